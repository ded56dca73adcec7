"""Captioning benchmark: latency at batch 1 and throughput for 32 requests, mmdemo vs plain transformers.

    python bench/caption.py               # full-size random-weight BLIP-base on the best device
    python bench/caption.py --tiny --quick  # tiny checkpoint, CPU smoke run (the test suite runs this)

Baseline: what a user writes (``BlipForConditionalGeneration.from_pretrained`` in fp32, processor,
``model.generate`` one image at a time, greedy). mmdemo: ``mmdemo.models.caption.caption`` through the
project's loader (bf16 on a CUDA GPU), a batch of 32 for the throughput row. Both produce exactly 20
new tokens (min = max), so timings do not depend on the random weights.
"""

from __future__ import annotations

import argparse
import sys

from common import build_checkpoint, cache_dir, environment, fmt, median, report, timeit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="use the tiny checkpoint (smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)

    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from mmdemo.models.caption import caption
    from mmdemo.models.generation import GenerationOptions
    from mmdemo.models.loading import load, pick_device

    device = pick_device(args.device)
    folder = str(build_checkpoint("caption", cache_dir() / ("tiny-caption" if args.tiny else "blip-caption-base"),
                                  tiny=args.tiny))
    iters, warmup = (2, 1) if args.quick else (10, 3)
    if args.quick:
        args.requests = min(args.requests, 8)
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(384, 384, 3, generator=rng) * 255).byte().numpy())
              for _ in range(args.requests)]
    greedy = dict(num_beams=1, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    # plain transformers, fp32
    processor = BlipProcessor.from_pretrained(folder)
    plain = BlipForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()

    def plain_one(img=images[0]):
        with torch.no_grad():
            return plain.generate(**processor(images=img, return_tensors="pt").to(device), **greedy)

    def plain_all():
        for img in images:
            plain_one(img)

    base_lat = median(timeit(plain_one, device, warmup, iters))
    base_all = median(timeit(plain_all, device, min(warmup, 1), max(1, iters // 5)))
    plain = None  # free it before loading the project path
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # mmdemo
    loaded = load("caption", folder, device=device)
    options = GenerationOptions(num_beams=1, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    ours_lat = median(timeit(lambda: caption(images[:1], options=options, model=loaded), device, warmup, iters))
    ours_all = median(timeit(lambda: caption(images, options=options, model=loaded, batch_size=len(images)),
                             device, min(warmup, 1), max(1, iters // 5)))

    n = len(images)
    rows = [
        {"measure": "latency, 1 image, 20 tokens", "baseline": fmt(base_lat, "s"), "ours": fmt(ours_lat, "s"),
         "ratio": f"{base_lat / ours_lat:.2f}x", "target": ">= 5x (H100)"},
        {"measure": f"throughput, {n} requests", "baseline": fmt(n / base_all, "img/s"),
         "ours": fmt(n / ours_all, "img/s"), "ratio": f"{base_all / ours_all:.2f}x", "target": ">= 8x (H100)"},
    ]
    cmd = "python bench/caption.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report("caption" + (" (tiny smoke)" if args.tiny else ""), cmd, environment(device) | {"dtype": str(loaded.dtype)},
           rows, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
