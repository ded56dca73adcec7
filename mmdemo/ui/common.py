"""Helpers shared by the tabs: turning project errors into ``gr.Error``, adapter choices, model status."""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from mmdemo.config import get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import check_adapter
from mmdemo.ui import gpu

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
BASE = "base"


def user_errors(fn: F) -> F:
    """Show a project error to the user as ``gr.Error`` with its sentence (no traceback in the page)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMDemoError as err:
            raise gr.Error(str(err), print_exception=False) from err

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- adapters
def owner_of(browser_id: str | None, profile: Any = None) -> str:
    """Who is asking: the signed-in Hugging Face user, else the anonymous id this browser keeps.

    The anonymous id is a random 128-bit value in the browser's local storage (``gr.BrowserState``), so
    a reload or a second tab is the same user; API clients pass the id they were given.
    """
    if profile is not None and getattr(profile, "username", None):
        return f"hf:{profile.username}"
    if not browser_id:
        raise InputError("Your browser session has no id yet; reload the page.")
    return f"anon:{browser_id}"


def new_browser_id(current: str | None) -> str:
    return current or uuid.uuid4().hex


def adapter_choices(task: str, owner: str | None) -> list[str]:
    """``base`` plus the finished adapters for ``task`` that ``owner`` may use (theirs, or published)."""
    from mmdemo import jobs

    if owner is None:
        return [BASE]
    return [BASE, *(a["name"] for a in jobs.list_adapters(task, owner))]


def adapter_path(task: str, choice: str | None) -> str | None:
    """The adapter folder for a selector value, checked; ``None`` for the base model."""
    if not choice or choice == BASE:
        return None
    if "/" in choice or "\\" in choice or choice.startswith("."):
        raise InputError(f"{choice!r} is not an adapter name; pick one from the list.")
    folder = get_settings().adapters_dir / choice
    if not folder.is_dir():
        raise InputError(f"There is no adapter called {choice!r}; refresh the list and pick another.")
    check_adapter(folder, task)
    return str(folder)


def adapter_dropdown(task: str) -> gr.Dropdown:
    # Only "base" at build time: the page fills in the visitor's own adapters on load (refresh_adapters).
    return gr.Dropdown(choices=[BASE], value=BASE, label="Model", allow_custom_value=True, elem_id=f"{task}-adapter",
                       info="the base model, or one of your fine-tuned adapters for this task")


def refresh_adapters(task: str, current: str | None, browser_id: str | None, profile: Any = None) -> dict:
    try:
        owner = owner_of(browser_id, profile)
    except InputError:
        owner = None
    choices = adapter_choices(task, owner)
    return gr.update(choices=choices, value=current if current in choices else BASE)


def model_selector(ctx, task: str) -> gr.Dropdown:
    """The "Model" row of a tab: base or one of the visitor's adapters, with a refresh button."""
    with gr.Row():
        dropdown = adapter_dropdown(task)
        button = gr.Button("↻", scale=0, min_width=40)
    wire_adapter_refresh(ctx, task, dropdown, button)
    return dropdown


def wire_adapter_refresh(ctx, task: str, dropdown, button) -> None:
    """Refill ``dropdown`` with the visitor's adapters on page load, on tab select and on ``button``."""

    def refresh(current, browser_id, profile: gr.OAuthProfile | None = None):
        return refresh_adapters(task, current, browser_id, profile)

    for trigger in (button.click, ctx.tab.select, ctx.ready):
        trigger(refresh, [dropdown, ctx.browser_id], dropdown, api_visibility="private", queue=False)


def generation_options(num_beams: Any, max_new_tokens: Any, defaults: GenerationOptions) -> GenerationOptions:
    """Decoding options from two UI numbers (``None``/blank means the task's default)."""
    try:
        beams = defaults.num_beams if num_beams in (None, "") else int(num_beams)
        max_new = defaults.max_new_tokens if max_new_tokens in (None, "") else int(max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("Beams and max new tokens must be whole numbers.") from None
    return GenerationOptions(num_beams=beams, max_new_tokens=max_new,
                             min_new_tokens=min(defaults.min_new_tokens, max_new))


def file_path(value: Any) -> str | None:
    """A path from what Gradio hands a handler for a file (a str, a dict from the API, or a FileData)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


# ------------------------------------------------------------------------------------------- model status
class ModelStatus:
    """Which models are loading, ready or failed; filled by a background warm-up thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: dict[str, str] = {}  # task -> "waiting" | "loading" | "ready" | the failure sentence
        self.thread: threading.Thread | None = None

    def warm_up(self, checkpoints: dict[str, str], then: list[Callable[[], Any]] = ()) -> threading.Thread:
        """Load every task's model in a daemon thread, so the server starts at once; then run ``then``."""
        with self._lock:
            for task in checkpoints:
                self.state.setdefault(task, "waiting")

        def run() -> None:
            for task, checkpoint in checkpoints.items():
                self._set(task, "loading")
                try:
                    gpu.loaded(task, checkpoint)
                except MMDemoError as err:
                    self._set(task, str(err))
                except Exception as err:  # noqa: BLE001 - shown in the page instead of dying silently
                    log.exception("loading %s failed", task)
                    self._set(task, f"{type(err).__name__}: {err}")
                else:
                    self._set(task, "ready")
            for hook in then:
                try:
                    hook()
                except MMDemoError as err:
                    log.warning("warm-up step failed: %s", err)

        self.thread = threading.Thread(target=run, name="mmdemo-warm-up", daemon=True)
        self.thread.start()
        return self.thread

    def _set(self, task: str, value: str) -> None:
        with self._lock:
            self.state[task] = value

    def done(self) -> bool:
        with self._lock:
            return all(v not in ("waiting", "loading") for v in self.state.values())

    def markdown(self, checkpoints: dict[str, str]) -> str:
        with self._lock:
            state = dict(self.state)
        if not state:
            return ""
        parts = []
        for task, value in state.items():
            name = Path(checkpoints.get(task, task)).name
            if value in ("ready", "waiting", "loading"):
                parts.append(f"{task} ({name}): {value}")
            else:
                parts.append(f"{task}: failed, {value}")
        return "**Models:** " + " · ".join(parts)


STATUS = ModelStatus()
