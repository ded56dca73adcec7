"""The dispatcher: starts queued jobs in worker processes, one at a time per GPU, and recovers after a restart.

It runs as a daemon thread in the app (:func:`start_dispatcher`) or in the foreground
(``python -m mmdemo.jobs.dispatcher``). Every ``poll`` seconds it

1. reaps its own workers; a worker that died without recording an outcome (killed, say for memory, or
   crashed) sends the job back to the queue to resume from its last checkpoint, up to ``MAX_ATTEMPTS``;
   then the job fails with the cause and a fix that fits it. A cancel asked for meanwhile wins;
2. stops cancelled running jobs that are still alive (SIGTERM to the worker's process group, SIGKILL after
   a grace period), which frees the GPU;
3. requeues running jobs whose worker is gone (the app or the machine was restarted): they resume from
   their last checkpoint; a worker that outlived the app (it runs in its own session) is left to finish; a job
   another machine claimed (replicas sharing a PostgreSQL queue, :mod:`mmdemo.jobs.pg_queue`) is judged by its
   heartbeat alone, requeued once it is ``STALE_SECONDS`` old, and never signalled from here;
4. starts queued jobs while fewer than ``slots`` run (the settings' ``job_slots``, ``MMDEMO_JOB_SLOTS``; default
   one per GPU, 1 on CPU). A worker runs with the dispatcher's settings (those it was given, else the
   process's): their :meth:`~mmdemo.config.Settings.to_env` variables replace the inherited ones in the child's
   environment only, so an app configured by flags trains with the same models and data folder;
5. at its first step and every ``CLEAN_SECONDS`` after, deletes half-written files that interrupted processes
   left behind (one warning line says what) and cleans finished jobs older than ``MMDEMO_KEEP_RUNS_DAYS`` (see
   :mod:`mmdemo.jobs.retention`).

With ``MMDEMO_RAY_ADDRESS`` set, a claimed job runs as an actor on a Ray cluster node instead of a local worker, and
steps 1-3 follow the actors (:mod:`mmdemo.jobs.ray_backend`; ray is imported only then).

When a step fails (a full or read-only data folder, a database hiccup) the error is logged once, with its
traceback, the loop backs off up to ``MAX_BACKOFF_SECONDS`` and says once when it works again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from mmdemo.config import Settings, folder_problem, get_settings, install
from mmdemo.errors import JobError, MMDemoError
from mmdemo.jobs.queue import Job, JobQueue, _signal, get_queue, pid_alive
from mmdemo.jobs.retention import CLEAN_SECONDS, clean_expired, clean_leftovers, keep_words
from mmdemo.jobs.worker import smaller_settings

log = logging.getLogger(__name__)

STALE_SECONDS = 30.0  # a worker that has not heartbeat for this long is gone
KILL_GRACE_SECONDS = 3.0  # from the SIGTERM of a cancel to the SIGKILL of a worker that has not stopped
MAX_BACKOFF_SECONDS = 30.0  # between tries while every step fails (a full disk is not fixed in a second)
KILLED_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)  # Popen's -9, or 137 through a shell
TERMINATED_CODES = (-signal.SIGTERM, 128 + signal.SIGTERM)  # the worker exits 143 on a SIGTERM that is not a cancel
WORKER_COMMAND = (sys.executable, "-m", "mmdemo.jobs.worker")  # the job id is added at the end


def death_sentences(code: int, job: Job) -> tuple[str, str]:
    """For a worker that exited with ``code`` without recording an outcome: (the cause, the failure sentence
    once attempts are used up). The fix fits the job: a Quick job is not told to choose Quick."""
    tries = f"after {job.attempts} tries the job was stopped"
    if code in KILLED_CODES:
        smaller = smaller_settings(job.preset, job.config.get("batch_size"))
        fix = (f"submit it again with {smaller}" if smaller
               else "use fewer or smaller examples, or a machine with more memory")
        cause = "The training process was killed, most likely because the machine ran out of memory"
        return cause, f"{cause}, and {tries}; {fix}."
    if code in TERMINATED_CODES:  # a server shutdown or restart (a cancel never gets here: it wins before)
        cause = "The training process was stopped from outside, as a server shutdown or restart does"
        return cause, f"{cause}, and {tries}; submit it again once the server runs without restarting."
    how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
    cause = f"The training process stopped unexpectedly ({how})"
    return cause, f"{cause}, and {tries}; read the job's log for the cause before you submit it again."


def default_slots(settings: Settings | None = None) -> int:
    """The settings' ``job_slots`` (``MMDEMO_JOB_SLOTS``) if set, else one per GPU, 1 on CPU."""
    slots = (settings or get_settings()).job_slots
    if slots:
        return slots
    if (settings or get_settings()).ray_address:
        return 1  # this machine's GPUs say nothing of the cluster's: MMDEMO_JOB_SLOTS says how many jobs it runs
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


