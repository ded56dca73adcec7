"""LoRA adapters are injected once and switched per request without reloading the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_image
from mmdemo.errors import InputError
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import ADAPTER_META, load

OPTS = GenerationOptions(num_beams=1, max_new_tokens=8, min_new_tokens=8)


def make_adapter(checkpoint: str, out, seed: int, task: str = "caption") -> str:
    """A random (non-zero) LoRA adapter in the PEFT on-disk format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    base = BlipForConditionalGeneration.from_pretrained(checkpoint)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["query", "value"],
                                           init_lora_weights=False))
    peft.save_pretrained(out)
    (out / ADAPTER_META).write_text(json.dumps({"task": task}))
    return str(out)


def test_switch_adapters_per_request(tiny_models, tmp_path):
    img = make_image(tmp_path / "a.png")
    loaded = load("caption", tiny_models["caption"])
    base_before = caption([img], options=OPTS, model=loaded)
    a1 = make_adapter(tiny_models["caption"], tmp_path / "a1", seed=1)
    a2 = make_adapter(tiny_models["caption"], tmp_path / "a2", seed=2)
    with_a1 = caption([img], options=OPTS, model=loaded, adapter=a1)
    with_a2 = caption([img], options=OPTS, model=loaded, adapter=a2)
    base_after = caption([img], options=OPTS, model=loaded)
    assert with_a1 != base_before and with_a2 != with_a1
    assert base_after == base_before  # base-only requests still possible
    assert caption([img], options=OPTS, model=loaded, adapter=a1) == with_a1  # switching back
    # each adapter loaded once (other tests may have loaded theirs into the same cached model)
    mine = [k for k in loaded.adapters if Path(k).parent == tmp_path]
    assert len(mine) == 2 and load("caption", tiny_models["caption"]) is loaded


def test_adapter_loads_outside_the_project(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    path = make_adapter(tiny_models["caption"], tmp_path / "a", seed=3)
    model = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_models["caption"]), path)
    assert model.active_adapter == "default"


def test_bad_adapters_are_refused(tiny_models, tmp_path):
    loaded = load("caption", tiny_models["caption"])
    img = make_image(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a LoRA adapter folder"):
        caption([img], model=loaded, adapter=tmp_path / "empty")
    wrong = make_adapter(tiny_models["caption"], tmp_path / "w", seed=4, task="vqa")
    with pytest.raises(InputError, match="trained for vqa"):
        caption([img], model=loaded, adapter=wrong)


def test_bf16_base_with_adapter(tiny_models, tmp_path):
    """The dtype a CUDA GPU gets (bf16), exercised on the CPU: base and adapter requests both run."""
    import torch

    from mmdemo.models.retrieval import AudioIndex, embedder

    img = make_image(tmp_path / "a.png")
    loaded = load("caption", tiny_models["caption"], dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    adapter = make_adapter(tiny_models["caption"], tmp_path / "a1", seed=5)
    assert caption([img], options=OPTS, model=loaded)[0]
    assert caption([img], options=OPTS, model=loaded, adapter=adapter)[0]

    from conftest import make_tone

    emb = embedder(load("retrieval", tiny_models["retrieval"], dtype="bfloat16"))
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, emb.dim)
    index.add_files([make_tone(tmp_path / "t.wav"), make_tone(tmp_path / "n.wav", kind="noise")], emb)
    assert index.embeddings.dtype.name == "float32" and len(index.search_text("a tone", emb)) == 2
