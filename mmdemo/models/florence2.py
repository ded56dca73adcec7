"""The Florence-2 family (``Florence2ForConditionalGeneration``, native in transformers 5): captions.

Florence-2 is steered by task tokens rather than a free prefix: ``<CAPTION>`` writes a short caption,
``<DETAILED_CAPTION>`` a longer one and ``<MORE_DETAILED_CAPTION>`` a paragraph; its processor turns the token
into the model's prompt (``What does the image describe?``) and puts the image's placeholder tokens in front.
Decoding is the model's own ``generate`` (a BART encoder-decoder over the image and prompt tokens), so the
tokens are plain ``generate``'s by construction (tests/test_florence2.py checks it, with and without a LoRA
adapter). LoRA adapts the language model's query and value projections (``q_proj``, ``v_proj``).

Everything Florence-2 needs is here: its task prompts, how a batch is built and decoded, and its tiny builder.
"""

from __future__ import annotations

from pathlib import Path

from mmdemo.errors import InputError
from mmdemo.models.registry import Architecture

# Task tokens instead of a prefix; LoRA on the BART language model's query/value projections.
ARCHITECTURES = (
    Architecture("caption", "florence2", "Florence2ForConditionalGeneration", "AutoProcessor",
                 ("q_proj", "v_proj"), "florence2", "florence2"),
)

# The caption lengths a visitor may ask for, and the task token each one is.
DETAIL_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "paragraph": "<MORE_DETAILED_CAPTION>"}


def check_prompt(prompt: str | None) -> None:
    """Florence-2 does not continue a prefix: its text input is a task, chosen by ``detail``."""
    if (prompt or "").strip():
        raise InputError("Florence-2 does not continue a text prefix; leave the prefix empty (choose a short or "
                         "detailed caption instead).")


def task_prompt(detail: str) -> str:
    try:
        return DETAIL_TASKS[detail]
    except KeyError:
        raise InputError(f"Caption detail must be one of {', '.join(DETAIL_TASKS)}, not {detail!r}.") from None


def caption_batch(loaded, images, prompt, options, adapter, detail: str = "short") -> list[str]:
    """One caption per image, as ``model.generate`` writes it for the task token of ``detail`` (``prompt``: none,
    :func:`check_prompt` refused one)."""
    import torch

    processor = loaded.processor
    inputs = processor(images=images, text=[task_prompt(detail)] * len(images), return_tensors="pt")
    inputs = inputs.to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    with loaded.using(adapter) as model, torch.inference_mode():
        out = model.generate(**inputs, **options.kwargs())
    return [" ".join(text.split()) for text in processor.batch_decode(out, skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------- tiny builder
def build_tiny(out: Path, arch: Architecture | None = None) -> None:
    """A tiny random Florence-2 in the Hub layout: BART tokenizer with the ``<image>`` token, a CLIP-style image
    processor, a two-stage DaViT vision tower (32 x 32 pixels -> 16 patches + 1 pooled token) and a 2+2-layer BART."""
    import torch
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    from mmdemo.models.tiny import bpe_tokenizer

    torch.manual_seed(0)
    tok = bpe_tokenizer("BartTokenizer", extra_special_tokens={"image_token": "<image>"})
    # 32 px, strides 4 then 2: a 4 x 4 grid, plus the pooled token = 17 image tokens per picture.
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=False, image_seq_length=17)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2], window_size=2,
                  projection_dim=32, drop_path_rate=0.0, max_position_embeddings=10, initializer_range=0.02)
    text = dict(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id, init_std=0.02)
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(out)
    Florence2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


# ------------------------------------------------------------------------------------------- fine-tuning
def prepare_caption(loaded, examples, seed: int = 0):
    """Training inputs, computed once per job, and their collator (``mmdemo.jobs.train`` runs them): the image and
    the ``<CAPTION>`` prompt in, the caption as labels (``<s> caption </s>``; the model shifts them right behind its
    decoder start token, as ``generate`` starts)."""
    from mmdemo.media import load_image
    from mmdemo.models.batches import pad_ids

    processor, tok = loaded.processor, loaded.processor.tokenizer
    prompt = task_prompt("short")
    items = []
    for e in examples:
        inputs = processor(images=[load_image(e.path)], text=[prompt], return_tensors="pt")
        labels = tok(e.text, truncation=True, max_length=40, return_tensors="pt")["input_ids"][0]
        items.append({"pixel_values": inputs["pixel_values"][0], "input_ids": inputs["input_ids"][0],
                      "labels": labels})

    def collate(batch: list[dict]) -> dict:
        import torch

        ids, mask = pad_ids([b["input_ids"] for b in batch], tok.pad_token_id)
        labels, label_mask = pad_ids([b["labels"] for b in batch], tok.pad_token_id)
        return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "input_ids": ids,
                "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100)}

    return items, collate

