"""``python -m mmdemo finetune``: the same training as a Fine-tune job, in the foreground, with a tqdm bar.

    python -m mmdemo finetune --task caption|vqa|retrieval|image_search --data ZIP_OR_DIR --out DIR [--model M]
        [--preset quick|balanced|thorough] [--epochs N] [--lr X] [--rank R] [--alpha A] [--batch-size B]

Prints one JSON line at the end: ``{"adapter", "metrics_before", "metrics_after"}``. Bad data exits 2 with
the problems as sentences on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def cmd_finetune(args) -> int:
    from tqdm import tqdm

    from mmdemo.data import inspect_dataset
    from mmdemo.errors import InputError
    from mmdemo.jobs.train import Progress, TrainConfig, check_out_folder, finetune

    config = TrainConfig.from_preset(args.preset, epochs=args.epochs, learning_rate=args.lr, rank=args.rank,
                                     alpha=args.alpha, batch_size=args.batch_size, min_steps=args.min_steps)
    out = check_out_folder(args.out)
    workdir = out.parent / f".{out.name}.work"
    report = inspect_dataset(args.data, args.task, workdir)
    if not report.ok:
        for problem in report.problems:
            print(f"error: {problem}", file=sys.stderr)
        n = len(report.problems)
        raise InputError(f"The dataset has {n} {'problem' if n == 1 else 'problems'}, listed above; fix them and "
                         f"run again.")
    bars: dict[str, tqdm] = {}

    def progress(p: Progress) -> None:
        if p.phase == "training" and p.total:
            bar = bars.get("training")
            if bar is None:
                bar = bars["training"] = tqdm(total=p.total, desc="training", unit="step", file=sys.stderr)
            bar.n = p.step
            if p.loss is not None:
                bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
            bar.refresh()
        if p.message and p.phase != "validating":
            scores = f" {json.dumps(p.metrics)}" if p.metrics else ""
            print(f"[{p.phase}] {p.message}{scores}", file=sys.stderr, flush=True)

    result = finetune(args.task, report.root, out, model=args.model, config=config, workdir=workdir,
                      progress=progress, device=args.device)
    for bar in bars.values():
        bar.close()
    print(json.dumps({"adapter": result["adapter"], "metrics_before": result["metrics_before"],
                      "metrics_after": result["metrics_after"]}), flush=True)
    return 0


def add_finetune_parser(subparsers) -> None:
    from mmdemo.models.registry import TASKS  # light: reads the task modules' specs

    p = subparsers.add_parser("finetune", help="fine-tune a LoRA adapter on a dataset (zip or folder)")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, metavar="ZIP_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    p.add_argument("--model", help="base checkpoint: Hub id or local folder (default: the task's)")
    p.add_argument("--preset", default="quick", choices=["quick", "balanced", "thorough"])
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--rank", type=_positive, help="LoRA rank")
    p.add_argument("--alpha", type=_positive, help="LoRA alpha (default: twice --rank, the presets' ratio)")
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--min-steps", type=int, help="train at least this many steps")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: best available)")
    p.set_defaults(func=cmd_finetune)
