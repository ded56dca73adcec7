"""Image captioning: images (and an optional text prefix) to one caption each, batched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import ImageSource, load_image
from mmdemo.models.beams import caption_generate
from mmdemo.models.generation import (
    CAPTION_DEFAULTS,
    GenerationOptions,
    check_max_new_tokens,
    count_tokens,
    text_positions,
)
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import family_module

MAX_PREFIX_CHARS = 1_000  # refused before tokenizing; the token limit below is the real bound


def check_prompt(loaded: Loaded, prompt: str | None, options: GenerationOptions = CAPTION_DEFAULTS,
                 detail: str = "short") -> None:
    """Refuse a prefix and ``max_new_tokens`` that together exceed the text decoder's positions, and a prefix or
    ``detail`` the model's family cannot follow (Florence-2 takes no prefix; BLIP writes short captions only).

    Checked per request before requests are batched: one too-long prefix would fail the whole batch.
    """
    family = family_module(loaded.arch)
    if family is not None:
        family.check_prompt(prompt)
        family.task_prompt(detail)
    elif detail != "short":
        raise InputError(f"{loaded.arch.model_type.upper()} writes short captions only; choose the short detail, or "
                         f"a model that writes detailed captions (Florence-2).")
    prompt = (prompt or "").strip()
    if len(prompt) > MAX_PREFIX_CHARS:
        raise InputError(f"The prefix is {len(prompt):,} characters long; keep it under {MAX_PREFIX_CHARS:,} "
                         f"(a few words work best).")
    used = count_tokens(loaded, prompt) if prompt else 1
    limit = text_positions(loaded)
    if used + options.min_new_tokens > limit:
        raise InputError(f"The prefix is {used} tokens long, more than this model's limit of {limit} tokens "
                         f"allows; shorten it to a few words.")
    check_max_new_tokens(loaded, options, used)


def caption(
    images: Sequence[ImageSource],
    prompt: str | None = None,
    options: GenerationOptions = CAPTION_DEFAULTS,
    adapter: str | Path | None = None,
    model: str | Loaded | None = None,
    batch_size: int = 16,
    detail: str = "short",
) -> list[str]:
    """One caption per image. Every image is decoded and checked before the model is touched.

    ``detail`` (``short``, ``detailed``, ``paragraph``) is for models that write longer captions on request
    (Florence-2); BLIP accepts ``short`` only."""
    limits = get_settings().limits
    pil_images = [load_image(img, limits) for img in images]
    if not pil_images:
        return []
    loaded = model if isinstance(model, Loaded) else load("caption", model)
    check_prompt(loaded, prompt, options, detail)
    prompt = (prompt or "").strip() or None
    captions: list[str] = []
    for start in range(0, len(pil_images), batch_size):
        captions += _caption_batch(loaded, pil_images[start:start + batch_size], prompt, options, adapter, detail)
    return captions


def _caption_batch(loaded: Loaded, images, prompt, options: GenerationOptions, adapter,
                   detail: str = "short") -> list[str]:
    import torch

    family = family_module(loaded.arch)
    if family is not None:
        return family.caption_batch(loaded, images, prompt, options, adapter, detail)
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
