"""Loading checkpoints lazily, once per (task, checkpoint, device, dtype), and switching LoRA adapters.

A checkpoint is a Hub id or a local folder in the Hugging Face layout; both go through the same
``from_pretrained`` calls. Before a Hub id loads, :mod:`mmdemo.models.hub` says whether the Hub answers:
if not, a cached copy loads with ``local_files_only`` (no retries) and an uncached one fails at once with
a sentence saying what to do. A failed load is remembered for ``FAILURE_TTL`` seconds, so clicks after
it get the same sentence at once instead of waiting for the Hub again.

Adapters are PEFT folders injected into the loaded base model with ``PeftModel.from_pretrained`` /
``load_adapter`` and chosen per request with ``set_adapter``; a request without adapter runs under
``disable_adapter()``, so the base is never reloaded.

With ``MMDEMO_FAST=1`` a model loaded on the CPU is made faster by :mod:`mmdemo.models.fast` (int8 layers,
an exported CLAP audio encoder); it is cached apart from the exact one, and ``fast=False`` loads the exact one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.config import Settings, get_settings
from mmdemo.errors import InputError, ModelLoadError
from mmdemo.models import hub
from mmdemo.models.registry import TASKS, Architecture, get_architecture, get_task

ADAPTER_META = "mmdemo.json"  # written next to adapter_config.json: task, base checkpoint, metrics


def pick_device(override: str | None = None) -> str:
    """``MMDEMO_DEVICE`` (or ``override``) if set, else cuda, then mps, then cpu."""
    import torch

    choice = override or get_settings().device
    if choice:
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"Device {choice!r} was asked for but no CUDA GPU is visible; unset MMDEMO_DEVICE.")
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, override: str | None = None):
    """bf16 on a CUDA GPU that supports it, fp32 elsewhere (``MMDEMO_DTYPE`` overrides)."""
    import torch

    name = override or get_settings().dtype
    if name:
        return getattr(torch, name)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_checkpoint(task: str, checkpoint: str | None = None, settings: Settings | None = None) -> str:
    """The checkpoint for ``task``: the argument, else the settings' (``MMDEMO_<TASK>_MODEL``, ``--<task>-model``;
    default: :func:`~mmdemo.config.get_settings`), else the registry default."""
    spec = get_task(task)
    return checkpoint or (settings or get_settings()).models.get(task) or spec.default_checkpoint


def checkpoint_name(checkpoint: str | None) -> str:
    """A checkpoint as people read it: a Hub id as it is, a local folder by its own name (never a server path)."""
    text = str(checkpoint or "")
    local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.path.isdir(text)
    return Path(text).name if local else text


def more_checkpoints(task: str, settings: Settings | None = None) -> list[str]:
    """The other base models offered for ``task`` beside its main checkpoint: the settings' if set
    (``MMDEMO_<TASK>_MORE_MODELS``, ``--<task>-more-models``: comma-separated Hub ids or folders, ``none`` for
    none; default: :func:`~mmdemo.config.get_settings`), else the registry's."""
    spec = get_task(task)
    more = (settings or get_settings()).more_models
    return list(more[task] if task in more else spec.more_checkpoints)


def check_task_names(settings: Settings) -> None:
    """Raise one sentence when a ``MMDEMO_<TASK>_MODEL`` or ``..._MORE_MODELS`` names no task of the registry
    (mmdemo.config reads them for any name: it does not know the registry)."""
    for task in sorted({*settings.models, *settings.more_models}):
        if task not in TASKS:
            which = "MODEL" if task in settings.models else "MORE_MODELS"
            raise InputError(f"MMDEMO_{task.upper()}_{which} is set, but {task} is no task; the tasks are "
                             f"{', '.join(TASKS)}: fix its name or unset it.")


def _is_local(checkpoint: str) -> bool:
    return checkpoint.startswith((".", "/", "~")) or os.path.isdir(checkpoint) or checkpoint.count("/") > 1


def _missing(task: str, checkpoint: str, why: str = "", partly: bool = False) -> ModelLoadError:
    """A checkpoint that is there but unusable (``why``), or a Hub id that is not (``partly``) cached nor reachable."""
    spec = get_task(task)
    why = " ".join(why.split())  # library errors span lines; the sentence is shown on one
    # Sentences serve the app (--<task>-model) and the CLI (--model) alike, so they name both flags.
    flags = f"{spec.env_var} (--{task}-model in app.py, --model in the CLI)"
    if _is_local(checkpoint):
        return ModelLoadError(
            f"Checkpoint folder {checkpoint!r} {why or 'cannot be loaded'}; point {flags} at a folder with "
            f"config.json and model weights."
        )
    if why:
        return ModelLoadError(
            f"Checkpoint {checkpoint!r} {why}; check the Hub id, or point {flags} at a local folder."
        )
    return ModelLoadError(
        f"Checkpoint {checkpoint!r} is {'only partly' if partly else 'not'} in the local Hugging Face cache and "
        f"the Hub ({hub.endpoint()}) cannot be reached; run `python -m mmdemo download` where there is internet, "
        f"point {flags} at a local folder, or start `python app.py --tiny-models` to try the app on tiny test "
        f"models."
    )


