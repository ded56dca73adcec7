"""The caption task: images (and an optional text prefix) to one caption each, batched; how it is trained and scored.

Inference checks every request before batching (:func:`check_prompt`), then hands each batch to the model's family
module (``caption_batch``: BLIP, Florence-2, SmolVLM). Fine-tuning takes ``file_name,text`` rows; the family's
``prepare_caption`` turns them into training batches. Held-out scores are coco-caption's BLEU-4 and CIDEr
(:mod:`mmdemo.metrics`) on captions written as the Caption tab writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import ImageSource, load_image
from mmdemo.models.generation import (
    CAPTION_DEFAULTS,
    GenerationOptions,
    check_max_new_tokens,
    count_tokens,
    fitted_to_texts,
    text_positions,
)
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import Task, family_module

SPEC = Task(
    "caption", "Caption", "MMDEMO_CAPTION_MODEL", "Salesforce/blip-image-captioning-base", ("bleu4", "cider"), "image",
    columns=("text",), data_help="images, each with a description: `metadata.csv` with the columns `file_name,text`",
    tiny="blip-caption", examples="shapes", cli_command="caption",
    more_checkpoints=("florence-community/Florence-2-base", "HuggingFaceTB/SmolVLM-256M-Instruct"),
)

MAX_PREFIX_CHARS = 1_000  # refused before tokenizing; the token limit below is the real bound


def check_prompt(loaded: Loaded, prompt: str | None, options: GenerationOptions = CAPTION_DEFAULTS,
                 detail: str = "short") -> None:
    """Refuse a prefix and ``max_new_tokens`` that together exceed the text decoder's positions, and a prefix or
    ``detail`` the model's family cannot follow (Florence-2 takes no prefix; BLIP writes short captions only).

    Checked per request before requests are batched: one too-long prefix would fail the whole batch.
    """
    family = family_module(loaded.arch)
    family.check_prompt(prompt)
    family.task_prompt(detail)
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
    return family_module(loaded.arch).caption_batch(loaded, images, prompt, options, adapter, detail)


# ------------------------------------------------------------------------------------- training and scoring
def prepare(loaded: Loaded, examples, seed: int = 0):
    """Training inputs for ``file_name,text`` rows and their collator, as the model's family builds them."""
    return family_module(loaded.arch).prepare_caption(loaded, examples, seed=seed)


def fitted_decoding(loaded: Loaded, train) -> GenerationOptions:
    """The Caption tab's decoding, with lengths fitted to the training captions (``generation.fitted_to_texts``)."""
    tok = loaded.processor.tokenizer
    cap = 39  # the length training truncates to, less the start token
    lengths = [min(cap, len(tok(e.text, add_special_tokens=False)["input_ids"])) for e in train]
    return fitted_to_texts(CAPTION_DEFAULTS, lengths, text_positions(loaded))


def evaluate(loaded: Loaded, examples, adapter=None, options: GenerationOptions | None = None):
    """BLEU-4 and CIDEr of the captions of the held-out images, and one sample per image (its sentence BLEU)."""
    from mmdemo.metrics import bleu4, cider, sentence_bleu

    files = list(dict.fromkeys(e.file for e in examples))
    path = {e.file: e.path for e in examples}
    refs = {f: [e.text for e in examples if e.file == f] for f in files}
    # one image per call, as the Caption tab sends one: batching may change the last digits of the logits
    outputs = [caption([path[f]], options=options or CAPTION_DEFAULTS, adapter=adapter, model=loaded)[0]
               for f in files]
    metrics = {"bleu4": round(bleu4(outputs, [refs[f] for f in files]), 4),
               "cider": round(cider(outputs, [refs[f] for f in files]), 4)}
    samples = [{"file": f, "reference": refs[f][0], "output": o, "score": round(sentence_bleu(o, refs[f]), 4)}
               for f, o in zip(files, outputs)]
    return metrics, samples


def verdict(c: dict) -> str:
    n = c["total"]
    if not c["better"] and not c["worse"]:
        return (f"The fine-tuned model writes the same captions as the base model for all {n} held-out examples: it "
                f"has not learned enough to change them (try more examples, more epochs or a higher learning rate).")
    rest = [f"worse on {c['worse']}" if c["worse"] else "", f"the same on {c['same']}" if c["same"] else ""]
    rest = [r for r in rest if r]
    tail = f" ({' and '.join(rest)})" if rest else ""
    return (f"The fine-tuned model matches the held-out captions better than the base model on {c['better']} of "
            f"{n} examples{tail}.")
