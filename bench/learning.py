"""Does ``finetune`` learn as well as a plain LoRA loop? Same data, model, targets, rank, learning rate, steps.

The reference is what a careful user writes by hand in about 40 lines: ``get_peft_model`` + ``torch.optim.AdamW``
at a constant learning rate, no Trainer, batches built with the model's own processor in the loop, shuffled each
epoch. A training seed fixes the same initial LoRA weights and the same batches on both sides, so with the plain
loop's constant rate and weight decay the two compute the same loss at every step (tests/test_learning.py); what
differs in use is the project's learning-rate schedule. The project's side is ``mmdemo.jobs.train.finetune`` exactly as ``python -m mmdemo finetune --task T --epochs E --lr X --rank R``
runs it. Both adapters are then scored by the same plain scorer on held-out data the project never trained on:

- caption: 12 classes of pictures (4 colours x 3 patterns), 12 training and 10 held-out pictures per class,
  two-word captions ("red ring"); score = share of caption words right (word i of the output equals word i of
  the reference, over the longer of the two), greedy decoding of at most 10 tokens;
- VQA: the same pictures, "what color is it?" / "what is drawn?", exact-match accuracy, greedy decoding;
- retrieval: 12 kinds of synthetic sound (3 timbres x 4 pitch shapes), clips of 3 to 16 s (so some span several
  10 s windows), two-word descriptions ("rising buzz"); score = text-to-audio recall@1 through the app's own
  search embedding (every window of a clip, averaged).

The project's own reported metrics (what the page and the model card show) are printed beside them.

    python bench/learning.py [--task caption|vqa|retrieval|all] [--steps N] [--retrieval-steps N] [--seeds K] [--write]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLORS = ("red", "green", "blue", "yellow")
PATTERNS = ("ring", "cross", "dots")
TIMBRES = ("beep", "hum", "buzz")
PITCHES = ("low", "high", "rising", "falling")
RGB = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (225, 205, 40)}


# ------------------------------------------------------------------------------------------------- datasets
def _picture(rng: np.random.Generator, color: str, pattern: str, size: int = 64):
    from PIL import Image, ImageDraw

    shade = int(rng.integers(215, 255))
    noise = rng.integers(-12, 13, size=(size, size, 3))
    img = Image.fromarray(np.clip(np.full((size, size, 3), shade) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in RGB[color])
    s = int(rng.integers(size // 2, size - 8))
    x, y = (int(v) for v in rng.integers(2, size - s - 2, size=2))
    w = max(3, s // 6)
    if pattern == "ring":
        draw.ellipse((x, y, x + s, y + s), outline=fill, width=w)
    elif pattern == "cross":
        draw.rectangle((x + s // 2 - w, y, x + s // 2 + w, y + s), fill=fill)
        draw.rectangle((x, y + s // 2 - w, x + s, y + s // 2 + w), fill=fill)
    else:
        for i in range(3):
            for j in range(3):
                cx, cy = x + (2 * i + 1) * s // 6, y + (2 * j + 1) * s // 6
                draw.ellipse((cx - w, cy - w, cx + w, cy + w), fill=fill)
    return img


def make_pictures(root: Path, task: str, train_per_class: int = 12, test_per_class: int = 3, seed: int = 7) -> Path:
    """``root/train`` and ``root/test``: 12 picture classes, two-word captions or two questions per picture."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for color in COLORS:
            for pattern in PATTERNS:
                for k in range(n):
                    name = f"{color}-{pattern}-{k}.png"
                    _picture(rng, color, pattern).save(folder / name)
                    if task == "vqa":
                        rows += [{"file_name": name, "question": "what color is it?", "answer": color},
                                 {"file_name": name, "question": "what is drawn?", "answer": pattern}]
                    else:
                        rows.append({"file_name": name, "text": f"{color} {pattern}"})
        _write_csv(folder / "metadata.csv", rows)
    return root


