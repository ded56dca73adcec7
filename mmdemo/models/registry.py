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
    # other base models the tab offers beside the default, chosen per request from its Model list
    # (``MMDEMO_<TASK>_MORE_MODELS`` replaces them; see mmdemo.models.loading.more_checkpoints)
    more_checkpoints: tuple[str, ...] = ()

    @property
    def more_env_var(self) -> str:
        return self.env_var.removesuffix("_MODEL") + "_MORE_MODELS"


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
    # the family's own module under mmdemo.models (how a batch is built and decoded, its tiny builder), for the
    # families added after BLIP and CLAP, whose code still lives in the task modules; "" for those two
    family: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("caption", "Caption", "MMDEMO_CAPTION_MODEL", "Salesforce/blip-image-captioning-base",
             ("bleu4", "cider"), "image",
             more_checkpoints=("florence-community/Florence-2-base", "HuggingFaceTB/SmolVLM-256M-Instruct")),
        Task("vqa", "Visual QA", "MMDEMO_VQA_MODEL", "Salesforce/blip-vqa-base", ("accuracy",), "image",
             more_checkpoints=("HuggingFaceTB/SmolVLM-256M-Instruct",)),
        Task("retrieval", "Audio search", "MMDEMO_RETRIEVAL_MODEL", "laion/clap-htsat-unfused",
             ("text_to_audio_r1", "text_to_audio_r5", "audio_to_text_r1", "audio_to_text_r5"), "audio"),
        Task("image_search", "Image search", "MMDEMO_IMAGE_SEARCH_MODEL", "google/siglip-base-patch16-224",
             ("text_to_image_r1", "text_to_image_r5", "image_to_text_r1", "image_to_text_r5"), "image"),
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
        # Florence-2: task tokens instead of a prefix; LoRA on the BART language model's query/value projections.
        Architecture("caption", "florence2", "Florence2ForConditionalGeneration", "AutoProcessor",
                     ("q_proj", "v_proj"), "florence2", family="florence2"),
        # SmolVLM (SmolVLM-256M-Instruct is an Idefics3 model): a chat turn per request, free-form answers.
        Architecture("caption", "idefics3", "Idefics3ForConditionalGeneration", "AutoProcessor",
                     ("q_proj", "v_proj"), "smolvlm", family="smolvlm"),
        Architecture("vqa", "idefics3", "Idefics3ForConditionalGeneration", "AutoProcessor",
                     ("q_proj", "v_proj"), "smolvlm", family="smolvlm"),
        # CLAP: both towers (RoBERTa text, HTSAT audio) name their attention projections query/value.
        Architecture("retrieval", "clap", "ClapModel", "ClapProcessor", ("query", "value"), "clap",
                     onednn_parts=("text_model", "text_projection")),
        # SigLIP: LoRA on both towers' attention projections (q_proj/k_proj/v_proj in each layer).
        Architecture("image_search", "siglip", "SiglipModel", "SiglipProcessor", ("q_proj", "v_proj"), "siglip",
                     family="siglip"),
    )
}


def family_module(arch: Architecture):
    """The family module of ``arch`` (``mmdemo.models.<family>``), or ``None`` for BLIP and CLAP."""
    if not arch.family:
        return None
    import importlib

    return importlib.import_module(f"mmdemo.models.{arch.family}")


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
