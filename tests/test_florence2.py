"""Florence-2 for captions: the tiny checkpoint loads through the Hub code path, the app's captions are plain
``generate``'s tokens (short and detailed, 1 and 3 beams, a batch, with a LoRA adapter made by plain peft), and
what Florence-2 cannot do gets a sentence."""

from __future__ import annotations

import pytest

from mmdemo.errors import InputError
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import load
from tests.conftest import make_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def florence(tiny_dir) -> str:
    return str(tiny_dir / "florence2")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("florence-pictures")
    paths = [make_image(folder / "red.png", "red", "circle"), make_image(folder / "blue.png", "blue", "square", 80)]
    return paths, [Image.open(p).convert("RGB") for p in paths]


def plain_captions(folder: str, images, task: str, options: GenerationOptions, adapter: str | None = None):
    """What the model card's code writes: processor, ``generate``, ``batch_decode``."""
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    inputs = processor(text=[task] * len(images), images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, **options.kwargs())
    return [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]


def test_the_tiny_checkpoint_is_florence2_in_the_hub_layout(florence):
    loaded = load("caption", florence)
    assert type(loaded.model).__name__ == "Florence2ForConditionalGeneration"
    assert loaded.arch.model_type == "florence2" and loaded.arch.lora_targets == ("q_proj", "v_proj")
    assert loaded.processor.image_token == "<image>"


@pytest.mark.parametrize("detail,task", [("short", "<CAPTION>"), ("detailed", "<DETAILED_CAPTION>")])
@pytest.mark.parametrize("beams", [1, 3])
def test_captions_are_plain_generates_tokens(florence, pictures, detail, task, beams):
    paths, images = pictures
    options = GenerationOptions(num_beams=beams, max_new_tokens=12, min_new_tokens=2)
    ours = caption(paths, None, options, model=florence, detail=detail)
    assert ours == plain_captions(florence, images, task, options)
    assert all(ours), ours


def test_a_lora_adapter_made_with_plain_peft_captions_as_plain_peft_does(florence, pictures, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(1)
    base = Florence2ForConditionalGeneration.from_pretrained(florence)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter's B is not zero: make this one change the captions
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)

    paths, images = pictures
    options = GenerationOptions(num_beams=3, max_new_tokens=12, min_new_tokens=2)
    with_adapter = caption(paths, None, options, adapter=adapter, model=florence)
    assert with_adapter == plain_captions(florence, images, "<CAPTION>", options, adapter=str(adapter))
    assert with_adapter != caption(paths, None, options, model=florence)  # and the base is back without it


def test_what_florence2_cannot_do_gets_a_sentence(florence, tiny_models, pictures):
    paths, _ = pictures
    with pytest.raises(InputError, match="does not continue a text prefix"):
        caption(paths, "a picture of", model=florence)
    with pytest.raises(InputError, match="must be one of short, detailed, paragraph"):
        caption(paths, None, model=florence, detail="huge")
    with pytest.raises(InputError, match="short captions only"):
        caption(paths, None, model=tiny_models["caption"], detail="detailed")


def test_the_caption_tab_serves_a_florence2_checkpoint(florence, pictures, home):
    """``python app.py --caption-model <Florence-2>``: the tab's batched handler captions with it, and a prefix
    gets the sentence in its own row while the other visitor's request is served."""
    from mmdemo.ui import caption as caption_tab

    paths, images = pictures
    rows, info = caption_tab.caption_batch([[str(paths[0])], [str(paths[1])]], ["", "a photo of"], [3, 3], [12, 12],
                                           ["base", "base"], checkpoint=florence)
    options = GenerationOptions(num_beams=3, max_new_tokens=12, min_new_tokens=5)
    assert rows[0] == [[paths[0].name, plain_captions(florence, images[:1], "<CAPTION>", options)[0]]]
    assert "does not continue a text prefix" in rows[1][0][1] and rows[1][0][1].startswith("Refused: ")


def test_the_cli_writes_detailed_captions(florence, pictures):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    paths, images = pictures
    proc = subprocess.run([sys.executable, "-m", "mmdemo", "caption", str(paths[0]), "--model", florence,
                           "--detail", "detailed", "--num-beams", "1", "--max-new-tokens", "12",
                           "--min-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    options = GenerationOptions(num_beams=1, max_new_tokens=12, min_new_tokens=2)
    assert line["caption"] == plain_captions(florence, images[:1], "<DETAILED_CAPTION>", options)[0]
