"""Captioning and VQA benchmark: latency and throughput, mmdemo vs plain transformers, with a token check.

    OMP_WAIT_POLICY=PASSIVE python bench/caption.py    # full-size random-weight BLIP-base on the best device
    python bench/caption.py --tiny --quick              # tiny checkpoints, CPU smoke run (the test suite runs this)

Baseline: what a user writes (``BlipForConditionalGeneration`` / ``BlipForQuestionAnswering.from_pretrained`` in
fp32, the same processor, ``model.generate`` one request at a time). mmdemo: ``mmdemo.models.caption.caption`` and
``mmdemo.models.vqa.answer`` through the project's loader (bf16 on a CUDA GPU; on the CPU fp32, exact mode unless
MMDEMO_FAST is set). Every row forces exactly ``--tokens`` new tokens (min = max), so timings do not depend on the
random weights. Rows:

- greedy latency (1 image) and throughput (``--requests`` images, one batch) against plain one at a time;
- caption and VQA latency with 3 beams (the app's decoding): the cross-attention keys/values once per image,
  not per beam, never copied at the beams' reorder, and the large matrices multiplied in slices;
- 16 concurrent requests with 3 beams: the app batches them into one ``caption`` call (Gradio ``batch=True``,
  up to 16); against plain one at a time, and against the project one at a time;
- whether mmdemo's tokens are identical to plain ``generate``'s (3 beams, caption and VQA; checked, printed);
- on the CPU, VQA latency with the decode of one request on one thread (the app, ``beams.DECODE_THREADS``)
  against all threads;
- on the CPU, the caption decoder's Linear layers for one 3-beam step (3 rows each) on one thread: plain
  ``F.linear`` (MKL's ``addmm``), oneDNN, and the project's small-rows kernel (``mmdemo.models.kernels``), as GB/s
  of weights read.

A and B repetitions are interleaved (A, B, A, B, ...); each cell is the median and (min-max).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import build_checkpoint, cache_dir, environment, fmt, median, report, sync


def interleaved(fns: dict, device: str, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns (so drift in the machine hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def cell(xs: list[float], unit: str = "s", per: float = 1.0) -> str:
    """Median and (min-max); ``unit`` "s" for times, else a rate ``per`` / time."""
    if unit == "s":
        return f"{fmt(median(xs), 's')} ({fmt(min(xs), 's')}-{fmt(max(xs), 's')})"
    return f"{per / median(xs):,.2f} {unit} ({per / max(xs):,.2f}-{per / min(xs):,.2f})"


def ratio(base: list[float], ours: list[float]) -> str:
    return f"{median(base) / median(ours):.2f}x"


def all_threads(fn):
    """``fn()`` with the project's few-rows decode on every torch thread (``beams.DECODE_THREADS = 0``)."""
    from mmdemo.models import beams

    before, beams.DECODE_THREADS = beams.DECODE_THREADS, 0
    try:
        return fn()
    finally:
        beams.DECODE_THREADS = before


