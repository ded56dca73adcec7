"""Tiny random-weight checkpoints, one per supported architecture, in the Hugging Face on-disk layout.

``python -m mmdemo tiny-models DIR`` writes ``DIR/<name>/`` with config.json, model.safetensors,
tokenizer and processor files; they load through exactly the code a Hub id takes (``from_pretrained``),
so tests and ``python app.py --tiny-models`` exercise the real path without a download. Outputs are
meaningless, but deterministic (seeded) and learnable: initializer ranges are 0.02, not BLIP's vision
default of 1e-10, under which image features are ~1e-7 and nothing can learn from the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmdemo.models.registry import TASKS, _Table

# A small English vocabulary: the words of the bundled examples and of the synthetic datasets the
# tests learn from, plus every letter as a word start and as a WordPiece continuation.
WORDS = """
a an the of on in at with and or to is are what which how many color colour shape this that there it
picture photo image photography drawing sound recording clip audio noise music of
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle star cross ring bar stripe dot dots line lines diamond heart
small big large tiny huge left right top bottom middle center centre two three one four five
yes no background foreground on dark light bright
dog cat bird car rain wind water bell whistle beep tone chirp hum buzz drum click siren speech
voice man woman person people street tree house sky sea beach mountain city
high low pitch rising falling fast slow loud quiet soft short long pulse noise sweep chord
""".split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'-")


def bpe_tokenizer(cls_name: str, **kwargs):
    """A byte-level BPE tokenizer (RoBERTa's and BART's kind) trained on ``WORDS``, as transformers' ``cls_name``."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(WORDS)] + WORDS
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1, special_tokens=specials, show_progress=False)
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        lines = Path(tmp, "merges.txt").read_text().splitlines()
        merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#")]
    return getattr(transformers, cls_name)(vocab=vocab, merges=merges, model_max_length=64, **kwargs)


# task -> tiny folder name of its default checkpoint, for `--tiny-models` and the tests (each task's SPEC.tiny)
TINY_FOR_TASK: Mapping[str, str] = _Table(lambda: {t.name: t.tiny for t in TASKS.values()})


def tiny_more_for_task() -> dict[str, list[str]]:
    """task -> the tiny folders of its other model families (the tab's other base models under ``--tiny-models``)."""
    from mmdemo.models.registry import ARCHITECTURES

    more: dict[str, list[str]] = {}
    for arch in ARCHITECTURES.values():
        if arch.tiny_name != TINY_FOR_TASK.get(arch.task):
            more.setdefault(arch.task, []).append(arch.tiny_name)
    return more


def write_tiny_models(out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write every tiny checkpoint (or ``names``) under ``out_dir``; return name -> folder.

    A folder that already holds a complete checkpoint is kept, so repeated calls are cheap.
    """
    from mmdemo.models.registry import ARCHITECTURES, family_module

    out_dir = Path(out_dir)
    written = {}
    for arch in ARCHITECTURES.values():
        name = arch.tiny_name
        if names and name not in names:
            continue
        folder = out_dir / name
        if not (folder / "model.safetensors").is_file():
            tmp = out_dir / f".{name}.tmp"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            family_module(arch).build_tiny(tmp, arch)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        written[name] = folder
    return written
