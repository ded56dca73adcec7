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
    jobs.rename_adapter(name, "shapes-v2", "alice"); jobs.delete_adapter(name, "alice")
    jobs.estimate_seconds("caption", steps)   # from the timings of earlier jobs here, or None
    jobs.log_file(job.id, "alice")   # a private copy of the worker's log, for download
    jobs.disk_usage("alice")         # bytes of alice's run folders and adapters: {"jobs", "adapters", "total"}
    jobs.finetune(task, data, out, ...)   # the training itself, in the foreground (CLI, worker)

Modules: ``queue`` (JobQueue interface + SQLite backend; ``get_queue`` picks the backend), ``pg_queue`` (the same
queue in PostgreSQL, shared by several app replicas: ``MMDEMO_JOBS_DB``), ``dispatcher`` (worker processes, recovery),
``worker`` (one job), ``train`` (Trainer + peft LoRA), ``evaluate`` (metrics), ``adapters`` (artifacts),
``retention`` (what is kept on disk and for how long, clean-ups, disk usage), ``cli`` (``python -m mmdemo finetune``).
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import statistics
import time
from pathlib import Path

from mmdemo.config import ensure_writable, folder_problem, get_settings
from mmdemo.data import DatasetReport, Problem, inspect_dataset, load_dataset
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.adapters import (
    check_name,
    default_name,
    delete_adapter,
    list_adapters,
    private_download_dir,
    publish_adapter,
    rename_adapter,
    resolve_adapter,
    zip_adapter,
)
from mmdemo.jobs.dispatcher import Dispatcher, start_dispatcher
from mmdemo.jobs.queue import (
    FINAL,
    STATES,
    Job,
    JobQueue,
    SQLiteQueue,
    clean_owner,
    duplicate_job,
    get_queue,
    new_job_id,
    too_many_jobs,
)
from mmdemo.jobs.retention import disk_usage, keep_words, size_words
from mmdemo.jobs.train import PRESETS, JobCancelled, Progress, TrainConfig, finetune, training_plan
from mmdemo.models.registry import get_task


def submit(task: str, data: str | Path, owner: str, preset: str = "quick", model: str | None = None,
           queue: JobQueue | None = None, name: str | None = None, **overrides) -> Job:
    """Check the dataset and queue a fine-tuning job; raises ``InputError`` naming the dataset's problems.

    ``overrides`` are :class:`TrainConfig` fields (epochs, learning_rate, rank, alpha, batch_size, ...);
    ``None`` values keep the preset's. ``name`` is the adapter's display name (checked: see
    :func:`mmdemo.jobs.adapters.check_name`); without one a readable free name is made from the dataset's file
    name. The dataset is copied into the job's run folder, so the upload can go. Raises ``JobError`` when the
    owner already has the same job (data, task, settings) or ``MMDEMO_MAX_QUEUED_JOBS`` jobs waiting or
    running, or when the data folder cannot be written.
    """
    get_task(task)
    owner = clean_owner(owner)
    config = TrainConfig.from_preset(preset, **overrides)
    config_dict = {k: getattr(config, k) for k in config.__dataclass_fields__}
    limit = get_settings().max_queued_jobs
    queue = queue or get_queue()
    data = Path(data)
    fingerprint = dataset_fingerprint(data)
    probe = Job(id="", owner=owner, task=task, model=model, preset=config.preset, config=config_dict, data="",
                name="", state="queued", created=0, fingerprint=fingerprint)
    # before the dataset is copied and checked, so a refused user does not wait for that; add() checks again
    same = queue.find_duplicate(probe)
    if same is not None:
        raise JobError(duplicate_job(same))
    if sum(j.state in ("queued", "running") for j in queue.list(owner)) >= limit:
        raise JobError(too_many_jobs(limit))
    label = check_name(name, owner, queue) if name and str(name).strip() else default_name(data.name, task, owner,
                                                                                             queue)
    job_id = new_job_id()
    run_dir = queue.run_dir(job_id)
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
    plan = {**training_plan(config, len(report.train)), "test_examples": len(report.test)}
    job = Job(id=job_id, owner=owner, task=task, model=model, preset=config.preset, config=config_dict,
              data=str(report.root), name=f"{task}-{job_id}", state="queued", created=time.time(), label=label,
              fingerprint=fingerprint, plan=plan)
    try:
        return queue.add(job, limit=limit)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def dataset_fingerprint(data: Path) -> str | None:
    """A hash of the dataset as uploaded (a zip's bytes, or a folder's file names and bytes); ``None`` if it
    cannot be read (the dataset check then says why)."""
    digest = hashlib.sha256()
    try:
        if data.is_file():
            files = [(data.name, data)]
        elif data.is_dir() and not data.is_symlink():
            files = sorted((p.relative_to(data).as_posix(), p) for p in data.rglob("*")
                           if p.is_file() and not p.is_symlink())
        else:
            return None
        for rel, path in files:
            digest.update(rel.encode() if data.is_dir() else b"zip")
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def estimate_seconds(task: str, steps: int, queue: JobQueue | None = None, last: int = 5) -> float | None:
    """About how long a job of ``steps`` training steps takes here, from the last ``last`` finished jobs of the
    task on this server (any owner: only their timings are used); ``None`` before the first one finished.

    Each earlier job gives a time per step (its training time over the steps it trained) and a fixed part
    (the rest of its run: checking the data, loading the model, scoring before and after).
    """
    per_step, fixed = [], []
    for job in (queue or get_queue()).list(None):
        if len(per_step) >= last:
            break
        training = (job.result or {}).get("training") or {}
        trained = (training.get("steps_done") or 0) - (training.get("resumed_from_step") or 0)
        seconds = training.get("train_seconds")
        if job.task != task or job.state != "succeeded" or not job.started or not job.finished or trained <= 0 \
                or not seconds:
            continue
        per_step.append(seconds / trained)
        fixed.append(max(0.0, job.finished - job.started - seconds))
    if not per_step:
        return None
    return statistics.median(fixed) + steps * statistics.median(per_step)


def log_file(job_id: str, owner: str | None, queue: JobQueue | None = None) -> Path:
    """A copy of the job's full worker log for its owner, in a private temporary folder (not under
    MMDEMO_HOME, which is never served), with the data folder's location replaced by ``MMDEMO_HOME``."""
    queue = queue or get_queue()
    job = queue.get(job_id, owner)
    source = queue.run_dir(job.id) / "log.txt"
    text = source.read_text(encoding="utf-8", errors="replace") if source.is_file() else ""
    if not text and job.cleaned:
        text = ("This job's log was deleted with the rest of its run folder: this server keeps a finished job's "
                "files for a limited time (MMDEMO_KEEP_RUNS_DAYS). Its scores stay in the job list.\n")
    home = get_settings().home
    for prefix in sorted({str(home.resolve()), str(home.absolute())}, key=len, reverse=True):
        text = text.replace(prefix, "MMDEMO_HOME")
    target = private_download_dir() / f"job-{job.id}-log.txt"
    target.write_text(text or "The worker has written nothing to its log yet.\n", encoding="utf-8")
    return target


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
    "Progress", "SQLiteQueue", "TrainConfig", "cancel", "check_name", "dataset_fingerprint", "default_name",
    "delete_adapter", "disk_usage", "estimate_seconds", "events", "finetune", "get", "get_queue", "inspect_dataset",
    "keep_words", "list_adapters", "list_jobs", "load_dataset", "log_file", "log_tail", "publish_adapter", "rename_adapter",
    "resolve_adapter", "size_words", "start_dispatcher", "submit", "training_plan", "wait", "zip_adapter",
]
