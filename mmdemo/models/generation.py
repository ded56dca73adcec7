"""Decoding options shared by captioning and VQA, validated up front."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from mmdemo.errors import InputError


@dataclass(frozen=True)
class GenerationOptions:
    """Beam search settings; the defaults are BLIP's published captioning eval (3 beams, max 20, min 5)."""

    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.num_beams <= 10:
            raise InputError(f"Beams must be between 1 and 10, not {self.num_beams}.")
        if not 1 <= self.max_new_tokens <= 256:
            raise InputError(f"Max new tokens must be between 1 and 256, not {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InputError(
                f"Min new tokens must be between 0 and max new tokens ({self.max_new_tokens}), "
                f"not {self.min_new_tokens}."
            )

    def kwargs(self) -> dict:
        return dict(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                    min_new_tokens=self.min_new_tokens, do_sample=False)


CAPTION_DEFAULTS = GenerationOptions()
# Answers are short: BLIP's VQA decoding uses a few beams and no minimum length.
VQA_DEFAULTS = GenerationOptions(num_beams=3, max_new_tokens=10, min_new_tokens=1)


def fitted_to_texts(defaults: GenerationOptions, lengths: list[int], positions: int) -> GenerationOptions:
    """``defaults`` adjusted to texts of ``lengths`` tokens: what an adapter trained on them should decode with.

    The minimum length may not exceed the shortest text (BLIP's published minimum of 5 tokens would pad a
    two-word caption with three made-up words), and the maximum must leave room for the longest (plus its end
    token), within the model's ``positions``.
    """
    if not lengths:
        return defaults
    longest = min(max(defaults.max_new_tokens, max(lengths) + 1), max(1, positions - 1))
    shortest = min(defaults.min_new_tokens, min(lengths), longest)
    return replace(defaults, max_new_tokens=longest, min_new_tokens=max(0, shortest))


def for_adapter(defaults: GenerationOptions, adapter: str | Path | None) -> GenerationOptions:
    """The decoding defaults for ``adapter``: the ones its fine-tune fitted to its training texts and wrote into
    its ``mmdemo.json`` (``"generation"``), else ``defaults``; beams stay the caller's."""
    if not adapter:
        return defaults
    from mmdemo.models.loading import ADAPTER_META

    path = Path(adapter) / ADAPTER_META
    try:
        fitted = json.loads(path.read_text()).get("generation") or {}
        return replace(defaults, max_new_tokens=int(fitted.get("max_new_tokens", defaults.max_new_tokens)),
                       min_new_tokens=int(fitted.get("min_new_tokens", defaults.min_new_tokens)))
    except (OSError, ValueError, TypeError, AttributeError, InputError):
        return defaults  # an adapter from elsewhere (no mmdemo.json) decodes with the task's defaults


def text_positions(loaded) -> int:
    """How many text tokens (prompt plus generated) the loaded model's text side has positions for."""
    config = loaded.model.config
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", None) or 512)


def count_tokens(loaded, text: str) -> int:
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    return len(tokenizer(text)["input_ids"])


def check_max_new_tokens(loaded, options: GenerationOptions, used: int = 1) -> None:
    """Refuse a ``max_new_tokens`` the model has no positions for (``used`` tokens come before the answer)."""
    limit = text_positions(loaded)
    if used + options.max_new_tokens > limit:
        raise InputError(f"Max new tokens can be at most {max(1, limit - used)} with this model and input, not "
                         f"{options.max_new_tokens}; lower it.")


def max_text_tokens(loaded) -> int:
    """The longest text the loaded model reads: its tokenizer's stated maximum, else its text positions."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    stated = getattr(tokenizer, "model_max_length", None)
    return int(stated) if stated and stated < 1_000_000 else text_positions(loaded)


def check_text(loaded, text: str, what: str, max_chars: int = 1_000) -> None:
    """Refuse a text longer than the model reads (it would be cut silently, or fail a whole batch)."""
    if len(text) > max_chars:
        raise InputError(f"The {what} is {len(text):,} characters long; keep it under {max_chars:,}.")
    limit = max_text_tokens(loaded)
    n = count_tokens(loaded, text)
    if n > limit:
        raise InputError(f"The {what} is {n} tokens long; this model reads at most {limit}; shorten it.")


def check_query(loaded, text: str | None, example: str, max_chars: int = 300) -> str:
    """A search text, stripped; a sentence (naming ``example``) when it is empty or longer than the model reads."""
    text = (text or "").strip()
    if not text:
        raise InputError(f"Type some text to search for, such as '{example}'.")
    check_text(loaded, text, "search text", max_chars)
    return text


def split_labels(loaded, labels: str | None, example: str, most: int = 50, max_chars: int = 300) -> list[str]:
    """The comma- or line-separated labels, each within the model's text limit, at most ``most``, each once."""
    import re

    found = [lab.strip() for lab in re.split(r"[,\n]", labels or "") if lab.strip()]
    if not found:
        raise InputError(f"Write at least one label to rank, such as '{example}'.")
    if len(found) > most:
        raise InputError(f"{len(found)} labels were given; rank at most {most} at a time.")
    for label in found:
        check_text(loaded, label, "label", max_chars)
    return list(dict.fromkeys(found))  # a label given twice is ranked once
