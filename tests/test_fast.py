"""Fast mode (MMDEMO_FAST=1): off by default; int8 BLIP layers that adapters still wrap; the exported CLAP audio
encoder agrees with torch, is cached, and falls back to torch when the export fails; agreement with fp32."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import make_image, make_tone
from mmdemo.config import Settings, get_settings
from mmdemo.errors import InputError
from mmdemo.models import fast
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import ADAPTER_META, clear_cache, load
from mmdemo.models.vqa import answer_pairs

OPTS = GenerationOptions(num_beams=3, max_new_tokens=8, min_new_tokens=8)
# Measured: min cosine 0.99956 of the int8 export to torch fp32 on the tiny CLAP (full size: 0.99951)
AUDIO_COSINE = 0.995
# Measured on these 8 random images with the tiny BLIP, 3 beams, 12 tokens: 77% of the tokens agree
TOKEN_AGREEMENT = 0.6


@pytest.fixture(autouse=True)
def _fresh(one_thread, home, monkeypatch):
    monkeypatch.setenv("MMDEMO_FAST", "")  # recorded, so that what a test (or app.py --fast) sets is undone
    monkeypatch.delenv("MMDEMO_FAST")
    yield
    clear_cache()  # fast models hold a per-home export; no other test should get them


def _linears(model):
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) or fast.is_int8(m)}


def make_adapter(checkpoint: str, out, cls: str, targets, seed: int = 1, task: str = "caption") -> str:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = getattr(transformers, cls).from_pretrained(checkpoint)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(out)
    (out / ADAPTER_META).write_text(json.dumps({"task": task}))
    return str(out)


def test_off_by_default_and_the_setting(tiny_models, monkeypatch):
    assert Settings().fast is False and get_settings().fast is False
    loaded = load("caption", tiny_models["caption"])
    assert not loaded.fast and not any(fast.is_int8(m) for m in loaded.model.modules())
    monkeypatch.setenv("MMDEMO_FAST", "1")
    assert get_settings().fast is True
    assert load("caption", tiny_models["caption"]).fast  # a separate model, not the exact one changed
    assert not any(fast.is_int8(m) for m in loaded.model.modules())
    monkeypatch.setenv("MMDEMO_FAST", "maybe")
    with pytest.raises(InputError, match="MMDEMO_FAST must be 1"):
        get_settings()


def test_app_flag_turns_it_on(monkeypatch, home):
    from mmdemo.ui.app import configure, parse_args

    assert configure(parse_args(["--fast", "--home", str(home)])).settings.fast is True
    assert configure(parse_args(["--home", str(home)])).settings.fast is False


def test_fast_not_on_other_dtypes(tiny_models):
    assert not load("caption", tiny_models["caption"], dtype="bfloat16", fast=True).fast


def test_captions_and_vqa_run_with_int8_layers(tiny_models, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("MMDEMO_FAST", "1")
    img = make_image(tmp_path / "a.png")
    int8, base = fast.int8_classes()
    for task in ("caption", "vqa"):
        loaded = load(task, tiny_models[task])
        layers = _linears(loaded.model)
        assert layers and not any(type(m) is torch.nn.Linear for m in layers.values())  # every Linear is int8
        for name, m in layers.items():
            is_target = name.rsplit(".", 1)[-1] in loaded.arch.lora_targets
            assert isinstance(m, base if is_target else int8), name
        assert any(isinstance(m, base) for m in layers.values()) and any(type(m) is int8 for m in layers.values())
    assert caption([img], options=OPTS, model=load("caption", tiny_models["caption"]))[0]
    assert answer_pairs([(img, "what color is it?")], model=load("vqa", tiny_models["vqa"]))[0]


def test_lora_adapter_loads_and_applies_in_fast_mode(tiny_models, tmp_path):
    """The adapter's update runs beside the int8 base: its effect matches what it does to the exact model."""
    import torch

    ckpt = tiny_models["caption"]
    adapter = make_adapter(ckpt, tmp_path / "a", "BlipForConditionalGeneration", ["query", "value", "qkv"])
    exact, quick = load("caption", ckpt, fast=False), load("caption", ckpt, fast=True)
    img = make_image(tmp_path / "a.png", color="blue")
    from PIL import Image

    inputs = exact.processor(images=Image.open(img).convert("RGB"), text="a picture of", return_tensors="pt")

    def logits(loaded, with_adapter):
        with loaded.using(adapter if with_adapter else None) as model, torch.inference_mode():
            return model(**inputs).logits

    base_e, base_f = logits(exact, False), logits(quick, False)
    lora_e, lora_f = logits(exact, True), logits(quick, True)
    assert quick.peft is not None and any("lora_A" in n for n, _ in quick.model.named_modules())
    effect = (lora_e - base_e).norm()
    assert effect > 0.1 * base_e.norm()  # the adapter changes the output a lot
    # and fast mode applies it: close to the exact adapter (measured 0.03 of the effect)
    assert (lora_f - lora_e).norm() < 0.25 * effect
    assert ((lora_f - base_f) - (lora_e - base_e)).norm() < 0.25 * effect  # the same change in both
    assert caption([img], options=OPTS, model=quick, adapter=adapter) != caption([img], options=OPTS, model=quick)


