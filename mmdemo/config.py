"""Settings read from the environment (``MMDEMO_*``), as a small validated dataclass.

Env vars:
    MMDEMO_HOME              where adapters, indexes, the job database and runs live (default ``checkpoints``)
    MMDEMO_CAPTION_MODEL     captioning checkpoint, Hub id or local folder
    MMDEMO_VQA_MODEL         visual question answering checkpoint
    MMDEMO_RETRIEVAL_MODEL   text/audio retrieval checkpoint
    MMDEMO_DEVICE            cuda, cuda:1, mps or cpu (default: the best available)
    MMDEMO_DTYPE             bfloat16, float16 or float32 (default: bf16 on a CUDA GPU with it, else fp32)
    MMDEMO_MAX_IMAGE_PIXELS, MMDEMO_MAX_IMAGE_MB, MMDEMO_MAX_AUDIO_MB, MMDEMO_MAX_AUDIO_SECONDS  input limits
    MMDEMO_MIN_AUDIO_SECONDS shortest audio clip accepted (default 0.1)
    MMDEMO_FAST              1 turns on the CPU fast mode (int8 BLIP layers, the CLAP audio encoder in
                             onnxruntime int8): faster, outputs close to but not identical to fp32 (default 0: off)
    MMDEMO_MAX_QUEUED_JOBS   fine-tuning jobs one user may have waiting or running at once (default 3)
    MMDEMO_KEEP_RUNS_DAYS    days a finished fine-tuning job keeps its run folder (dataset copy, checkpoints, log)
                             and its per-step progress records; fractions allowed; ``0`` or ``forever`` keeps them
                             forever (default 7). The job's record, scores and adapter stay: adapters are kept
                             until their owner deletes them.

:func:`ensure_writable` checks that a data folder (``MMDEMO_HOME``) can be written before anything relies on it.
"""

from __future__ import annotations

import errno
import math
import os
import uuid
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


def _env_days(name: str, default: float) -> float:
    """A number of days; ``forever`` (any case) is 0, which means no limit."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    if raw.lower() == "forever":
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"{name} must be a number of days (0 or forever keeps finished runs forever), "
                         f"but it is {raw!r}.") from None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_flag(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InputError(f"{name} must be 1 (on) or 0 (off), but it is {raw!r}.")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, but it is {raw!r}.") from None


@dataclass(frozen=True)
class Limits:
    """Input limits that protect the server from oversized or malicious media."""

    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 30 * 1024 * 1024
    max_audio_bytes: int = 100 * 1024 * 1024
    max_audio_seconds: float = 600.0
    min_audio_seconds: float = 0.1  # shorter clips carry no usable sound and embed as noise

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_image_bytes", "max_audio_bytes", "max_audio_seconds"):
            if getattr(self, name) <= 0:
                raise InputError(f"The limit {name} must be positive; check the MMDEMO_MAX_* settings.")
        if not 0 <= self.min_audio_seconds < self.max_audio_seconds:
            raise InputError(
                f"MMDEMO_MIN_AUDIO_SECONDS must be zero or more and below the {self.max_audio_seconds:g} s maximum, "
                f"not {self.min_audio_seconds:g}."
            )

    @classmethod
    def from_env(cls) -> Limits:
        mb = 1024 * 1024
        return cls(
            max_image_pixels=int(_env_float("MMDEMO_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
            max_image_bytes=int(_env_float("MMDEMO_MAX_IMAGE_MB", cls.max_image_bytes / mb) * mb),
            max_audio_bytes=int(_env_float("MMDEMO_MAX_AUDIO_MB", cls.max_audio_bytes / mb) * mb),
            max_audio_seconds=_env_float("MMDEMO_MAX_AUDIO_SECONDS", cls.max_audio_seconds),
            min_audio_seconds=_env_float("MMDEMO_MIN_AUDIO_SECONDS", cls.min_audio_seconds),
        )


@dataclass(frozen=True)
class Settings:
    home: Path = Path("checkpoints")
    models: dict[str, str] = field(default_factory=dict)  # task name -> checkpoint override
    device: str | None = None
    dtype: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_queued_jobs: int = 3  # per user, waiting or running: one user cannot fill the GPU queue for everyone
    # a finished job's run folder and per-step records are deleted this many days after it ended; 0: never
    keep_runs_days: float = 7.0
    # CPU fast mode (mmdemo.models.fast): int8 text/vision layers, exported CLAP audio encoder; not token-identical
    fast: bool = False

    def __post_init__(self) -> None:
        if self.max_queued_jobs < 1:
            raise InputError(f"MMDEMO_MAX_QUEUED_JOBS must be 1 or more, not {self.max_queued_jobs}.")
        if not math.isfinite(self.keep_runs_days) or self.keep_runs_days < 0:
            raise InputError(f"MMDEMO_KEEP_RUNS_DAYS must be 0 or more days (0 or forever keeps finished runs "
                             f"forever), not {self.keep_runs_days:g}.")
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
            max_queued_jobs=_env_int("MMDEMO_MAX_QUEUED_JOBS", cls.max_queued_jobs),
            keep_runs_days=_env_days("MMDEMO_KEEP_RUNS_DAYS", cls.keep_runs_days),
            fast=_env_flag("MMDEMO_FAST", cls.fast),
        )

    @property
    def keep_runs_seconds(self) -> float | None:
        """How long a finished job's run folder is kept, in seconds; ``None``: forever."""
        return self.keep_runs_days * 86400 if self.keep_runs_days > 0 else None

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


# ------------------------------------------------------------------------------------------- data folder
DATA_FOLDER = "The data folder (MMDEMO_HOME)"

# errno -> (why it cannot be written, what to do); the sentence never names the path: web users see it
_WRITABLE = "point MMDEMO_HOME at a writable folder"
_SPACE = "free some space or point MMDEMO_HOME at another disk"
_FOLDER_PROBLEMS = {
    errno.EROFS: ("read-only file system", _WRITABLE),
    errno.ENOSPC: ("no space left on the device", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("permission denied", _WRITABLE),
    errno.EEXIST: ("a file of the same name is in the way", "remove that file or " + _WRITABLE),
    errno.ENOTDIR: ("a file is in the way of the folder", "remove that file or " + _WRITABLE),
}


def folder_problem(err: OSError, what: str = DATA_FOLDER) -> str | None:
    """The sentence for an OSError that means ``what`` cannot be written (full, read-only, ...), else ``None``."""
    problem = _FOLDER_PROBLEMS.get(err.errno or 0)
    if problem is None:
        return None
    why, fix = problem
    return f"{what} cannot be written ({why}); {fix}."


def ensure_writable(path: Path, what: str = DATA_FOLDER) -> str | None:
    """Create ``path`` if needed and write and delete a small probe file in it.

    Returns ``None`` when that works, else one sentence saying what is wrong and what to do (no path in it).
    A probe, not a permission check: root ignores permission bits, and a full disk or a read-only mount
    only shows when something is written.
    """
    path = Path(path)
    probe = path / f".mmdemo-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"mmdemo write probe\n" * 64)  # ~1 KB: a full disk refuses it
    except OSError as err:
        # strerror, not str(err): str() carries the path
        why = (err.strerror or type(err).__name__).lower()
        return folder_problem(err, what) or f"{what} cannot be written ({why}); {_WRITABLE}."
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the probe was never written, or the folder went away: nothing to clean up
    return None
