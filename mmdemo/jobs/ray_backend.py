"""Fine-tuning jobs on a Ray cluster (``MMDEMO_RAY_ADDRESS``): one detached actor per job, driven by the dispatcher.

Nothing here is imported, and ``ray`` is never imported, unless ``MMDEMO_RAY_ADDRESS`` is set: the single-machine
path (local worker processes) is unchanged. With it set, the app's dispatcher still claims jobs from its queue, and
for each claimed job starts a named, detached actor (``mmdemo-job-<id>`` in namespace ``mmdemo``) on a node that
has what a job asks for (``MMDEMO_RAY_RESOURCES``; default one GPU when the cluster has GPUs, else one CPU).

- **Same training.** The actor trains in a thread through :func:`mmdemo.jobs.worker.train_job`, the local worker's
  own code path (``finetune()``, checkpoints in the run folder, failure sentences). It never opens the queue: it keeps
  its progress records and log lines (its stdout and stderr) until the dispatcher fetches them.
- **Progress.** Every poll the dispatcher asks each actor for what is new (:meth:`JobActor.drain`, never waiting: a
  reply not there yet is looked at the next poll), writes the records to the queue and the lines to the job's
  ``log.txt``, exactly as a local worker would, so the page shows progress, loss, ETA and logs unchanged. Each drain
  acknowledges the previous one, and the actor forgets what was acknowledged.
- **Cancel.** :meth:`JobActor.cancel` sets the flag training's ``should_stop`` reads (it stops at its next step);
  after the dispatcher's kill grace the actor is killed (``ray.kill``) and the job recorded as cancelled.
- **App restart.** The actor is detached, so it trains on without the app, and keeps its outcome until a dispatcher
  fetches it. A starting dispatcher re-attaches to the actor of every job the queue says is running
  (:meth:`RayJobs.attach`) instead of requeueing it; a new actor is made with ``get_if_exists``, so a job never runs
  twice. Records written in the last poll before the app stopped may be written again after it.
- **Node death.** The actor has ``max_restarts``: Ray starts it again on another node with the resources, and
  training resumes from the last checkpoint in the run folder (its records say so). When the restarts are used up,
  or the actor is gone for another reason, the job goes back to the queue like a local worker that died.

**Storage.** Run folders (dataset copies, checkpoints, logs) and adapters live under ``MMDEMO_HOME``, which must be
one shared folder mounted at the same path on the app's machine and every node (NFS, EFS, Filestore, a GCS/S3 FUSE
mount). A checkpoint must outlive the node that wrote it, and a dataset is read where the job runs: a shared folder
gives both with plain file paths, so ``finetune()`` runs unchanged and nothing large travels through Ray's object
store (which lives in the nodes' memory and dies with them). Only the app writes the job database.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdemo.config import Settings, install
from mmdemo.errors import JobError
from mmdemo.jobs.queue import MAX_ATTEMPTS, Job, JobQueue, checkpoint_step

log = logging.getLogger(__name__)

NAMESPACE = "mmdemo"
HEARTBEAT_SECONDS = 2.0  # how often a job that answers gets a heartbeat in the queue
WAITING_NOTE_SECONDS = 20.0  # an actor silent this long after its start is told to be waiting for a node
MAX_FAILURES = 60  # drains in a row that fail (about 30 s) before an actor that still has its name counts as lost
MAX_LINES = 20_000  # log lines an actor keeps while no dispatcher fetches them (the oldest go first)
ROOT = Path(__file__).resolve().parents[1]  # the mmdemo package, shipped to the nodes (py_modules)


def actor_name(job_id: str) -> str:
    return f"mmdemo-job-{job_id}"


def actor_options(resources: dict[str, float], cluster: dict[str, float]) -> dict[str, Any]:
    """Ray actor options for what one job asks for (``MMDEMO_RAY_RESOURCES``; ``{}``: one GPU if the cluster has
    any, else one CPU). ``CPU``, ``GPU`` and ``memory`` are Ray's own; any other key is a custom resource."""
    asked = dict(resources) or ({"GPU": 1} if cluster.get("GPU", 0) > 0 else {"CPU": 1})
    options: dict[str, Any] = {"num_cpus": asked.pop("CPU", 1), "num_gpus": asked.pop("GPU", 0)}
    if "memory" in asked:
        options["memory"] = asked.pop("memory")
    if asked:
        options["resources"] = asked
    return options


