"""Settings read from the environment (``MMDEMO_*``), as a small validated dataclass.

Env vars:
    MMDEMO_HOME              where adapters, indexes, the job database and runs live (default ``checkpoints``)
    MMDEMO_CAPTION_MODEL     captioning checkpoint, Hub id or local folder
    MMDEMO_VQA_MODEL         visual question answering checkpoint
    MMDEMO_RETRIEVAL_MODEL   text/audio retrieval checkpoint
    MMDEMO_DEVICE            cuda, cuda:1, mps or cpu (default: the best available)
    MMDEMO_DTYPE             bfloat16, float16 or float32 (default: bf16 on a CUDA GPU with it, else fp32)
    MMDEMO_MAX_IMAGE_PIXELS, MMDEMO_MAX_IMAGE_MB, MMDEMO_MAX_AUDIO_MB, MMDEMO_MAX_AUDIO_SECONDS  input limits
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mmdemo.errors import InputError

_DTYPES = ("bfloat16", "float16", "float32")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"{name} must be a number, but it is {raw!r}.") from None


@dataclass(frozen=True)
class Limits:
    """Input limits that protect the server from oversized or malicious media."""

    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 30 * 1024 * 1024
    max_audio_bytes: int = 100 * 1024 * 1024
    max_audio_seconds: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_image_bytes", "max_audio_bytes", "max_audio_seconds"):
            if getattr(self, name) <= 0:
                raise InputError(f"The limit {name} must be positive; check the MMDEMO_MAX_* settings.")

    @classmethod
    def from_env(cls) -> Limits:
        mb = 1024 * 1024
        return cls(
            max_image_pixels=int(_env_float("MMDEMO_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
            max_image_bytes=int(_env_float("MMDEMO_MAX_IMAGE_MB", cls.max_image_bytes / mb) * mb),
            max_audio_bytes=int(_env_float("MMDEMO_MAX_AUDIO_MB", cls.max_audio_bytes / mb) * mb),
            max_audio_seconds=_env_float("MMDEMO_MAX_AUDIO_SECONDS", cls.max_audio_seconds),
        )


@dataclass(frozen=True)
class Settings:
    home: Path = Path("checkpoints")
    models: dict[str, str] = field(default_factory=dict)  # task name -> checkpoint override
    device: str | None = None
    dtype: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise InputError(f"MMDEMO_DTYPE must be one of {', '.join(_DTYPES)}, not {self.dtype!r}.")
        if self.device is not None and self.device.split(":")[0] not in ("cuda", "mps", "cpu"):
            raise InputError(f"MMDEMO_DEVICE must be cuda, cuda:N, mps or cpu, not {self.device!r}.")

    @classmethod
    def from_env(cls) -> Settings:
        models = {}
        for task, var in (("caption", "MMDEMO_CAPTION_MODEL"), ("vqa", "MMDEMO_VQA_MODEL"),
                          ("retrieval", "MMDEMO_RETRIEVAL_MODEL")):
            if os.environ.get(var):
                models[task] = os.environ[var]
        return cls(
            home=Path(os.environ.get("MMDEMO_HOME") or "checkpoints"),
            models=models,
            device=os.environ.get("MMDEMO_DEVICE") or None,
            dtype=os.environ.get("MMDEMO_DTYPE") or None,
            limits=Limits.from_env(),
        )

    # Folders under MMDEMO_HOME; created on first use, never at import.
    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def jobs_db(self) -> Path:
        return self.home / "jobs.sqlite3"


def get_settings() -> Settings:
    """Settings as the environment says now (cheap; read again so tests can change the environment)."""
    return Settings.from_env()
