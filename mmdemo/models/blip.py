"""The BLIP family (``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``): captions and short answers.

BLIP continues a free text prefix and writes short captions only. Decoding runs through
:mod:`mmdemo.models.beams`: the image's (or question's) cross-attention keys/values are computed once and shared
by the beams, with plain ``generate``'s tokens (tests/test_beams.py, tests/test_parity.py).

VQA quirk: BLIP's answer decoder attends to every question token without a padding mask, so questions are
batched only with questions of the same token length; answers are then exactly those of asking one question at
a time. Each distinct image goes through the vision encoder once per batch, however many questions are asked
about it (``model.generate`` would encode it again for every question).

Training: captions are decoded from ``[DEC]`` and answers from the decoder's start token, so the training inputs
start with them too. LoRA adapts the text decoder's self- and cross-attention ``query``/``value`` and the vision
encoder's fused ``qkv``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from mmdemo.errors import InputError
from mmdemo.models.batches import pad_ids
from mmdemo.models.beams import answer_generate, caption_generate, encode_images
from mmdemo.models.registry import Architecture

ARCHITECTURES = (
    Architecture("caption", "blip", "BlipForConditionalGeneration", "BlipProcessor", ("query", "value", "qkv"),
                 "blip-caption", "blip", onednn_parts=("text_decoder",), int8_parts=("",)),
    Architecture("vqa", "blip", "BlipForQuestionAnswering", "BlipProcessor", ("query", "value", "qkv"),
                 "blip-vqa", "blip", onednn_parts=("text_encoder", "text_decoder"), int8_parts=("",)),
)


# ------------------------------------------------------------------------------------------------- captions
def check_prompt(prompt: str | None) -> None:
    """Any prefix is fine: the caption continues it (its length is checked against the positions)."""


def task_prompt(detail: str) -> None:
    if detail != "short":
        raise InputError("BLIP writes short captions only; choose the short detail, or a model that writes detailed "
                         "captions (Florence-2).")


def caption_batch(loaded, images, prompt, options, adapter, detail: str = "short") -> list[str]:
    """One caption per image (each starting with ``prompt`` when there is one), ``model.generate``'s tokens."""
    import torch

    task_prompt(detail)
    processor = loaded.processor
    if prompt is None:
        inputs = processor(images=images, return_tensors="pt")
    else:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    inputs = inputs.to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    with loaded.using(adapter) as model, torch.inference_mode():
        out = caption_generate(model, **inputs, **options.kwargs())  # model.generate's tokens, less work
    return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]


# -------------------------------------------------------------------------------------------------- answers
def answer_batch(loaded, images, questions: list[str], options, adapter, batch_size: int = 32) -> list[str]:
    """One answer per (image, question) row; rows that share an image object share its vision pass."""
    import torch

    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    slot: dict[int, int] = {}  # one row of pixel values per distinct image
    distinct = []
    for img in images:
        if id(img) not in slot:
            slot[id(img)] = len(distinct)
            distinct.append(img)
    image_of = [slot[id(img)] for img in images]
    pixel_values = processor(images=distinct, return_tensors="pt")["pixel_values"].to(loaded.device, loaded.dtype)

    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[len(tokenizer(q)["input_ids"])].append(i)
    answers: list[str] = [""] * len(questions)
    with loaded.using(adapter) as m, torch.inference_mode():
        image_embeds = encode_images(m, pixel_values)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                text = tokenizer([questions[i] for i in chunk], return_tensors="pt").to(loaded.device)
                # BlipForQuestionAnswering.generate from the precomputed image embeddings (same steps, same tokens)
                out = answer_generate(m, image_embeds[[image_of[i] for i in chunk]], text["input_ids"],
                                      text["attention_mask"], **options.kwargs())
                for i, decoded in zip(chunk, processor.batch_decode(out, skip_special_tokens=True)):
                    answers[i] = decoded.strip()
    return answers


# ---------------------------------------------------------------------------------------------- fine-tuning
def pixel_values(loaded, examples) -> dict[str, Any]:
    """Each example file's pixel values, decoded once."""
    from mmdemo.media import load_image

    files = list(dict.fromkeys(e.file for e in examples))
    path = {e.file: e.path for e in examples}
    out = {}
    for start in range(0, len(files), 32):
        chunk = files[start:start + 32]
        pv = loaded.processor(images=[load_image(path[f]) for f in chunk], return_tensors="pt")["pixel_values"]
        out.update(zip(chunk, pv))
    return out


def prepare_caption(loaded, examples, seed: int = 0):
    """The image in, the caption (from ``[DEC]``) as labels; BLIP's own language-modelling loss."""
    tok = loaded.processor.tokenizer
    pixels = pixel_values(loaded, examples)
    bos, pad_id = tok.bos_token_id, tok.pad_token_id
    items = []
    for e in examples:
        ids = tok(e.text, truncation=True, max_length=40, return_tensors="pt")["input_ids"][0]
        ids[0] = bos  # generation starts captions from [DEC], so training must too
        items.append({"pixel_values": pixels[e.file], "input_ids": ids})

    def collate(batch: list[dict]) -> dict:
        import torch

        ids, mask = pad_ids([b["input_ids"] for b in batch], pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "input_ids": ids,
                "attention_mask": mask, "labels": labels}

    return items, collate


def prepare_vqa(loaded, examples, seed: int = 0):
    """The image and the question in, the answer (from the decoder's start token) as labels."""
    tok = loaded.processor.tokenizer
    pixels = pixel_values(loaded, examples)
    start_id = loaded.model.decoder_start_token_id
    pad_id = tok.pad_token_id
    items = []
    for e in examples:
        q = tok(e.question, truncation=True, max_length=40, return_tensors="pt")["input_ids"][0]
        a = tok(e.answer, truncation=True, max_length=16, return_tensors="pt")["input_ids"][0]
        a[0] = start_id  # answers are decoded from the decoder's start token (see answer_batch)
        items.append({"pixel_values": pixels[e.file], "input_ids": q, "answer_ids": a})

    def collate(batch: list[dict]) -> dict:
        import torch

        q, q_mask = pad_ids([b["input_ids"] for b in batch], pad_id)
        a, a_mask = pad_ids([b["answer_ids"] for b in batch], pad_id)
        return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "input_ids": q,
                "attention_mask": q_mask, "decoder_input_ids": a, "decoder_attention_mask": a_mask,
                "labels": a.masked_fill(a_mask == 0, -100)}

    return items, collate


# --------------------------------------------------------------------------------------------- tiny builder
def _bert_vocab() -> dict[str, int]:
    from mmdemo.models.tiny import CHARS, WORDS

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


def build_tiny(out: Path, arch: Architecture) -> None:
    """A tiny random BLIP of ``arch.model_class`` (2-layer ViT on 32 px, 2-layer BERT text model) in the Hub layout,
    with a WordPiece tokenizer over the tiny vocabulary and ``[DEC]``."""
    import torch
    import transformers
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    tok = _bert_tokenizer()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, initializer_range=0.02)
    text = dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, initializer_range=0.02)
    config = BlipConfig(vision_config=vision, text_config=text, projection_dim=32, initializer_range=0.02)
    getattr(transformers, arch.model_class)(config).eval().save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
