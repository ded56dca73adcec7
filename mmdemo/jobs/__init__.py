"""Fine-tuning jobs: a durable queue, worker processes, LoRA training and held-out evaluation. No gradio here.

Public API (the Fine-tune tab and the CLI use only this)::

    from mmdemo import jobs
    report = jobs.inspect_dataset(zip_or_dir, "caption", workdir)   # DatasetReport: .ok, .problems, .preview()
    job = jobs.submit("caption", zip_or_dir, owner="alice", preset="quick", epochs=3)  # -> Job (queued)
    jobs.list_jobs("alice"); jobs.get(job.id, "alice"); jobs.cancel(job.id, "alice")
    jobs.events(job.id, since=0)     # progress records: phase, step, total, loss, eta, message
    jobs.log_tail(job.id)            # the worker's log
    jobs.start_dispatcher()          # once per app process: runs queued jobs in worker processes
    jobs.list_adapters("caption", "alice"); jobs.zip_adapter(name, "alice"); jobs.publish_adapter(...)
    jobs.finetune(task, data, out, ...)   # the training itself, in the foreground (CLI, worker)

Modules: ``queue`` (JobQueue interface + SQLite backend), ``dispatcher`` (worker processes, recovery),
``worker`` (one job), ``train`` (Trainer + peft LoRA), ``evaluate`` (metrics), ``adapters`` (artifacts),
``cli`` (``python -m mmdemo finetune``).
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

from mmdemo.config import ensure_writable, folder_problem, get_settings
from mmdemo.data import DatasetReport, Problem, inspect_dataset, load_dataset
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.adapters import list_adapters, publish_adapter, zip_adapter
from mmdemo.jobs.dispatcher import Dispatcher, start_dispatcher
from mmdemo.jobs.queue import (
    FINAL,
    STATES,
    Job,
    JobQueue,
    SQLiteQueue,
    clean_owner,
    get_queue,
    new_job_id,
    too_many_jobs,
)
from mmdemo.jobs.train import PRESETS, JobCancelled, Progress, TrainConfig, finetune
from mmdemo.models.registry import get_task


def submit(task: str, data: str | Path, owner: str, preset: str = "quick", model: str | None = None,
           queue: JobQueue | None = None, **overrides) -> Job:
    """Check the dataset and queue a fine-tuning job; raises ``InputError`` naming the dataset's problems.

    ``overrides`` are :class:`TrainConfig` fields (epochs, learning_rate, rank, alpha, batch_size, ...);
    ``None`` values keep the preset's. The dataset is copied into the job's run folder, so the upload can go.
    Raises ``JobError`` when the owner already has ``MMDEMO_MAX_QUEUED_JOBS`` jobs waiting or running, or
    when the data folder cannot be written.
    """
    get_task(task)
    owner = clean_owner(owner)
    config = TrainConfig.from_preset(preset, **overrides)
    limit = get_settings().max_queued_jobs
    queue = queue or get_queue()
    # before the dataset is copied and checked, so a refused user does not wait for that; add() counts again
    if sum(j.state in ("queued", "running") for j in queue.list(owner)) >= limit:
        raise JobError(too_many_jobs(limit))
    job_id = new_job_id()
    run_dir = queue.run_dir(job_id)
    data = Path(data)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if data.is_dir() and not data.is_symlink():
            shutil.copytree(data, run_dir / "upload", symlinks=True)
            source = run_dir / "upload"
        else:
            source = data
        report = inspect_dataset(source, task, run_dir)
        report.raise_for_problems()
    except OSError as err:
        shutil.rmtree(run_dir, ignore_errors=True)
        problem = _write_problem(err, run_dir.parent)
        if problem is None:
            raise
        raise JobError(problem) from err
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    name = f"{task}-{job_id}"
    job = Job(id=job_id, owner=owner, task=task, model=model, preset=config.preset,
              config={k: getattr(config, k) for k in config.__dataclass_fields__}, data=str(report.root), name=name,
              state="queued", created=time.time())
    return queue.add(job, limit=limit)


def _write_problem(err: OSError, folder: Path) -> str | None:
    """The sentence for an error that came from a full or read-only data folder, not from the upload itself.

    Full and read-only can only be writes; anything else (shutil.Error has no errno) is told apart by a probe.
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return folder_problem(err)
    return ensure_writable(folder)


def list_jobs(owner: str | None, queue: JobQueue | None = None) -> list[Job]:
    return (queue or get_queue()).list(owner)


def get(job_id: str, owner: str | None, queue: JobQueue | None = None) -> Job:
    return (queue or get_queue()).get(job_id, owner)


def cancel(job_id: str, owner: str | None, queue: JobQueue | None = None) -> Job:
    return (queue or get_queue()).cancel(job_id, owner)


def events(job_id: str, since: int = 0, owner: str | None = None, queue: JobQueue | None = None) -> list[dict]:
    queue = queue or get_queue()
    queue.get(job_id, owner)
    return queue.events(job_id, since)


def log_tail(job_id: str, lines: int = 40, owner: str | None = None, queue: JobQueue | None = None) -> str:
    queue = queue or get_queue()
    queue.get(job_id, owner)
    return queue.log_tail(job_id, lines)


def wait(job_id: str, timeout: float = 300, queue: JobQueue | None = None, poll: float = 0.5) -> Job:
    """Block until the job is finished (tests, scripts)."""
    queue = queue or get_queue()
    deadline = time.monotonic() + timeout
    while True:
        job = queue.get(job_id)
        if job.state in FINAL:
            return job
        if time.monotonic() > deadline:
            raise InputError(f"Job {job_id} is still {job.state} after {timeout:.0f} s.")
        time.sleep(poll)


__all__ = [
    "FINAL", "PRESETS", "STATES", "DatasetReport", "Dispatcher", "Job", "JobCancelled", "JobQueue", "Problem",
    "Progress", "SQLiteQueue", "TrainConfig", "cancel", "events", "finetune", "get", "get_queue", "inspect_dataset",
    "list_adapters", "list_jobs", "load_dataset", "log_tail", "publish_adapter", "start_dispatcher", "submit",
    "wait", "zip_adapter",
]
