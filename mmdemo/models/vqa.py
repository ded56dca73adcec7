"""Visual question answering: an image and one or more questions to one answer per question, batched.

BLIP's answer decoder attends to every question token without a padding mask, so questions are
batched only with questions of the same token length: answers are then exactly those of asking one
question at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import ImageSource, load_image
from mmdemo.models.generation import VQA_DEFAULTS, GenerationOptions
from mmdemo.models.loading import Loaded, load

MAX_QUESTION_CHARS = 500


def clean_questions(questions: Sequence[str]) -> list[str]:
    cleaned = [q.strip() for q in questions if q and q.strip()]
    if not cleaned:
        raise InputError("Ask at least one question about the image.")
    for q in cleaned:
        if len(q) > MAX_QUESTION_CHARS:
            raise InputError(f"A question is {len(q)} characters long; keep each under {MAX_QUESTION_CHARS}.")
    return cleaned


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
    tokenizer = loaded.processor.tokenizer
    groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[len(tokenizer(q)["input_ids"])].append(i)
    answers: list[str] = [""] * len(pairs)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            inputs = loaded.processor(images=[images[i] for i in chunk], text=[questions[i] for i in chunk],
                                      return_tensors="pt").to(loaded.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            with loaded.using(adapter) as m, torch.inference_mode():
                out = m.generate(**inputs, **options.kwargs())
            for i, text in zip(chunk, loaded.processor.batch_decode(out, skip_special_tokens=True)):
                answers[i] = text.strip()
    return answers
