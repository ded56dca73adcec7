"""Shared pieces of the benchmarks: full-size random-weight checkpoints, timing, the results file.

Checkpoints are built from the default checkpoints' configs (BLIP-base, CLAP HTSAT-unfused, SigLIP base) with
random weights and written in the Hugging Face layout, so the project loads them through its normal path and
the baseline through plain ``from_pretrained``; no Hub access is needed. Generation lengths are forced
(min = max new tokens), so timings do not depend on the weights.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).with_name("RESULTS.md")


def _bert_vocab_full() -> dict[str, int]:
    """A 30,522-entry vocabulary laid out like bert-base-uncased's special ids ([SEP]=102, ...)."""
    from mmdemo.models.tiny import CHARS, WORDS

    special = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    tokens = [t for t in dict.fromkeys(CHARS + ["##" + c for c in CHARS if c.isalnum()] + WORDS)]
    vocab: dict[str, int] = dict(special)
    next_id = 104
    for t in tokens:
        vocab[t] = next_id
        next_id += 1
    for i in range(1, 100):
        vocab[f"[unused{i}]"] = i
    while next_id < 30522:
        vocab[f"[unused{next_id}]"] = next_id
        next_id += 1
    return vocab


def build_checkpoint(task: str, out: Path, tiny: bool = False) -> Path:
    """A random-weight checkpoint for ``task`` in ``out`` (full size from the default config, or tiny)."""
    out = Path(out)
    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    if tiny:
        from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models

        return write_tiny_models(out.parent / "tiny", [TINY_FOR_TASK[task]])[TINY_FOR_TASK[task]]
    import torch
    import transformers
    from transformers import BertTokenizer, BlipConfig, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    if task in ("caption", "vqa"):
        tok = BertTokenizer(vocab=_bert_vocab_full(), do_lower_case=True, model_max_length=512)
        tok.add_special_tokens({"bos_token": "[DEC]"})  # id 30522, as in the Salesforce checkpoints
        # BLIP-base defaults; vision init 0.02 instead of 1e-10 so image features are not ~0
        config = BlipConfig(vision_config={"initializer_range": 0.02}, text_config={})
        cls = "BlipForConditionalGeneration" if task == "caption" else "BlipForQuestionAnswering"
        model = getattr(transformers, cls)(config)
        model.save_pretrained(out)
        BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}),
                      tokenizer=tok).save_pretrained(out)
    elif task == "image_search":
        import tempfile

        from transformers import SiglipConfig, SiglipModel, SiglipProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        from mmdemo.models.siglip import _tiny_tokenizer

        with tempfile.TemporaryDirectory() as tmp:  # a small SentencePiece vocabulary; the embedding table is full
            tok = _tiny_tokenizer(Path(tmp))
            # the defaults are google/siglip-base-patch16-224's sizes (32,000 tokens, 768 wide, 12 + 12 layers, 224 px)
            text = {"pad_token_id": tok.pad_token_id, "bos_token_id": None, "eos_token_id": tok.eos_token_id}
            SiglipModel(SiglipConfig(text_config=text)).save_pretrained(out)
            SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 224, "width": 224}),
                            tokenizer=tok).save_pretrained(out)
    else:
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

        from mmdemo.models import tiny

        # the tiny models' byte-level BPE (mmdemo.models.tiny.bpe_tokenizer; _roberta_tokenizer before it)
        roberta = getattr(tiny, "_roberta_tokenizer", None) or (lambda: tiny.bpe_tokenizer("RobertaTokenizer"))
        model = ClapModel(ClapConfig())
        model.save_pretrained(out)
        fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                                  fft_window_size=1024, padding="repeatpad", truncation="rand_trunc")
        ClapProcessor(feature_extractor=fe, tokenizer=roberta()).save_pretrained(out)
    return out


def cache_dir() -> Path:
    d = Path(os.environ.get("MMDEMO_BENCH_CACHE", "/tmp/mmdemo-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def environment(device: str) -> dict:
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def report(name: str, command: str, env: dict, rows: list[dict], write: bool) -> None:
    """Print the table; with ``write``, replace this bench's section of bench/RESULTS.md."""
    lines = [f"## {name}", "", f"Command: `{command}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| measure | baseline (plain transformers) | mmdemo | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['measure']} | {r['baseline']} | {r['ours']} | {r['ratio']} | {r.get('target', '')} |")
    section = "\n".join(lines) + "\n"
    print(section)
    print(json.dumps({"bench": name, "env": env, "rows": rows}))
    if write:
        write_section(name, section)


def write_section(name: str, section: str) -> None:
    """Replace the section ``## name`` of bench/RESULTS.md with ``section`` (or add it at the end)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in bench/.\n"
    start = text.find(f"## {name}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")  # a blank line before the next
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def fmt(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    return f"{x:,.1f} {unit}"
