"""Visual question answering: an image and one or more questions to one answer per question, batched.

BLIP's answer decoder attends to every question token without a padding mask, so questions are
batched only with questions of the same token length: answers are then exactly those of asking one
question at a time. Each distinct image goes through the vision encoder once per request, however many
questions are asked about it (``model.generate`` would encode it again for every question).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import ImageSource, load_image
from mmdemo.models.beams import answer_generate, encode_images
from mmdemo.models.generation import (
    VQA_DEFAULTS,
    GenerationOptions,
    check_max_new_tokens,
    count_tokens,
    text_positions,
)
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import family_module

MAX_QUESTION_CHARS = 500


def clean_questions(questions: Sequence[str]) -> list[str]:
    cleaned = [q.strip() for q in questions if q and q.strip()]
    if not cleaned:
        raise InputError("Ask at least one question about the image.")
    for q in cleaned:
        if len(q) > MAX_QUESTION_CHARS:
            raise InputError(f"A question is {len(q)} characters long; keep each under {MAX_QUESTION_CHARS}.")
    return cleaned


def check_questions(loaded: Loaded, questions: Sequence[str], options: GenerationOptions = VQA_DEFAULTS) -> None:
    """Refuse questions longer than the question encoder's positions, and a ``max_new_tokens`` the answer
    decoder has no positions for; checked per request, before requests are batched together."""
    limit = text_positions(loaded)
    for q in clean_questions(questions):
        n = count_tokens(loaded, q)
        if n > limit:
            raise InputError(f"A question is {n} tokens long; this model reads at most {limit}; shorten it.")
    check_max_new_tokens(loaded, options)


def answer(
    image: ImageSource,
    questions: Sequence[str],
    options: GenerationOptions = VQA_DEFAULTS,
    adapter: str | Path | None = None,
    model: str | Loaded | None = None,
) -> list[str]:
    """Answers to ``questions`` about one image, in order."""
    questions = clean_questions(questions)
    pil = load_image(image, get_settings().limits)
    return answer_pairs([(pil, q) for q in questions], options, adapter, model)


def answer_pairs(
    pairs: Sequence[tuple[ImageSource, str]],
    options: GenerationOptions = VQA_DEFAULTS,
    adapter: str | Path | None = None,
    model: str | Loaded | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Answers for (image, question) pairs, e.g. from several users at once, in input order."""
    import torch

    limits = get_settings().limits
    images = [load_image(img, limits) for img, _ in pairs]
    questions = clean_questions([q for _, q in pairs]) if pairs else []
    if len(questions) != len(pairs):
        raise InputError("Every question must have some text.")
    if not pairs:
        return []
    loaded = model if isinstance(model, Loaded) else load("vqa", model)
    check_questions(loaded, questions, options)
    family = family_module(loaded.arch)
    if family is not None:  # a chat model (SmolVLM): one turn per question, batched by its own generate
        out: list[str] = []
        for start in range(0, len(pairs), batch_size):
            out += family.answer_batch(loaded, images[start:start + batch_size],
                                       questions[start:start + batch_size], options, adapter)
        return out
    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    # one row of pixel values per distinct image (the same object asked several questions)
    slot: dict[int, int] = {}
    distinct = []
    for img, (src, _) in zip(images, pairs):
        if id(src) not in slot:
            slot[id(src)] = len(distinct)
            distinct.append(img)
    image_of = [slot[id(src)] for src, _ in pairs]
    pixel_values = processor(images=distinct, return_tensors="pt")["pixel_values"].to(loaded.device, loaded.dtype)

    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[len(tokenizer(q)["input_ids"])].append(i)
    answers: list[str] = [""] * len(pairs)
    with loaded.using(adapter) as m, torch.inference_mode():
        image_embeds = encode_images(m, pixel_values)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                text = tokenizer([questions[i] for i in chunk], return_tensors="pt").to(loaded.device)
                out = _generate(m, image_embeds[[image_of[i] for i in chunk]], text, options)
                for i, decoded in zip(chunk, processor.batch_decode(out, skip_special_tokens=True)):
                    answers[i] = decoded.strip()
    return answers


def _generate(model, image_embeds, text, options: GenerationOptions):
    """``BlipForQuestionAnswering.generate`` from precomputed image embeddings (same steps, same tokens)."""
    return answer_generate(model, image_embeds, text["input_ids"], text["attention_mask"], **options.kwargs())
