"""A stand-in for the job worker, for the dispatcher's tests: ``python tests/fake_worker.py BEHAVIOUR JOB_ID``.

The dispatcher starts it as it starts ``python -m mmdemo.jobs.worker JOB_ID`` (see ``Dispatcher(worker_command=)``),
in its own session, with ``MMDEMO_HOME`` set. No model is loaded; each start and each SIGTERM is written to
``runs/JOB_ID/fake.txt``, one line each, so a test can count them. Behaviours:

- ``oom``: killed by SIGKILL, as the kernel's out-of-memory killer does;
- ``exit137``: exits 137, the same kill seen through a shell;
- ``crash``: raises an error and exits 1 without recording an outcome (an interpreter crash, say);
- ``stubborn``: ignores SIGTERM (each is written down), with a child in its process group that ignores it too;
  only SIGKILL stops them;
- ``worker-sleep``, ``worker-fail``: the real worker (:func:`mmdemo.jobs.worker.main`: pid, heartbeats, signals,
  outcomes) around a fake training that sleeps until stopped, or raises an unexpected error at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def note(job_id: str, line: str) -> None:
    folder = Path(os.environ["MMDEMO_HOME"]) / "runs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "fake.txt").open("a") as fh:
        fh.write(line + "\n")


def real_worker(job_id: str, behaviour: str) -> int:
    import mmdemo.jobs.train as train
    from mmdemo.jobs import worker

    def finetune(*args, should_stop, progress, **kwargs):
        note(job_id, "training")  # main() has installed the worker's SIGTERM handler by now
        progress(train.Progress("training", step=1, total=100, loss=1.0))
        if behaviour == "worker-fail":
            raise RuntimeError("fake training broke")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if should_stop():
                raise train.JobCancelled()
            time.sleep(0.05)
        raise RuntimeError("the fake training was never stopped")

    train.finetune = finetune
    return worker.main([job_id])


def main() -> int:
    behaviour, job_id = sys.argv[1], sys.argv[2]
    note(job_id, f"start {os.getpid()}")
    if behaviour == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    if behaviour == "exit137":
        os._exit(137)
    if behaviour == "crash":
        print("fake worker: about to crash", flush=True)
        raise ZeroDivisionError("the fake worker crashed")
    if behaviour == "stubborn":
        signal.signal(signal.SIGTERM, lambda *_: note(job_id, "TERM"))
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); time.sleep(60)"])
        note(job_id, f"child {child.pid}")
        note(job_id, "training")
        time.sleep(60)
        return 0
    if behaviour.startswith("worker-"):
        return real_worker(job_id, behaviour)
    raise SystemExit(f"unknown behaviour {behaviour!r}")


if __name__ == "__main__":
    sys.exit(main())
