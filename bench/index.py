"""Indexing benchmark: 10-second clips from WAV files to embeddings, mmdemo vs plain transformers.

    python bench/index.py                  # full-size random-weight CLAP on the best device
    python bench/index.py --tiny --quick   # tiny checkpoint, CPU smoke run (the test suite runs this)

Baseline: soundfile decoding, ``ClapFeatureExtractor`` (NumPy, CPU) and ``ClapModel.get_audio_features``
in fp32, batch by batch, as a user writes it. mmdemo: ``AudioIndex.add_files`` (decoding, content
hashes, torch log-mel features on the model's device, the project's dtype), which also writes the index.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import build_checkpoint, cache_dir, environment, fmt, report, sync


def make_clips(folder: Path, n: int, seconds: float = 10.0, sr: int = 48000) -> list[Path]:
    import soundfile as sf

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    t = np.arange(int(sr * seconds)) / sr
    for i in range(n):
        wave = 0.2 * np.sin(2 * np.pi * (100 + 37 * i) * t) + 0.05 * rng.standard_normal(len(t))
        path = folder / f"clip{i:05d}.wav"
        sf.write(path, wave.astype(np.float32), sr, subtype="PCM_16")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--clips", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)

    import soundfile as sf
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from mmdemo.models.loading import load, pick_device
    from mmdemo.models.retrieval import AudioIndex, Embedder

    device = pick_device(args.device)
    n = args.clips or (8 if args.quick else 256)
    folder = str(build_checkpoint("retrieval", cache_dir() / ("tiny-clap" if args.tiny else "clap-htsat-unfused"),
                                  tiny=args.tiny))
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp) / "clips", n)

        fe = ClapFeatureExtractor.from_pretrained(folder)
        plain = ClapModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()

        def plain_run(files):
            out = []
            for s in range(0, len(files), args.batch):
                waves = [sf.read(f, dtype="float32")[0] for f in files[s:s + args.batch]]
                feats = fe(waves, sampling_rate=48000, return_tensors="pt").to(device)
                with torch.no_grad():
                    out.append(plain.get_audio_features(**feats).pooler_output.cpu())
            return torch.cat(out)

        plain_run(paths[: min(2, n)])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        plain_run(paths)
        sync(device)
        base = time.perf_counter() - t0
        plain = None  # free it before loading the project path

        loaded = load("retrieval", folder, device=device)
        emb = Embedder(loaded, batch_size=args.batch)
        AudioIndex.open_or_create(Path(tmp) / "warm", loaded.checkpoint, emb.dim).add_files(paths[: min(2, n)], emb)
        index = AudioIndex.open_or_create(Path(tmp) / "index", loaded.checkpoint, emb.dim)
        sync(device)
        t0 = time.perf_counter()
        added = index.add_files(paths, emb, batch_size=args.batch).added
        sync(device)
        ours = time.perf_counter() - t0
        assert len(added) == n

    rows = [{"measure": f"index {n} ten-second WAV clips", "baseline": fmt(n / base, "clips/s"),
             "ours": fmt(n / ours, "clips/s"), "ratio": f"{base / ours:.2f}x", "target": ">= 20x (H100)"}]
    cmd = "python bench/index.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report("index" + (" (tiny smoke)" if args.tiny else ""), cmd, environment(device) | {"dtype": str(loaded.dtype)},
           rows, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