def hub_options(task: str, checkpoint: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``checkpoint``; raises at once if it cannot load at all.

    A local folder needs none. A Hub id loads as usual when the Hub answers (transformers checks for
    updates and downloads what is missing); when it does not, a cached copy loads with
    ``local_files_only`` so that no request is retried, and an uncached one raises the sentence.
    """
    if _is_local(checkpoint) or hub.reachable():
        return {}
    if hub.is_cached(checkpoint):
        return {"local_files_only": True}
    raise _missing(task, checkpoint)


def read_config(task: str, checkpoint: str, **hub_kwargs: Any):
    """The checkpoint's ``config.json``; ``hub_kwargs`` as returned by :func:`hub_options`."""
    from transformers import AutoConfig

    if _is_local(checkpoint):
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise _missing(task, checkpoint, "does not exist")
        if not (folder / "config.json").is_file():
            raise _missing(task, checkpoint, "has no config.json")
        checkpoint = str(folder)
    try:
        with hub.quiet():
            return AutoConfig.from_pretrained(checkpoint, **hub_kwargs)
    except (OSError, ValueError) as err:
        if hub_kwargs.get("local_files_only") or any(w in str(err).lower() for w in ("offline", "connect", "cache")):
            raise _missing(task, checkpoint, partly=bool(hub_kwargs)) from None
        raise _missing(task, checkpoint, f"is not a valid checkpoint ({err})") from None


@dataclass
class Loaded:
    """A model and its processor on a device, with the adapters injected into it so far."""

    task: str
    checkpoint: str
    arch: Architecture
    model: Any  # the transformers model; adapters are injected into its modules in place
    processor: Any
    device: str
    dtype: Any
    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises adapter switching + inference
    peft: Any = None  # PeftModel wrapper once an adapter was loaded
    adapters: dict[str, str] = field(default_factory=dict)  # resolved adapter folder -> peft adapter name
    memo: OrderedDict = field(default_factory=OrderedDict)  # small LRU of derived values (text embeddings)
    fast: bool = False  # fast mode (mmdemo.models.fast): int8 layers, outputs close to but not exactly fp32
    fast_audio: Any = None  # fast mode's exported CLAP audio encoder; False once its export failed

    @contextlib.contextmanager
    def using(self, adapter: str | Path | None = None) -> Iterator[Any]:
        """Hold the model with ``adapter`` active (or none) for one request; yields the model."""
        with self.lock:
            if adapter is None:
                if self.peft is None:
                    yield self.model
                else:
                    with self.peft.disable_adapter():
                        yield self.model
                return
            name = self.load_adapter(adapter)
            self.peft.set_adapter(name)
            yield self.model

    def load_adapter(self, adapter: str | Path) -> str:
        """Inject the PEFT adapter in ``adapter`` once; return its name."""
        folder = Path(adapter).expanduser().resolve()
        key = str(folder)
        with self.lock:
            if key in self.adapters:
                return self.adapters[key]
            check_adapter(folder, self.task)
            name = "a" + hashlib.sha1(key.encode()).hexdigest()[:12]
            from peft import PeftModel

            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError) as err:
                hint = (" or, if it adapts other layers than mmdemo's fine-tunes do, turn fast mode off "
                        "(MMDEMO_FAST=0)") if self.fast else ""
                raise ModelLoadError(
                    f"Adapter {folder.name} does not fit the {self.checkpoint} model ({err}); "
                    f"use an adapter trained on this checkpoint{hint}."
                ) from None
            self.peft.eval()
            self.adapters[key] = name
            return name


def check_adapter(folder: Path, task: str) -> dict:
    """Refuse a folder that is not a PEFT adapter, or one made for another task; return its metadata."""
    if not (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder} is not a LoRA adapter folder (no adapter_config.json); pick another folder.")
    meta_path = folder / ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("task") and meta["task"] != task:
        raise InputError(f"Adapter {folder.name} was trained for {meta['task']}, not {task}; pick a {task} adapter.")
    return meta


_CACHE: dict[tuple, Loaded] = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
# Two models loading at once in threads (the warm-up and a click on another tab) break: transformers 5 builds
# models under a process-wide meta-device context and imports its classes lazily, so one load gets "Cannot copy
# out of meta tensor" or "module 'transformers' has no attribute ...". Loads of different models wait in turn.
_LOAD_LOCK = threading.Lock()