def kernel_rows(decoder, warmup: int, iters: int) -> list[dict]:
    """The decoder's Linear layers, each multiplying 3 rows (one step of 3 beams), on one thread: F.linear against
    oneDNN and the small-rows kernel; GB/s of weights read (median and range)."""
    import torch

    from mmdemo.models import kernels

    layers = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    size = sum(m.weight.numel() * 4 for m in layers)
    xs = [torch.randn(3, 1, m.in_features) for m in layers]

    def run(fn):
        return lambda: [fn(x, m.weight, m.bias) for x, m in zip(xs, layers)]

    onednn = (lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")) \
        if kernels.onednn_usable() else torch.nn.functional.linear
    fns = {"plain": run(torch.nn.functional.linear), "onednn": run(onednn)}
    if kernels.small_rows_kernel() is not None:
        fns["small"] = run(kernels.small_rows_linear)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            t = interleaved(fns, "cpu", warmup, iters)
    finally:
        torch.set_num_threads(before)

    def rate(xs_):
        return f"{size / median(xs_) / 1e9:.1f} GB/s ({size / max(xs_) / 1e9:.1f}-{size / min(xs_) / 1e9:.1f})"

    what = f"caption decoder's {len(layers)} Linear layers ({size / 2**20:.1f} MiB), 3 rows each, one thread"
    out = [{"measure": f"{what}: oneDNN", "baseline": rate(t["plain"]), "ours": rate(t["onednn"]),
            "ratio": ratio(t["plain"], t["onednn"]), "target": "-"}]
    if "small" in t:
        out.append({"measure": f"{what}: small-rows kernel (the app's path)", "baseline": rate(t["plain"]),
                    "ours": rate(t["small"]), "ratio": ratio(t["plain"], t["small"]), "target": "-"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="use the tiny checkpoints (smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=32, help="images in the greedy throughput row")
    p.add_argument("--concurrent", type=int, default=16, help="requests in the 3-beam throughput rows")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--iters", type=int, default=None, help="timed repetitions of the latency rows")
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)

    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering, BlipProcessor

    from mmdemo.models import beams
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import GenerationOptions
    from mmdemo.models.loading import clear_cache, load, pick_device
    from mmdemo.models.vqa import answer

    device = pick_device(args.device)
    name = "tiny-{}" if args.tiny else "blip-{}-base"
    folders = {task: str(build_checkpoint(task, cache_dir() / name.format(task), tiny=args.tiny))
               for task in ("caption", "vqa")}
    iters, warmup = (2, 1) if args.quick else (args.iters or 7, 1)
    if args.quick:
        args.requests, args.concurrent = min(args.requests, 8), min(args.concurrent, 4)
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(384, 384, 3, generator=rng) * 255).byte().numpy())
              for _ in range(max(args.requests, args.concurrent))]
    question = "what is in the picture?"
    n_tok = args.tokens
    greedy = GenerationOptions(num_beams=1, max_new_tokens=n_tok, min_new_tokens=n_tok)
    beam3 = GenerationOptions(num_beams=3, max_new_tokens=n_tok, min_new_tokens=n_tok)
    rows: list[dict] = []
    identical: dict[str, bool] = {}

    # ---------------------------------------------------------------- captions: plain and mmdemo side by side
    processor = BlipProcessor.from_pretrained(folders["caption"])
    plain = BlipForConditionalGeneration.from_pretrained(folders["caption"], dtype=torch.float32).to(device).eval()
    loaded = load("caption", folders["caption"], device=device)
    dtype = loaded.dtype

    def plain_caption(img, options):
        with torch.no_grad():
            out = plain.generate(**processor(images=img, return_tensors="pt").to(device), **options.kwargs())
        return processor.decode(out[0], skip_special_tokens=True).strip()

    # tokens: the project's captions of 3 images in one batch against plain generate on each
    ours_text = caption(images[:3], options=beam3, model=loaded)
    identical["caption"] = ours_text == [plain_caption(img, beam3) for img in images[:3]]

    t = interleaved({"plain": lambda: plain_caption(images[0], greedy),
                     "ours": lambda: caption(images[:1], options=greedy, model=loaded)}, device, warmup, iters)
    rows.append({"measure": f"latency, 1 image, {n_tok} tokens, greedy", "baseline": cell(t["plain"]),
                 "ours": cell(t["ours"]), "ratio": ratio(t["plain"], t["ours"]), "target": ">= 5x (H100)"})
    t = interleaved({"plain": lambda: plain_caption(images[0], beam3),
                     "ours": lambda: caption(images[:1], options=beam3, model=loaded)}, device, warmup, iters)
    rows.append({"measure": f"caption latency, 1 image, 3 beams, {n_tok} tokens", "baseline": cell(t["plain"]),
                 "ours": cell(t["ours"]), "ratio": ratio(t["plain"], t["ours"]), "target": ">= 1.3x (CPU)"})

    n = args.requests
    few = max(1, iters // 3)
    t = interleaved({"plain": lambda: [plain_caption(img, greedy) for img in images[:n]],
                     "ours": lambda: caption(images[:n], options=greedy, model=loaded, batch_size=n)},
                    device, 0, few)
    rows.append({"measure": f"throughput, {n} requests, greedy", "baseline": cell(t["plain"], "img/s", n),
                 "ours": cell(t["ours"], "img/s", n), "ratio": ratio(t["plain"], t["ours"]), "target": ">= 8x (H100)"})

    # 16 users at once: the app hands their images to one caption() call (batches of up to 16)
    c = args.concurrent
    t = interleaved({"plain": lambda: [plain_caption(img, beam3) for img in images[:c]],
                     "one": lambda: [caption([img], options=beam3, model=loaded) for img in images[:c]],
                     "batched": lambda: caption(images[:c], options=beam3, model=loaded)}, device, 0, few)
    rows.append({"measure": f"throughput, {c} concurrent requests, 3 beams, vs plain one at a time",
                 "baseline": cell(t["plain"], "img/s", c), "ours": cell(t["batched"], "img/s", c),
                 "ratio": ratio(t["plain"], t["batched"]), "target": ">= 3x"})
    rows.append({"measure": f"throughput, {c} concurrent requests, 3 beams, vs mmdemo one at a time",
                 "baseline": "mmdemo: " + cell(t["one"], "img/s", c), "ours": cell(t["batched"], "img/s", c),
                 "ratio": ratio(t["one"], t["batched"]), "target": ">= 3x"})
    if device == "cpu":
        rows.extend(kernel_rows(loaded.model.text_decoder, warmup, iters))
    plain = loaded = None
    clear_cache()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------- VQA
    processor = BlipProcessor.from_pretrained(folders["vqa"])
    plain = BlipForQuestionAnswering.from_pretrained(folders["vqa"], dtype=torch.float32).to(device).eval()
    loaded = load("vqa", folders["vqa"], device=device)

    def plain_answer(img):
        with torch.no_grad():
            out = plain.generate(**processor(images=img, text=question, return_tensors="pt").to(device),
                                 **beam3.kwargs())
        return processor.decode(out[0], skip_special_tokens=True).strip()

    identical["vqa"] = all(answer(img, [question], options=beam3, model=loaded) == [plain_answer(img)]
                           for img in images[:3])
    fns = {"plain": lambda: plain_answer(images[0]),
           "ours": lambda: answer(images[0], [question], options=beam3, model=loaded)}
    if device == "cpu" and beams.DECODE_THREADS:  # the app's one-thread decode of a few rows, against all threads
        fns["all threads"] = lambda: all_threads(lambda: answer(images[0], [question], options=beam3, model=loaded))
    t = interleaved(fns, device, warmup, iters)
    rows.append({"measure": f"VQA latency, 1 image + 1 question, 3 beams, {n_tok} tokens", "baseline": cell(t["plain"]),
                 "ours": cell(t["ours"]), "ratio": ratio(t["plain"], t["ours"]), "target": ">= 1.3x (CPU)"})
    if "all threads" in t:
        rows.append({"measure": f"VQA latency as above, decoding on {beams.DECODE_THREADS} thread (the app) against all "
                                f"{torch.get_num_threads()} (beams.DECODE_THREADS = 0)",
                     "baseline": "all threads: " + cell(t["all threads"]), "ours": cell(t["ours"]),
                     "ratio": ratio(t["all threads"], t["ours"]), "target": "-"})
    plain = loaded = None
    clear_cache()

    exact = dtype == torch.float32
    for task, same in identical.items():
        print(f"{task}: mmdemo's tokens {'ARE' if same else 'are NOT'} identical to plain generate's (3 beams)")
        rows.append({"measure": f"{task}: tokens identical to plain generate (3 beams, 3 images)",
                     "baseline": "-", "ours": "yes" if same else "no", "ratio": "-",
                     "target": "yes" if exact else f"- ({dtype} vs fp32)"})
    env = environment(device) | {"dtype": f"{dtype} (mmdemo), torch.float32 (plain)",
                                 "MMDEMO_FAST": os.environ.get("MMDEMO_FAST", "unset"),
                                 "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
                                 "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                                 "repetitions": f"{iters} (latency), {few} (throughput), interleaved"}
    cmd = "python bench/caption.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report("caption" + (" (tiny smoke)" if args.tiny else ""), cmd, env, rows, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
