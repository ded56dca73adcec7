"""The dispatcher: starts queued jobs in worker processes, one at a time per GPU, and recovers after a restart.

It runs as a daemon thread in the app (:func:`start_dispatcher`) or in the foreground
(``python -m mmdemo.jobs.dispatcher``). Every ``poll`` seconds it

1. reaps its own workers; a worker that died without recording an outcome fails the job with the cause
   (killed -> probably out of memory), or cancels it if a cancel was asked for;
2. stops cancelled running jobs that are still alive (SIGTERM to the worker's process group, SIGKILL after
   a grace period), which frees the GPU;
3. requeues running jobs whose worker is gone (the app or the machine was restarted): they resume from
   their last checkpoint; a worker that outlived the app (it runs in its own session) is left to finish;
4. starts queued jobs while fewer than ``slots`` run (``MMDEMO_JOB_SLOTS``; default one per GPU, 1 on CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mmdemo.jobs.queue import SQLiteQueue, _signal, get_queue, pid_alive

STALE_SECONDS = 30.0  # a worker that has not heartbeat for this long is gone
KILL_GRACE_SECONDS = 3.0


def default_slots() -> int:
    raw = os.environ.get("MMDEMO_JOB_SLOTS")
    if raw:
        return max(1, int(raw))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


class Dispatcher:
    def __init__(self, queue: SQLiteQueue | None = None, slots: int | None = None, poll: float = 0.5):
        self.queue = queue or get_queue()
        self.slots = slots or default_slots()
        self.poll = poll
        self.children: dict[str, subprocess.Popen] = {}
        self.cancel_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ steps
    def recover(self) -> None:
        """Requeue running jobs whose worker is gone; leave live workers (even another process's) alone."""
        now = time.time()
        for job in self.queue.running():
            if job.id in self.children:
                continue
            fresh = job.heartbeat is not None and now - job.heartbeat < STALE_SECONDS
            if pid_alive(job.pid) and fresh:
                continue
            if job.pid is None and fresh:
                continue  # claimed a moment ago; the worker has not registered yet
            self.queue.requeue(job.id, "The app stopped while this job ran; it will resume from its last "
                                       "checkpoint (or start again if none was saved).")

    def reap(self) -> None:
        for job_id, proc in list(self.children.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.children[job_id]
            self.cancel_seen.pop(job_id, None)
            job = self.queue.get(job_id)
            if job.state != "running":
                continue  # the worker recorded its own outcome
            if job.cancel_requested:
                self.queue.finish(job_id, "cancelled")
            elif code in (-9, 137):
                self.queue.finish(job_id, "failed", error=(
                    "The training process was killed, most likely because the machine ran out of memory; choose "
                    "the Quick preset or a smaller batch size and submit again."))
            else:
                self.queue.finish(job_id, "failed", error=(
                    f"The training process stopped unexpectedly (exit code {code}); the log shows why. "
                    f"Submit the job again."))

    def enforce_cancels(self) -> None:
        now = time.monotonic()
        for job in self.queue.running():
            if not job.cancel_requested or not job.pid:
                continue
            first = self.cancel_seen.setdefault(job.id, now)
            if not pid_alive(job.pid):
                if job.id not in self.children:
                    self.queue.finish(job.id, "cancelled")
                continue
            _signal(job.pid, 15 if now - first < KILL_GRACE_SECONDS else 9)

    def start_jobs(self) -> None:
        while (job := self.queue.claim(self.slots)) is not None:
            run_dir = self.queue.run_dir(job.id)
            run_dir.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
            env["MMDEMO_HOME"] = str(self.queue.home)
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            with (run_dir / "log.txt").open("ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "mmdemo.jobs.worker", job.id], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True, cwd=root)
            self.children[job.id] = proc
            self.queue.set_pid(job.id, proc.pid)

    def step(self) -> None:
        self.reap()
        self.enforce_cancels()
        self.recover()
        self.start_jobs()

    # ---------------------------------------------------------------------------------------------- running
    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop the dispatcher for good
                import traceback

                traceback.print_exc()
            self._stop.wait(self.poll)

    def start(self) -> Dispatcher:
        self.thread = threading.Thread(target=self.run_forever, name="mmdemo-dispatcher", daemon=True)
        self.thread.start()
        return self

    def stop(self, kill_workers: bool = False) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if kill_workers:
            for proc in self.children.values():
                _signal(proc.pid, 9)
                proc.wait(timeout=10)


_DISPATCHERS: dict[str, Dispatcher] = {}
_LOCK = threading.Lock()


def start_dispatcher(home: str | Path | None = None, slots: int | None = None) -> Dispatcher:
    """Start this process's dispatcher for ``MMDEMO_HOME`` once (idempotent)."""
    queue = get_queue(home)
    with _LOCK:
        key = str(queue.path)
        if key not in _DISPATCHERS:
            _DISPATCHERS[key] = Dispatcher(queue, slots).start()
        return _DISPATCHERS[key]


def main() -> int:
    """Run the dispatcher in the foreground until interrupted."""
    dispatcher = Dispatcher(get_queue())
    print(f"dispatcher: {dispatcher.queue.path}, {dispatcher.slots} slot(s)", file=sys.stderr, flush=True)
    try:
        dispatcher.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
