"""One fine-tuning job in its own process: ``python -m mmdemo.jobs.worker JOB_ID`` (started by the dispatcher).

The worker runs :func:`mmdemo.jobs.train.finetune` (the same function as the CLI), writes each progress record
to the queue, heartbeats every few seconds and records the outcome itself. A crash, an out-of-memory kill or
a cancel never reaches the app process. Failures become causes with a fix that fits the job (out of GPU
memory -> a smaller batch, or the Quick preset unless the job already uses it; bad data -> which file; a full
data folder -> free some space); the traceback goes to the job's log only. A SIGTERM is a cancel when one was
asked for (recorded as cancelled), else a server shutdown: the worker then exits 143 with no outcome, and the
dispatcher puts the job back in the queue to resume from its checkpoint.

Its settings are those of the app that started it: the dispatcher writes them into the worker's environment
(:meth:`mmdemo.config.Settings.to_env`), and :func:`main` reads and installs them once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mmdemo.config import Settings, folder_problem, get_settings, install
from mmdemo.errors import MMDemoError

if TYPE_CHECKING:
    from mmdemo.jobs.queue import Job

HEARTBEAT_SECONDS = 2.0


class Terminated(SystemExit):
    """Raised in the worker by a SIGTERM: a cancel (the job is then recorded as cancelled) or a server shutdown
    (no outcome is recorded, so the dispatcher puts the job back in the queue)."""


def on_sigterm(signum, frame) -> None:
    """The worker's SIGTERM handler: stop through normal interpreter shutdown, so ``finally`` blocks run, and
    ignore any further SIGTERM, which would interrupt that clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(128 + signal.SIGTERM)


def smaller_settings(preset: str | None = None, batch_size: int | None = None) -> str | None:
    """The settings that need less memory than the job's, as a phrase; ``None`` when it is already at the least.

    Never suggests what the job already uses: a Quick job is not told to choose Quick.
    """
    options = []
    if batch_size is None:
        options.append("a smaller batch size")
    elif batch_size > 1:
        options.append(f"a batch size smaller than {batch_size}")
    if (preset or "").lower() != "quick":
        options.append("the Quick preset")
    return " or ".join(options) or None


def failure_sentence(err: BaseException, preset: str | None = None, batch_size: int | None = None) -> str:
    """The cause of a failed job, as a sentence saying what to do; ``preset`` and ``batch_size`` are the job's."""
    text = str(err)
    if isinstance(err, MMDemoError):
        return text
    smaller = smaller_settings(preset, batch_size)
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        if smaller is None:
            return ("The GPU ran out of memory even with batch size 1 and the Quick preset; use smaller images or "
                    "shorter clips, or a GPU with more memory.")
        return f"The GPU ran out of memory; close other jobs on this GPU and submit again with {smaller}."
    if isinstance(err, MemoryError):
        if smaller is None:
            return "The machine ran out of memory; submit again with fewer examples, or use a machine with more memory."
        return f"The machine ran out of memory; submit again with {smaller} or fewer examples."
    if isinstance(err, OSError) and (problem := folder_problem(err)) is not None:
        return problem  # a full or read-only data folder: the fix is on the server, not in the job
    return (f"Training stopped with an unexpected error ({type(err).__name__}: {text[:200]}); the log shows where. "
            f"Submit again, and report it if it happens again.")


def run_job(job_id: str, home: str | None = None) -> str:
    """Run one claimed job to its end; returns the final state."""
    from mmdemo.jobs.queue import get_queue

    queue = get_queue(home)
    job = queue.get(job_id)
    if job.state != "running":
        return job.state
    queue.set_pid(job_id, os.getpid())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            queue.heartbeat(job_id)

    threading.Thread(target=beat, daemon=True).start()

    def progress(rec: dict) -> None:
        queue.progress(job_id, rec)

    try:
        state, result, error = train_job(job, queue.run_dir(job_id), progress,
                                         lambda: queue.cancel_requested(job_id))
    finally:
        stop.set()
    queue.finish(job_id, state, result=result, error=error)
    return state


def train_job(job: Job, run_dir: Path, progress: Callable[[dict], None],
              should_stop: Callable[[], bool]) -> tuple[str, dict | None, str | None]:
    """Train one job, reporting each progress record to ``progress`` (and as a ``key=value`` line on stdout, the
    job's log), and say how it ended: ``(state, result, error sentence)``; writes nothing to the queue.

    The local worker (:func:`run_job`) and the Ray actor (:mod:`mmdemo.jobs.ray_backend`) both train through it,
    so a job trains, resumes from its checkpoints in ``run_dir/work`` and fails with the same sentences wherever
    it runs. A SIGTERM without a cancel (:class:`Terminated`) is re-raised: it is no outcome of the job.
    """
    from mmdemo.jobs.queue import MAX_ATTEMPTS, checkpoint_step
    from mmdemo.jobs.train import JobCancelled, Progress, TrainConfig, finetune

    def report(p: Progress) -> None:
        rec = p.record()
        progress(rec)
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)

    if job.attempts > 1:
        step = checkpoint_step(run_dir)
        resume = (f"resuming from the checkpoint of step {step}" if step is not None
                  else "no checkpoint was saved, so training starts from the beginning")
        report(Progress("validating", message=f"Attempt {job.attempts} of {MAX_ATTEMPTS}: the previous run "
                                              f"was interrupted; {resume}."))
    try:
        config = TrainConfig(**job.config)
        result = finetune(
            job.task, job.data, get_settings().adapters_dir / job.name, model=job.model, config=config,
            workdir=run_dir / "work", progress=report, should_stop=should_stop, owner=job.owner, job_id=job.id,
            name=job.display_name,
        )
    except JobCancelled:
        return "cancelled", None, None
    except Terminated:
        if should_stop():
            return "cancelled", None, None
        # stopped from outside (a server shutdown or restart), not a failure of the job: no outcome, so the
        # dispatcher requeues it to resume from its checkpoint
        print("Stopped by SIGTERM without a cancel; the job goes back to the queue.", flush=True)
        raise
    except BaseException as err:  # noqa: BLE001 - every failure must reach the job record as a sentence
        if should_stop():  # a cancel seen by training as another error
            return "cancelled", None, None
        traceback.print_exc()
        return "failed", None, failure_sentence(err, job.preset, job.config.get("batch_size"))
    return "succeeded", result, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmdemo.jobs.worker JOB_ID", file=sys.stderr)
        return 2
    os.environ.pop("HF_TOKEN", None)  # training needs no token; keep it out of this process and its logs
    try:  # the app's settings, which the dispatcher wrote into this process's environment: read once
        install(Settings.from_env())
    except MMDemoError:
        pass  # run_job reads them again inside its error handling, which records the sentence as the job's failure
    # SIGTERM (cancel) ends the process through normal interpreter shutdown: finally blocks run.
    signal.signal(signal.SIGTERM, on_sigterm)
    import warnings

    warnings.filterwarnings("ignore")
    state = run_job(argv[0])
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
