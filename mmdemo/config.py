"""Settings read from the environment (``MMDEMO_*``) and the command line, as one small validated dataclass.

A program builds its :class:`Settings` once (``Settings.from_env().with_flags(...)``), makes it the process's
with :func:`install` and passes it down; :func:`get_settings` returns the installed one. Where none is installed
(library use, the tests) it reads the environment at each call, so a changed environment is seen at once.
Nothing writes settings back into ``os.environ``: a job worker gets them through its own environment, built by
:meth:`Settings.to_env`.

Env vars:
    MMDEMO_HOME              where adapters, indexes, the job database and runs live (default ``checkpoints``)
    MMDEMO_<TASK>_MODEL      a task's checkpoint, Hub id or local folder: MMDEMO_CAPTION_MODEL, MMDEMO_VQA_MODEL,
                             MMDEMO_RETRIEVAL_MODEL, MMDEMO_IMAGE_SEARCH_MODEL (the task is the middle part,
                             lowercased; the model registry rejects a name that is no task)
    MMDEMO_<TASK>_MORE_MODELS the other base models a task's Model list offers, comma-separated Hub ids or folders,
                             or ``none`` (default: the registry's, e.g. Florence-2 and SmolVLM for captions)
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
    MMDEMO_JOB_SLOTS         fine-tuning jobs running at once (default: one per GPU, 1 on CPU)
    MMDEMO_RAY_ADDRESS       run fine-tuning jobs on this Ray cluster (``host:6379``, ``auto``) instead of in local
                             worker processes; MMDEMO_HOME must then be a folder every node reaches at the same
                             path (see mmdemo/jobs/ray_backend.py). Default: unset, local workers
    MMDEMO_RAY_RESOURCES     what one job asks the cluster for, a JSON object of Ray resources, e.g.
                             ``{"GPU": 1, "CPU": 4}`` or a custom node label (default: one GPU if the cluster
                             has GPUs, else one CPU)
    MMDEMO_JOBS_DB           a PostgreSQL URL (postgresql://user@host:5432/db) for a job queue several app
                             replicas share (they share MMDEMO_HOME too; see mmdemo/jobs/pg_queue.py); default:
                             empty, the SQLite queue in MMDEMO_HOME
    MMDEMO_GPU_CONCURRENCY   model calls of the web app running at once, all tabs together (default 1)
    MMDEMO_QUEUE_SIZE        requests waiting in the web app's queue (default 64)
    MMDEMO_MCP               1 also serves the model tools to MCP clients (default 0: off)
    MMDEMO_VECTOR_INDEX_ROWS from this many rows on, an audio or image library searches an on-disk FAISS IVF index
                             (approximate, memory-mapped) instead of scoring every row (default 200000)
    GRADIO_SERVER_NAME       address the web app listens on (default: Gradio's, 127.0.0.1)
    GRADIO_SERVER_PORT       port of the web app (default 7860)

:func:`ensure_writable` checks that a data folder (``MMDEMO_HOME``) can be written before anything relies on it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.errors import InputError

_DTYPES = ("bfloat16", "float16", "float32")
_MB = 1024 * 1024


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InputError(f"{name} must be a number, but it is {raw!r}.") from None


def _env_days(env: Mapping[str, str], name: str, default: float) -> float:
    """A number of days; ``forever`` (any case) is 0, which means no limit."""
    raw = (env.get(name) or "").strip()
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


def _env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InputError(f"{name} must be 1 (on) or 0 (off), but it is {raw!r}.")


def _env_json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    """A JSON object, e.g. ``{"GPU": 1}``; ``{}`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f'{name} must be a JSON object such as {{"GPU": 1}}, but it is {raw!r}.')
    return value


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, but it is {raw!r}.") from None


# MMDEMO_<TASK>_MODEL and MMDEMO_<TASK>_MORE_MODELS, for any task: this layer does not know the registry
_MODEL_VAR = re.compile(r"MMDEMO_(?P<task>[A-Z0-9_]+?)_(?P<more>MORE_)?MODELS?")


def model_var(task: str, more: bool = False) -> str:
    """The env var of a task's checkpoint (``MMDEMO_CAPTION_MODEL``) or other base models (``..._MORE_MODELS``)."""
    return f"MMDEMO_{task.upper()}_{'MORE_MODELS' if more else 'MODEL'}"


def _model_var_task(name: str) -> tuple[str, bool] | None:
    """(task, more) for a task model env var name, else ``None``."""
    match = _MODEL_VAR.fullmatch(name)
    if match is None or name.endswith("_MORE_MODEL") or (name.endswith("MODELS") and not match["more"]):
        return None
    return match["task"].lower(), bool(match["more"])


def parse_checkpoints(name: str, raw: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of checkpoints (``MMDEMO_<TASK>_MORE_MODELS`` or its flag): ``None`` when not given
    (the registry's list applies), ``()`` for ``none``, else the checkpoints in order without repeats."""
    if raw is None or not raw.strip():
        return None
    if raw.strip().lower() == "none":
        return ()
    checkpoints = tuple(dict.fromkeys(c.strip() for c in raw.split(",") if c.strip()))
    if not checkpoints:
        raise InputError(f"{name} must list checkpoints (Hub ids or folders) separated by commas, or be none, "
                         f"but it is {raw!r}.")
    return checkpoints


def is_settings_var(name: str) -> bool:
    """Whether the environment variable ``name`` is read by :meth:`Settings.from_env`."""
    return name in SETTINGS_VARS or _model_var_task(name) is not None


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
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if environ is None else environ
        return cls(
            max_image_pixels=int(_env_float(env, "MMDEMO_MAX_IMAGE_PIXELS", cls.max_image_pixels)),
            max_image_bytes=int(_env_float(env, "MMDEMO_MAX_IMAGE_MB", cls.max_image_bytes / _MB) * _MB),
            max_audio_bytes=int(_env_float(env, "MMDEMO_MAX_AUDIO_MB", cls.max_audio_bytes / _MB) * _MB),
            max_audio_seconds=_env_float(env, "MMDEMO_MAX_AUDIO_SECONDS", cls.max_audio_seconds),
            min_audio_seconds=_env_float(env, "MMDEMO_MIN_AUDIO_SECONDS", cls.min_audio_seconds),
        )

    def to_env(self) -> dict[str, str]:
        # bytes / 2**20 is exact in a float, so the MB values read back to the same byte counts
        return {
            "MMDEMO_MAX_IMAGE_PIXELS": str(self.max_image_pixels),
            "MMDEMO_MAX_IMAGE_MB": repr(self.max_image_bytes / _MB),
            "MMDEMO_MAX_AUDIO_MB": repr(self.max_audio_bytes / _MB),
            "MMDEMO_MAX_AUDIO_SECONDS": repr(float(self.max_audio_seconds)),
            "MMDEMO_MIN_AUDIO_SECONDS": repr(float(self.min_audio_seconds)),
        }


@dataclass(frozen=True)
class Settings:
    """Every setting of the app, the CLI and the job workers; see the module docstring for the env vars."""

    home: Path = Path("checkpoints")
    models: dict[str, str] = field(default_factory=dict)  # task name -> checkpoint override
    # task name -> the other base models its Model list offers, replacing the registry's (``()``: none);
    # a task not in it keeps the registry's list
    more_models: dict[str, tuple[str, ...]] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_queued_jobs: int = 3  # per user, waiting or running: one user cannot fill the GPU queue for everyone
    # a finished job's run folder and per-step records are deleted this many days after it ended; 0: never
    keep_runs_days: float = 7.0
    # CPU fast mode (mmdemo.models.fast): int8 text/vision layers, exported CLAP audio encoder; not token-identical
    fast: bool = False
    job_slots: int | None = None  # fine-tuning jobs running at once; None: one per GPU, 1 on CPU
    gpu_concurrency: int = 1  # model calls of the web app running at once, all tabs together
    queue_size: int = 64  # requests waiting in the web app's queue
    mcp: bool = False  # also serve the model tools to MCP clients
    host: str | None = None  # address the web app listens on; None: Gradio's default
    port: int = 7860
    # libraries of this many rows or more search an on-disk IVF index (mmdemo.models.vector_index), not every row
    vector_index_rows: int = 200_000
    ray_address: str | None = None  # a Ray cluster to run jobs on (mmdemo.jobs.ray_backend); None: local workers
    ray_resources: dict[str, float] = field(default_factory=dict)  # what one job asks for; {}: 1 GPU if any, else 1 CPU
    jobs_database: str | None = None  # MMDEMO_JOBS_DB: a PostgreSQL URL; None: the SQLite queue in ``home``

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home))
        object.__setattr__(self, "more_models", {task: tuple(c) for task, c in self.more_models.items()})
        if self.max_queued_jobs < 1:
            raise InputError(f"MMDEMO_MAX_QUEUED_JOBS must be 1 or more, not {self.max_queued_jobs}.")
        if not math.isfinite(self.keep_runs_days) or self.keep_runs_days < 0:
            raise InputError(f"MMDEMO_KEEP_RUNS_DAYS must be 0 or more days (0 or forever keeps finished runs "
                             f"forever), not {self.keep_runs_days:g}.")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise InputError(f"MMDEMO_DTYPE must be one of {', '.join(_DTYPES)}, not {self.dtype!r}.")
        if self.device is not None and self.device.split(":")[0] not in ("cuda", "mps", "cpu"):
            raise InputError(f"MMDEMO_DEVICE must be cuda, cuda:N, mps or cpu, not {self.device!r}.")
        for name, var in (("job_slots", "MMDEMO_JOB_SLOTS"), ("gpu_concurrency", "MMDEMO_GPU_CONCURRENCY (or "
                          "--gpu-concurrency)"), ("queue_size", "MMDEMO_QUEUE_SIZE")):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{var} must be 1 or more, not {value}.")
        if not 0 < self.port < 65536:
            raise InputError(f"GRADIO_SERVER_PORT (--port) must be a port number from 1 to 65535, not {self.port}.")
        if self.vector_index_rows < 1:
            raise InputError(f"MMDEMO_VECTOR_INDEX_ROWS must be 1 or more rows, not {self.vector_index_rows}.")
        for name, amount in self.ray_resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not amount > 0:
                raise InputError(f"MMDEMO_RAY_RESOURCES must give each resource a number above 0, like "
                                 f'{{"GPU": 1}}, but {name!r} is {amount!r}.')
        if self.jobs_database is not None and not self.jobs_database.startswith(("postgresql://", "postgres://")):
            raise InputError("MMDEMO_JOBS_DB must be a PostgreSQL URL such as postgresql://user@host:5432/mmdemo, "
                             "or empty for the built-in SQLite queue.")  # not the value: it may hold a password
        for task, checkpoint in self.models.items():
            if not str(checkpoint).strip():
                raise InputError(f"{model_var(task)} must name a checkpoint (a Hub id or a folder), not be empty.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings ``environ`` (default: ``os.environ``) gives; a bad value raises one sentence."""
        env = os.environ if environ is None else environ
        models: dict[str, str] = {}
        more: dict[str, tuple[str, ...]] = {}
        for name in sorted(env):
            which = _model_var_task(name)
            if which is None:
                continue
            task, is_more = which
            if is_more:
                checkpoints = parse_checkpoints(name, env[name])
                if checkpoints is not None:
                    more[task] = checkpoints
            elif env[name].strip():
                models[task] = env[name].strip()
        return cls(
            home=Path(env.get("MMDEMO_HOME") or "checkpoints"),
            models=models,
            more_models=more,
            device=env.get("MMDEMO_DEVICE") or None,
            dtype=env.get("MMDEMO_DTYPE") or None,
            limits=Limits.from_env(env),
            max_queued_jobs=_env_int(env, "MMDEMO_MAX_QUEUED_JOBS", cls.max_queued_jobs),
            keep_runs_days=_env_days(env, "MMDEMO_KEEP_RUNS_DAYS", cls.keep_runs_days),
            fast=_env_flag(env, "MMDEMO_FAST", cls.fast),
            job_slots=_env_int(env, "MMDEMO_JOB_SLOTS", None),
            gpu_concurrency=_env_int(env, "MMDEMO_GPU_CONCURRENCY", cls.gpu_concurrency),
            queue_size=_env_int(env, "MMDEMO_QUEUE_SIZE", cls.queue_size),
            mcp=_env_flag(env, "MMDEMO_MCP", cls.mcp),
            host=(env.get("GRADIO_SERVER_NAME") or "").strip() or None,
            port=_env_int(env, "GRADIO_SERVER_PORT", cls.port),
            vector_index_rows=_env_int(env, "MMDEMO_VECTOR_INDEX_ROWS", cls.vector_index_rows),
            ray_address=(env.get("MMDEMO_RAY_ADDRESS") or "").strip() or None,
            ray_resources=_env_json_object(env, "MMDEMO_RAY_RESOURCES"),
            jobs_database=(env.get("MMDEMO_JOBS_DB") or "").strip() or None,
        )

    def with_flags(self, **flags: Any) -> Settings:
        """These settings with command-line values over them; a flag that is ``None`` was not given.

        ``models`` and ``more_models`` are merged task by task (a flag for one task keeps the others), every
        other name replaces the field of that name. Validated like :meth:`from_env`.
        """
        given = {name: value for name, value in flags.items() if value is not None}
        if "models" in given:
            given["models"] = {**self.models, **given["models"]}
        if "more_models" in given:
            given["more_models"] = {**self.more_models, **given["more_models"]}
        if "home" in given:
            given["home"] = Path(given["home"])
        return dataclasses.replace(self, **given)

    def to_env(self) -> dict[str, str]:
        """The environment variables that make :meth:`from_env` give these settings again (for a job worker).

        Every setting is written, defaults too, so the child does not fall back on what its parent's environment
        said when it differs from these settings (flags win over the environment).
        """
        env = {
            "MMDEMO_HOME": str(self.home),
            **{model_var(task): checkpoint for task, checkpoint in self.models.items()},
            **{model_var(task, more=True): ",".join(checkpoints) or "none"
               for task, checkpoints in self.more_models.items()},
            **self.limits.to_env(),
            "MMDEMO_MAX_QUEUED_JOBS": str(self.max_queued_jobs),
            "MMDEMO_KEEP_RUNS_DAYS": repr(float(self.keep_runs_days)),
            "MMDEMO_FAST": "1" if self.fast else "0",
            "MMDEMO_GPU_CONCURRENCY": str(self.gpu_concurrency),
            "MMDEMO_QUEUE_SIZE": str(self.queue_size),
            "MMDEMO_MCP": "1" if self.mcp else "0",
            "GRADIO_SERVER_PORT": str(self.port),
            "MMDEMO_VECTOR_INDEX_ROWS": str(self.vector_index_rows),
        }
        for name, value in (("MMDEMO_DEVICE", self.device), ("MMDEMO_DTYPE", self.dtype),
                            ("MMDEMO_JOB_SLOTS", self.job_slots), ("GRADIO_SERVER_NAME", self.host),
                            ("MMDEMO_RAY_ADDRESS", self.ray_address), ("MMDEMO_JOBS_DB", self.jobs_database)):
            if value is not None:
                env[name] = str(value)
        if self.ray_resources:
            env["MMDEMO_RAY_RESOURCES"] = json.dumps(self.ray_resources, sort_keys=True)
        return env

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: ``os.environ``) with its settings variables replaced by :meth:`to_env`'s: the
        environment of a subprocess that must run with exactly these settings. ``base`` is not changed."""
        base = os.environ if base is None else base
        return {**{k: v for k, v in base.items() if not is_settings_var(k)}, **self.to_env()}

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


# the fixed-name variables from_env reads (the task model variables are matched by pattern: is_settings_var)
SETTINGS_VARS = frozenset((
    "MMDEMO_HOME", "MMDEMO_DEVICE", "MMDEMO_DTYPE", "MMDEMO_MAX_IMAGE_PIXELS", "MMDEMO_MAX_IMAGE_MB",
    "MMDEMO_MAX_AUDIO_MB", "MMDEMO_MAX_AUDIO_SECONDS", "MMDEMO_MIN_AUDIO_SECONDS", "MMDEMO_MAX_QUEUED_JOBS",
    "MMDEMO_KEEP_RUNS_DAYS", "MMDEMO_FAST", "MMDEMO_JOB_SLOTS", "MMDEMO_GPU_CONCURRENCY", "MMDEMO_QUEUE_SIZE",
    "MMDEMO_MCP", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "MMDEMO_RAY_ADDRESS", "MMDEMO_RAY_RESOURCES",
    "MMDEMO_JOBS_DB", "MMDEMO_VECTOR_INDEX_ROWS",
))

_INSTALLED: Settings | None = None


def install(settings: Settings | None) -> Settings | None:
    """Make ``settings`` this process's settings (what :func:`get_settings` returns); ``None`` goes back to
    reading the environment. Returns the settings installed before, so a caller can put them back."""
    global _INSTALLED
    previous, _INSTALLED = _INSTALLED, settings
    return previous


def get_settings() -> Settings:
    """The installed settings (see :func:`install`); with none installed, the settings the environment gives now
    (cheap; read again at each call so tests and library users can change the environment)."""
    return _INSTALLED if _INSTALLED is not None else Settings.from_env()


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
