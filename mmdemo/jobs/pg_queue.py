"""The job queue in a PostgreSQL database, for several app replicas sharing one queue (``MMDEMO_JOBS_DB``).

:class:`PostgresQueue` implements :class:`~mmdemo.jobs.queue.JobQueue` with the semantics of the SQLite queue:
the same :class:`~mmdemo.jobs.queue.Job` records, progress records and sentences. Only the rows move to the
server: run folders (dataset copies, checkpoints, ``log.txt``) and adapters stay under ``MMDEMO_HOME``, which the
replicas must share (one network file system mounted at the same path on each: a job's row holds its dataset
copy's path). Select it with ``MMDEMO_JOBS_DB=postgresql://user@host:5432/mmdemo``; the tables (``mmdemo_jobs``,
``mmdemo_events``) are created on first use, and columns added later are added to an older database then.

Claiming: :meth:`PostgresQueue.claim` picks the oldest queued job with ``SELECT ... FOR UPDATE SKIP LOCKED`` and
marks it running in the same transaction, so two dispatchers (of one replica or of two) never claim the same job;
each claim records ``claimed_by``, the :func:`machine_id` of the claiming process (host, boot and pid namespace:
where its worker's pid means something). ``slots`` counts the jobs running on that machine only: each replica has
its own GPUs. A job claimed on another machine is judged by its heartbeat alone (the dispatcher does not check or
signal its pid), and :meth:`PostgresQueue.requeue` refuses, in its transaction, to requeue a job another machine
claimed whose heartbeat is fresh, so a slow replica's job is never run twice.

psycopg (``pip install "psycopg[binary]"``) is imported when a queue is made: the default SQLite path never needs it.
A server that cannot be reached, or refuses the login, is a :class:`~mmdemo.errors.JobError` sentence (no URL in it:
web users read it), raised by the call that needed the database; the next call tries again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from mmdemo.config import ensure_writable
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.queue import (
    ACTIVE,
    FINAL,
    MAX_ATTEMPTS,
    Job,
    _signal,
    checkpoint_step,
    duplicate_job,
    is_step_record,
    keeps_step,
    milestones,
    name_in_use,
    thin_losses,
    too_many_jobs,
)

log = logging.getLogger(__name__)

SCHEMES = ("postgresql://", "postgres://")
IDLE_CONNECTIONS = 4  # kept open per process for the next call (a page polls every 2 s)
CONNECT_TIMEOUT = 5  # seconds; a page waiting longer for an unreachable server is worse than the sentence
_LOCK_SPACE = 0x6D6D6400  # pg_advisory_xact_lock(space, key): 'mmd\0' + what the key locks
_SCHEMA_LOCK, _CLAIM_LOCK, _OWNER_LOCK = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mmdemo_jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, task TEXT NOT NULL, model TEXT, preset TEXT NOT NULL,
    config TEXT NOT NULL, data TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, finished DOUBLE PRECISION,
    heartbeat DOUBLE PRECISION, pid INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, phase TEXT, step INTEGER, total INTEGER, loss DOUBLE PRECISION,
    eta DOUBLE PRECISION, error TEXT, note TEXT, result TEXT
);
CREATE INDEX IF NOT EXISTS mmdemo_jobs_state ON mmdemo_jobs(state, created);
CREATE TABLE IF NOT EXISTS mmdemo_events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, job_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mmdemo_events_job ON mmdemo_events(job_id, seq);
"""
# columns added after the first table: ADD COLUMN IF NOT EXISTS at first use brings an older database up to date
_ADDED_COLUMNS = {"label": "TEXT", "fingerprint": "TEXT", "plan": "TEXT", "cleaned": "DOUBLE PRECISION",
                  "claimed_by": "TEXT"}


@functools.cache
def machine_id() -> str:
    """Where this process's pids mean something: host name, boot and pid namespace (a container has its own).

    Two processes with the same value see each other's pids; a job claimed under another value is judged by its
    heartbeat only.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "-"
    try:
        space = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        space = "-"
    return f"{socket.gethostname()}/{boot}/{space}"


def check_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL, else ``InputError`` (the value is not repeated: it may hold a password)."""
    if not url.startswith(SCHEMES):
        raise InputError("MMDEMO_JOBS_DB must be a PostgreSQL URL such as postgresql://user@host:5432/mmdemo, or "
                         "empty for the built-in SQLite queue.")
    return url


