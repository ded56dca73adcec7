"""Text -> audio query latency over a large index (100,000 clips by default): p50 and p95 after warm-up.

    python bench/search.py                 # full-size random-weight CLAP, 100,000 synthetic index rows
    python bench/search.py --tiny --quick  # tiny checkpoint, small index, CPU smoke run

The index rows are random unit vectors (what is timed is text encoding plus scoring and top-k, not
how the rows were made). Baseline: tokenizer + ``get_text_features`` in fp32, cosine against every row
with ``torch``, full sort. mmdemo: ``AudioIndex.search_text``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
from common import build_checkpoint, cache_dir, environment, fmt, percentile, report, sync


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)

    import torch
    from transformers import ClapModel, ClapProcessor

    from mmdemo.models.loading import load, pick_device
    from mmdemo.models.retrieval import AudioIndex, Clip, Embedder

    device = pick_device(args.device)
    rows = args.rows or (2_000 if args.quick else 100_000)
    queries = args.queries or (10 if args.quick else 200)
    folder = str(build_checkpoint("retrieval", cache_dir() / ("tiny-clap" if args.tiny else "clap-htsat-unfused"),
                                  tiny=args.tiny))
    loaded = load("retrieval", folder, device=device)
    emb = Embedder(loaded)
    dim = emb.texts(["probe"]).shape[1]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    clips = [Clip(path=f"/lib/clip{i}.wav", name=f"clip{i}.wav", sha256=f"{i:064x}", duration=10.0)
             for i in range(rows)]
    words = ["dog", "rain", "bell", "engine", "bird", "siren", "crowd", "wind", "piano", "drum"]
    texts = [f"a {words[i % 10]} {words[(i * 7) % 10]} sound number {i}" for i in range(queries)]

    with tempfile.TemporaryDirectory() as tmp:
        index = AudioIndex(tmp, loaded.checkpoint, dim, clips, vectors)
        for t in texts[:5]:
            index.search_text(t, emb, top_k=10)
        ours = []
        for t in texts:
            sync(device)
            t0 = time.perf_counter()
            index.search_text(t, emb, top_k=10)
            sync(device)
            ours.append(time.perf_counter() - t0)

    processor = ClapProcessor.from_pretrained(folder)
    plain = ClapModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    table = torch.from_numpy(vectors).to(device)

    def plain_query(text):
        with torch.no_grad():
            q = plain.get_text_features(**processor.tokenizer([text], return_tensors="pt").to(device)).pooler_output
        scores = torch.nn.functional.cosine_similarity(q, table)
        return torch.argsort(scores, descending=True)[:10].cpu()

    for t in texts[:5]:
        plain_query(t)
    base = []
    for t in texts:
        sync(device)
        t0 = time.perf_counter()
        plain_query(t)
        sync(device)
        base.append(time.perf_counter() - t0)

    p50, p95, b50 = percentile(ours, 50), percentile(ours, 95), percentile(base, 50)
    rows_out = [
        {"measure": f"text query over {rows:,} clips, p50", "baseline": fmt(b50, "s"), "ours": fmt(p50, "s"),
         "ratio": f"{b50 / p50:.2f}x", "target": "< 20 ms (H100)"},
        {"measure": f"text query over {rows:,} clips, p95", "baseline": fmt(percentile(base, 95), "s"),
         "ours": fmt(p95, "s"), "ratio": f"{percentile(base, 95) / p95:.2f}x", "target": ""},
    ]
    cmd = "python bench/search.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report("search" + (" (tiny smoke)" if args.tiny else ""), cmd, environment(device) | {"dtype": str(loaded.dtype)},
           rows_out, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
