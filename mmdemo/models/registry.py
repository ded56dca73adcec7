"""One table of tasks and one of architectures: adding a model family is one entry and one tiny builder.

A task says which checkpoint to use by default and how it is evaluated; an architecture (keyed by the
task and the checkpoint's ``config.model_type``) says which transformers class loads it, which
processor reads its inputs and which modules LoRA adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmdemo.errors import InputError, ModelLoadError


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    env_var: str
    default_checkpoint: str
    metrics: tuple[str, ...]
    modality: str  # "image" or "audio": what the media files of a dataset are


@dataclass(frozen=True)
class Architecture:
    task: str
    model_type: str
    model_class: str  # attribute of the transformers package
    processor_class: str
    lora_targets: tuple[str, ...]
    tiny_name: str  # folder written by ``python -m mmdemo tiny-models DIR``
    # submodules whose Linear layers run through oneDNN for fp32 inference on the CPU (mmdemo.models.kernels):
    # the ones that multiply few rows per call (decoding steps, short texts), where it is 1.2-2.7x faster
    onednn_parts: tuple[str, ...] = ()


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("caption", "Caption", "MMDEMO_CAPTION_MODEL", "Salesforce/blip-image-captioning-base",
             ("bleu4", "cider"), "image"),
        Task("vqa", "Visual QA", "MMDEMO_VQA_MODEL", "Salesforce/blip-vqa-base", ("accuracy",), "image"),
        Task("retrieval", "Audio search", "MMDEMO_RETRIEVAL_MODEL", "laion/clap-htsat-unfused",
             ("text_to_audio_r1", "text_to_audio_r5", "audio_to_text_r1", "audio_to_text_r5"), "audio"),
    )
}

ARCHITECTURES: dict[tuple[str, str], Architecture] = {
    (a.task, a.model_type): a
    for a in (
        # BLIP: LoRA on the text decoder's self/cross attention and the vision encoder's fused qkv.
        Architecture("caption", "blip", "BlipForConditionalGeneration", "BlipProcessor",
                     ("query", "value", "qkv"), "blip-caption", onednn_parts=("text_decoder",)),
        Architecture("vqa", "blip", "BlipForQuestionAnswering", "BlipProcessor",
                     ("query", "value", "qkv"), "blip-vqa", onednn_parts=("text_encoder", "text_decoder")),
        # CLAP: both towers (RoBERTa text, HTSAT audio) name their attention projections query/value.
        Architecture("retrieval", "clap", "ClapModel", "ClapProcessor", ("query", "value"), "clap",
                     onednn_parts=("text_model", "text_projection")),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.") from None


def get_architecture(task: str, model_type: str, checkpoint: str = "") -> Architecture:
    try:
        return ARCHITECTURES[(task, model_type)]
    except KeyError:
        known = ", ".join(sorted(a.model_type for a in ARCHITECTURES.values() if a.task == task))
        raise ModelLoadError(
            f"Checkpoint {checkpoint or model_type!r} is a {model_type!r} model, which mmdemo does not support "
            f"for {task}; use a {known} checkpoint."
        ) from None
