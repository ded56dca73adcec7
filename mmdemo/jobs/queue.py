"""The durable job queue: jobs, their progress events and their results in an embedded SQLite database.

:class:`JobQueue` is the small interface the UI, the CLI and the dispatcher use; :class:`SQLiteQueue` (the
default, ``MMDEMO_HOME/jobs.sqlite3``) implements it for one machine, and
:class:`~mmdemo.jobs.pg_queue.PostgresQueue` for several replicas. Both are a :class:`SqlQueue`: one SQL
implementation of every method but ``claim``, over the connection each store gives, with hooks where a shared
server must lock what one SQLite file serialises anyway. SQLite runs in WAL mode so the app, the dispatcher
and the worker processes read and write it concurrently; each call opens its own short transaction.

Each job row holds the latest phase, step and total (the page's one source of truth for where a job is); a
finished job's row holds the training steps it ran (phase ``finished``). A job also keeps the display name of
the adapter it makes (``label``), a fingerprint of its dataset (two identical jobs of one owner are refused while
the first waits or runs) and its training plan (steps and epochs, from :func:`mmdemo.jobs.train.training_plan`).

Progress is one record per training step; a long job stores only ``STEP_EVENTS`` of them, evenly spaced (plus the
first after any other record and the last before training stopped), so its events stay bounded while the row keeps
the latest step. A finished job older than ``MMDEMO_KEEP_RUNS_DAYS`` is *cleaned* (see :mod:`mmdemo.jobs.retention`):
its run folder goes and its step records are thinned to the milestones the timeline shows; the row, with its result,
stays (``cleaned`` says when).

States: queued -> running -> succeeded | failed | cancelled. A running job whose worker disappeared (app or
machine restart, a worker killed for memory) goes back to queued and resumes from its last checkpoint; each
claim counts an attempt, and after ``MAX_ATTEMPTS`` the job fails with the cause instead of looping.

A data folder that cannot be written (read-only, full, a file in the way) raises :class:`JobError` with one
sentence (no path: web users see it), both when the queue is opened and when a write fails.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from mmdemo.config import Settings, ensure_writable, folder_problem, get_settings
from mmdemo.errors import InputError, JobError

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a job interrupted this many times fails instead of looping forever

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, task TEXT NOT NULL, model TEXT, preset TEXT NOT NULL,
    config TEXT NOT NULL, data TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL, pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    phase TEXT, step INTEGER, total INTEGER, loss REAL, eta REAL,
    error TEXT, note TEXT, result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""
# columns added after the first release: a database made before them gets them at open (ALTER TABLE)
_ADDED_COLUMNS = {"label": "TEXT", "fingerprint": "TEXT", "plan": "TEXT", "cleaned": "REAL"}
ACTIVE = ("queued", "running")
STEP_EVENTS = 500  # per-step training records stored per job, evenly spaced (the chart draws at most 1,000 points)


@dataclass
class Job:
    id: str
    owner: str
    task: str
    model: str | None
    preset: str
    config: dict
    data: str  # the job's own copy of the dataset (under its run folder)
    name: str  # adapter folder name under MMDEMO_HOME/adapters
    state: str
    created: float
    started: float | None = None
    finished: float | None = None
    heartbeat: float | None = None
    pid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    phase: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    eta: float | None = None
    error: str | None = None
    note: str | None = None
    result: dict | None = None
    label: str | None = None  # the adapter's display name, chosen at submit (the folder keeps ``name``)
    fingerprint: str | None = None  # of the dataset as uploaded: same data, task and settings = a duplicate
    plan: dict | None = None  # training plan: steps, epochs, examples (see train.training_plan)
    cleaned: float | None = None  # when its run folder was deleted and its step records thinned (retention)
    # the machine whose dispatcher claimed it (pg_queue.machine_id); None: a one-machine queue (SQLite), whose
    # pids are always this machine's
    claimed_by: str | None = None
    position: int | None = None  # 1 = next to run (queued jobs only)

    @property
    def adapter(self) -> str | None:
        return (self.result or {}).get("adapter")

    @property
    def display_name(self) -> str:
        return self.label or self.name

    def record(self) -> dict:
        """A JSON-able view for the UI and the API (no internal fields such as the pid)."""
        keys = ("id", "task", "model", "preset", "config", "name", "label", "state", "position", "created",
                "started", "finished", "phase", "step", "total", "loss", "eta", "error", "note", "result",
                "attempts", "plan", "cancel_requested", "cleaned")
        return {k: getattr(self, k) for k in keys}


class JobQueue(Protocol):
    """What the UI, the CLI, the dispatcher, the worker and the clean-ups need from a queue backend.

    Every member here is used outside :class:`SQLiteQueue` (tests/test_dispatcher.py checks that the SQLite queue
    has each one with a compatible signature); a new backend implements all of them. ``owner`` arguments are a
    user's name: ``None`` means any owner and is for the server's own code, never for a web user's request.
    Each method that decides something (``add``, ``claim``, ``requeue``, ``finish``) checks and writes in one
    transaction, so of two processes (the app, the dispatcher, a worker) only one can win.
    """

    @property
    def home(self) -> Path:
        """``MMDEMO_HOME``: run folders and adapters live under it; the dispatcher gives it to the workers."""
        ...

    @property
    def path(self) -> Path | str:
        """Where the queue is stored (a database file, a server URL without secrets): one dispatcher per value."""
        ...

    # user side (mmdemo.jobs: the Fine-tune tab, the API, the CLI)
    def add(self, job: Job, limit: int | None = None) -> Job:
        """Queue ``job`` and return it as stored; raise ``JobError``/``InputError`` for a duplicate, an adapter
        name in use or more than ``limit`` active jobs of the owner, checked in the insert's transaction."""
        ...

    def find_duplicate(self, job: Job) -> Job | None:
        """The owner's queued or running job with ``job``'s data, task, model and settings (an early, advisory
        check before a dataset is copied; ``add`` checks again)."""
        ...

    def list(self, owner: str | None = None) -> list[Job]:
        """The owner's jobs (all jobs when ``None``), newest first; queued ones carry their ``position``."""
        ...

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, or ``JobError`` with one sentence when it does not exist or is not ``owner``'s."""
        ...

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """A queued job becomes cancelled at once; a running one gets ``cancel_requested``, and the dispatcher
        stops its worker (SQLite also signals it at once, on this machine). ``JobError`` for a finished job.
        Returns the job after the change."""
        ...

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        """Progress records after sequence number ``since``, oldest first, each with ``seq`` and ``time``."""
        ...

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        """The last ``lines`` lines of the worker's log ("" when there is none)."""
        ...

    def labels(self, owner: str) -> dict[str, str]:
        """Adapter names (label -> job id) the owner's queued or running jobs will make, cancels excluded."""
        ...

    def set_label(self, job_id: str, label: str) -> None:
        """Rename the adapter a job made or will make (the adapters module checks the name first)."""
        ...

    def run_dir(self, job_id: str) -> Path:
        """The job's run folder (dataset copy, checkpoints, ``log.txt``); a path only, nothing is created."""
        ...

    # dispatcher side (mmdemo.jobs.dispatcher: one per queue)
    def claim(self, slots: int) -> Job | None:
        """Atomically move the oldest queued job to running, counting an attempt, if fewer than ``slots`` run;
        ``None`` otherwise. Only the dispatcher calls it."""
        ...

    def release(self, job_id: str) -> None:
        """Undo a claim whose worker never started (no pid yet): queued again, the attempt not counted."""
        ...

    def running(self) -> list[Job]:
        """Every running job, of any owner and any dispatcher (the dispatcher's recovery and cancel checks)."""
        ...

    def requeue(self, job_id: str, cause: str, error: str | None = None) -> None:
        """For a running job whose worker died without an outcome, in one transaction: cancelled if a cancel was
        asked, failed with ``error`` once ``MAX_ATTEMPTS`` are used, else queued again with a note built from
        ``cause``. Does nothing to a job that is not running."""
        ...

    # worker side (mmdemo.jobs.worker), and the dispatcher for a worker that died
    def set_pid(self, job_id: str, pid: int) -> None:
        """Record the worker's process id (its process group) and count it as a heartbeat."""
        ...

    def heartbeat(self, job_id: str) -> None:
        """Say the running job's worker is alive (every few seconds); no effect on a job that is not running."""
        ...

    def cancel_requested(self, job_id: str) -> bool:
        """Whether the job's owner asked to cancel it (the worker polls it between training steps)."""
        ...

    def progress(self, job_id: str, record: dict) -> None:
        """Append a progress record (phase, step, total, loss, eta, message) and keep the latest on the job."""
        ...

    def finish(self, job_id: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        """Record the outcome (a state in ``FINAL``; ``error`` is the sentence users read) of a queued or running
        job and its progress record, in one transaction; a job already finished keeps its first outcome and gets
        no second record."""
        ...

    # retention (mmdemo.jobs.retention, from the dispatcher)
    def expired(self, before: float) -> list[str]:
        """Ids of finished jobs that ended before ``before`` and are not cleaned yet."""
        ...

    def clean(self, job_id: str) -> bool:
        """Delete a finished job's run folder and thin its step records; False (nothing done) when it is not
        finished or the folder could not be deleted."""
        ...


@functools.lru_cache(maxsize=512)
def _dialect(sql: str, jobs: str, events: str, param: str) -> str:
    """``sql`` written for :class:`SqlQueue` (tables ``$jobs`` and ``$events``, ``?`` parameters) in a store's terms."""
    return sql.replace("$jobs", jobs).replace("$events", events).replace("?", param)


class SqlQueue:
    """What the SQLite queue and the PostgreSQL one (:mod:`mmdemo.jobs.pg_queue`) share: every
    :class:`JobQueue` method but ``claim``, in SQL both run, over the connection their ``_db`` gives.

    A store sets ``JOBS``, ``EVENTS`` and ``PARAM`` (its table names and parameter marker), and provides
    ``_db(write=False)`` (a connection whose rows read by column name; with ``write``, one transaction) and
    ``claim``. Where a server shared by several machines must lock what one embedded file serialises anyway, it
    overrides the hooks ``_lock_owner``, ``_lock_job``, ``_requeue_row`` and ``_signals``.
    """

    JOBS = "jobs"
    EVENTS = "events"
    PARAM = "?"
    home: Path
    runs: Path

    def _db(self, write: bool = False):  # pragma: no cover - each store gives its own
        raise NotImplementedError

    def _run(self, db, sql: str, params: tuple | list = ()):
        """Execute ``sql`` (``$jobs``, ``$events``, ``?``) on ``db``; returns the cursor."""
        return db.execute(_dialect(sql, self.JOBS, self.EVENTS, self.PARAM), params)

    # ------------------------------------------------------------------------------------ the stores' hooks
    def _lock_owner(self, db, owner: str) -> None:
        """Inside ``add``'s transaction, before its checks: nothing where the transaction alone serialises."""

    def _lock_job(self, db, job_id: str) -> None:
        """Inside ``progress`` and ``finish``, before they write: nothing where the transaction alone serialises."""

    def _requeue_row(self, db, job_id: str):
        """The running job's ``attempts`` and ``cancel_requested`` for ``requeue``, or None to leave it alone."""
        return self._run(db, "SELECT attempts, cancel_requested FROM $jobs WHERE id=? AND state='running'",
                         (job_id,)).fetchone()

    def _signals(self, job: Job) -> bool:
        """Whether a cancel may signal the job's worker process here (its pid means something on this machine)."""
        return True

    # ------------------------------------------------------------------------------------------ user side
    def run_dir(self, job_id: str) -> Path:
        return self.runs / job_id

    def add(self, job: Job, limit: int | None = None) -> Job:
        """Queue ``job``; refuse it if its owner already has the same job (data, task, settings) or a job making
        an adapter of the same name waiting or running, or, with ``limit``, that many jobs queued or running.

        The checks and the insert share one transaction, so a double click cannot queue two identical jobs and
        two quick submits cannot both slip under the limit.
        """
        with self._db(write=True) as db:
            self._lock_owner(db, job.owner)
            same = self._duplicate(db, job)
            if same is not None:
                raise JobError(duplicate_job(same))
            if job.label:
                taken = self._run(db, f"SELECT id FROM $jobs WHERE owner=? AND label=? AND state IN {ACTIVE} "
                                      f"AND cancel_requested=0", (job.owner, job.label)).fetchone()
                if taken is not None:
                    raise InputError(name_in_use(job.label, taken["id"]))
            if limit is not None:
                active = self._run(db, f"SELECT COUNT(*) AS n FROM $jobs WHERE owner=? AND state IN {ACTIVE}",
                                   (job.owner,)).fetchone()["n"]
                if active >= limit:
                    raise JobError(too_many_jobs(limit))
            self._run(
                db,
                "INSERT INTO $jobs (id, owner, task, model, preset, config, data, name, state, created, label, "
                "fingerprint, plan) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job.id, job.owner, job.task, job.model, job.preset, json.dumps(job.config), job.data, job.name,
                 job.created, job.label, job.fingerprint, json.dumps(job.plan) if job.plan is not None else None),
            )
        self.progress(job.id, {"phase": "queued", "message": "Submitted; waiting in the queue."})
        return self.get(job.id)

    def _duplicate(self, db, job: Job) -> Job | None:
        if not job.fingerprint:
            return None
        # a job being cancelled does not count: the user may submit it again at once
        rows = self._run(db, f"SELECT * FROM $jobs WHERE owner=? AND task=? AND fingerprint=? AND state IN {ACTIVE} "
                             f"AND cancel_requested=0 ORDER BY created",
                         (job.owner, job.task, job.fingerprint)).fetchall()
        for row in rows:
            other = self._job(row)
            if other.config == job.config and (other.model or None) == (job.model or None):
                return other
        return None

    def find_duplicate(self, job: Job) -> Job | None:
        """The owner's waiting or running job with the same data, task, model and settings as ``job``, if any."""
        with self._db() as db:
            return self._duplicate(db, job)

    def set_label(self, job_id: str, label: str) -> None:
        """Rename the adapter a job made (or will make)."""
        with self._db(write=True) as db:
            self._run(db, "UPDATE $jobs SET label=? WHERE id=?", (label, job_id))

    def labels(self, owner: str) -> dict[str, str]:
        """Adapter names the owner's waiting or running jobs will use: label -> job id."""
        with self._db() as db:
            rows = self._run(db, f"SELECT id, label FROM $jobs WHERE owner=? AND label IS NOT NULL AND state IN "
                                 f"{ACTIVE} AND cancel_requested=0", (owner,)).fetchall()
        return {r["label"]: r["id"] for r in rows}

    @staticmethod
    def _job(row, position: int | None = None) -> Job:
        d = dict(row)
        d["config"] = json.loads(d["config"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["plan"] = json.loads(d["plan"]) if d.get("plan") else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return Job(**d, position=position)

    def _positions(self, db) -> dict[str, int]:
        rows = self._run(db, "SELECT id FROM $jobs WHERE state='queued' ORDER BY created, id").fetchall()
        return {r["id"]: i + 1 for i, r in enumerate(rows)}

    def list(self, owner: str | None = None) -> list[Job]:
        """Jobs of ``owner`` (all jobs when ``None``), newest first."""
        with self._db() as db:
            pos = self._positions(db)
            if owner is None:
                rows = self._run(db, "SELECT * FROM $jobs ORDER BY created DESC").fetchall()
            else:
                rows = self._run(db, "SELECT * FROM $jobs WHERE owner=? ORDER BY created DESC", (owner,)).fetchall()
        return [self._job(r, pos.get(r["id"])) for r in rows]

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if it exists and belongs to ``owner`` (any owner when ``None``)."""
        with self._db() as db:
            row = self._run(db, "SELECT * FROM $jobs WHERE id=?", (str(job_id),)).fetchone()
            pos = self._positions(db) if row is not None and row["state"] == "queued" else {}
        if row is None or (owner is not None and row["owner"] != owner):
            raise JobError(f"There is no job {job_id!r} of yours; pick one from your job list.")
        return self._job(row, pos.get(row["id"]))

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Cancel a queued job at once, or ask a running one to stop (its worker is stopped within seconds: at once
        when it runs on this machine, else by the dispatcher of the machine running it, at its next poll)."""
        job = self.get(job_id, owner)
        if job.state in FINAL:
            raise JobError(f"Job {job_id} already {job.state}; there is nothing to cancel.")
        with self._db(write=True) as db:
            self._run(db, "UPDATE $jobs SET state='cancelled', finished=?, cancel_requested=1 "
                          "WHERE id=? AND state='queued'", (time.time(), job.id))
            self._run(db, "UPDATE $jobs SET cancel_requested=1 WHERE id=? AND state='running'", (job.id,))
        job = self.get(job.id)
        if job.state == "cancelled":
            # a job interrupted and waiting for its next attempt did start: do not tell its owner it never did
            message = ("Cancelled while waiting in the queue to be tried again after an interruption." if job.attempts
                       else "Cancelled while waiting in the queue; it never started.")
            self.progress(job.id, {"phase": "cancelled", "message": message}, update_job=False)
        else:
            self.progress(job.id, {"phase": "cancelling", "message": "You asked to cancel; the training is being "
                                                                     "stopped."}, update_job=False)
        if job.state == "running" and job.pid and self._signals(job):
            _signal(job.pid, 15)  # the worker's process group: it stops now, not at the next step
        return job

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        """Progress records after sequence number ``since`` (each has ``seq`` and ``time``)."""
        with self._db() as db:
            rows = self._run(db, "SELECT seq, time, record FROM $events WHERE job_id=? AND seq>? ORDER BY seq",
                             (job_id, since)).fetchall()
        return [{"seq": r["seq"], "time": r["time"], **json.loads(r["record"])} for r in rows]

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        log_file = self.run_dir(job_id) / "log.txt"
        if not log_file.is_file():
            return ""
        with log_file.open("rb") as fh:
            fh.seek(max(0, log_file.stat().st_size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------------------- dispatcher/worker side
    def _started(self, job_id: str) -> Job:
        """The job a ``claim`` just moved to running, after recording that it started."""
        job = self.get(job_id)
        again = f" (attempt {job.attempts} of {MAX_ATTEMPTS})" if job.attempts > 1 else ""
        self.progress(job.id, {"phase": "starting", "message": f"Started{again}."}, update_job=False)
        return job

    def set_pid(self, job_id: str, pid: int) -> None:
        with self._db(write=True) as db:
            self._run(db, "UPDATE $jobs SET pid=?, heartbeat=? WHERE id=?", (pid, time.time(), job_id))

    def heartbeat(self, job_id: str) -> None:
        with self._db(write=True) as db:
            self._run(db, "UPDATE $jobs SET heartbeat=? WHERE id=? AND state='running'", (time.time(), job_id))

    def cancel_requested(self, job_id: str) -> bool:
        with self._db() as db:
            row = self._run(db, "SELECT cancel_requested FROM $jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def progress(self, job_id: str, record: dict, update_job: bool = True) -> None:
        """Append a progress record; the job row keeps the latest phase/step/loss/ETA for the job list.

        A training step's record is stored only when it is one of ``STEP_EVENTS`` evenly spaced steps, the last
        step, or the first after any other record; the row is updated at every step all the same, and before any
        other record the latest step is stored, so each stretch of training ends with the step it really reached.
        """
        now = time.time()
        with self._db(write=True) as db:
            self._lock_job(db, job_id)
            if not is_step_record(record):
                self._flush_step(db, job_id)
                store = True
            else:
                store = keeps_step(record["step"], record.get("total") or 0) or not self._last_is_step(db, job_id)
            if store:
                self._run(db, "INSERT INTO $events (job_id, time, record) VALUES (?, ?, ?)",
                          (job_id, now, json.dumps(record)))
            if update_job:
                self._run(db, "UPDATE $jobs SET phase=COALESCE(?, phase), step=?, total=?, loss=COALESCE(?, loss), "
                              "eta=?, heartbeat=? WHERE id=?",
                          (record.get("phase"), record.get("step"), record.get("total"), record.get("loss"),
                           record.get("eta"), now, job_id))

    def _record(self, db, job_id: str, record: dict) -> None:
        """Store a progress record inside the caller's transaction."""
        self._run(db, "INSERT INTO $events (job_id, time, record) VALUES (?, ?, ?)",
                  (job_id, time.time(), json.dumps(record)))

    def _last_record(self, db, job_id: str) -> dict | None:
        row = self._run(db, "SELECT record FROM $events WHERE job_id=? ORDER BY seq DESC LIMIT 1",
                        (job_id,)).fetchone()
        return json.loads(row["record"]) if row is not None else None

    def _last_is_step(self, db, job_id: str) -> bool:
        record = self._last_record(db, job_id)
        return record is not None and is_step_record(record)

    def _flush_step(self, db, job_id: str) -> None:
        """Store the row's latest training step if the evenly spaced records skipped it (the last record stored is
        an earlier step), so a stretch of training ends where it stopped (a cancel, a failure, a killed worker)."""
        row = self._run(db, "SELECT phase, step, total, loss FROM $jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["phase"] != "training" or row["step"] is None or row["loss"] is None:
            return
        record = self._last_record(db, job_id) or {}
        if is_step_record(record) and record["step"] != row["step"]:  # else nothing was skipped since the last one
            self._record(db, job_id, {"phase": "training", "step": row["step"], "total": row["total"],
                                      "loss": row["loss"]})

    def finish(self, job_id: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        """Record the outcome. A succeeded job's row then holds what it trained (phase ``finished``, the steps
        done of the steps planned) and its loss log thinned like its step records; a failed or cancelled one
        keeps the phase and step where it stopped."""
        if state not in FINAL:
            raise ValueError(state)
        training = (result or {}).get("training") or {}
        done, planned = training.get("steps_done"), training.get("steps")
        if result is not None and isinstance(result.get("losses"), list):
            result = {**result, "losses": thin_losses(result["losses"], planned or 0)}
        message = {"succeeded": "Finished.", "cancelled": "Cancelled.", "failed": error or "Failed."}[state]
        # the outcome and its record in one transaction: a worker killed (a cancel's SIGKILL) while it records its
        # outcome leaves both or neither, and of two processes recording one outcome only the first writes it
        with self._db(write=True) as db:
            self._lock_job(db, job_id)
            self._flush_step(db, job_id)  # before the row says "finished"
            changed = self._run(
                db,
                "UPDATE $jobs SET state=?, finished=?, result=COALESCE(?, result), error=?, pid=NULL, eta=NULL, "
                "phase=CASE WHEN ?='succeeded' THEN 'finished' ELSE phase END, step=COALESCE(?, step), "
                "total=COALESCE(?, total) WHERE id=? AND state IN ('running', 'queued')",
                (state, time.time(), json.dumps(result) if result is not None else None, error, state, done, planned,
                 job_id)).rowcount
            if changed:
                self._record(db, job_id, {"phase": state, "message": message})

    def requeue(self, job_id: str, cause: str, error: str | None = None) -> None:
        """Put an interrupted running job back at the head of the queue (it keeps its creation time).

        ``cause`` says what interrupted it ("The app stopped while this job ran"); the note adds which attempt
        comes next and the checkpoint it resumes from. When ``MAX_ATTEMPTS`` are used up the job fails with
        ``error`` (a sentence fitting the cause), and a cancel asked for meanwhile wins over both.
        """
        step = checkpoint_step(self.run_dir(job_id))
        with self._db(write=True) as db:
            row = self._requeue_row(db, job_id)
            if row is None:
                return
            attempts = row["attempts"]
            if row["cancel_requested"]:
                self._run(db, "UPDATE $jobs SET state='cancelled', finished=?, pid=NULL WHERE id=?",
                          (time.time(), job_id))
                phase, note = "cancelled", "Cancelled."
            elif attempts >= MAX_ATTEMPTS:
                phase = "failed"
                note = error or (f"The job was interrupted {attempts} times, so it was stopped; "
                                 f"submit it again, and report it if it happens again.")
                self._run(db, "UPDATE $jobs SET state='failed', finished=?, pid=NULL, eta=NULL, error=? WHERE id=?",
                          (time.time(), note, job_id))
            else:
                phase = "queued"
                resume = (f"resuming from the checkpoint of step {step}" if step is not None
                          else "starting from the beginning, as no checkpoint was saved yet")
                note = (f"{cause.rstrip('.')}; it goes back to the queue for attempt {attempts + 1} of {MAX_ATTEMPTS}, "
                        f"{resume}.")
                self._run(db, "UPDATE $jobs SET state='queued', pid=NULL, eta=NULL, note=? WHERE id=?", (note, job_id))
            self._flush_step(db, job_id)
            self._record(db, job_id, {"phase": phase, "message": note})  # with the change it tells of

    def release(self, job_id: str) -> None:
        """Undo a claim whose worker could not even be started: back to queued, the attempt not counted."""
        with self._db(write=True) as db:
            self._run(db, "UPDATE $jobs SET state='queued', attempts=CASE WHEN attempts > 0 THEN attempts - 1 "
                          "ELSE 0 END WHERE id=? AND state='running' AND pid IS NULL", (job_id,))

    def running(self) -> list[Job]:
        with self._db() as db:
            rows = self._run(db, "SELECT * FROM $jobs WHERE state='running'").fetchall()
        return [self._job(r) for r in rows]

    def expired(self, before: float) -> list[str]:
        """Finished (succeeded, failed, cancelled) jobs that ended before ``before`` and are not cleaned yet."""
        with self._db() as db:
            rows = self._run(db, f"SELECT id FROM $jobs WHERE state IN {FINAL} AND cleaned IS NULL "
                                 f"AND COALESCE(finished, created) < ? ORDER BY finished", (before,)).fetchall()
        return [r["id"] for r in rows]

    def clean(self, job_id: str) -> bool:
        """Delete a finished job's run folder (dataset copy, checkpoints, log) and thin its step records to the
        milestones its timeline shows; the row and its result (scores, examples, loss log) stay. An adapter lives
        elsewhere and is not touched. Returns False, doing nothing, for a job that is not finished, and when the
        run folder could not be deleted (the next clean-up tries again)."""
        job = self.get(job_id)
        if job.state not in FINAL:
            return False
        run_dir = self.run_dir(job.id)
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.exists():
            return False
        events = self.events(job.id)
        keep = milestones(events)
        drop = [e["seq"] for e in events if is_step_record(e) and e["seq"] not in keep]
        result = job.result
        if result is not None and isinstance(result.get("losses"), list):  # rows written before losses were thinned
            total = ((result.get("training") or {}).get("steps")) or 0
            result = {**result, "losses": thin_losses(result["losses"], total)}
        with self._db(write=True) as db:
            for start in range(0, len(drop), 500):
                chunk = drop[start:start + 500]
                self._run(db, f"DELETE FROM $events WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
            self._run(db, f"UPDATE $jobs SET cleaned=?, result=COALESCE(?, result) WHERE id=? AND state IN {FINAL}",
                      (time.time(), json.dumps(result) if result is not None else None, job.id))
        return True

    def delete(self, job_id: str, owner: str | None = None) -> None:
        """Forget a finished job and its run folder (its adapter stays)."""
        job = self.get(job_id, owner)
        if job.state not in FINAL:
            raise JobError(f"Job {job_id} is {job.state}; cancel it before deleting it.")
        with self._db(write=True) as db:
            self._run(db, "DELETE FROM $events WHERE job_id=?", (job.id,))
            self._run(db, "DELETE FROM $jobs WHERE id=?", (job.id,))
        shutil.rmtree(self.run_dir(job.id), ignore_errors=True)


class SQLiteQueue(SqlQueue):
    """The embedded queue under ``home`` (``jobs.sqlite3``, run folders in ``runs/<job id>``)."""

    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.path = self.home / "jobs.sqlite3"
        self.runs = self.home / "runs"
        problem = ensure_writable(self.home)
        if problem is not None:
            # debug: the app says it once at start-up, the CLI prints the JobError; a warning here would repeat
            # at every status poll of every open page
            log.debug("MMDEMO_HOME %s cannot be written: %s", self.home.absolute(), problem)
            raise JobError(problem)
        with self._db() as db:
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    try:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError as err:  # another process added it a moment ago
                        if "duplicate column" not in str(err):
                            raise

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (sqlite3.Error, OSError) as err:
            self._raise_storage_error(err)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if write:
                db.execute("BEGIN IMMEDIATE")
            yield db
            if write:
                db.execute("COMMIT")
        except BaseException as err:
            if write and db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # closing the connection below discards the transaction anyway; keep the first error
            if isinstance(err, (sqlite3.Error, OSError)):
                self._raise_storage_error(err)
            raise
        finally:
            db.close()

    def _raise_storage_error(self, err: sqlite3.Error | OSError) -> NoReturn:
        """Raise a full or read-only data folder as a ``JobError`` sentence; any other error as it is."""
        if isinstance(err, OSError):
            problem = folder_problem(err)
        else:
            text = str(err).lower()
            if "database or disk is full" in text:
                problem = folder_problem(OSError(errno.ENOSPC, "full"))
            elif "readonly database" in text:
                problem = folder_problem(OSError(errno.EROFS, "read-only"))
            elif "unable to open database" in text or "disk i/o error" in text:
                problem = ensure_writable(self.home)  # sqlite does not say why; a probe write does
            else:
                problem = None  # "database is locked" and the like: not the folder's fault
        if problem is None:
            raise err
        # debug only: every poll of a page would repeat it; the dispatcher logs it once, with this as its cause
        log.debug("job database %s: %s", self.path.absolute(), err)
        raise JobError(problem) from err

    # ------------------------------------------------------------------------------- dispatcher/worker side
    def claim(self, slots: int) -> Job | None:
        """Atomically move the oldest queued job to running if fewer than ``slots`` jobs run."""
        with self._db(write=True) as db:
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE state='running'").fetchone()[0]
            if running >= slots:
                return None
            row = db.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY created, id LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            # the row says "starting" until the worker reports: not the "queued" phase of its first record
            db.execute("UPDATE jobs SET state='running', started=COALESCE(started, ?), heartbeat=?, pid=NULL, "
                       "attempts=attempts+1, phase='starting', step=NULL, total=NULL, eta=NULL WHERE id=?",
                       (now, now, row["id"]))
        return self._started(row["id"])


def _signal(pid: int, sig: int) -> bool:
    """Signal the worker's process group (it runs in its own session); False if it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_QUEUES: dict[str, JobQueue] = {}
_LOCK = threading.Lock()


def get_queue(home: str | Path | None = None, settings: Settings | None = None) -> JobQueue:
    """The queue for ``MMDEMO_HOME`` (or ``home``) of ``settings`` (default: :func:`get_settings`): the SQLite one
    in it, or with ``MMDEMO_JOBS_DB`` set the PostgreSQL one (:mod:`mmdemo.jobs.pg_queue`; run folders still under
    ``home``). One object per database and home per process."""
    settings = settings or get_settings()
    home = Path(home) if home is not None else settings.home
    database = settings.jobs_database
    key = str(home.resolve()) if not database else f"{database} {home.resolve()}"
    with _LOCK:
        if key not in _QUEUES:
            if database:
                from mmdemo.jobs.pg_queue import PostgresQueue  # psycopg only where it is asked for

                _QUEUES[key] = PostgresQueue(database, home)
            else:
                _QUEUES[key] = SQLiteQueue(home)
        return _QUEUES[key]


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in a job's run folder (``work/checkpoints``), if any.

    The same rule as training's resume (``trainer_state.json`` is written last), without its clean-up: this
    only reads, so it is safe to call for a job whose worker may still be writing.
    """
    folder = Path(run_dir) / "work" / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [int(p.name.rsplit("-", 1)[-1]) for p in folder.glob("checkpoint-*")
             if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps, default=None)


def is_step_record(record: dict) -> bool:
    """A training step's record (a loss, no sentence): the kind a job writes thousands of."""
    return (record.get("phase") == "training" and record.get("loss") is not None and not record.get("message")
            and isinstance(record.get("step"), int))


def keeps_step(step: int, total: int) -> bool:
    """Is ``step`` one of the ``STEP_EVENTS`` evenly spaced steps of ``total`` that are stored (the last always)?"""
    if total <= STEP_EVENTS:
        return True
    return step % math.ceil(total / STEP_EVENTS) == 0 or step >= total


def thin_losses(losses: list[dict], total: int) -> list[dict]:
    """A loss log (``{"step", "loss"}`` per step) thinned like the step records: the same steps, first and last
    always kept."""
    total = total or max((int(x.get("step") or 0) for x in losses), default=0)
    return [x for i, x in enumerate(losses)
            if i in (0, len(losses) - 1) or keeps_step(int(x.get("step") or 0), total)]


def milestones(events: list[dict]) -> set[int]:
    """The ``seq`` of the step records a cleaned job keeps: the first and last of each stretch of training (the
    timeline's "the loss went from ... to ...") and the first in each quarter of the steps (its progress lines)."""
    keep: set[int] = set()
    quarters: set[int] = set()
    stretch: list[dict] = []
    for ev in [*events, {"phase": "end"}]:
        if ev.get("phase") == "training":
            if is_step_record(ev):
                stretch.append(ev)
                total = ev.get("total") or 0
                quarter = int(4 * ev["step"] / total) if total else 0
                if 0 < quarter < 4 and quarter not in quarters:
                    quarters.add(quarter)
                    keep.add(ev["seq"])
            continue
        if stretch:
            keep.update((stretch[0]["seq"], stretch[-1]["seq"]))
            stretch = []
    return keep


def duplicate_job(other: Job) -> str:
    where = "waiting in the queue" if other.state == "queued" else "running"
    return (f"You already have this job {where} (job {other.id}, adapter “{other.display_name}”): the same dataset, "
            f"task and settings. Wait for it to finish, or cancel it before submitting it again.")


def name_in_use(label: str, job_id: str) -> str:
    return (f"Your job {job_id}, still waiting or running, will already make an adapter called “{label}”; choose "
            f"another name.")


def too_many_jobs(limit: int) -> str:
    jobs = "job" if limit == 1 else "jobs"
    return (f"You already have {limit} {jobs} waiting or running; wait for one to finish or cancel one, "
            f"then submit again.")


def new_job_id() -> str:
    # 48 random bits: an adapter is named after its job, and the name is what an API call passes
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:12]


def clean_owner(owner: str | None) -> str:
    owner = (owner or "").strip()
    if not owner or len(owner) > 200:
        raise InputError("A job needs an owner (a Hugging Face user name or a browser session id).")
    return owner


__all__ = ["ACTIVE", "FINAL", "MAX_ATTEMPTS", "STATES", "STEP_EVENTS", "duplicate_job", "name_in_use", "Job", "JobQueue",
           "SQLiteQueue", "checkpoint_step", "clean_owner", "get_queue", "is_step_record", "keeps_step", "milestones",
           "new_job_id", "pid_alive", "thin_losses", "too_many_jobs"]