class Dispatcher:
    """Runs the jobs of ``queue`` (any :class:`JobQueue` backend) in worker processes.

    ``worker_command`` is the command a worker runs, the job id added at its end (default: ``python -m
    mmdemo.jobs.worker``; tests give a fake worker); ``kill_grace`` is how long a cancelled worker has from its
    SIGTERM until the SIGKILL. ``settings`` are what workers run with (default: :func:`get_settings` at each use).
    """

    def __init__(self, queue: JobQueue | None = None, slots: int | None = None, poll: float = 0.5,
                 clean_every: float = CLEAN_SECONDS, worker_command: Sequence[str] = WORKER_COMMAND,
                 kill_grace: float = KILL_GRACE_SECONDS, settings: Settings | None = None):
        self._given_settings = settings
        self.queue: JobQueue = queue or get_queue(settings=settings)
        self.slots = slots or default_slots(settings)
        self.poll = poll
        self.clean_every = clean_every
        self.worker_command = tuple(worker_command)
        self.kill_grace = kill_grace
        self._next_clean = 0.0  # time.monotonic() of the next clean-up; the first step does one
        self._cleaned_once = False
        self.children: dict[str, subprocess.Popen] = {}
        self.cancel_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.cluster = None  # mmdemo.jobs.ray_backend.RayJobs, made at first use when MMDEMO_RAY_ADDRESS is set

    @property
    def settings(self) -> Settings:
        """The settings workers run with: the ones given, else the process's now."""
        return self._given_settings if self._given_settings is not None else get_settings()

    def _cluster(self):
        """The Ray cluster jobs run on (``MMDEMO_RAY_ADDRESS``), else ``None``: local workers. Imports ray only then."""
        if self.cluster is None and self.settings.ray_address:
            from mmdemo.jobs.ray_backend import RayJobs

            self.cluster = RayJobs(self.queue, self.settings.ray_address, kill_grace=self.kill_grace)
        return self.cluster

    def pids_here(self, job: Job) -> bool:
        """Whether the job's pid is one of this machine's: claimed here, or by a queue of one machine (SQLite
        records no claimant). Another replica's job is judged by its heartbeat and never signalled from here."""
        return job.claimed_by is None or job.claimed_by == getattr(self.queue, "machine", None)

    # ------------------------------------------------------------------------------------------------ steps
    def recover(self) -> None:
        """Requeue running jobs whose worker is gone; leave live workers (even another process's) alone."""
        now = time.time()
        for job in self.queue.running():
            if job.id in self.children:
                continue
            if (cluster := self._cluster()) is not None and self.pids_here(job) and cluster.attach(job):
                continue  # Ray: its actor runs on, and this dispatcher (restarted) follows it again
            fresh = job.heartbeat is not None and now - job.heartbeat < STALE_SECONDS
            if not self.pids_here(job):  # another replica's job: its pid means nothing here, its heartbeat does
                if not fresh:  # the queue checks the heartbeat again in the requeue's transaction
                    self.queue.requeue(job.id, "The app replica running this job stopped answering")
                continue
            if pid_alive(job.pid) and fresh:
                continue
            if job.pid is None and fresh:
                continue  # claimed a moment ago; the worker has not registered yet
            self.queue.requeue(job.id, "The app stopped while this job ran")

    def reap(self) -> None:
        for job_id, proc in list(self.children.items()):
            code = proc.poll()
            if code is None:
                continue
            self._worker_exited(job_id, code)  # if this raises, the child stays listed and is looked at again
            del self.children[job_id]
            self.cancel_seen.pop(job_id, None)
        if (cluster := self._cluster()) is not None:
            cluster.poll()  # Ray: progress, logs, cancels and outcomes of the jobs' actors

    def _worker_exited(self, job_id: str, code: int) -> None:
        job = self.queue.get(job_id)
        if job.state != "running":
            return  # the worker recorded its own outcome
        if job.cancel_requested:
            self.queue.finish(job_id, "cancelled")
            return
        # died without an outcome (SIGKILL from the kernel's OOM killer, a crash): its checkpoints are intact
        cause, error = death_sentences(code, job)
        self.queue.requeue(job_id, cause, error=error)

    def enforce_cancels(self) -> None:
        """Stop cancelled running jobs: one SIGTERM to the worker's process group when the cancel is first seen
        (the worker then records "cancelled" itself), SIGKILL once ``kill_grace`` seconds have passed.

        One SIGTERM only: a SIGTERM every poll would interrupt the worker's own clean-up, again and again.
        """
        now = time.monotonic()
        for job in self.queue.running():
            if not job.cancel_requested or not job.pid or not self.pids_here(job):  # its replica stops it
                continue
            if not pid_alive(job.pid):
                if job.id not in self.children:  # a worker of an earlier app: nobody reaps it, so say it here
                    self.cancel_seen.pop(job.id, None)
                    self.queue.finish(job.id, "cancelled")
                continue
            first = self.cancel_seen.get(job.id)
            if first is None:
                self.cancel_seen[job.id] = now
                _signal(job.pid, signal.SIGTERM)  # cancel() sent one too, if it could: a backend may run elsewhere
            elif now - first >= self.kill_grace:
                _signal(job.pid, signal.SIGKILL)

    def start_jobs(self) -> None:
        settings = self.settings  # a bad setting raises here, before a job is claimed
        while (job := self.queue.claim(self.slots)) is not None:
            if (cluster := self._cluster()) is not None:
                cluster.start(job, settings)  # Ray: an actor on a node, no local process (a failure releases it)
                continue
            try:
                proc = self._spawn(job, settings)
            except OSError as err:
                # no worker, so no attempt: the job waits in the queue until the folder can be written again
                self.queue.release(job.id)
                problem = folder_problem(err)
                if problem is None:
                    raise
                raise JobError(problem) from err
            self.children[job.id] = proc
            self.queue.set_pid(job.id, proc.pid)

    def _spawn(self, job: Job, settings: Settings | None = None) -> subprocess.Popen:
        run_dir = self.queue.run_dir(job.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        # this process's environment with its settings variables replaced by the dispatcher's settings: the
        # worker's get_settings() then equals them (parent's os.environ untouched); no token in a worker
        env = (settings or self.settings).child_env()
        env.pop("HF_TOKEN", None)
        env["MMDEMO_HOME"] = str(self.queue.home.absolute())  # the queue's jobs live there; the worker's cwd differs
        env["MMDEMO_JOBS_DB"] = getattr(self.queue, "url", "")  # the worker opens this queue (empty: SQLite in home)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with (run_dir / "log.txt").open("ab") as log_file:
            return subprocess.Popen([*self.worker_command, job.id], stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, cwd=root)

    def clean_up(self, force: bool = False) -> None:
        """Delete leftovers of interrupted processes and clean expired finished jobs, at most every
        ``clean_every`` seconds (``force``: now). A failure waits for the next turn: it must not hold up jobs."""
        now = time.monotonic()
        if not force and now < self._next_clean:
            return
        self._next_clean = now + self.clean_every
        first, self._cleaned_once = not self._cleaned_once, True
        leftovers = clean_leftovers(self.queue)
        if leftovers:
            # a warning when something had been interrupted (it must be seen without log config); expired
            # download folders alone are routine
            say = log.warning if set(leftovers.counts) - {"download"} else log.info
            say("%s removed %s.", "Start-up clean-up" if first else "Clean-up", leftovers.summary())
        settings = self.settings
        expired = clean_expired(self.queue, settings.keep_runs_seconds)
        if expired:
            log.info("Deleted %s, finished more than %s ago (MMDEMO_KEEP_RUNS_DAYS); their adapters are kept.",
                     expired.summary(), keep_words(settings.keep_runs_days))
        if expired.failed:
            log.warning("Could not delete the run folders of %d finished jobs (%s); trying again at the next "
                        "clean-up.", len(expired.failed), ", ".join(expired.failed[:5]))

    def step(self) -> None:
        self.reap()
        self.enforce_cancels()
        self.recover()
        self.start_jobs()
        self.clean_up()

    # ---------------------------------------------------------------------------------------------- running
    def run_forever(self) -> None:
        failures = 0
        logged: set[tuple[str, str]] = set()  # errors already logged since the last step that worked
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - a full disk or a database hiccup must not stop it for good
                failures += 1
                key = (type(err).__name__, str(err))
                if key not in logged:  # the same error every poll would bury everything else in the log
                    logged.add(key)
                    log.error("The job dispatcher cannot run jobs: %s (retrying quietly, at most every %.0f s)",
                              err, MAX_BACKOFF_SECONDS, exc_info=True)
                delay = min(MAX_BACKOFF_SECONDS, self.poll * 2 ** min(failures, 16))
            else:
                if failures:
                    # a warning, not info: it must reach the same place as the error above without log config
                    log.warning("The job dispatcher works again after %d failed tries.", failures)
                failures, delay = 0, self.poll
                logged.clear()
            self._stop.wait(delay)

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
            if self.cluster is not None:  # Ray actors are detached: only this stops them (an app restart does not)
                self.cluster.kill_all()


_DISPATCHERS: dict[str, Dispatcher] = {}
_LOCK = threading.Lock()


def start_dispatcher(home: str | Path | None = None, slots: int | None = None,
                     settings: Settings | None = None) -> Dispatcher:
    """Start this process's dispatcher for ``home`` (default: the settings' data folder) once (idempotent).

    Its workers run with ``settings`` (default: :func:`get_settings` when a job starts).
    """
    queue = get_queue(home, settings=settings)
    with _LOCK:
        key = str(queue.path)
        if key not in _DISPATCHERS:
            _DISPATCHERS[key] = Dispatcher(queue, slots, settings=settings).start()
        return _DISPATCHERS[key]


def main() -> int:
    """Run the dispatcher in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()  # read once; its workers run with the same
        install(settings)
        dispatcher = Dispatcher(settings=settings)
    except MMDemoError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"dispatcher: {dispatcher.queue.path}, {dispatcher.slots} slot(s)", file=sys.stderr, flush=True)
    try:
        dispatcher.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
