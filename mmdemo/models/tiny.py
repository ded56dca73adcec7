"""Tiny random-weight checkpoints, one per supported architecture, in the Hugging Face on-disk layout.

``python -m mmdemo tiny-models DIR`` writes ``DIR/<name>/`` with config.json, model.safetensors,
tokenizer and processor files; they load through exactly the code a Hub id takes (``from_pretrained``),
so tests and ``python app.py --tiny-models`` exercise the real path without a download. Outputs are
meaningless, but deterministic (seeded) and learnable: initializer ranges are 0.02, not BLIP's vision
default of 1e-10, under which image features are ~1e-7 and nothing can learn from the image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def _bert_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += CHARS + ["##" + c for c in CHARS if c.isalnum()]
    for w in WORDS:
        if w not in tokens:
            tokens.append(w)
    return {t: i for i, t in enumerate(tokens)}


def _bert_tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=_bert_vocab(), do_lower_case=True, model_max_length=64)
    # BLIP's decoder starts with [DEC], added after the vocabulary as in the real checkpoints.
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _roberta_tokenizer():
    return bpe_tokenizer("RobertaTokenizer")


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


def _blip_config(tok):
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, initializer_range=0.02)
    text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, initializer_range=0.02)
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=32, initializer_range=0.02)


def _blip_processor(tok):
    from transformers import BlipImageProcessor, BlipProcessor

    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return BlipProcessor(image_processor=image_processor, tokenizer=tok)


def _build_blip(model_class: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(0)
        tok = _bert_tokenizer()
        model = getattr(transformers, model_class)(_blip_config(tok)).eval()
        model.save_pretrained(out)
        _blip_processor(tok).save_pretrained(out)

    return build


def _build_clap(out: Path) -> None:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    torch.manual_seed(0)
    tok = _roberta_tokenizer()
    config = ClapConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        # spec_size 256 with 64 mel bins is what the 10 s, 1001-frame features of the real feature
        # extractor fold into; patches of 8 keep the Swin grid small (32x32).
        audio_config=dict(window_size=4, num_mel_bins=64, spec_size=256, patch_size=8, patch_stride=(8, 8),
                          hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                          projection_dim=32, num_hidden_layers=2),
        projection_dim=32,
    )
    model = ClapModel(config).eval()
    model.save_pretrained(out)
    # Same feature extractor settings as laion/clap-htsat-unfused (48 kHz, 10 s, rand_trunc + repeatpad).
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, padding="repeatpad", truncation="rand_trunc")
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "blip-caption": _build_blip("BlipForConditionalGeneration"),
    "blip-vqa": _build_blip("BlipForQuestionAnswering"),
    "clap": _build_clap,
}
# task -> tiny folder name, for `--tiny-models` and the tests
TINY_FOR_TASK = {"caption": "blip-caption", "vqa": "blip-vqa", "retrieval": "clap", "image_search": "siglip"}


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
            (BUILDERS.get(name) or family_module(arch).build_tiny)(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        written[name] = folder
    return written
