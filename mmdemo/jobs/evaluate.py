"""Held-out evaluation, before and after fine-tuning, through the same functions the tabs use.

Each task module scores its own outputs (``evaluate`` in ``mmdemo.models.<task>``: captions and answers decoded
one image at a time, as a visitor sends them, with the tab's beams and the lengths a fine-tune fitted to its
training texts; search tasks embed the held-out texts and media as the library does) with the metrics of
:mod:`mmdemo.metrics`. Each held-out example also gets its own score, so :func:`compare` can say on how many
examples the adapter came closer to the reference than the base model; :data:`METRICS` and :func:`verdict` say it
in words.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmdemo.metrics import (  # noqa: F401  (the metrics are read from here by the UI, the CLI and the tests)
    METRICS,
    Metric,
    bleu4,
    cider,
    normalize_answer,
    recall_at_k,
    sentence_bleu,
    tokens,
    vqa_accuracy,
)
from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS
from mmdemo.models.registry import task_module

CAPTION_EVAL = CAPTION_DEFAULTS  # the Caption tab's defaults: the table shows what the tab gives
VQA_EVAL = VQA_DEFAULTS


def evaluate(task: str, loaded, examples: Sequence, adapter=None,
             show: int | None = 4, options=None) -> tuple[dict, list[dict]]:
    """Metrics on ``examples`` and the first ``show`` outputs (all with ``None``), through the tabs' functions.

    ``options`` are the decoding options (default: the tab's); a fine-tune passes the ones fitted to its training
    texts, for the base model and the adapter alike.

    Each sample is ``{"file", ["question"], "reference", "output", "score"}``; ``score`` is that example's own
    closeness to its reference (smoothed sentence BLEU for captions, 1 or 0 for an answer or a retrieved text).
    """
    metrics, samples = task_module(task).evaluate(loaded, examples, adapter=adapter, options=options)
    return metrics, samples if show is None else samples[:show]


def compare(task: str, before: Sequence[dict], after: Sequence[dict]) -> dict:
    """How the adapter did against the base model, example by example (samples from :func:`evaluate`).

    ``better``/``worse``/``same``: examples whose own score rose, fell or stayed; ``base_right``/``adapter_right``:
    examples scored 1 (an exact answer, the right description) by each model.
    """
    pairs = [(b.get("score") or 0.0, a.get("score") or 0.0) for b, a in zip(before, after)]
    return {"task": task, "total": len(pairs), "better": sum(a > b for b, a in pairs),
            "worse": sum(a < b for b, a in pairs), "same": sum(a == b for b, a in pairs),
            "base_right": sum(b >= 1.0 for b, _ in pairs), "adapter_right": sum(a >= 1.0 for _, a in pairs)}


def verdict(task: str, c: dict | None) -> str:
    """One sentence for people who do not program: did fine-tuning help on the held-out examples?"""
    if not c or not c.get("total"):
        return "There were no held-out examples to compare the two models on."
    return task_module(task).verdict(c)
