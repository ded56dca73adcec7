"""Where tasks and model families are registered: one module per task, one per model family, listed here.

A **task module** (``mmdemo/models/<task>.py``) holds everything a task is:

- ``SPEC``: its :class:`Task` (default checkpoint, dataset columns, metrics, how the page names it);
- its inference (``caption``, ``answer_pairs``, the search libraries), which the tabs, the CLI and MCP call;
- ``prepare(loaded, examples, seed) -> (items, collate)``: dataset rows to training batches (the family's
  ``prepare_<task>`` builds them; :mod:`mmdemo.jobs.train` runs them through the Trainer);
- ``evaluate(loaded, examples, adapter, options) -> (metrics, samples)``: the held-out scores, through the same
  inference the tab uses, and ``verdict(comparison)``: one sentence saying whether fine-tuning helped;
- ``fitted_decoding(loaded, train)``: decoding options fitted to a fine-tune's texts (``None`` for search tasks).

A **family module** (``mmdemo/models/<family>.py``) holds everything a kind of checkpoint is:

- ``ARCHITECTURES``: one :class:`Architecture` per task it serves, keyed by the checkpoint's ``config.model_type``
  (the transformers class that loads it, its processor, the modules LoRA adapts);
- its processor quirks and batching (``caption_batch``, ``answer_batch``, ``text_inputs``...), whatever its tasks
  ask of it, and ``prepare_<task>`` for each task it can be fine-tuned on;
- ``build_tiny(out, arch)``: a tiny random checkpoint in the Hub layout, for tests and ``--tiny-models``.

Adding a task is one task module, its family module(s) and one tab module under ``mmdemo/ui``, plus a name in
:data:`TASK_MODULES` (and :data:`FAMILY_MODULES`) and the tab in ``mmdemo/ui/app.py``'s list. The two tables below are
built from the modules on first use (the modules import this one, so they are not imported here at import time).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mmdemo.errors import InputError, ModelLoadError

# mmdemo.models.<name>, in the order the app shows the tabs and writes the tiny models
TASK_MODULES = ("caption", "vqa", "retrieval", "image_search")
FAMILY_MODULES = ("blip", "florence2", "smolvlm", "clap", "siglip")


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # the tab that serves it, as the page names it
    env_var: str
    default_checkpoint: str
    metrics: tuple[str, ...]
    modality: str  # "image" or "audio": what the media files of a dataset are
    columns: tuple[str, ...]  # a dataset's metadata columns beside file_name
    data_help: str  # what a dataset for it holds, in words (the Fine-tune tab)
    tiny: str  # the tiny checkpoint (``Architecture.tiny_name``) that stands in for the default one
    # the example dataset (mmdemo.data.write_example_dataset): "shapes", "shape questions" or "sounds"
    examples: str
    cli_command: str | None = None  # the ``python -m mmdemo`` command that uses an adapter of it, if any
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
    family: str  # its family module, mmdemo.models.<family>
    # submodules whose Linear layers run through oneDNN for fp32 inference on the CPU (mmdemo.models.kernels):
    # the ones that multiply few rows per call (decoding steps, short texts), where it is 1.2-2.7x faster
    onednn_parts: tuple[str, ...] = ()
    # submodules ("" for the whole model) whose Linear layers go int8 in the CPU fast mode (mmdemo.models.fast), for
    # the families whose agreement with fp32 bench/fast.py measured; the others stay exact in fast mode
    int8_parts: tuple[str, ...] = ()


class _Table(Mapping):
    """A read-only mapping built from the modules the first time it is read."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build
        self._data: dict | None = None

    def _get(self) -> dict:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key: Any) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"mmdemo.models.{name}")


def _tasks() -> dict[str, Task]:
    specs = [_module(m).SPEC for m in TASK_MODULES]
    _TASK_MODULE.update({s.name: m for s, m in zip(specs, TASK_MODULES)})
    return {s.name: s for s in specs}


def _architectures() -> dict[tuple[str, str], Architecture]:
    return {(a.task, a.model_type): a for m in FAMILY_MODULES for a in _module(m).ARCHITECTURES}


_TASK_MODULE: dict[str, str] = {}
TASKS: Mapping[str, Task] = _Table(_tasks)
ARCHITECTURES: Mapping[tuple[str, str], Architecture] = _Table(_architectures)


def task_module(task: str) -> ModuleType:
    """The task module of ``task`` (``mmdemo.models.<module>``)."""
    get_task(task)
    return _module(_TASK_MODULE[task])


def family_module(arch: Architecture) -> ModuleType:
    """The family module of ``arch`` (``mmdemo.models.<family>``)."""
    return _module(arch.family)


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
