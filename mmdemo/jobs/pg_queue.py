"""The job queue in a PostgreSQL database, for several app replicas sharing one queue (``MMDEMO_JOBS_DB``).

:class:`PostgresQueue` implements :class:`~mmdemo.jobs.queue.JobQueue` with the SQLite queue's code (both are a
:class:`~mmdemo.jobs.queue.SqlQueue`): the same :class:`~mmdemo.jobs.queue.Job` records, progress records and
sentences; its own are the connections, the claim and the row and advisory locks. Only the rows move to the
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
import logging
import os
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
from mmdemo.jobs.queue import Job, SqlQueue

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


class PostgresQueue(SqlQueue):
    """The queue in the PostgreSQL database at ``url``; run folders in ``home/runs/<job id>`` as with SQLite. Every
    method but ``claim`` is the shared :class:`~mmdemo.jobs.queue.SqlQueue`'s, with this store's locks."""

    JOBS = "mmdemo_jobs"
    EVENTS = "mmdemo_events"
    PARAM = "%s"

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

    # ------------------------------------------------------------------------------------ the shared queue's hooks
    def _lock_owner(self, db, owner: str) -> None:
        """The owner's advisory lock for ``add``'s transaction: two replicas cannot both slip a job of one owner under
        a check (duplicate, adapter name, limit)."""
        db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE + _OWNER_LOCK, owner))

    def _lock_job(self, db, job_id: str) -> None:
        """Lock the job's row for this transaction: its records are then numbered in the order they commit, so a
        page reading ``seq > since`` never skips one committed late."""
        db.execute("SELECT id FROM mmdemo_jobs WHERE id=%s FOR UPDATE", (job_id,))

    def _requeue_row(self, db, job_id: str):
        """The running job, locked; None (left alone) when another machine claimed it and its heartbeat is fresh: its
        replica is alive, and the check sits in the transaction, so it holds even when that replica beat a moment
        after the caller looked (or claimed the job again since)."""
        from mmdemo.jobs import dispatcher  # its STALE_SECONDS, read now (tests shorten it)

        row = db.execute("SELECT attempts, cancel_requested, claimed_by, heartbeat FROM mmdemo_jobs "
                         "WHERE id=%s AND state='running' FOR UPDATE", (job_id,)).fetchone()
        if row is None:
            return None
        elsewhere = row["claimed_by"] not in (None, self.machine)
        if elsewhere and row["heartbeat"] is not None and time.time() - row["heartbeat"] < dispatcher.STALE_SECONDS:
            return None
        return row

    def _signals(self, job: Job) -> bool:
        """Only a worker running on this machine is signalled; another replica's dispatcher stops its own."""
        return job.claimed_by == self.machine

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
        return self._started(row["id"])

    def close(self) -> None:
        """Close the idle connections (tests; a process's connections otherwise close when it exits)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


__all__ = ["PostgresQueue", "check_url", "database_problem", "machine_id", "redact"]
