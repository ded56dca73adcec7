"""Which models are loading, ready or failed: filled by a background warm-up thread, shown at the top of the page.

The page gets one line per model (a Markdown list) under a sentence saying where the models run, and the
terminal one line per model once it is ready or has failed, with the same sentence a click on that tab
would then show. A local checkpoint folder is named by its last part in the page (no server path).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmdemo.errors import MMDemoError
from mmdemo.models.loading import loaded_models
from mmdemo.models.registry import TASKS
from mmdemo.ui import gpu
from mmdemo.ui.common import device_label, model_name

log = logging.getLogger(__name__)

PENDING = {"waiting": "waiting for its turn to load", "loading": "loading (the first start can take a few minutes)"}


def model_label(task: str, checkpoint: str | None) -> str:
    """``Caption (blip-image-captioning-base)``: the tab's name and the checkpoint's last path part."""
    title = TASKS[task].title if task in TASKS else task
    return f"{title} ({Path(checkpoint or task).name})"


class ModelStatus:
    """Which models are loading, ready or failed; filled by a background warm-up thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: dict[str, str] = {}  # task -> "waiting" | "loading" | "ready" | the failure sentence
        self.devices: dict[str, str] = {}  # task -> where its model runs, in words (once ready)
        self.thread: threading.Thread | None = None

    def warm_up(self, checkpoints: dict[str, str], then: list[Callable[[], Any]] = ()) -> threading.Thread:
        """Load every task's model in a daemon thread, so the server starts at once; then run ``then``."""
        with self._lock:
            for task in checkpoints:
                self.state.setdefault(task, "waiting")

        def run() -> None:
            for task, checkpoint in checkpoints.items():
                self._set(task, "loading")
                start = time.monotonic()
                try:
                    loaded = gpu.loaded(task, checkpoint)
                except MMDemoError as err:
                    self._set(task, str(err))
                    say(f"{model_label(task, checkpoint)}: could not load — {err}")
                except Exception as err:  # noqa: BLE001 - shown in the page instead of dying silently
                    log.exception("loading %s failed", task)
                    self._set(task, f"{type(err).__name__}: {err}")
                else:
                    with self._lock:
                        self.devices[task] = device_label(loaded.device, loaded.dtype)
                    self._set(task, "ready")
                    say(f"{model_label(task, checkpoint)}: ready ({time.monotonic() - start:.1f} s)")
            for hook in then:
                try:
                    hook()
                except MMDemoError as err:
                    if not self.reported(str(err)):  # a model's failure is already on its own line
                        log.warning("warm-up step failed: %s", err)

        self.thread = threading.Thread(target=run, name="mmdemo-warm-up", daemon=True)
        self.thread.start()
        return self.thread

    def _set(self, task: str, value: str) -> None:
        with self._lock:
            self.state[task] = value

    def reported(self, sentence: str) -> bool:
        """Whether ``sentence`` is already shown as some model's failure."""
        with self._lock:
            return sentence in self.state.values()

    def done(self) -> bool:
        with self._lock:
            return all(v not in PENDING for v in self.state.values())

    def markdown(self, checkpoints: dict[str, str], more: dict[str, list[str]] | None = None) -> str:
        """One list item per model: ``Caption (blip-image-captioning-base): ready``, or why it could not load,
        under a sentence saying that each tab works once its model is ready, and where the models run.

        ``more``: each task's other base models (the Model list's other entries), which are not loaded at start
        (each would take memory most visitors never use): one line each, saying it loads when first chosen."""
        with self._lock:
            state, devices = dict(self.state), dict(self.devices)
        if not state:
            return ""
        lines = []
        for task, value in state.items():
            checkpoint = checkpoints.get(task)
            label = model_label(task, checkpoint)
            if value == "ready":
                lines.append(f"- {label}: ready")
            elif value in PENDING:
                lines.append(f"- {label}: {PENDING[value]}")
            else:
                if checkpoint and checkpoint != model_name(checkpoint):  # a local folder: its name, not its path
                    value = value.replace(checkpoint, model_name(checkpoint))
                lines.append(f"- {label}: **could not load** — {value}")
        loaded = {(m.task, m.checkpoint) for m in loaded_models()}
        for task, extra in (more or {}).items():
            for checkpoint in extra:
                state_text = "ready" if (task, checkpoint) in loaded else "loads when first chosen in the Model list"
                lines.append(f"- {model_label(task, checkpoint)}: {state_text}")
        where = sorted(set(devices.values()))
        runs_on = f" They run on {' and '.join(where)}." if where else ""
        return f"**Models.** Each tab works once its model is ready.{runs_on}\n\n" + "\n".join(lines)


def say(line: str) -> None:
    """One line for the person who started the app, on stderr beside the server's own messages."""
    print(f"mmdemo: {line}", file=sys.stderr, flush=True)


STATUS = ModelStatus()
