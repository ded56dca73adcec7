"""Where model work runs: ``@spaces.GPU`` on a ZeroGPU Space, a plain call on GPU or CPU hardware.

On ZeroGPU (the ``spaces`` package is importable and ``SPACES_ZERO_GPU`` is set) the main process has no
CUDA: models load on the CPU there (``loaded``), and a function decorated with :func:`task` moves the
model it uses to ``cuda`` when it runs inside the GPU worker (:func:`on_device`). Decorated functions take
and return plain picklable values (paths, strings, decoded images, lists), never a loaded model, because
ZeroGPU runs them in a forked worker. Elsewhere :func:`task` returns the function unchanged and ``loaded`` picks the
best device as the model layer does (``MMDEMO_DEVICE`` overrides).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from mmdemo.models.loading import Loaded, load

F = TypeVar("F", bound=Callable[..., Any])

try:  # the Spaces runtime; on other hosts the package is usually absent
    import spaces  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the host
    spaces = None

ZERO_GPU = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))


def task(duration: int = 60) -> Callable[[F], F]:
    """Decorator for a function that runs a model: ``spaces.GPU(duration=...)`` where ``spaces`` exists."""

    def wrap(fn: F) -> F:
        if spaces is None:
            return fn
        return spaces.GPU(duration=duration)(fn)

    return wrap


def loaded(task_name: str, checkpoint: str | None) -> Loaded:
    """The cached model for a task: on the CPU under ZeroGPU (no CUDA in the main process), else as usual.

    Raises :class:`~mmdemo.errors.ModelLoadError` at once while the same checkpoint failed to load
    recently (the warm-up's failure, for a click right after it): the model layer remembers failures for
    a short while rather than letting every click wait for an unreachable Hub again.
    """
    if ZERO_GPU:
        return on_device(load(task_name, checkpoint, device="cpu", fast=False))  # int8 layers cannot move to a GPU
    return load(task_name, checkpoint)


def on_device(model: Loaded) -> Loaded:
    """Inside a ZeroGPU worker, move ``model`` to the GPU it was lent; a no-op anywhere else."""
    if not ZERO_GPU:
        return model
    import torch

    if torch.cuda.is_available() and not model.device.startswith("cuda"):
        with model.lock:
            model.model.to("cuda")
            model.device = "cuda"
    return model
