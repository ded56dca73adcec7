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
  outcomes) around a fake training that sleeps until stopped, or raises an unexpected error at once;
- ``worker-settings``: the real worker around a fake training that writes what it would train with (the worker's
  settings, the checkpoint, the adapter folder, whether it saw ``HF_TOKEN``) to ``runs/JOB_ID/settings.json``
  and succeeds.
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
    import json

    import mmdemo.jobs.train as train
    from mmdemo.config import get_settings
    from mmdemo.jobs import worker
    from mmdemo.models.loading import more_checkpoints, resolve_checkpoint

    token_seen = "HF_TOKEN" in os.environ  # before worker.main, which drops it

    def finetune(*args, should_stop, progress, **kwargs):
        note(job_id, "training")  # main() has installed the worker's SIGTERM handler by now
        if behaviour == "worker-settings":
            task, settings = args[0], get_settings()
            seen = {"home": str(settings.home), "checkpoint": resolve_checkpoint(task, kwargs.get("model")),
                    "more": more_checkpoints(task), "out": str(args[2]), "fast": settings.fast,
                    "hf_token": token_seen, "env": settings.to_env()}
            (Path(os.environ["MMDEMO_HOME"]) / "runs" / job_id / "settings.json").write_text(json.dumps(seen))
            return {"adapter": str(args[2])}
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
