"""One fine-tuning job in its own process: ``python -m mmdemo.jobs.worker JOB_ID`` (started by the dispatcher).

The worker runs :func:`mmdemo.jobs.train.finetune` (the same function as the CLI), writes each progress record
to the queue, heartbeats every few seconds and records the outcome itself. A crash, an out-of-memory kill or
a cancel never reaches the app process. Failures become causes with a fix (out of GPU memory -> a smaller
preset or batch; bad data -> which file); the traceback goes to the job's log only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from mmdemo.config import get_settings
from mmdemo.errors import MMDemoError

HEARTBEAT_SECONDS = 2.0


def failure_sentence(err: BaseException) -> str:
    """The cause of a failed job, as a sentence saying what to do."""
    text = str(err)
    if isinstance(err, MMDemoError):
        return text
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return ("The GPU ran out of memory; choose the Quick preset or a smaller batch size (and close other jobs "
                "on this GPU), then submit again.")
    if isinstance(err, MemoryError):
        return "The machine ran out of memory; choose a smaller batch size or fewer examples, then submit again."
    return (f"Training stopped with an unexpected error ({type(err).__name__}: {text[:200]}); the log shows where. "
            f"Submit again, and report it if it happens again.")


def run_job(job_id: str, home: str | None = None) -> str:
    """Run one claimed job to its end; returns the final state."""
    from mmdemo.jobs.queue import get_queue
    from mmdemo.jobs.train import JobCancelled, Progress, TrainConfig, finetune

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

    def progress(p: Progress) -> None:
        rec = p.record()
        queue.progress(job_id, rec)
        print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True)

    if job.attempts > 1:
        progress(Progress("validating", message=f"Attempt {job.attempts}: the previous run was interrupted; "
                                                f"resuming from its last checkpoint if one was saved, "
                                                f"else starting again."))
    try:
        config = TrainConfig(**job.config)
        result = finetune(
            job.task, job.data, get_settings().adapters_dir / job.name, model=job.model, config=config,
            workdir=queue.run_dir(job_id) / "work", progress=progress,
            should_stop=lambda: queue.cancel_requested(job_id), owner=job.owner, job_id=job_id,
        )
    except JobCancelled:
        queue.finish(job_id, "cancelled")
        return "cancelled"
    except BaseException as err:  # noqa: BLE001 - every failure must reach the job record as a sentence
        if queue.cancel_requested(job_id):  # SIGTERM from a cancel lands here as SystemExit
            queue.finish(job_id, "cancelled")
            return "cancelled"
        traceback.print_exc()
        queue.finish(job_id, "failed", error=failure_sentence(err))
        return "failed"
    finally:
        stop.set()
    queue.finish(job_id, "succeeded", result=result)
    return "succeeded"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mmdemo.jobs.worker JOB_ID", file=sys.stderr)
        return 2
    os.environ.pop("HF_TOKEN", None)  # training needs no token; keep it out of this process and its logs
    # SIGTERM (cancel) ends the process through normal interpreter shutdown: finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import warnings

    warnings.filterwarnings("ignore")
    state = run_job(argv[0])
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