def _sound(rng: np.random.Generator, timbre: str, pitch: str, seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    base = {"low": 180.0, "high": 1400.0, "rising": 250.0, "falling": 1500.0}[pitch] * rng.uniform(0.93, 1.07)
    period = 2.5  # the rising/falling sweeps repeat, so every 10 s window hears them
    frac = (t % period) / period
    if pitch == "rising":
        freq = base * (1 + 4 * frac)
    elif pitch == "falling":
        freq = base / (1 + 4 * frac)
    else:
        freq = np.full_like(t, base)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    if timbre == "beep":
        wave = np.sin(phase) * (np.sin(2 * np.pi * 3 * t) > 0.3)
    elif timbre == "hum":
        wave = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    else:
        wave = np.sign(np.sin(phase)) * 0.6
    wave = wave / np.max(np.abs(wave)) * rng.uniform(0.2, 0.5) + rng.normal(0, 0.01, len(t))
    return wave.astype(np.float32)


def make_sounds(root: Path, train_per_class: int = 12, test_per_class: int = 3, seed: int = 7) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for timbre in TIMBRES:
            for pitch in PITCHES:
                for k in range(n):
                    name = f"{pitch}-{timbre}-{k}.wav"
                    sf.write(str(folder / name), _sound(rng, timbre, pitch, float(rng.uniform(3, 16))), 16000)
                    rows.append({"file_name": name, "text": f"{pitch} {timbre}"})
        _write_csv(folder / "metadata.csv", rows)
    return root


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _rows(folder: Path) -> list[dict]:
    with (folder / "metadata.csv").open() as fh:
        return [{**r, "path": str(folder / r["file_name"])} for r in csv.DictReader(fh)]


# ------------------------------------------------------------------------------------- the reference loop
def reference_loop(task: str, model_dir: str, train: list[dict], steps: int, rank: int, alpha: int, lr: float,
                   batch_size: int = 8, seed: int = 0, losses: list[float] | None = None):
    """Plain peft + AdamW, no Trainer: what a user writes by hand. Returns the trained peft model (eval mode);
    appends each step's loss to ``losses`` if given."""
    import librosa
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from mmdemo.models.registry import ARCHITECTURES

    arch = next(a for a in ARCHITECTURES.values() if a.task == task)
    processor = getattr(transformers, arch.processor_class).from_pretrained(model_dir)
    model = getattr(transformers, arch.model_class).from_pretrained(model_dir)
    torch.manual_seed(seed)  # the LoRA weights' initial values
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(arch.lora_targets)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tok = processor.tokenizer
    audio_cache: dict[str, np.ndarray] = {}  # decoded once, as a careful user would
    order: list[int] = []
    epoch = 0
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:  # a new shuffle each epoch, drawn from torch.Generator(seed + epoch)
            order += torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            epoch += 1
        batch, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        if task == "caption":
            images = [Image.open(r["path"]).convert("RGB") for r in batch]
            enc = processor(images=images, text=[r["text"] for r in batch], padding=True, return_tensors="pt")
            enc["input_ids"][:, 0] = tok.bos_token_id  # BLIP generates from [DEC], so it trains from it
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
        elif task == "vqa":
            images = [Image.open(r["path"]).convert("RGB") for r in batch]
            enc = processor(images=images, text=[r["question"] for r in batch], padding=True, return_tensors="pt")
            ans = tok([r["answer"] for r in batch], padding=True, return_tensors="pt")
            ans["input_ids"][:, 0] = model.base_model.model.decoder_start_token_id
            labels = ans["input_ids"].masked_fill(ans["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels, decoder_attention_mask=ans["attention_mask"]).loss
        else:
            sr = processor.feature_extractor.sampling_rate
            audio = [audio_cache.get(r["path"]) if r["path"] in audio_cache else
                     audio_cache.setdefault(r["path"], librosa.load(r["path"], sr=sr)[0]) for r in batch]
            enc = processor(audio=audio, text=[r["text"] for r in batch], sampling_rate=sr, padding=True,
                            return_tensors="pt")
            loss = model(**enc, return_loss=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if losses is not None:
            losses.append(float(loss))
    return model.eval()


# ---------------------------------------------------------------------------------------- the plain scorer
def word_accuracy(outputs: list[str], references: list[str]) -> float:
    """Share of caption words right: word i of the output equals word i of the reference, over the longer."""
    scores = []
    for out, ref in zip(outputs, references):
        o, r = out.lower().split(), ref.lower().split()
        scores.append(sum(a == b for a, b in zip(o, r)) / max(len(o), len(r), 1))
    return float(np.mean(scores))


def plain_score(task: str, model, model_dir: str, test: list[dict]) -> float:
    """The same scorer for both adapters: greedy ``generate`` (caption, VQA) or the app's search embedding."""
    import torch
    import transformers
    from PIL import Image

    from mmdemo.models.registry import ARCHITECTURES

    arch = next(a for a in ARCHITECTURES.values() if a.task == task)
    processor = getattr(transformers, arch.processor_class).from_pretrained(model_dir)
    if task == "retrieval":
        import dataclasses
        from collections import OrderedDict

        from mmdemo.jobs.evaluate import recall_at_k
        from mmdemo.models.loading import _load_uncached
        from mmdemo.models.retrieval import Embedder

        base = _load_uncached("retrieval", model_dir, "cpu", torch.float32)
        emb = Embedder(dataclasses.replace(base, model=model, memo=OrderedDict()))  # the trained weights
        texts = [r["text"] for r in test]
        return recall_at_k(emb.texts(texts), emb.files([r["path"] for r in test]), texts, ks=(1,))["text_to_audio_r1"]
    outputs = []
    with torch.no_grad():
        for r in test:
            image = Image.open(r["path"]).convert("RGB")
            text = r.get("question")
            enc = processor(images=image, text=text, return_tensors="pt") if text else \
                processor(images=image, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=10, num_beams=1, do_sample=False)
            outputs.append(processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    if task == "vqa":
        return float(np.mean([o.lower() == r["answer"] for o, r in zip(outputs, test)]))
    return word_accuracy(outputs, [r["text"] for r in test])


def _load_adapter(task: str, model_dir: str, adapter: Path):
    import transformers
    from peft import PeftModel

    from mmdemo.models.registry import ARCHITECTURES

    arch = next(a for a in ARCHITECTURES.values() if a.task == task)
    base = getattr(transformers, arch.model_class).from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


# --------------------------------------------------------------------------------------------------- driver
def compare(task: str, model_dir: str, work: Path, steps: int = 720, rank: int = 16, lr: float = 1e-3,
            batch_size: int = 8, seed: int = 0, test_per_class: int = 3) -> dict:
    """Train both sides for ``steps`` steps; score both with the plain scorer; the project's own metrics too."""
    from mmdemo.jobs.train import TrainConfig, finetune

    data = (make_sounds(work / f"{task}-data", test_per_class=test_per_class) if task == "retrieval" else
            make_pictures(work / f"{task}-data", task, test_per_class=test_per_class))
    train, test = _rows(data / "train"), _rows(data / "test")
    per_epoch = -(-len(train) // batch_size)
    epochs = max(1, steps // per_epoch)
    steps = epochs * per_epoch  # the CLI asks for epochs; both sides run exactly this many steps
    config = TrainConfig.from_preset("quick", epochs=epochs, learning_rate=lr, rank=rank, batch_size=batch_size,
                                     min_steps=0, seed=seed)  # what `finetune --epochs E --lr X --rank R` builds
    t0 = time.perf_counter()
    for old in (f"{task}-adapter", f"{task}-work", f"{task}-reference"):
        shutil.rmtree(work / old, ignore_errors=True)
    result = finetune(task, data, work / f"{task}-adapter", model=model_dir, config=config,
                      workdir=work / f"{task}-work", device="cpu")
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_loop(task, model_dir, train, steps, rank, config.alpha, lr, batch_size, seed=seed)
    ref_s = time.perf_counter() - t0
    ours = _load_adapter(task, model_dir, work / f"{task}-adapter")  # as saved: the round trip is tested too
    reference = round(plain_score(task, ref, model_dir, test), 4)  # in memory, as the user's notebook has it
    ref.save_pretrained(str(work / f"{task}-reference"))
    reloaded = _load_adapter(task, model_dir, work / f"{task}-reference")  # as the user would ship it
    return {"task": task, "seed": seed, "steps": steps, "rank": rank, "alpha": config.alpha, "lr": lr,
            "train": len(train), "test": len(test), "reference": reference,
            "reference_reloaded": round(plain_score(task, reloaded, model_dir, test), 4),
            "mmdemo": round(plain_score(task, ours, model_dir, test), 4),
            "mmdemo_reported": result["metrics_after"], "mmdemo_steps": result["training"]["steps_done"],
            "seconds": {"mmdemo": round(ours_s, 1), "reference": round(ref_s, 1)}}


def compare_on_one_thread(*args, **kwargs) -> dict:
    """:func:`compare` with torch on one thread: for a worker process, so that two comparisons share 2 cores."""
    import torch

    torch.set_num_threads(1)
    return compare(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="all", choices=["caption", "vqa", "retrieval", "all"])
    p.add_argument("--steps", type=int, default=720, help="training steps for captioning and VQA, both sides")
    p.add_argument("--retrieval-steps", type=int, default=300,
                   help="for retrieval (the plain loop computes CLAP features every step: slow on a CPU)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-per-class", type=int, default=10,
                   help="held-out examples per class (12 classes); more makes each seed's score less noisy")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per task (0, 1, ...): the spread")
    p.add_argument("--models", help="folder of tiny checkpoints (default: built in a temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    p.add_argument("--from-logs", nargs="+", metavar="LOG",
                   help="write the table from the JSON lines earlier runs printed (one run per task), train nothing")
    args = p.parse_args(argv)
    if args.from_logs:
        rows = [json.loads(line) for log in args.from_logs for line in Path(log).read_text().splitlines()
                if line.startswith('{"task"')]
        ran = [line.split("`")[1] for log in args.from_logs for line in Path(log).read_text().splitlines()
               if line.startswith("Command: `python bench/learning.py --task")]
        _write(rows, "`, `".join([*ran, "python bench/learning.py --from-logs " + " ".join(args.from_logs)]),
               write=args.write)
        return 0
    torch.set_num_threads(args.threads)
    from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models

    tasks = ["caption", "vqa", "retrieval"] if args.task == "all" else [args.task]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = write_tiny_models(args.models or Path(tmp) / "tiny")
        for task in tasks:
            for seed in range(args.seeds):
                steps = args.retrieval_steps if task == "retrieval" else args.steps
                row = compare(task, str(models[TINY_FOR_TASK[task]]), Path(tmp), steps, args.rank, args.lr,
                              seed=seed, test_per_class=args.test_per_class)
                print(json.dumps(row), flush=True)
                rows.append(row)
    _write(rows, " ".join(["python bench/learning.py", *(argv if argv is not None else sys.argv[1:])]), args.write)
    return 0


def _write(rows: list[dict], command: str, write: bool) -> None:
    from bench.common import report

    measure = {"caption": "caption words right", "vqa": "VQA accuracy", "retrieval": "text-to-audio R@1"}
    table = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        ref = [r["reference"] for r in mine]
        ours = [r["mmdemo"] for r in mine]
        reloaded = [r["reference_reloaded"] for r in mine]

        def cell(xs: list[float]) -> str:
            spread = f" ({min(xs):.3f} to {max(xs):.3f}, mean {statistics.mean(xs):.3f})" if len(xs) > 1 else ""
            return f"{statistics.median(xs):.3f}{spread}"

        table.append({"measure": f"{task}: {measure[task]}, {mine[0]['steps']} steps, median of {len(mine)} seeds "
                                 f"(reference saved and reloaded: {cell(reloaded)})",
                      "baseline": cell(ref), "ours": cell(ours),
                      "ratio": f"{statistics.median(ours) / max(statistics.median(ref), 1e-9):.2f}x",
                      "target": ">= 1.00x"})
    report("learning", command, {"device": "cpu", "models": "tiny", "threads": 1}, table, write=write)


if __name__ == "__main__":
    raise SystemExit(main())
