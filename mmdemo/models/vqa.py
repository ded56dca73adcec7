"""The visual question answering task: an image and questions to one answer each, batched; how it is trained and
scored.

Questions are checked per request before batching (:func:`check_questions`); each batch goes to the model's family
module (``answer_batch``: BLIP's short answers, SmolVLM's free-form ones). Rows that ask about the same image
share one decoded image, so a family can encode it once. Fine-tuning takes ``file_name,question,answer`` rows;
the held-out score is the VQA benchmark's accuracy (:mod:`mmdemo.metrics`) on answers given as the tab gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import ImageSource, load_image
from mmdemo.models.generation import (
    VQA_DEFAULTS,
    GenerationOptions,
    check_max_new_tokens,
    count_tokens,
    fitted_to_texts,
    text_positions,
)
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import Task, family_module

SPEC = Task(
    "vqa", "Visual QA", "MMDEMO_VQA_MODEL", "Salesforce/blip-vqa-base", ("accuracy",), "image",
    columns=("question", "answer"),
    data_help="images with questions and answers: `metadata.csv` with the columns `file_name,question,answer` "
              "(several rows per image are fine)",
    tiny="blip-vqa", examples="shape questions", cli_command="vqa",
    more_checkpoints=("HuggingFaceTB/SmolVLM-256M-Instruct",),
)

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
    limits = get_settings().limits
    decoded: dict[int, object] = {}  # the same source asked several questions is decoded once, one object
    for src, _ in pairs:
        if id(src) not in decoded:
            decoded[id(src)] = load_image(src, limits)
    images = [decoded[id(src)] for src, _ in pairs]
    questions = clean_questions([q for _, q in pairs]) if pairs else []
    if len(questions) != len(pairs):
        raise InputError("Every question must have some text.")
    if not pairs:
        return []
    loaded = model if isinstance(model, Loaded) else load("vqa", model)
    check_questions(loaded, questions, options)
    return family_module(loaded.arch).answer_batch(loaded, images, questions, options, adapter, batch_size)


# ------------------------------------------------------------------------------------- training and scoring
def prepare(loaded: Loaded, examples, seed: int = 0):
    """Training inputs for ``file_name,question,answer`` rows and their collator, as the model's family builds them."""
    return family_module(loaded.arch).prepare_vqa(loaded, examples, seed=seed)


def fitted_decoding(loaded: Loaded, train) -> GenerationOptions:
    """The Visual QA tab's decoding, with lengths fitted to the training answers (``generation.fitted_to_texts``)."""
    tok = loaded.processor.tokenizer
    cap = 15  # the length training truncates answers to, less the start token
    lengths = [min(cap, len(tok(e.answer, add_special_tokens=False)["input_ids"])) for e in train]
    return fitted_to_texts(VQA_DEFAULTS, lengths, text_positions(loaded))


def evaluate(loaded: Loaded, examples, adapter=None, options: GenerationOptions | None = None):
    """VQA accuracy of the answers to the held-out questions, asked one at a time, and one sample per question."""
    from mmdemo.metrics import normalize_answer, vqa_accuracy

    images = {e.file: load_image(e.path) for e in examples}  # one object per file: encoded once
    outputs = [answer_pairs([(images[e.file], e.question)], options=options or VQA_DEFAULTS, adapter=adapter,
                            model=loaded)[0]
               for e in examples]
    metrics = {"accuracy": round(vqa_accuracy(outputs, [[e.answer] for e in examples]), 4)}
    samples = [{"file": e.file, "question": e.question, "reference": e.answer, "output": o,
                "score": float(normalize_answer(o) == normalize_answer(e.answer))}
               for e, o in zip(examples, outputs)]
    return metrics, samples


def verdict(c: dict) -> str:
    return (f"The fine-tuned model answers {c['adapter_right']} of {c['total']} held-out questions exactly right; the "
            f"base model answered {c['base_right']}.")
