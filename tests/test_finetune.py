"""Fine-tuning learns: each task's tiny checkpoint, trained with LoRA on a small synthetic dataset on the CPU,
clearly beats its own base model on the held-out examples.

Thresholds (the tiny models are random, so "before" is chance level):
- caption (12 colour x shape classes, "a picture of a red circle"): BLEU-4 from < 0.2 to > 0.5, CIDEr +1.0;
- VQA (what colour / what shape, 7 answers): accuracy from <= 0.1 to >= 0.4;
- retrieval (6 kinds of synthetic sound, held-out clips): R@1 both ways from <= 0.5 to >= 0.75.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_shapes_dataset, make_sounds_dataset, run_cli
from mmdemo.jobs.train import TrainConfig, finetune
from mmdemo.models.loading import ADAPTER_META

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores


def _run(task, data, tmp_path, tiny_models, **overrides):
    config = TrainConfig.from_preset("quick", **overrides)
    phases = []
    result = finetune(task, data, tmp_path / "adapter", model=tiny_models[task], config=config,
                      workdir=tmp_path / "work", progress=lambda p: phases.append(p.phase))
    assert {"validating", "loading model", "preprocessing", "evaluating", "training", "saving"} <= set(phases)
    meta = json.loads((tmp_path / "adapter" / ADAPTER_META).read_text())
    assert meta["task"] == task and meta["metrics_after"] == result["metrics_after"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "PeftModel.from_pretrained" in (tmp_path / "adapter" / "README.md").read_text()
    return result


@pytest.mark.slow
def test_caption_lora_learns_shapes(tiny_models, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=4)
    r = _run("caption", data, tmp_path, tiny_models, learning_rate=1e-2, rank=16, alpha=32, epochs=1, min_steps=400)
    before, after = r["metrics_before"], r["metrics_after"]
    print(f"caption held-out: before {before} after {after}")
    assert before["bleu4"] < 0.2 and after["bleu4"] > 0.5, (before, after)
    assert after["cider"] > before["cider"] + 1.0, (before, after)
    assert r["examples"][0]["adapter"].startswith("a picture of")


@pytest.mark.slow
def test_vqa_lora_learns_colours_and_shapes(tiny_models, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", "vqa", per_class=4)
    r = _run("vqa", data, tmp_path, tiny_models, learning_rate=5e-3, rank=16, alpha=64, batch_size=16, epochs=1,
             min_steps=1200)
    before, after = r["metrics_before"], r["metrics_after"]
    print(f"vqa held-out: before {before} after {after}")
    assert before["accuracy"] <= 0.1 and after["accuracy"] >= 0.4, (before, after)


@pytest.mark.slow
def test_retrieval_lora_learns_sounds(tiny_models, tmp_path):
    make_sounds_dataset(tmp_path / "data" / "train", per_class=4)
    make_sounds_dataset(tmp_path / "data" / "test", per_class=2, start=4)
    r = _run("retrieval", tmp_path / "data", tmp_path, tiny_models, learning_rate=5e-3, epochs=1, min_steps=150)
    before, after = r["metrics_before"], r["metrics_after"]
    print(f"retrieval held-out: before {before} after {after}")
    assert before["text_to_audio_r1"] <= 0.5 and before["audio_to_text_r1"] <= 0.5, before
    assert after["text_to_audio_r1"] >= 0.75 and after["audio_to_text_r1"] >= 0.75, after


def test_cli_finetune_prints_the_final_record_and_refuses_bad_data(tiny_models, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    out = tmp_path / "adapter"
    proc = run_cli("finetune", "--task", "caption", "--data", str(data), "--out", str(out),
                   "--model", tiny_models["caption"], "--epochs", "1", "--min-steps", "3", "--lr", "1e-3",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines  # stdout holds the JSON record alone; progress goes to stderr
    record = json.loads(lines[0])
    assert set(record) == {"adapter", "metrics_before", "metrics_after"} and set(record["metrics_after"]) == {
        "bleu4", "cider"}
    assert (out / "adapter_config.json").is_file() and "training" in proc.stderr
    (data / "red_circle_0.png").unlink()
    proc = run_cli("finetune", "--task", "caption", "--data", str(data), "--out", str(tmp_path / "b"),
                   "--model", tiny_models["caption"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "names red_circle_0.png, which is not in the dataset" in proc.stderr
