"""Loading checkpoints lazily, once per (task, checkpoint, device, dtype), and switching LoRA adapters.

A checkpoint is a Hub id or a local folder in the Hugging Face layout; both go through the same
``from_pretrained`` calls. Adapters are PEFT folders injected into the loaded base model with
``PeftModel.from_pretrained`` / ``load_adapter`` and chosen per request with ``set_adapter``; a request
without adapter runs under ``disable_adapter()``, so the base is never reloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.config import get_settings
from mmdemo.errors import InputError, ModelLoadError
from mmdemo.models.registry import Architecture, get_architecture, get_task

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


def resolve_checkpoint(task: str, checkpoint: str | None = None) -> str:
    """The checkpoint for ``task``: the argument, else its env var, else the registry default."""
    spec = get_task(task)
    return checkpoint or get_settings().models.get(task) or spec.default_checkpoint


def _is_local(checkpoint: str) -> bool:
    return checkpoint.startswith((".", "/", "~")) or os.path.isdir(checkpoint) or checkpoint.count("/") > 1


def _missing(task: str, checkpoint: str, why: str = "") -> ModelLoadError:
    var = get_task(task).env_var
    if _is_local(checkpoint):
        return ModelLoadError(
            f"Checkpoint folder {checkpoint!r} {why or 'cannot be loaded'}; point {var} (or --model) at a folder "
            f"with config.json and model weights."
        )
    return ModelLoadError(
        f"Checkpoint {checkpoint!r} is not in the local Hugging Face cache and the Hub cannot be reached; "
        f"run `python -m mmdemo download` where there is internet, or set {var} (or --model) to a local copy."
    )


def read_config(task: str, checkpoint: str):
    from transformers import AutoConfig

    if _is_local(checkpoint):
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            raise _missing(task, checkpoint, "does not exist")
        if not (folder / "config.json").is_file():
            raise _missing(task, checkpoint, "has no config.json")
        checkpoint = str(folder)
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        if "offline" in str(err).lower() or "connect" in str(err).lower() or "cache" in str(err).lower():
            raise _missing(task, checkpoint) from None
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
                raise ModelLoadError(
                    f"Adapter {folder.name} does not fit the {self.checkpoint} model ({err}); "
                    f"use an adapter trained on this checkpoint."
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


def load(task: str, checkpoint: str | None = None, device: str | None = None, dtype: Any = None) -> Loaded:
    """The loaded model for ``task``; loads it on first use and returns the same object afterwards."""
    import torch

    checkpoint = resolve_checkpoint(task, checkpoint)
    device = pick_device(device)
    dtype = dtype if dtype is not None else pick_dtype(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    key = (task, checkpoint, device, dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        loaded = _load_uncached(task, checkpoint, device, dtype)
        with _CACHE_LOCK:
            _CACHE[key] = loaded
        return loaded


def _load_uncached(task: str, checkpoint: str, device: str, dtype: Any) -> Loaded:
    import transformers

    config = read_config(task, checkpoint)
    arch = get_architecture(task, config.model_type, checkpoint)
    source = str(Path(checkpoint).expanduser()) if _is_local(checkpoint) else checkpoint
    model_cls = getattr(transformers, arch.model_class)
    processor_cls = getattr(transformers, arch.processor_class)
    try:
        model = model_cls.from_pretrained(source, dtype=dtype)
        processor = processor_cls.from_pretrained(source)
    except OSError as err:
        raise _missing(task, checkpoint, f"is incomplete ({err})") from None
    model.to(device).eval()
    return Loaded(task=task, checkpoint=checkpoint, arch=arch, model=model, processor=processor,
                  device=device, dtype=dtype)


def loaded_models() -> list[Loaded]:
    with _CACHE_LOCK:
        return list(_CACHE.values())


def clear_cache() -> None:
    """Forget every loaded model (tests, or freeing memory before a training job in-process)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _KEY_LOCKS.clear()