def test_caption_agreement_with_fp32(tiny_models):
    """Fast vs exact on the same images: most tokens agree (measured, with margin)."""
    import torch
    from PIL import Image

    exact = load("caption", tiny_models["caption"], fast=False)
    quick = load("caption", tiny_models["caption"], fast=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    kwargs = GenerationOptions(num_beams=3, max_new_tokens=12, min_new_tokens=12).kwargs()
    same = total = 0
    for img in images:
        out = []
        for loaded in (exact, quick):
            with loaded.using(None) as model, torch.inference_mode():
                out.append(model.generate(**loaded.processor(images=img, return_tensors="pt"), **kwargs)[0])
        n = min(len(out[0]), len(out[1]))
        same += int((out[0][:n] == out[1][:n]).sum())
        total += max(len(out[0]), len(out[1]))
    assert same / total >= TOKEN_AGREEMENT


def _clips(tmp_path):
    return [make_tone(tmp_path / "t1.wav"), make_tone(tmp_path / "n.wav", kind="noise"),
            make_tone(tmp_path / "long.wav", seconds=14.0)]


def test_exported_audio_encoder_agrees_and_is_cached(tiny_models, tmp_path, home, monkeypatch):
    from mmdemo.models.retrieval import Embedder

    clips = _clips(tmp_path)
    exact = Embedder(load("retrieval", tiny_models["retrieval"], fast=False)).files(clips)
    quick_loaded = load("retrieval", tiny_models["retrieval"], fast=True)
    quick = Embedder(quick_loaded).files(clips)
    assert isinstance(quick_loaded.fast_audio, fast.OnnxAudio)
    cached = fast.cache_dir(quick_loaded) / fast.AUDIO_FILE
    assert cached.is_file() and cached.parent.parent == home / "fast"
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    cos = (exact * quick).sum(axis=1)
    assert cos.min() >= AUDIO_COSINE and not np.array_equal(exact, quick)  # close, and not the torch path

    # a new process (here: an emptied model cache) uses the cached export instead of exporting again
    clear_cache()
    monkeypatch.setattr(fast, "export_audio", lambda *a: pytest.fail("exported again"))
    again_loaded = load("retrieval", tiny_models["retrieval"], fast=True)
    again = Embedder(again_loaded).files(clips)
    assert isinstance(again_loaded.fast_audio, fast.OnnxAudio)
    np.testing.assert_allclose(again, quick, atol=1e-6)


def test_failed_export_falls_back_to_torch(tiny_models, tmp_path, monkeypatch, caplog):
    from mmdemo.models.retrieval import Embedder

    def broken(loaded, target):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(fast, "export_audio", broken)
    clips = _clips(tmp_path)
    exact = Embedder(load("retrieval", tiny_models["retrieval"], fast=False)).files(clips)
    loaded = load("retrieval", tiny_models["retrieval"], fast=True)
    with caplog.at_level(logging.WARNING, logger="mmdemo.models.fast"):
        got = Embedder(loaded).files(clips)
        Embedder(loaded).files(clips[:1])  # not tried again, not logged again
    assert loaded.fast_audio is False
    np.testing.assert_array_equal(got, exact)  # the exact torch path
    lines = [r for r in caplog.records if r.name == "mmdemo.models.fast"]
    assert len(lines) == 1 and "exporter exploded" in lines[0].getMessage() and "torch" in lines[0].getMessage()


def test_audio_adapter_uses_torch_text_adapter_keeps_the_export(tiny_models, tmp_path):
    from mmdemo.models.retrieval import Embedder

    ckpt = tiny_models["retrieval"]
    both = make_adapter(ckpt, tmp_path / "both", "ClapModel", ["query", "value"], task="retrieval")
    text_only = make_adapter(ckpt, tmp_path / "text", "ClapModel", r".*text_model.*\.(query|value)", task="retrieval")
    loaded = load("retrieval", ckpt, fast=True)
    exact = load("retrieval", ckpt, fast=False)
    clips = _clips(tmp_path)
    assert fast.audio_for(loaded, both) is None  # the export has no LoRA in it
    assert isinstance(fast.audio_for(loaded, text_only), fast.OnnxAudio)
    # with the audio adapter, clips are embedded by torch with the LoRA: exactly the exact model's embeddings
    np.testing.assert_allclose(Embedder(loaded, adapter=both).files(clips),
                               Embedder(exact, adapter=both).files(clips), atol=1e-6)


def test_bench_smoke(tmp_path):
    """bench/fast.py on the tiny checkpoints: timing rows with ratios, and every agreement figure."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "MMDEMO_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/fast.py", "--tiny", "--quick", "--reps", "1", "--clips", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"].startswith("fast mode")
    assert {r["measure"].rsplit(": ", 1)[-1] for r in record["rows"]} >= {"exact", "fast"}
    assert all(float(r["ratio"].split("x")[0]) > 0 for r in record["rows"])
    agree = record["agreement"]
    assert 0 <= agree["caption"]["token_agreement"] <= 1 and 0 <= agree["caption_finetuned"]["token_agreement"] <= 1
    assert "cider_diff" in agree["caption_finetuned"] and "bleu4_diff" in agree["caption_finetuned"]
    assert agree["retrieval"]["exported"] and agree["retrieval"]["cosine_min"] >= AUDIO_COSINE
    assert 0 <= agree["retrieval"]["top10_overlap_mean"] <= 1


# Measured on the tiny CLAP, 10 queries: min cosine 0.99969 of the int8 text tower to fp32 (full size: see
# bench/search.py's fast-mode rows)
TEXT_COSINE = 0.998


def test_text_tower_is_int8_and_agrees_with_fp32(tiny_models):
    import torch

    from mmdemo.models.retrieval import Embedder

    quick = load("retrieval", tiny_models["retrieval"], fast=True)
    exact = load("retrieval", tiny_models["retrieval"], fast=False)
    int8, base = fast.int8_classes()
    text_layers = {n: m for n, m in _linears(quick.model).items() if n.startswith(("text_model", "text_projection"))}
    assert text_layers and all(fast.is_int8(m) for m in text_layers.values())
    assert all(isinstance(m, base) for n, m in text_layers.items() if n.rsplit(".", 1)[-1] in ("query", "value"))
    # the audio tower stays fp32 in torch (the exported encoder replaces it; adapters on it need torch)
    assert all(type(m) is torch.nn.Linear for n, m in _linears(quick.model).items() if n.startswith("audio_model"))
    texts = ["a barking dog", "rain on a tin roof", "a high beep", "a siren far away", "wind in trees"]
    q, e = Embedder(quick).texts(texts), Embedder(exact).texts(texts)
    cos = (q * e).sum(axis=1)
    assert cos.min() >= TEXT_COSINE and not np.array_equal(q, e)


def test_text_adapter_applies_in_fast_mode(tiny_models, tmp_path):
    from mmdemo.models.retrieval import Embedder

    ckpt = tiny_models["retrieval"]
    adapter = make_adapter(ckpt, tmp_path / "t", "ClapModel", r".*text_model.*\.(query|value)", seed=5,
                           task="retrieval")
    quick, exact = load("retrieval", ckpt, fast=True), load("retrieval", ckpt, fast=False)
    texts = ["a barking dog", "rain on a tin roof", "a high beep"]
    base_e, lora_e = Embedder(exact).texts(texts), Embedder(exact, adapter=adapter).texts(texts)
    base_f, lora_f = Embedder(quick).texts(texts), Embedder(quick, adapter=adapter).texts(texts)
    effect = np.linalg.norm(lora_e - base_e)
    assert effect > 0.1  # the adapter moves the embeddings
    assert np.linalg.norm(lora_f - lora_e) < 0.25 * effect  # and fast mode applies it like the exact model
    assert np.linalg.norm((lora_f - base_f) - (lora_e - base_e)) < 0.25 * effect  # the same change in both


def test_fast_search_over_a_large_index_rescores_int8_candidates(tiny_models, tmp_path):
    from mmdemo.models.retrieval import PREFILTER_MIN_ROWS, AudioIndex, Clip, Embedder, Int8Rows

    if not Int8Rows.usable():
        pytest.skip("no fbgemm int8 kernel in this torch build")
    quick = Embedder(load("retrieval", tiny_models["retrieval"], fast=True))
    dim = quick.dim
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((PREFILTER_MIN_ROWS, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    clips = [Clip(path=f"/c{i}.wav", name=f"c{i}.wav", sha256=f"{i:064x}", duration=1.0) for i in range(len(rows))]
    index = AudioIndex(tmp_path / "idx", quick.checkpoint, dim, clips, rows)
    overlap = []
    for text in ["a barking dog", "rain on a tin roof", "a high beep", "a siren far away", "wind in trees"]:
        vec = quick.texts([text])[0]
        hits = index.search_text(text, quick, top_k=10)
        assert index._int8 is not None and index._int8.source is rows  # the int8 pass ran
        exact = np.argsort(-(rows @ vec), kind="stable")[:10]
        for h in hits:  # the scores shown are fp32's
            assert abs(h.score - float(rows[int(h.name[1:-4])] @ vec)) < 1e-5
        overlap.append(len({h.name for h in hits} & {f"c{i}.wav" for i in exact}) / 10)
    assert np.mean(overlap) >= 0.9
