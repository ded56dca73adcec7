"""Florence-2 and SmolVLM fine-tune through the same job path as BLIP (``finetune``: dataset checks, the family's
training inputs, the Trainer, before/after scores, ``mmdemo.json``), learn the task on a small dataset, and the
adapter they save loads with plain peft and decodes there as in the app."""

from __future__ import annotations

import json

import pytest

from bench.learning import make_pictures
from mmdemo.jobs.train import TrainConfig, finetune
from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS, for_adapter
from mmdemo.models.loading import ADAPTER_META

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(600)]


def plain_peft(model_class: str, folder: str, adapter: str):
    import transformers
    from peft import PeftModel
    from transformers import AutoProcessor

    model = getattr(transformers, model_class).from_pretrained(folder)
    return PeftModel.from_pretrained(model, adapter).eval(), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("family,task,steps,metric,least", [
    ("florence2", "caption", 240, "cider", 0.3),
    ("smolvlm", "caption", 160, "cider", 0.3),
    ("smolvlm", "vqa", 160, "accuracy", 0.25),  # guessing: (1/4 + 1/3) / 2
])
def test_a_family_learns_through_the_job_path(family, task, steps, metric, least, tiny_dir, tmp_path):
    import torch
    from PIL import Image

    from mmdemo.models.caption import caption
    from mmdemo.models.vqa import answer_pairs

    folder = str(tiny_dir / family)
    data = make_pictures(tmp_path / "data", task, train_per_class=3, test_per_class=1)
    config = TrainConfig.from_preset("quick", epochs=1, learning_rate=5e-3, rank=16, min_steps=steps)
    result = finetune(task, data, tmp_path / "adapter", model=folder, config=config, workdir=tmp_path / "work")
    print(json.dumps({k: result[k] for k in ("metrics_before", "metrics_after", "training")}))
    assert result["training"]["steps_done"] == steps
    assert result["metrics_after"][metric] >= least > result["metrics_before"][metric], result["metrics_after"]
    assert result["losses"][-1]["loss"] < result["losses"][0]["loss"]
    adapter = tmp_path / "adapter"
    meta = json.loads((adapter / ADAPTER_META).read_text())
    assert meta["task"] == task and meta["model_class"] in ("Florence2ForConditionalGeneration",
                                                           "Idefics3ForConditionalGeneration")

    # the adapter in plain peft decodes the held-out pictures as the app does
    rows = [r for r in result["examples"]][:2]
    paths = [data / r["file"] for r in rows]
    model, processor = plain_peft(meta["model_class"], folder, str(adapter))
    options = for_adapter(CAPTION_DEFAULTS if task == "caption" else VQA_DEFAULTS, adapter)
    images = [Image.open(p).convert("RGB") for p in paths]
    if family == "florence2":
        inputs = processor(text=["<CAPTION>"] * len(images), images=images, return_tensors="pt")
    else:
        from mmdemo.models.smolvlm import DETAIL_INSTRUCTIONS, chat_prompt

        processor.tokenizer.padding_side = "left"
        texts = [DETAIL_INSTRUCTIONS["short"]] * len(rows) if task == "caption" else [r["question"] for r in rows]
        inputs = processor(text=[chat_prompt(processor, t) for t in texts], images=[[i] for i in images],
                           return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, **options.kwargs())
    if family == "smolvlm":
        out = out[:, inputs["input_ids"].shape[1]:]
    plain = [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]
    if task == "caption":
        ours = caption(paths, None, options, adapter=adapter, model=folder)
    else:
        ours = answer_pairs(list(zip(paths, [r["question"] for r in rows])), options, adapter=adapter, model=folder)
    assert ours == plain
