"""Fast mode (``MMDEMO_FAST=1``) against the exact path and plain transformers: speed, and agreement with fp32.

    python bench/fast.py                    # full-size random-weight BLIP-base and CLAP, CPU
    python bench/fast.py --tiny --quick     # tiny checkpoints, smoke run
    python bench/fast.py --device cuda      # GPU: fast mode is CPU-only, so "fast" is the exact path there

Speed (one process, repetitions interleaved plain / exact / fast, median and spread):
- caption latency: 1 image, 3 beams, exactly 20 new tokens (min = max). Plain: ``BlipForConditionalGeneration``
  fp32 ``generate``. Exact: ``mmdemo.models.caption.caption`` without fast mode. Fast: the same with fast mode.
  One more column shows the piece "int8 except the LoRA target layers" (what the issue measured) against fast
  mode's int8 everywhere (LoRA targets included, as ``nn.Linear`` subclasses that peft can wrap).
- indexing 10-second WAV clips: plain is soundfile + ``ClapFeatureExtractor`` + ``get_audio_features`` fp32;
  exact and fast are ``AudioIndex.add_files``. The one-time export of the audio encoder is timed apart.

Agreement with fp32 (always on the CPU, where fast mode exists):
- captions, full-size random-weight BLIP-base: token agreement of fast vs exact on the timing images (random
  weights make the next-token distribution flat, so this is a pessimistic figure);
- captions after a LoRA fine-tune: a tiny BLIP (the project's tiny checkpoint) fine-tuned with
  ``mmdemo.jobs.train.finetune`` on ``bench/learning.py``'s pictures (12 classes, two-word captions); on the
  held-out pictures, token agreement and the BLEU-4 / CIDEr of fast minus exact (``mmdemo.jobs.evaluate``);
- retrieval, full-size random-weight CLAP: cosine of fast vs exact clip embeddings, and the overlap of the
  top-10 clips of text queries ranked over each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import build_checkpoint, cache_dir, environment, fmt, sync, write_section

TOKENS = 20
BEAMS = 3


def _spread(xs: list[float]) -> str:
    return f"{fmt(statistics.median(xs), 's')} ({fmt(min(xs), 's')}-{fmt(max(xs), 's')})"


def _ratio(base: list[float], ours: list[float]) -> str:
    """Median of the per-repetition ratios (each pair ran back to back), and their range."""
    r = [b / o for b, o in zip(base, ours)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions with the same token, over the longer of each pair of sequences."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    return same / max(1, total)


def _images(n: int, size: int = 384):
    import torch
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(size, size, 3, generator=rng) * 255).byte().numpy()) for _ in range(n)]


# -------------------------------------------------------------------------------------------------- captions
def bench_caption(folder: str, device: str, reps: int, agree_images: int) -> tuple[list[dict], dict]:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from mmdemo.models import fast
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import GenerationOptions
    from mmdemo.models.loading import _load_uncached, load

    images = _images(max(1, agree_images))
    processor = BlipProcessor.from_pretrained(folder)
    plain = BlipForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    forced = dict(num_beams=BEAMS, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    options = GenerationOptions(num_beams=BEAMS, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    exact = load("caption", folder, device=device, fast=False)
    quick = load("caption", folder, device=device, fast=True)
    variants = {"plain": None, "exact": exact, "fast": quick}
    if quick.fast:  # the piece the issue measured: int8 only where no LoRA goes (peft then refuses nothing)
        part = _load_uncached("caption", folder, device, torch.float32)
        fast.quantize_linears(part.model, keep_float=part.arch.lora_targets)
        variants = {"plain": None, "exact": exact, "int8 except LoRA targets": part, "fast": quick}

    def run(name, img):
        if name == "plain":
            with torch.no_grad():
                return plain.generate(**processor(images=img, return_tensors="pt").to(device), **forced)
        return caption([img], options=options, model=variants[name])

    times: dict[str, list[float]] = {k: [] for k in variants}
    for k in variants:
        run(k, images[0])  # warm-up
    for _ in range(reps):
        for k in variants:
            sync(device)
            t0 = time.perf_counter()
            run(k, images[0])
            sync(device)
            times[k].append(time.perf_counter() - t0)

    rows = []
    for k in variants:
        if k == "plain":
            continue
        target = ">= 2.5x (CPU)" if k == "fast" else ("token-identical" if k == "exact" else "")
        rows.append({"measure": f"caption latency, 1 image, {BEAMS} beams, {TOKENS} tokens: {k}",
                     "baseline": _spread(times["plain"]), "ours": _spread(times[k]),
                     "ratio": _ratio(times["plain"], times[k]), "target": target})

    agreement = {"model": f"{'tiny' if 'tiny' in folder else 'full-size'} random-weight BLIP", "images": len(images)}
    if quick.fast:
        ids = {}
        for k in ("exact", "fast"):
            m = variants[k]
            outs = []
            for img in images:
                inputs = m.processor(images=img, return_tensors="pt").to(device)
                with m.using(None) as model, torch.inference_mode():
                    outs.append(model.generate(**inputs, **forced)[0].tolist())
            ids[k] = outs
        with torch.no_grad():
            plain_ids = [plain.generate(**processor(images=img, return_tensors="pt").to(device), **forced)[0].tolist()
                         for img in images]
        agreement.update(exact_vs_plain_identical=sum(a == b for a, b in zip(ids["exact"], plain_ids)),
                         token_agreement=round(token_agreement(ids["fast"], ids["exact"]), 4),
                         identical=sum(a == b for a, b in zip(ids["fast"], ids["exact"])))
    return rows, agreement


def finetuned_agreement(work: Path, steps: int) -> dict:
    """A tiny BLIP fine-tuned on pictures; held-out captions of fast vs exact with the adapter."""
    import torch
    from learning import make_pictures

    from mmdemo.data import load_dataset
    from mmdemo.jobs.evaluate import bleu4, cider, sentence_bleu
    from mmdemo.jobs.train import TrainConfig, finetune
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import CAPTION_DEFAULTS, for_adapter
    from mmdemo.models.loading import load
    from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models

    tiny = str(write_tiny_models(work / "tiny", [TINY_FOR_TASK["caption"]])[TINY_FOR_TASK["caption"]])
    data = make_pictures(work / "pictures", "caption")
    per_epoch = -(-12 * 12 // 8)
    config = TrainConfig.from_preset("quick", epochs=max(1, steps // per_epoch), learning_rate=1e-3, rank=16,
                                     batch_size=8, min_steps=0, seed=0)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from more
    try:
        result = finetune("caption", data, work / "adapter", model=tiny, config=config, workdir=work / "ft-work",
                          device="cpu")
        train_s = time.perf_counter() - t0
        test = load_dataset(data, "caption", work / "ds").test
        adapter = work / "adapter"
        options = for_adapter(CAPTION_DEFAULTS, adapter)
        files = list(dict.fromkeys(e.file for e in test))
        path = {e.file: e.path for e in test}
        refs = [[e.text for e in test if e.file == f] for f in files]
        out = {}
        for name, fast in (("exact", False), ("fast", True)):
            loaded = load("caption", tiny, device="cpu", fast=fast)
            out[name] = [caption([path[f]], options=options, adapter=adapter, model=loaded)[0] for f in files]
    finally:
        torch.set_num_threads(before)
    tok = load("caption", tiny, device="cpu", fast=False).processor.tokenizer
    ids = {k: [tok(t, add_special_tokens=False)["input_ids"] for t in v] for k, v in out.items()}
    scores = {k: {"bleu4": bleu4(v, refs), "cider": cider(v, refs),
                  "sentence_bleu": statistics.mean(sentence_bleu(o, r) for o, r in zip(v, refs))}
              for k, v in out.items()}
    return {"model": f"tiny BLIP ({TINY_FOR_TASK['caption']}) + LoRA fine-tuned {result['training']['steps_done']} "
                     f"steps on {len(files)} held-out pictures", "train_seconds": round(train_s, 1),
            "token_agreement": round(token_agreement(ids["fast"], ids["exact"]), 4),
            "identical": sum(a == b for a, b in zip(out["fast"], out["exact"])), "images": len(files),
            "bleu4": {k: round(v["bleu4"], 4) for k, v in scores.items()},
            "cider": {k: round(v["cider"], 4) for k, v in scores.items()},
            "bleu4_diff": round(scores["fast"]["bleu4"] - scores["exact"]["bleu4"], 4),
            "cider_diff": round(scores["fast"]["cider"] - scores["exact"]["cider"], 4),
            "sentence_bleu": {k: round(v["sentence_bleu"], 4) for k, v in scores.items()}}


# ------------------------------------------------------------------------------------------------- retrieval
def bench_index(folder: str, device: str, reps: int, clips: int, work: Path) -> tuple[list[dict], dict]:
    import soundfile as sf
    import torch
    from index import make_clips
    from transformers import ClapFeatureExtractor, ClapModel

    from mmdemo.models import fast
    from mmdemo.models.loading import load
    from mmdemo.models.retrieval import AudioIndex, Embedder

    paths = make_clips(work / "clips", clips)
    fe = ClapFeatureExtractor.from_pretrained(folder)
    plain = ClapModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    exact = Embedder(load("retrieval", folder, device=device, fast=False))
    quick = Embedder(load("retrieval", folder, device=device, fast=True))
    t0 = time.perf_counter()
    exported = fast.audio_encoder(quick.loaded) is not None
    export_s = time.perf_counter() - t0

    def plain_run():
        for s in range(0, len(paths), 32):
            waves = [sf.read(f, dtype="float32")[0] for f in paths[s:s + 32]]
            feats = fe(waves, sampling_rate=48000, return_tensors="pt").to(device)
            with torch.no_grad():
                plain.get_audio_features(**feats)

    runs = {"plain": plain_run}
    for name, emb in (("exact", exact), ("fast", quick)):
        def ours(emb=emb, name=name):
            shutil.rmtree(work / f"index-{name}", ignore_errors=True)
            index = AudioIndex.open_or_create(work / f"index-{name}", emb.checkpoint, emb.dim)
            assert len(index.add_files(paths, emb).added) == len(paths)
        runs[name] = ours
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    rows = []
    for k in ("exact", "fast"):
        rows.append({"measure": f"index {clips} ten-second WAV clips: {k}",
                     "baseline": _spread(times["plain"]), "ours": _spread(times[k]),
                     "ratio": _ratio(times["plain"], times[k]), "target": ">= 1.5x (CPU)" if k == "fast" else ""})

    agreement: dict = {"model": f"{'tiny' if 'tiny' in folder else 'full-size'} random-weight CLAP",
                       "exported": exported,
                       "export_seconds_first_use": round(export_s, 1)}
    if exported:
        from learning import make_sounds

        sounds = make_sounds(work / "sounds", train_per_class=1, test_per_class=3)
        files = sorted((sounds / "test").glob("*.wav"))
        a, b = exact.files(files), quick.files(files)
        cos = (a * b).sum(axis=1)
        queries = ["a rising buzz", "a low hum", "high beeps", "a falling tone", "noise", "a steady low beep",
                   "a high buzz", "a hum that falls"]
        text = exact.texts(queries)
        overlaps = [len(set(np.argsort(-(a @ q))[:10]) & set(np.argsort(-(b @ q))[:10])) / 10 for q in text]
        agreement.update(clips=len(files), cosine_min=round(float(cos.min()), 5),
                         cosine_median=round(float(np.median(cos)), 5), queries=len(queries),
                         top10_overlap_mean=round(float(np.mean(overlaps)), 3),
                         top10_overlap_min=round(float(np.min(overlaps)), 3))
    return rows, agreement


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints (smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and clips")
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5, quick 2)")
    p.add_argument("--clips", type=int, default=None, help="clips indexed per repetition (default 16, quick 4)")
    p.add_argument("--agree-images", type=int, default=None, help="images for the full-size token agreement")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps of the tiny LoRA fine-tune (default 300)")
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)

    from mmdemo.models.loading import pick_device

    device = pick_device(args.device)
    reps = args.reps or (2 if args.quick else 5)
    clips = args.clips or (4 if args.quick else 16)
    agree_images = args.agree_images or (2 if args.quick else 8)
    steps = args.finetune_steps or (20 if args.quick else 300)
    caption_dir = str(build_checkpoint("caption", cache_dir() / ("tiny-caption" if args.tiny else "blip-caption-base"),
                                       tiny=args.tiny))
    clap_dir = str(build_checkpoint("retrieval", cache_dir() / ("tiny-clap" if args.tiny else "clap-htsat-unfused"),
                                    tiny=args.tiny))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["MMDEMO_HOME"] = str(work / "home")  # the export cache starts empty: its cost is measured
        rows, cap_agree = bench_caption(caption_dir, device, reps, agree_images)
        idx_rows, idx_agree = bench_index(clap_dir, device, reps, clips, work)
        ft_agree = finetuned_agreement(work / "finetune", steps)

    env = environment(device)
    cmd = "python bench/fast.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    name = "fast mode" + (" (tiny smoke)" if args.tiny else "")
    on_gpu = not device.startswith("cpu")
    lines = [f"## {name}", "", f"Command: `{cmd}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "Ratios are the median of per-repetition ratios (plain / ours, run back to back), with their range; "
             "times are medians (min-max). Fast mode is `MMDEMO_FAST=1`: int8 Linear layers in BLIP, CLAP's "
             "audio encoder exported to onnxruntime int8." + (" It is CPU-only: on this GPU the \"fast\" rows "
                                                               "run the exact path." if on_gpu else ""), "",
             "| measure | baseline (plain transformers) | mmdemo | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for r in rows + idx_rows:
        lines.append(f"| {r['measure']} | {r['baseline']} | {r['ours']} | {r['ratio']} | {r.get('target', '')} |")
    lines += ["", "Agreement of fast mode with fp32 (CPU):", ""]
    if "token_agreement" in cap_agree:
        lines.append(f"- captions, {cap_agree['model']}, {cap_agree['images']} images, {BEAMS} beams, {TOKENS} "
                     f"tokens: token agreement {cap_agree['token_agreement']:.1%}, identical captions "
                     f"{cap_agree['identical']}/{cap_agree['images']} (exact path vs plain `generate`: "
                     f"{cap_agree['exact_vs_plain_identical']}/{cap_agree['images']} identical)")
    lines.append(f"- captions, {ft_agree['model']} (fine-tune {ft_agree['train_seconds']} s): token agreement "
                 f"{ft_agree['token_agreement']:.1%}, identical {ft_agree['identical']}/{ft_agree['images']}; "
                 f"BLEU-4 exact {ft_agree['bleu4']['exact']:.4f}, fast {ft_agree['bleu4']['fast']:.4f} "
                 f"(difference {ft_agree['bleu4_diff']:+.4f}; two-word captions have no 4-grams, so smoothed "
                 f"sentence BLEU: exact {ft_agree['sentence_bleu']['exact']:.4f}, fast "
                 f"{ft_agree['sentence_bleu']['fast']:.4f}); CIDEr exact {ft_agree['cider']['exact']:.4f}, fast "
                 f"{ft_agree['cider']['fast']:.4f} (difference {ft_agree['cider_diff']:+.4f})")
    if "cosine_min" in idx_agree:
        lines.append(f"- retrieval, {idx_agree['model']}, {idx_agree['clips']} clips of 3-16 s: cosine of fast vs "
                     f"fp32 clip embeddings min {idx_agree['cosine_min']:.5f}, median "
                     f"{idx_agree['cosine_median']:.5f}; top-10 overlap of {idx_agree['queries']} text queries mean "
                     f"{idx_agree['top10_overlap_mean']:.0%}, min {idx_agree['top10_overlap_min']:.0%}; first-use "
                     f"export {idx_agree['export_seconds_first_use']} s (once per checkpoint, then cached)")
    else:
        lines.append(f"- retrieval: the audio encoder was not exported on {device} (fast mode is CPU-only): "
                     f"the fast rows ran the exact torch path")
    section = "\n".join(lines) + "\n"
    print(section)
    print(json.dumps({"bench": name, "env": env, "rows": rows + idx_rows,
                      "agreement": {"caption": cap_agree, "caption_finetuned": ft_agree, "retrieval": idx_agree}}))
    if args.write:
        write_section(name, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
