"""Decoding options shared by captioning and VQA, validated up front."""

from __future__ import annotations

from dataclasses import dataclass

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