class _Lines(io.TextIOBase):
    """A stdout/stderr that hands each complete line to ``sink`` and still writes to ``stream`` (Ray's own log)."""

    def __init__(self, sink, stream):
        self.sink, self.stream, self.partial = sink, stream, ""

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            pass
        *lines, self.partial = (self.partial + text).replace("\r", "\n").split("\n")
        for line in lines:
            self.sink(line)
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class JobActor:
    """One job on a cluster node: trains in a thread from its construction (also when Ray restarts it on another
    node), keeps numbered progress records and log lines until :meth:`drain` has them acknowledged."""

    def __init__(self, job: dict, run_dir: str):
        import ray

        # the app's settings came as environment variables (runtime_env), as a local worker's do
        install(Settings.from_env())
        self.job = Job(**job)
        self.run_dir = Path(run_dir)
        self.lock = threading.Lock()
        self.items: list[tuple[int, str, Any]] = []  # (seq, "record" | "line", payload)
        self.seq = 0
        self.incarnation = uuid.uuid4().hex  # a restart numbers from 1 again: an ack of the one before is void
        self.outcome: dict | None = None
        self.stop = threading.Event()
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        sys.stdout = _Lines(lambda line: self._add("line", line), sys.__stdout__)
        sys.stderr = _Lines(lambda line: self._add("line", line), sys.__stderr__)
        where = f"cluster node {ray.util.get_node_ip_address()} ({self.node[:12]})"
        with warnings.catch_warnings():  # ray 2.60 warns about its own use of a deprecated API here
            warnings.simplefilter("ignore")
            restarted = context.was_current_actor_reconstructed
        if restarted:
            step = checkpoint_step(self.run_dir)
            resume = (f"resumed from step {step}" if step is not None
                      else "started again from the beginning, as no checkpoint was saved yet")
            message = f"The cluster node running this job stopped; it runs again on {where}, {resume}."
        else:
            message = f"Running on {where}."
        self._add("record", {"phase": "starting", "message": message, "node": self.node})
        print(message, flush=True)
        threading.Thread(target=self._run, name="mmdemo-job", daemon=True).start()

    def _add(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.seq += 1
            self.items.append((self.seq, kind, payload))
            if kind == "line" and len(self.items) > 2 * MAX_LINES:  # nobody fetches: drop the oldest lines
                lines = [i for i, item in enumerate(self.items) if item[1] == "line"]
                drop = set(lines[:len(lines) - MAX_LINES])
                self.items = [item for i, item in enumerate(self.items) if i not in drop]

    def _run(self) -> None:
        from mmdemo.jobs.worker import failure_sentence, train_job

        try:
            state, result, error = train_job(self.job, self.run_dir, lambda rec: self._add("record", rec),
                                             self.stop.is_set)
        except BaseException as err:  # noqa: BLE001 - train_job lets only a SIGTERM through; it must be an outcome
            state, result, error = "failed", None, failure_sentence(err, self.job.preset,
                                                                    self.job.config.get("batch_size"))
        with self.lock:  # after every record: a drain that sees the outcome has seen all of them
            self.outcome = {"state": state, "result": result, "error": error}

    def drain(self, ack: int = 0, incarnation: str | None = None) -> dict:
        """Forget what is numbered ``ack`` or less in ``incarnation`` (the caller has written it: an ack of an earlier
        incarnation, before Ray restarted this actor, says nothing); return the rest, the node and, once training
        ended and everything before it is in this reply, the outcome."""
        with self.lock:
            if incarnation == self.incarnation:
                self.items = [item for item in self.items if item[0] > ack]
            return {"items": list(self.items), "outcome": self.outcome, "node": self.node,
                    "incarnation": self.incarnation}

    def cancel(self) -> None:
        self.stop.set()


@dataclass
class _Tracked:
    actor: Any
    started: float = field(default_factory=time.monotonic)
    ack: int = 0
    incarnation: str | None = None  # of the actor the ack is for (Ray may have restarted it since)
    pending: Any = None  # the ObjectRef of the drain asked for and not looked at yet
    heard: bool = False
    beat: float = 0.0
    cancel_seen: float | None = None
    noted_waiting: bool = False
    failures: int = 0  # drains in a row that failed (an actor Ray is restarting on another node fails a few)


_REMOTE_CLASS = None


def _remote_class(ray):
    global _REMOTE_CLASS
    if _REMOTE_CLASS is None:
        _REMOTE_CLASS = ray.remote(JobActor)
    return _REMOTE_CLASS


class RayJobs:
    """The dispatcher's side: starts, watches, cancels and re-attaches to the actors of its queue's jobs.

    Connects to ``address`` at first use (``ray.init``; the driver is this process). ``kill_grace`` is how long a
    cancelled actor has to stop by itself before it is killed.
    """

    def __init__(self, queue: JobQueue, address: str, kill_grace: float = 3.0):
        self.queue = queue
        self.address = address
        self.kill_grace = kill_grace
        self.jobs: dict[str, _Tracked] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.jobs

    def _ray(self):
        try:
            import ray
        except ImportError as err:
            raise JobError("MMDEMO_RAY_ADDRESS is set, but Ray is not installed: pip install the version the cluster "
                           "runs (requirements-dev.txt pins ray==2.60.0), or unset MMDEMO_RAY_ADDRESS to train on "
                           "this machine.") from err

        if not ray.is_initialized():
            try:
                # the mmdemo package travels to the nodes with the driver's job (only a job may upload a folder);
                # the nodes need the same Python packages (requirements.txt) installed
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level=logging.WARNING, runtime_env={"py_modules": [str(ROOT)]})
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise JobError(f"The Ray cluster at {self.address} (MMDEMO_RAY_ADDRESS) cannot be reached ({err}); "
                               f"jobs wait in the queue until it can. Start the cluster, or unset "
                               f"MMDEMO_RAY_ADDRESS to train on this machine.") from err
        return ray

    # ------------------------------------------------------------------------------------- start, attach
    def start(self, job: Job, settings: Settings) -> None:
        """Start the job's actor (or take the one of that name that already runs: nothing runs twice)."""
        try:
            ray = self._ray()
            run_dir = self.queue.run_dir(job.id)
            run_dir.mkdir(parents=True, exist_ok=True)
            env = {**settings.to_env(), "MMDEMO_HOME": str(Path(self.queue.home).absolute()),
                   "TOKENIZERS_PARALLELISM": "false"}  # no HF_TOKEN: training needs none
            options = actor_options(settings.ray_resources, ray.cluster_resources())
            actor = _remote_class(ray).options(
                name=actor_name(job.id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                max_restarts=MAX_ATTEMPTS - 1, max_task_retries=0,
                runtime_env={"env_vars": env}, **options,
            ).remote(job.__dict__ | {"position": None}, str(run_dir.absolute()))
        except BaseException:
            self.queue.release(job.id)  # no actor, so no attempt: the job waits in the queue
            raise
        self.jobs[job.id] = _Tracked(actor)
        self._log(job.id, f"Started as Ray actor {actor_name(job.id)} asking for {json.dumps(options)}.")

    def attach(self, job: Job) -> bool:
        """Re-attach to a running job's actor after an app restart; False when it has none on the cluster."""
        if job.id in self.jobs:
            return True
        ray = self._ray()
        try:
            actor = ray.get_actor(actor_name(job.id), namespace=NAMESPACE)
        except ValueError:
            return False
        self.jobs[job.id] = _Tracked(actor)
        self._log(job.id, f"The app restarted; re-attached to Ray actor {actor_name(job.id)}, still running.")
        log.info("Re-attached to job %s on the Ray cluster.", job.id)
        return True

    # ------------------------------------------------------------------------------------------- polling
    def poll(self) -> None:
        """Fetch what each actor has, forward cancels, record outcomes; never waits for an actor."""
        if not self.jobs:
            return
        ray = self._ray()
        from ray.exceptions import ActorUnavailableError, RayError

        running = {job.id: job for job in self.queue.running()}
        now = time.monotonic()
        for job_id, tracked in list(self.jobs.items()):
            job = running.get(job_id)
            if job is None:  # finished or requeued meanwhile by someone else: this actor has no job any more
                self._kill(job_id)
                continue
            if job.cancel_requested:
                if tracked.cancel_seen is None:
                    tracked.cancel_seen = now
                    tracked.actor.cancel.remote()
                elif now - tracked.cancel_seen >= self.kill_grace:
                    self._kill(job_id)
                    self.queue.finish(job_id, "cancelled")
                    continue
            if tracked.pending is not None:
                ready, _ = ray.wait([tracked.pending], timeout=0)
                if not ready:
                    self._waiting(job_id, tracked, now)
                    continue
                ref, tracked.pending = tracked.pending, None
                try:
                    reply = ray.get(ref)
                except ActorUnavailableError:
                    pass  # restarting on another node: ask again
                except RayError as err:  # died for good, or could not even be created, or restarting
                    tracked.failures += 1
                    if tracked.failures >= MAX_FAILURES or not self._exists(ray, job_id):
                        self._lost(job_id, err)
                        continue
                else:
                    tracked.failures = 0
                    if self._write(job_id, tracked, reply, now):
                        continue
            tracked.pending = tracked.actor.drain.remote(tracked.ack, tracked.incarnation)

    def _write(self, job_id: str, tracked: _Tracked, reply: dict, now: float) -> bool:
        """Write a drain's records and lines; True when it carried the outcome (then the job is finished)."""
        lines = []
        if reply["incarnation"] != tracked.incarnation:
            tracked.incarnation, tracked.ack = reply["incarnation"], 0
        for seq, kind, payload in reply["items"]:
            if kind == "record":
                payload = {k: v for k, v in payload.items() if k != "node"}
                self.queue.progress(job_id, payload)
            else:
                lines.append(payload)
            tracked.ack = max(tracked.ack, seq)
        if lines:
            self._log(job_id, *lines)
        tracked.heard = True
        outcome = reply["outcome"]
        if outcome is not None:
            self.queue.finish(job_id, outcome["state"], result=outcome["result"], error=outcome["error"])
            self._kill(job_id)
            return True
        if now - tracked.beat >= HEARTBEAT_SECONDS:
            tracked.beat = now
            self.queue.heartbeat(job_id)
        return False

    def _waiting(self, job_id: str, tracked: _Tracked, now: float) -> None:
        if tracked.heard or tracked.noted_waiting or now - tracked.started < WAITING_NOTE_SECONDS:
            return
        tracked.noted_waiting = True
        self.queue.progress(job_id, {"phase": "starting", "message": "Waiting for a cluster node with the "
                                                                     "resources this job asks for."})

    @staticmethod
    def _exists(ray, job_id: str) -> bool:
        """Whether the job's actor is still known to the cluster (alive, or being restarted by Ray)."""
        try:
            ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
        except ValueError:
            return False
        return True

    def _lost(self, job_id: str, err: Exception) -> None:
        """The actor is gone for good (its restarts used up, or killed): like a local worker that died."""
        del self.jobs[job_id]
        cause = "The Ray actor running this job stopped (its node was lost, or it was killed)"
        job = self.queue.get(job_id)
        self._log(job_id, f"{cause}: {err}")
        self.queue.requeue(job_id, cause, error=f"{cause}, and after {job.attempts} tries the job was stopped; "
                                                f"read the job's log for the cause before you submit it again.")

    def _kill(self, job_id: str) -> None:
        tracked = self.jobs.pop(job_id, None)
        if tracked is None:
            return
        import ray

        try:
            ray.kill(tracked.actor, no_restart=True)
        except ValueError:
            pass  # already gone

    def kill_all(self) -> None:
        for job_id in list(self.jobs):
            self._kill(job_id)

    def _log(self, job_id: str, *lines: str) -> None:
        run_dir = self.queue.run_dir(job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "log.txt").open("a", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in lines))


__all__ = ["NAMESPACE", "JobActor", "RayJobs", "actor_name", "actor_options"]
