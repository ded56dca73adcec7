"""One run of the model layer and a Quick fine-tuning job on a GPU, as the foundation and fine-tuning issues ask.

    python bench/gpu_check.py            # on a CUDA machine: bf16, tiny + full-size random-weight models
    python bench/gpu_check.py --tiny     # tiny models only (the CPU smoke run in the test suite)

It loads the tiny checkpoints and full-size random-weight BLIP-base (captioning, VQA) and CLAP (built
from their default configs, see common.py) through the project's loader in the device's dtype, captions
and questions the bundled images, indexes the bundled sounds and searches them by text and by sound;
then runs a Quick LoRA job (``mmdemo.jobs.finetune``) on ``--examples`` synthetic shape images and
reports its wall time, training samples/s and peak GPU memory. Prints one JSON record per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, build_checkpoint, cache_dir, environment


def shapes_dataset(root: Path, n: int, size: int) -> Path:
    """``n`` coloured shapes with captions, in the ImageFolder layout."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colors, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, shape = colors[i % 4], shapes[(i // 4) % 3]
        img = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(img)
        s = rng.randint(size // 3, size * 3 // 4)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        if shape == "circle":
            d.ellipse((x, y, x + s, y + s), fill=color)
        elif shape == "square":
            d.rectangle((x, y, x + s, y + s), fill=color)
        else:
            d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
        img.save(root / f"img{i:04d}.png")
        rows.append({"file_name": f"img{i:04d}.png", "text": f"a picture of a {color} {shape}"})
    with (root / "metadata.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file_name", "text"])
        w.writeheader()
        w.writerows(rows)
    return root


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints only")
    p.add_argument("--device", default=None)
    p.add_argument("--examples", type=int, default=200)
    args = p.parse_args(argv)

    import torch

    from mmdemo.jobs.train import TrainConfig, finetune
    from mmdemo.models.caption import caption
    from mmdemo.models.loading import load, pick_device, pick_dtype
    from mmdemo.models.retrieval import AudioIndex, embed_query_audio, embedder, rank_labels
    from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models
    from mmdemo.models.vqa import answer

    device = pick_device(args.device)
    emit({"step": "environment", **environment(device), "dtype": str(pick_dtype(device))})
    tiny = write_tiny_models(cache_dir() / "tiny")
    sets = {"tiny": {task: str(tiny[name]) for task, name in TINY_FOR_TASK.items()}}
    if not args.tiny:
        sets["full"] = {task: str(build_checkpoint(task, cache_dir() / f"full-{task}"))  # the tasks checked below
                        for task in ("caption", "vqa", "retrieval")}
    images = sorted((ROOT / "assets" / "images").glob("*.png"))[:3]
    sounds = sorted((ROOT / "assets" / "sounds").glob("*.wav"))
    for size, checkpoints in sets.items():
        t0 = time.perf_counter()
        cap = load("caption", checkpoints["caption"], device=device)
        captions = caption(images, model=cap)
        answers = answer(images[0], ["what color is it?", "how many shapes are there?"],
                         model=load("vqa", checkpoints["vqa"], device=device))
        emb = embedder(load("retrieval", checkpoints["retrieval"], device=device))
        with tempfile.TemporaryDirectory() as tmp:
            index = AudioIndex.open_or_create(tmp, emb.checkpoint, emb.dim)
            added = len(index.add_files(sounds, emb).added)
            by_text = [h.record() for h in index.search_text("a siren", emb, top_k=3)]
            query = embed_query_audio(emb, path=sounds[0])
            by_sound = [h.record() for h in index.search_vector(query, top_k=3)]
            labels = [h.record() for h in rank_labels(query, ["beep", "rain", "siren"], emb, top_k=3)]
        emit({"step": f"model layer ({size})", "device": cap.device, "dtype": str(cap.dtype),
              "captions": captions, "answers": answers, "indexed": added, "by_text": by_text,
              "by_sound": by_sound, "labels": labels, "seconds": round(time.perf_counter() - t0, 2)})

    size = "tiny" if args.tiny else "full"
    with tempfile.TemporaryDirectory() as tmp:
        data = shapes_dataset(Path(tmp) / "data", args.examples, 32 if args.tiny else 384)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = finetune("caption", data, Path(tmp) / "adapter", model=sets[size]["caption"],
                          config=TrainConfig.from_preset("quick"), workdir=Path(tmp) / "work", device=device)
        wall = time.perf_counter() - t0
        train = result.get("data", {}).get("train") or args.examples
        steps = max((x["step"] for x in result.get("losses", [])), default=0)
        emit({"step": f"quick fine-tune ({size} BLIP caption)", "examples": args.examples, "wall_s": round(wall, 1),
              "train_examples": train, "steps": steps,
              "train_samples_per_s": result["trainer_metrics"].get("train_samples_per_second"),
              "train_runtime_s": result["trainer_metrics"].get("train_runtime"),
              "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda")
              else None, "metrics_before": result["metrics_before"], "metrics_after": result["metrics_after"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