def redact(url: str) -> str:
    """The URL without its password (the queue's ``path``: logs and status lines show it)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise JobError('MMDEMO_JOBS_DB needs the psycopg package; install it with pip install "psycopg[binary]", '
                       'or leave MMDEMO_JOBS_DB empty for the built-in SQLite queue.') from None
    return psycopg


def database_problem(err: Exception) -> str | None:
    """The sentence for an error that means the job database cannot be used now (unreachable, login refused, out
    of space), else ``None`` (a bug: raised as it is). No host or user in it: web users read it."""
    psycopg = _psycopg()
    state = getattr(err, "sqlstate", None) or ""
    text = str(err).lower()
    if state.startswith("28") or "authentication failed" in text or "password" in text:
        return ("The job database (MMDEMO_JOBS_DB) refused the login; check the user and password (a .pgpass "
                "file or PGPASSWORD) and the server's access rules.")
    if state == "3D000" or ("database" in text and "does not exist" in text):
        return "The job database named in MMDEMO_JOBS_DB does not exist; create it (createdb) or fix the URL."
    if state.startswith("53"):
        return ("The job database server is out of space or connections; free some on the server, then try "
                "again.")
    if isinstance(err, psycopg.OperationalError) or state.startswith(("08", "57P")):
        why = ("connection refused" if "refused" in text else "timed out" if "timeout" in text or "timed out" in text
               else "the server is shutting down" if state.startswith("57P") else "no connection")
        return (f"The job database (MMDEMO_JOBS_DB) cannot be reached ({why}); check that the PostgreSQL server "
                f"is running and the URL is right, then try again.")
    return None


class PostgresQueue:
    """The queue in the PostgreSQL database at ``url``; run folders in ``home/runs/<job id>`` as with SQLite."""

    def __init__(self, url: str, home: str | Path):
        self.url = check_url(url)
        self.home = Path(home)
        self.path = redact(url)
        self.runs = self.home / "runs"
        self.machine = machine_id()  # written as claimed_by by claim(); the dispatcher compares jobs with it
        self._psycopg = _psycopg()
        problem = ensure_writable(self.home)  # run folders and adapters still live there
        if problem is not None:
            log.debug("MMDEMO_HOME %s cannot be written: %s", self.home.absolute(), problem)
            raise JobError(problem)
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._ready = False  # the schema is made at the first call that reaches the server, not here

    # ------------------------------------------------------------------------------------------ connections
    def _connect(self):
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not talk over its parent's sockets
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        from psycopg.rows import dict_row

        extra = {} if "connect_timeout" in self.url else {"connect_timeout": CONNECT_TIMEOUT}
        conn = self._psycopg.connect(self.url, autocommit=True, row_factory=dict_row, application_name="mmdemo",
                                     **extra)
        if not self._ready:
            try:
                self._create_schema(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _create_schema(self, conn) -> None:
        """Create the tables, or add the columns an older database lacks; nothing when all is there (DDL takes
        table locks that would wait for the other replicas' transactions)."""
        def missing() -> list[str]:
            if conn.execute("SELECT to_regclass('mmdemo_events_job') AS i").fetchone()["i"] is None:
                return ["tables"]
            have = {r["column_name"] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name='mmdemo_jobs' "
                "AND table_schema=current_schema()")}
            return [c for c in _ADDED_COLUMNS if c not in have]

        if missing():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _SCHEMA_LOCK))  # one at a time
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                for column in missing():
                    conn.execute(f"ALTER TABLE mmdemo_jobs ADD COLUMN IF NOT EXISTS {column} {_ADDED_COLUMNS[column]}")
        self._ready = True

    def _put(self, conn) -> None:
        with self._lock:
            if conn.broken or conn.closed or conn.info.transaction_status != 0 or self._pid != os.getpid() \
                    or len(self._idle) >= IDLE_CONNECTIONS:
                conn.close()
            else:
                self._idle.append(conn)

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[Any]:
        """A connection; with ``write``, inside one transaction (committed at the end, rolled back on an error)."""
        try:
            conn = self._connect()
        except self._psycopg.Error as err:
            self._raise_database_error(err)
        try:
            if write:
                with conn.transaction():
                    yield conn
            else:
                yield conn
        except self._psycopg.Error as err:
            self._put(conn)  # closes it when the connection broke
            self._raise_database_error(err)
        except BaseException:
            self._put(conn)
            raise
        else:
            self._put(conn)

    def _raise_database_error(self, err: Exception) -> NoReturn:
        problem = database_problem(err)
        if problem is None:
            raise err
        log.debug("job database %s: %s", self.path, err)  # each page poll would repeat a warning
        raise JobError(problem) from err

    # ------------------------------------------------------------------------------------------ user side
    def run_dir(self, job_id: str) -> Path:
        return self.runs / job_id

    def add(self, job: Job, limit: int | None = None) -> Job:
        """Queue ``job`` after the SQLite queue's checks (duplicate, adapter name, ``limit``), in one transaction
        that holds the owner's advisory lock: two replicas cannot both slip a job of one owner under a check."""
        with self._db(write=True) as db:
            db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE + _OWNER_LOCK, job.owner))
            same = self._duplicate(db, job)
            if same is not None:
                raise JobError(duplicate_job(same))
            if job.label:
                taken = db.execute(f"SELECT id FROM mmdemo_jobs WHERE owner=%s AND label=%s AND state IN {ACTIVE} "
                                   f"AND cancel_requested=0", (job.owner, job.label)).fetchone()
                if taken is not None:
                    raise InputError(name_in_use(job.label, taken["id"]))
            if limit is not None:
                active = db.execute(f"SELECT COUNT(*) AS n FROM mmdemo_jobs WHERE owner=%s AND state IN {ACTIVE}",
                                    (job.owner,)).fetchone()["n"]
                if active >= limit:
                    raise JobError(too_many_jobs(limit))
            db.execute(
                "INSERT INTO mmdemo_jobs (id, owner, task, model, preset, config, data, name, state, created, label, "
                "fingerprint, plan) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'queued', %s, %s, %s, %s)",
                (job.id, job.owner, job.task, job.model, job.preset, json.dumps(job.config), job.data, job.name,
                 job.created, job.label, job.fingerprint, json.dumps(job.plan) if job.plan is not None else None),
            )
        self.progress(job.id, {"phase": "queued", "message": "Submitted; waiting in the queue."})
        return self.get(job.id)

    def _duplicate(self, db, job: Job) -> Job | None:
        if not job.fingerprint:
            return None
        rows = db.execute(f"SELECT * FROM mmdemo_jobs WHERE owner=%s AND task=%s AND fingerprint=%s AND state IN "
                          f"{ACTIVE} AND cancel_requested=0 ORDER BY created",
                          (job.owner, job.task, job.fingerprint)).fetchall()
        for row in rows:
            other = self._job(row)
            if other.config == job.config and (other.model or None) == (job.model or None):
                return other
        return None

    def find_duplicate(self, job: Job) -> Job | None:
        with self._db() as db:
            return self._duplicate(db, job)

    def set_label(self, job_id: str, label: str) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE mmdemo_jobs SET label=%s WHERE id=%s", (label, job_id))

    def labels(self, owner: str) -> dict[str, str]:
        with self._db() as db:
            rows = db.execute(f"SELECT id, label FROM mmdemo_jobs WHERE owner=%s AND label IS NOT NULL AND state IN "
                              f"{ACTIVE} AND cancel_requested=0", (owner,)).fetchall()
        return {r["label"]: r["id"] for r in rows}

    @staticmethod
    def _job(row: dict, position: int | None = None) -> Job:
        d = dict(row)
        d["config"] = json.loads(d["config"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["plan"] = json.loads(d["plan"]) if d.get("plan") else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return Job(**d, position=position)

    @staticmethod
    def _positions(db) -> dict[str, int]:
        rows = db.execute("SELECT id FROM mmdemo_jobs WHERE state='queued' ORDER BY created, id").fetchall()
        return {r["id"]: i + 1 for i, r in enumerate(rows)}

    def list(self, owner: str | None = None) -> list[Job]:
        with self._db() as db:
            pos = self._positions(db)
            if owner is None:
                rows = db.execute("SELECT * FROM mmdemo_jobs ORDER BY created DESC").fetchall()
            else:
                rows = db.execute("SELECT * FROM mmdemo_jobs WHERE owner=%s ORDER BY created DESC",
                                  (owner,)).fetchall()
        return [self._job(r, pos.get(r["id"])) for r in rows]

    def get(self, job_id: str, owner: str | None = None) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM mmdemo_jobs WHERE id=%s", (str(job_id),)).fetchone()
            pos = self._positions(db) if row is not None and row["state"] == "queued" else {}
        if row is None or (owner is not None and row["owner"] != owner):
            raise JobError(f"There is no job {job_id!r} of yours; pick one from your job list.")
        return self._job(row, pos.get(row["id"]))

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """As SQLite's; the worker is signalled at once only when it runs on this machine (else the dispatcher of
        the replica running it stops it at its next poll)."""
        job = self.get(job_id, owner)
        if job.state in FINAL:
            raise JobError(f"Job {job_id} already {job.state}; there is nothing to cancel.")
        with self._db(write=True) as db:
            db.execute("UPDATE mmdemo_jobs SET state='cancelled', finished=%s, cancel_requested=1 "
                       "WHERE id=%s AND state='queued'", (time.time(), job.id))
            db.execute("UPDATE mmdemo_jobs SET cancel_requested=1 WHERE id=%s AND state='running'", (job.id,))
        job = self.get(job.id)
        if job.state == "cancelled":
            message = ("Cancelled while waiting in the queue to be tried again after an interruption." if job.attempts
                       else "Cancelled while waiting in the queue; it never started.")
            self.progress(job.id, {"phase": "cancelled", "message": message}, update_job=False)
        else:
            self.progress(job.id, {"phase": "cancelling", "message": "You asked to cancel; the training is being "
                                                                     "stopped."}, update_job=False)
        if job.state == "running" and job.pid and job.claimed_by == self.machine:
            _signal(job.pid, 15)
        return job

    def events(self, job_id: str, since: int = 0) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT seq, time, record FROM mmdemo_events WHERE job_id=%s AND seq>%s ORDER BY seq",
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
    def claim(self, slots: int) -> Job | None:
        """The oldest queued job, moved to running and claimed by this machine, if fewer than ``slots`` jobs run
        on this machine. ``FOR UPDATE SKIP LOCKED``: a job another dispatcher is claiming is passed over, never
        waited for or taken twice; the per-machine advisory lock keeps two dispatchers of one machine from both
        counting a free slot."""
        with self._db(write=True) as db:
            db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE + _CLAIM_LOCK, self.machine))
            running = db.execute("SELECT COUNT(*) AS n FROM mmdemo_jobs WHERE state='running' AND claimed_by=%s",
                                 (self.machine,)).fetchone()["n"]
            if running >= slots:
                return None
            row = db.execute("SELECT id FROM mmdemo_jobs WHERE state='queued' ORDER BY created, id LIMIT 1 "
                             "FOR UPDATE SKIP LOCKED").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE mmdemo_jobs SET state='running', started=COALESCE(started, %s), heartbeat=%s, "
                       "pid=NULL, attempts=attempts+1, phase='starting', step=NULL, total=NULL, eta=NULL, "
                       "claimed_by=%s WHERE id=%s AND state='queued'", (now, now, self.machine, row["id"]))
        job = self.get(row["id"])
        again = f" (attempt {job.attempts} of {MAX_ATTEMPTS})" if job.attempts > 1 else ""
        self.progress(job.id, {"phase": "starting", "message": f"Started{again}."}, update_job=False)
        return job

    def set_pid(self, job_id: str, pid: int) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE mmdemo_jobs SET pid=%s, heartbeat=%s WHERE id=%s", (pid, time.time(), job_id))

    def heartbeat(self, job_id: str) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE mmdemo_jobs SET heartbeat=%s WHERE id=%s AND state='running'", (time.time(), job_id))

    def cancel_requested(self, job_id: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT cancel_requested FROM mmdemo_jobs WHERE id=%s", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    @staticmethod
    def _lock_job(db, job_id: str) -> dict | None:
        """Lock the job's row for this transaction: its records are then numbered in the order they commit, so a
        page reading ``seq > since`` never skips one committed late."""
        return db.execute("SELECT * FROM mmdemo_jobs WHERE id=%s FOR UPDATE", (job_id,)).fetchone()

    def progress(self, job_id: str, record: dict, update_job: bool = True) -> None:
        """As SQLite's: ``STEP_EVENTS`` evenly spaced step records per job, the row keeps the latest."""
        now = time.time()
        with self._db(write=True) as db:
            self._lock_job(db, job_id)
            if not is_step_record(record):
                self._flush_step(db, job_id)
                store = True
            else:
                store = keeps_step(record["step"], record.get("total") or 0) or not self._last_is_step(db, job_id)
            if store:
                db.execute("INSERT INTO mmdemo_events (job_id, time, record) VALUES (%s, %s, %s)",
                           (job_id, now, json.dumps(record)))
            if update_job:
                db.execute("UPDATE mmdemo_jobs SET phase=COALESCE(%s, phase), step=%s, total=%s, "
                           "loss=COALESCE(%s, loss), eta=%s, heartbeat=%s WHERE id=%s",
                           (record.get("phase"), record.get("step"), record.get("total"), record.get("loss"),
                            record.get("eta"), now, job_id))

    @staticmethod
    def _record(db, job_id: str, record: dict) -> None:
        db.execute("INSERT INTO mmdemo_events (job_id, time, record) VALUES (%s, %s, %s)",
                   (job_id, time.time(), json.dumps(record)))

    @staticmethod
    def _last_record(db, job_id: str) -> dict | None:
        row = db.execute("SELECT record FROM mmdemo_events WHERE job_id=%s ORDER BY seq DESC LIMIT 1",
                         (job_id,)).fetchone()
        return json.loads(row["record"]) if row is not None else None

    def _last_is_step(self, db, job_id: str) -> bool:
        record = self._last_record(db, job_id)
        return record is not None and is_step_record(record)

    def _flush_step(self, db, job_id: str) -> None:
        """Store the row's latest training step if the evenly spaced records skipped it (see SQLiteQueue)."""
        row = db.execute("SELECT phase, step, total, loss FROM mmdemo_jobs WHERE id=%s", (job_id,)).fetchone()
        if row is None or row["phase"] != "training" or row["step"] is None or row["loss"] is None:
            return
        record = self._last_record(db, job_id) or {}
        if is_step_record(record) and record["step"] != row["step"]:
            self._record(db, job_id, {"phase": "training", "step": row["step"], "total": row["total"],
                                      "loss": row["loss"]})

    def finish(self, job_id: str, state: str, result: dict | None = None, error: str | None = None) -> None:
        if state not in FINAL:
            raise ValueError(state)
        training = (result or {}).get("training") or {}
        done, planned = training.get("steps_done"), training.get("steps")
        if result is not None and isinstance(result.get("losses"), list):
            result = {**result, "losses": thin_losses(result["losses"], planned or 0)}
        message = {"succeeded": "Finished.", "cancelled": "Cancelled.", "failed": error or "Failed."}[state]
        with self._db(write=True) as db:
            self._lock_job(db, job_id)
            self._flush_step(db, job_id)
            changed = db.execute(
                "UPDATE mmdemo_jobs SET state=%s, finished=%s, result=COALESCE(%s, result), error=%s, pid=NULL, "
                "eta=NULL, phase=CASE WHEN %s='succeeded' THEN 'finished' ELSE phase END, step=COALESCE(%s, step), "
                "total=COALESCE(%s, total) WHERE id=%s AND state IN ('running', 'queued')",
                (state, time.time(), json.dumps(result) if result is not None else None, error, state, done, planned,
                 job_id)).rowcount
            if changed:
                self._record(db, job_id, {"phase": state, "message": message})

    def requeue(self, job_id: str, cause: str, error: str | None = None) -> None:
        """As SQLite's, except that a job claimed on another machine whose heartbeat is fresh is left alone: its
        replica is alive, and the check sits in the transaction, so it holds even when that replica beat a moment
        after the caller looked (or claimed the job again since)."""
        from mmdemo.jobs import dispatcher  # its STALE_SECONDS, read now (tests shorten it)

        step = checkpoint_step(self.run_dir(job_id))
        with self._db(write=True) as db:
            row = db.execute("SELECT attempts, cancel_requested, claimed_by, heartbeat FROM mmdemo_jobs "
                             "WHERE id=%s AND state='running' FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                return
            elsewhere = row["claimed_by"] not in (None, self.machine)
            if elsewhere and row["heartbeat"] is not None and time.time() - row["heartbeat"] < dispatcher.STALE_SECONDS:
                return
            attempts = row["attempts"]
            if row["cancel_requested"]:
                db.execute("UPDATE mmdemo_jobs SET state='cancelled', finished=%s, pid=NULL WHERE id=%s",
                           (time.time(), job_id))
                phase, note = "cancelled", "Cancelled."
            elif attempts >= MAX_ATTEMPTS:
                phase = "failed"
                note = error or (f"The job was interrupted {attempts} times, so it was stopped; "
                                 f"submit it again, and report it if it happens again.")
                db.execute("UPDATE mmdemo_jobs SET state='failed', finished=%s, pid=NULL, eta=NULL, error=%s "
                           "WHERE id=%s", (time.time(), note, job_id))
            else:
                phase = "queued"
                resume = (f"resuming from the checkpoint of step {step}" if step is not None
                          else "starting from the beginning, as no checkpoint was saved yet")
                note = (f"{cause.rstrip('.')}; it goes back to the queue for attempt {attempts + 1} of {MAX_ATTEMPTS}, "
                        f"{resume}.")
                db.execute("UPDATE mmdemo_jobs SET state='queued', pid=NULL, eta=NULL, note=%s WHERE id=%s",
                           (note, job_id))
            self._flush_step(db, job_id)
            self._record(db, job_id, {"phase": phase, "message": note})

    def release(self, job_id: str) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE mmdemo_jobs SET state='queued', attempts=GREATEST(attempts - 1, 0) "
                       "WHERE id=%s AND state='running' AND pid IS NULL", (job_id,))

    def running(self) -> list[Job]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM mmdemo_jobs WHERE state='running'").fetchall()
        return [self._job(r) for r in rows]

    def expired(self, before: float) -> list[str]:
        with self._db() as db:
            rows = db.execute(f"SELECT id FROM mmdemo_jobs WHERE state IN {FINAL} AND cleaned IS NULL "
                              f"AND COALESCE(finished, created) < %s ORDER BY finished", (before,)).fetchall()
        return [r["id"] for r in rows]

    def clean(self, job_id: str) -> bool:
        """As SQLite's: the run folder goes, the step records are thinned to the timeline's milestones."""
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
        if result is not None and isinstance(result.get("losses"), list):
            total = ((result.get("training") or {}).get("steps")) or 0
            result = {**result, "losses": thin_losses(result["losses"], total)}
        with self._db(write=True) as db:
            if drop:
                db.execute("DELETE FROM mmdemo_events WHERE seq = ANY(%s)", (drop,))
            db.execute(f"UPDATE mmdemo_jobs SET cleaned=%s, result=COALESCE(%s, result) WHERE id=%s AND state IN "
                       f"{FINAL}", (time.time(), json.dumps(result) if result is not None else None, job.id))
        return True

    def delete(self, job_id: str, owner: str | None = None) -> None:
        """Forget a finished job and its run folder (its adapter stays)."""
        job = self.get(job_id, owner)
        if job.state not in FINAL:
            raise JobError(f"Job {job_id} is {job.state}; cancel it before deleting it.")
        with self._db(write=True) as db:
            db.execute("DELETE FROM mmdemo_events WHERE job_id=%s", (job.id,))
            db.execute("DELETE FROM mmdemo_jobs WHERE id=%s", (job.id,))
        shutil.rmtree(self.run_dir(job.id), ignore_errors=True)

    def close(self) -> None:
        """Close the idle connections (tests; a process's connections otherwise close when it exits)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


__all__ = ["PostgresQueue", "check_url", "database_problem", "machine_id", "redact"]
