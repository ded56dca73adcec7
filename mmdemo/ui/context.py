"""What every tab module gets from the app builder: the settings, checkpoints, limits on GPU work, the open
Blocks/Tab."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.config import Settings, get_settings
from mmdemo.models.loading import checkpoint_name, more_checkpoints, resolve_checkpoint

GPU_QUEUE = "gpu"  # concurrency_id shared by every event that runs a model
CHECK_CONCURRENCY = 4  # input checks (decoding uploads, counting tokens) running at once, all tabs together
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass
class UIContext:
    # the app's settings (flags over environment, built once by app.main); default: get_settings() at creation
    settings: Settings = field(default_factory=get_settings)
    checkpoints: dict[str, str] = field(default_factory=dict)  # task -> checkpoint (else settings / registry default)
    # task -> the other base models its Model list offers (else the settings' more_models / the registry's)
    more: dict[str, list[str]] = field(default_factory=dict)
    tiny: bool = False  # running on the random tiny checkpoints: outputs are meaningless
    gpu_concurrency: int = 1  # model events running at once, all tabs together
    max_batch_size: int = 16  # requests of one batched event served by one call
    demo: Any = None  # the gr.Blocks being built
    tab: Any = None  # the gr.Tab this module is being built in
    browser_id: Any = None  # gr.BrowserState: this browser's anonymous id (see common.owner_of)
    ready: Any = None  # like ``demo.load``, but runs once ``browser_id`` is set

    def checkpoint(self, task: str) -> str:
        return self.checkpoints.get(task) or resolve_checkpoint(task, settings=self.settings)

    def base_models(self, task: str) -> BaseModels:
        more = self.more[task] if task in self.more else more_checkpoints(task, self.settings)
        return BaseModels(task, self.checkpoint(task), tuple(c for c in more if c != self.checkpoint(task)))


DETAILED = " (detailed)"  # the Model list's second entry for a caption model that writes longer captions on request


@dataclass(frozen=True)
class BaseModels:
    """The base models a tab offers: its main checkpoint (the choice ``base``) and the others, each chosen by its
    name (a Hub id, or a local folder's own name; never a server path). A caption model other than the main one
    also has a ``<name> (detailed)`` entry: Florence-2 and SmolVLM write longer captions on request."""

    task: str
    main: str
    more: tuple[str, ...] = ()

    def entries(self) -> dict[str, tuple[str, str]]:
        """Model list value -> (checkpoint, caption detail), in list order, ``base`` first."""
        out = {BASE_CHOICE: (self.main, "short")}
        for checkpoint in self.more:
            name = checkpoint_name(checkpoint)
            out.setdefault(name, (checkpoint, "short"))
            if self.task == "caption":
                out.setdefault(name + DETAILED, (checkpoint, "detailed"))
        return out

    def names(self) -> list[str]:
        return list(self.entries())[1:]

    def checkpoint_for(self, adapter_base: str | None) -> str:
        """The base model an adapter runs on: the one it was trained on (its ``base_model`` name), else the main."""
        for checkpoint in (self.main, *self.more):
            if adapter_base and checkpoint_name(checkpoint) == adapter_base:
                return checkpoint
        return self.main


BASE_CHOICE = "base"
