"""The SigLIP family (``SiglipModel``): what it needs beyond the registry's entry, and its tiny checkpoint.

Quirk: SigLIP's text tower pools the *last* position of the sequence, and the model was trained on texts
padded to 64 tokens. Its model card says to tokenize with ``padding="max_length"``; a text padded only to
the longest in its batch gets another embedding (the last position is then a word, or another pad), so
the same query would score differently alone and in a batch. :func:`text_inputs` always pads to
``TEXT_LENGTH``.

The tiny checkpoint (:func:`build_tiny`) is a random ``SiglipModel`` with a SentencePiece tokenizer
trained here on a few hundred words (SigLIP's real tokenizer is a SentencePiece model, so the same
``SiglipTokenizer`` code reads both), saved with ``save_pretrained`` in the layout of
``google/siglip-base-patch16-224`` (config.json, model.safetensors, spiece.model, tokenizer_config.json,
processor_config.json) and loaded back with ``from_pretrained`` like the Hub checkpoint.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmdemo.models.registry import Architecture

# LoRA on both towers' attention projections (q_proj/v_proj in each layer).
ARCHITECTURES = (
    Architecture("image_search", "siglip", "SiglipModel", "SiglipProcessor", ("q_proj", "v_proj"), "siglip",
                 "siglip"),
)

TEXT_LENGTH = 64  # tokens every text is padded (and cut) to, as SigLIP was trained
TINY_IMAGE_SIZE = 32


def text_inputs(processor: Any, texts: Sequence[str], device: str | None = None) -> dict:
    """Tokenized ``texts`` as SigLIP reads them: padded to ``TEXT_LENGTH`` tokens (the model card's way)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    length = min(TEXT_LENGTH, int(getattr(tokenizer, "model_max_length", TEXT_LENGTH) or TEXT_LENGTH))
    batch = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return batch.to(device) if device else batch


def image_inputs(processor: Any, images: Sequence[Any], device: str | None = None, dtype: Any = None) -> dict:
    """Pixel values for RGB ``PIL`` images (resized to the model's size, normalised by its processor)."""
    batch = processor.image_processor(images=list(images), return_tensors="pt")
    pixels = batch["pixel_values"]
    if device:
        pixels = pixels.to(device)
    if dtype is not None:
        pixels = pixels.to(dtype)
    return {"pixel_values": pixels}


def _tiny_tokenizer(folder: Path):
    """A SentencePiece (unigram) tokenizer trained on the tiny vocabulary; ids as in SigLIP's: ``</s>`` pads."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    from mmdemo.models.tiny import WORDS

    corpus = [" ".join(WORDS), *WORDS, "a photo of a red circle", "a picture of a blue square"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(str(path), model_max_length=TEXT_LENGTH)


def build_tiny(out: Path, arch: Architecture | None = None) -> None:
    """Write a tiny random ``SiglipModel`` and its ``SiglipProcessor`` to ``out`` (the Hub checkpoint's layout)."""
    import tempfile

    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tiny_tokenizer(Path(tmp))
        config = SiglipConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                             pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=TINY_IMAGE_SIZE, patch_size=8),
        )
        model = SiglipModel(config).eval()
        with torch.no_grad():  # the paper's starting temperature and bias (transformers' init leaves both at 0, under
            model.logit_scale.fill_(math.log(10.0))  # which the sigmoid loss of a frozen scale barely ranks anything)
            model.logit_bias.fill_(-10.0)
        model.save_pretrained(out)
        # The PIL image processor: the default one needs torchvision, which this project does not install; both
        # save the same processor_config.json and resize, rescale and normalise alike.
        image_processor = SiglipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def prepare_image_search(loaded: Any, examples: Sequence[Any], seed: int = 0) -> tuple[list[dict], Any]:
    """Training inputs for image search (``mmdemo.jobs.train``): each example's pixels and its text, made as
    search makes them (64-token texts, the processor's pixels), and a collator that asks SigLIP for its own
    pairwise sigmoid loss (``return_loss=True``) over the batch's image-text pairs."""
    from mmdemo.media import load_image

    files = list(dict.fromkeys(e.file for e in examples))
    path = {e.file: e.path for e in examples}
    pixels = {}
    for start in range(0, len(files), 32):
        chunk = files[start:start + 32]
        batch = image_inputs(loaded.processor, [load_image(path[f]) for f in chunk])["pixel_values"]
        pixels.update(zip(chunk, batch))
    texts = text_inputs(loaded.processor, [e.text for e in examples])
    items = [{"pixel_values": pixels[e.file], **{k: v[i] for k, v in texts.items()}} for i, e in enumerate(examples)]

    def collate(batch: list[dict]) -> dict:
        import torch

        out = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
        return {**out, "return_loss": True}

    return items, collate
