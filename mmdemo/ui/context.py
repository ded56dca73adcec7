"""What every tab module gets from the app builder: checkpoints, limits on GPU work, the open Blocks/Tab."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.models.loading import resolve_checkpoint

GPU_QUEUE = "gpu"  # concurrency_id shared by every event that runs a model
CHECK_CONCURRENCY = 4  # input checks (decoding uploads, counting tokens) running at once, all tabs together
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass
class UIContext:
    checkpoints: dict[str, str] = field(default_factory=dict)  # task -> checkpoint (else env / registry default)
    tiny: bool = False  # running on the random tiny checkpoints: outputs are meaningless
    gpu_concurrency: int = 1  # model events running at once, all tabs together
    max_batch_size: int = 16  # requests of one batched event served by one call
    demo: Any = None  # the gr.Blocks being built
    tab: Any = None  # the gr.Tab this module is being built in
    browser_id: Any = None  # gr.BrowserState: this browser's anonymous id (see common.owner_of)
    ready: Any = None  # like ``demo.load``, but runs once ``browser_id`` is set

    def checkpoint(self, task: str) -> str:
        return self.checkpoints.get(task) or resolve_checkpoint(task)