FAILURE_TTL = hub.PROBE_TTL  # seconds a failed load is answered from memory, like the Hub probe it may come from


@dataclass(frozen=True)
class _Failure:
    error: ModelLoadError
    when: float  # time.monotonic()
    hub_down: bool  # the Hub was unreachable then: a probe that finds it back makes a retry worth it


_FAILED: dict[tuple[str, str], _Failure] = {}  # (task, checkpoint) -> its last failed load
_FAILED_LOCK = threading.Lock()


def recent_failure(task: str, checkpoint: str) -> ModelLoadError | None:
    """The error of a load of ``checkpoint`` that failed less than ``FAILURE_TTL`` s ago, unless the Hub is back."""
    key = (task, checkpoint)
    with _FAILED_LOCK:
        failure = _FAILED.get(key)
        if failure is None:
            return None
        expired = time.monotonic() - failure.when > FAILURE_TTL
        if expired or (failure.hub_down and hub.known_reachable()):
            del _FAILED[key]
            return None
    # A new instance each time: re-raising one object would pile up its tracebacks.
    return type(failure.error)(str(failure.error))


def forget_failures() -> None:
    """Let the next load of every failed checkpoint try again now (tests, or after fixing the cause)."""
    with _FAILED_LOCK:
        _FAILED.clear()


def load(task: str, checkpoint: str | None = None, device: str | None = None, dtype: Any = None,
         fast: bool | None = None) -> Loaded:
    """The loaded model for ``task``; loads it on first use and returns the same object afterwards.

    ``fast`` (default: ``MMDEMO_FAST``) loads the fast-mode model; it applies on the CPU only and is ignored
    elsewhere (a GPU runs in bf16 already).

    Raises :class:`ModelLoadError` at once, with the same sentence, while a recent load of the same
    checkpoint failed (see ``FAILURE_TTL``).
    """
    import torch

    checkpoint = resolve_checkpoint(task, checkpoint)
    if (err := recent_failure(task, checkpoint)) is not None:
        raise err
    device = pick_device(device)
    dtype = dtype if dtype is not None else pick_dtype(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    fast = bool(get_settings().fast if fast is None else fast) and device == "cpu" and dtype == torch.float32
    key = (task, checkpoint, device, dtype) + (("fast",) if fast else ())
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        # Whoever held the lock before may just have failed (the warm-up thread, while a click waited).
        if (err := recent_failure(task, checkpoint)) is not None:
            raise err
        try:
            with _LOAD_LOCK:  # one load at a time: transformers' from_pretrained is not thread-safe
                loaded = _load_uncached(task, checkpoint, device, dtype, fast=fast)
        except ModelLoadError as err:
            hub_down = not _is_local(checkpoint) and not hub.known_reachable()
            with _FAILED_LOCK:
                _FAILED[(task, checkpoint)] = _Failure(err, time.monotonic(), hub_down)
            raise
        with _CACHE_LOCK:
            _CACHE[key] = loaded
        return loaded


def _load_uncached(task: str, checkpoint: str, device: str, dtype: Any, fast: bool = False) -> Loaded:
    import transformers

    hub_kwargs = hub_options(task, checkpoint)
    config = read_config(task, checkpoint, **hub_kwargs)
    arch = get_architecture(task, config.model_type, checkpoint)
    source = str(Path(checkpoint).expanduser()) if _is_local(checkpoint) else checkpoint
    model_cls = getattr(transformers, arch.model_class)
    processor_cls = getattr(transformers, arch.processor_class)
    try:
        with hub.quiet():
            model = model_cls.from_pretrained(source, dtype=dtype, **hub_kwargs)
            processor = processor_cls.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        if hub_kwargs.get("local_files_only"):  # partly cached, and the Hub cannot fill in the rest
            raise _missing(task, checkpoint, partly=True) from None
        raise _missing(task, checkpoint, f"is incomplete ({err})") from None
    model.to(device).eval()
    if fast:
        from mmdemo.models import fast as fast_mode

        fast_mode.quantize_model(model, arch.int8_parts, arch.lora_targets)
    if arch.onednn_parts:  # fp32 on the CPU only (it checks); after quantizing, which replaces what it converts
        from mmdemo.models.kernels import onednn_linears

        onednn_linears(model, arch.onednn_parts)
    return Loaded(task=task, checkpoint=checkpoint, arch=arch, model=model, processor=processor,
                  device=device, dtype=dtype, fast=fast)


def loaded_models() -> list[Loaded]:
    with _CACHE_LOCK:
        return list(_CACHE.values())


def clear_cache() -> None:
    """Forget every loaded model and failed load (tests, or freeing memory before a training job in-process)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _KEY_LOCKS.clear()
    forget_failures()
