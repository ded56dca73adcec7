"""The PostgreSQL job queue (``MMDEMO_JOBS_DB``) against a real server of the test session (conftest's ``postgres``).

The SQLite queue's behavioural tests run here again on PostgreSQL: the tests below imported from
tests/test_dispatcher.py and tests/test_jobs.py are collected with this module's ``home`` fixture, which also sets
``MMDEMO_JOBS_DB`` to a fresh database, so their ``get_queue()`` is a :class:`PostgresQueue`. Then what only several
replicas can do: concurrent claims never hand out a job twice; two dispatcher processes sharing one database and
one ``MMDEMO_HOME`` run every job exactly once; a replica that dies mid-job (dispatcher and worker killed) has its
job requeued by the other once its heartbeat is stale, and finished there; a live replica's job is never taken.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# the SQLite queue's behavioural tests, collected again here with this module's ``home`` (PostgreSQL)
from test_dispatcher import (  # noqa: F401
    CONFIG,
    _members,
    dispatch,
    queue,
    test_a_cancel_between_the_workers_death_and_its_requeue_wins,
    test_a_cancel_while_the_job_waits_to_be_retried_ends_it,
    test_a_failure_the_worker_recorded_is_not_retried,
    test_a_sigterm_that_is_not_a_cancel_requeues_the_job,
    test_a_worker_killed_for_memory_is_retried_then_fails_with_a_fix,
    test_a_worker_that_crashes_every_attempt_fails_and_points_to_the_log,
    test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period,
    test_an_outcome_and_its_record_are_written_once,
    test_the_real_worker_records_a_cancel_itself,
)
from test_jobs import (  # noqa: F401
    data,
    test_a_crashed_worker_is_retried_and_a_cancel_still_wins,
    test_a_duplicate_of_a_waiting_or_running_job_is_refused,
    test_a_killed_worker_is_retried_then_failed_with_a_sentence_that_fits_the_job,
    test_submit_positions_owners_and_cancelling_a_queued_job,
    test_submit_refuses_a_fourth_waiting_job_of_one_user,
    test_the_job_limit_is_counted_in_the_same_transaction_as_the_insert,
)

from conftest import ROOT, free_port, wait_for
from mmdemo.config import Settings
from mmdemo.errors import InputError, JobError
from mmdemo.jobs import dispatcher as dispatcher_module
from mmdemo.jobs import queue as queue_module
from mmdemo.jobs.dispatcher import Dispatcher
from mmdemo.jobs.queue import FINAL, Job, JobQueue, SQLiteQueue, get_queue

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pg_url(postgres):
    """A fresh, empty database on the session's server; dropped afterwards."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres.rsplit("/", 1)[0] + "/" + name
    yield url
    for key, cached in list(queue_module._QUEUES.items()):  # noqa: SLF001 - close this test's connections
        if key.startswith(url + " "):
            cached.close()
            del queue_module._QUEUES[key]
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def home(tmp_path, monkeypatch, pg_url) -> Path:
    """An empty MMDEMO_HOME whose job queue is the PostgreSQL database ``pg_url`` (overrides conftest's)."""
    h = tmp_path / "home"
    monkeypatch.setenv("MMDEMO_HOME", str(h))
    monkeypatch.setenv("MMDEMO_JOBS_DB", pg_url)
    return h


@pytest.fixture
def tiny_models() -> dict[str, str]:
    """The imported submit tests only store the model's name: no need to build the tiny checkpoints here."""
    return {"caption": "tiny/caption-model"}


def _job(job_id: str, owner: str = "alice") -> Job:
    return Job(id=job_id, owner=owner, task="caption", model=None, preset="quick", config=dict(CONFIG),
               data="unused", name=f"caption-{job_id}", state="queued", created=time.time())


# ----------------------------------------------------------------------------------- selection, the protocol
def test_the_setting_selects_the_postgres_queue_and_round_trips(home, pg_url):
    from mmdemo.jobs.pg_queue import PostgresQueue

    q = get_queue()
    assert isinstance(q, PostgresQueue) and q.url == pg_url and q.home == home and q.path == pg_url
    assert q.run_dir("j1") == home / "runs" / "j1"
    settings = Settings.from_env({"MMDEMO_JOBS_DB": pg_url})
    assert settings.jobs_database == pg_url and Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env({"MMDEMO_JOBS_DB": "  "}).jobs_database is None
    assert "MMDEMO_JOBS_DB" not in Settings().to_env()
    with pytest.raises(InputError) as exc:
        Settings.from_env({"MMDEMO_JOBS_DB": "mysql://root:secret@db/jobs"})
    assert str(exc.value) == ("MMDEMO_JOBS_DB must be a PostgreSQL URL such as postgresql://user@host:5432/mmdemo, "
                              "or empty for the built-in SQLite queue.")  # the password is not repeated
    from mmdemo.jobs.pg_queue import redact

    assert redact("postgresql://app:s3cret@db.example:5432/jobs") == "postgresql://app:***@db.example:5432/jobs"


def test_the_default_queue_is_sqlite_and_never_imports_psycopg(tmp_path):
    code = ("import sys\nfrom mmdemo.jobs import get_queue\nq = get_queue()\n"
            "print(type(q).__name__, 'psycopg' in sys.modules)")
    env = {**os.environ, "MMDEMO_HOME": str(tmp_path / "home")}
    env.pop("MMDEMO_JOBS_DB", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["SQLiteQueue", "False"], out.stderr


def test_the_postgres_queue_has_every_member_of_the_protocol(home):
    """As tests/test_dispatcher.py checks the SQLite queue: every member, compatible signatures."""
    from mmdemo.jobs.pg_queue import PostgresQueue

    q = get_queue()
    for name in _members(JobQueue):
        wanted = inspect.getattr_static(JobQueue, name)
        assert hasattr(q, name), f"PostgresQueue has no {name}"
        if isinstance(wanted, property):
            assert not callable(getattr(q, name)), name
            continue
        have, want = inspect.signature(getattr(PostgresQueue, name)), inspect.signature(wanted)
        for param in want.parameters.values():
            got = have.parameters.get(param.name)
            assert got is not None and got.kind == param.kind and got.default == param.default, f"{name}({param})"
        extra = [p for p in have.parameters.values() if p.name not in want.parameters]
        assert all(p.default is not inspect.Parameter.empty for p in extra), name
        assert list(want.parameters) == list(have.parameters)[:len(want.parameters)], name
    assert {n for n in dir(SQLiteQueue) if not n.startswith("_")} <= {n for n in dir(PostgresQueue)}


def test_records_match_the_sqlite_queue(home, tmp_path):
    """One sequence of calls on both backends: the same jobs (but claimed_by) and the same progress records."""
    def run(q: JobQueue) -> tuple[list[dict], list[list[dict]]]:
        q.add(_job("j1"))
        q.add(_job("j2", "bob"))
        q.claim(1)
        q.set_pid("j1", 12345)
        for step in range(1, 263):  # of 2,000 planned: every 4th stored, and the last (262) when it stopped
            q.progress("j1", {"phase": "training", "step": step, "total": 2000, "loss": 1.0 / step})
        q.progress("j1", {"phase": "evaluating", "message": "Scoring."})
        q.finish("j1", "succeeded", result={"adapter": "x", "losses": [{"step": s, "loss": 1.0} for s in range(262)],
                                            "training": {"steps": 2000, "steps_done": 262}})
        q.cancel("j2", "bob")
        assert q.expired(time.time() + 1) == ["j1", "j2"]
        assert q.clean("j1")
        jobs = [{k: v for k, v in j.record().items() if k not in ("created", "started", "finished", "cleaned")}
                for j in q.list()]
        events = [[{k: v for k, v in e.items() if k not in ("seq", "time")} for e in q.events(j)] for j in ("j1", "j2")]
        return jobs, events

    pg = run(get_queue())
    lite = run(SQLiteQueue(tmp_path / "lite"))
    assert pg == lite
    assert len(pg[1][0]) < 20  # the cleaned job kept its milestones only


# ----------------------------------------------------------------------------------------------- errors
def test_a_server_that_cannot_be_reached_is_one_sentence(home, monkeypatch):
    from mmdemo import jobs

    monkeypatch.setenv("MMDEMO_JOBS_DB", f"postgresql://postgres@127.0.0.1:{free_port()}/mmdemo")
    sentence = ("The job database (MMDEMO_JOBS_DB) cannot be reached (connection refused); check that the "
                "PostgreSQL server is running and the URL is right, then try again.")
    with pytest.raises(JobError) as exc:
        jobs.list_jobs("alice")
    assert str(exc.value) == sentence
    with pytest.raises(JobError, match="cannot be reached"):
        jobs.submit("caption", home, owner="alice")


def test_a_database_that_does_not_exist_is_one_sentence(home, monkeypatch, pg_url):
    from mmdemo.jobs.pg_queue import PostgresQueue

    q = PostgresQueue(pg_url.rsplit("/", 1)[0] + "/no_such_db", home)
    with pytest.raises(JobError) as exc:
        q.list()
    assert str(exc.value) == ("The job database named in MMDEMO_JOBS_DB does not exist; create it (createdb) or fix "
                              "the URL.")


def test_a_dispatcher_starts_while_the_server_is_down_and_its_steps_say_why(home):
    """Nothing connects before the first call: a replica started while the database is down gets a dispatcher,
    whose loop logs this sentence once and retries (see tests/test_jobs_storage.py) until the server answers."""
    from mmdemo.jobs.pg_queue import PostgresQueue

    down = PostgresQueue(f"postgresql://postgres@127.0.0.1:{free_port()}/x", home)
    d = Dispatcher(down, slots=1, poll=0.01)
    with pytest.raises(JobError, match="cannot be reached"):
        d.step()


# ---------------------------------------------------------------------------------------- several replicas
def test_concurrent_claims_never_hand_out_a_job_twice(home, pg_url):
    from mmdemo.jobs.pg_queue import PostgresQueue

    first = get_queue()
    for i in range(60):
        first.add(_job(f"j{i:02d}"))
    claimed: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claimer(n: int) -> None:
        q = PostgresQueue(pg_url, home)  # its own connections, as another replica's
        q.machine = f"machine-{n}"  # each its own slots
        mine: list[str] = []
        try:
            start.wait()
            while (job := q.claim(100)) is not None:
                mine.append(job.id)
        except BaseException as err:  # noqa: BLE001 - the test says it below
            errors.append(err)
        claimed[n] = mine
        q.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [j for mine in claimed.values() for j in mine]
    assert errors == []
    assert len(claimed) == 8 and sorted(ids) == [f"j{i:02d}" for i in range(60)]  # each once, none lost
    assert sum(bool(mine) for mine in claimed.values()) > 1  # they really raced
    jobs = first.list()
    assert all(j.state == "running" and j.attempts == 1 for j in jobs)
    owner = {j: f"machine-{n}" for n, mine in claimed.items() for j in mine}
    assert {j.id: j.claimed_by for j in jobs} == owner


def test_slots_count_the_jobs_of_this_machine(home, pg_url):
    from mmdemo.jobs.pg_queue import PostgresQueue

    a, b = get_queue(), PostgresQueue(pg_url, home)
    b.machine = "another-machine"
    for i in range(3):
        a.add(_job(f"j{i}"))
    assert a.claim(1).id == "j0" and a.claim(1) is None  # this machine's one slot is taken
    assert b.claim(1).id == "j1" and b.claim(1) is None  # the other machine has a slot of its own
    assert {j.id: j.claimed_by for j in a.running()} == {"j0": a.machine, "j1": "another-machine"}
    b.close()


def test_a_live_replicas_job_is_left_alone_and_a_dead_ones_is_requeued(home, pg_url, monkeypatch):
    """Another machine's pid means nothing here: its job is judged by its heartbeat, and never signalled."""
    from mmdemo.jobs.pg_queue import PostgresQueue

    here = get_queue()
    there = PostgresQueue(pg_url, home)
    there.machine = "another-machine"
    here.add(_job("j1"))
    there.claim(1)
    there.set_pid("j1", 999_999)  # no such process here: SQLite's rule would requeue it at once
    d = Dispatcher(here, slots=1)
    monkeypatch.setattr(dispatcher_module, "_signal", lambda *a: pytest.fail("signalled another machine's pid"))
    here.cancel("j1")  # asked here; the replica running it stops it
    d.recover()
    d.enforce_cancels()
    job = here.get("j1")
    assert job.state == "running" and job.attempts == 1
    here.requeue("j1", "The app stopped while this job ran")  # refused in its transaction: the heartbeat is fresh
    assert here.get("j1").state == "running"

    monkeypatch.setattr(dispatcher_module, "STALE_SECONDS", 0.2)
    time.sleep(0.3)
    d.recover()  # stale: the replica is gone; the cancel asked meanwhile wins
    assert here.get("j1").state == "cancelled"

    here.add(_job("j2"))
    there.claim(1)
    time.sleep(0.3)
    d.recover()
    job = here.get("j2")
    assert job.state == "queued" and job.note == (
        "The app replica running this job stopped answering; it goes back to the queue for attempt 2 of 3, starting "
        "from the beginning, as no checkpoint was saved yet.")
    there.close()


# a dispatcher process of its own, as an app replica runs it: argv[1] is the machine it pretends to be
DISPATCHER = """
import sys
from mmdemo.jobs import dispatcher
from mmdemo.jobs.queue import get_queue

dispatcher.STALE_SECONDS = {stale}
queue = get_queue()
queue.machine = sys.argv[1]
dispatcher.Dispatcher(queue, slots=1, poll=0.1, worker_command=[sys.executable, {worker!r}]).run_forever()
"""

# the real worker (pid, heartbeats, outcome) around a training that notes each run and sleeps a while
WORKER = """
import os, sys, time
import mmdemo.jobs.train as train
from mmdemo.jobs import worker

worker.HEARTBEAT_SECONDS = 0.2

def finetune(task, data, out, *, should_stop, progress, **kwargs):
    with open(os.path.join(os.environ["MMDEMO_HOME"], "ran.txt"), "a") as fh:
        fh.write(f"{{kwargs['job_id']}} {{os.getpid()}}\\n")
    deadline = time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        if should_stop():
            raise train.JobCancelled()
        time.sleep(0.02)
    return {{"adapter": str(out)}}

train.finetune = finetune
sys.exit(worker.main(sys.argv[1:]))
"""


def _replica(home: Path, tmp_path: Path, machine: str, seconds: float, stale: float) -> subprocess.Popen:
    worker = tmp_path / f"worker-{machine}.py"
    worker.write_text(WORKER.format(seconds=seconds))
    log = (tmp_path / f"dispatcher-{machine}.log").open("ab")
    return subprocess.Popen([sys.executable, "-c", DISPATCHER.format(stale=stale, worker=str(worker)), machine],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ran(home: Path) -> list[str]:
    path = home / "ran.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(predicate, timeout: float = 40.0):
    return wait_for(predicate, timeout, poll=0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_two_replicas_share_the_queue_and_run_each_job_once(home, tmp_path):
    q = get_queue()
    ids = [f"j{i:02d}" for i in range(6)]
    for job_id in ids:
        q.add(_job(job_id))
    replicas = [_replica(home, tmp_path, m, seconds=0.2, stale=30) for m in ("replica-a", "replica-b")]
    try:
        _wait(lambda: all(j.state in FINAL for j in q.list()))
    finally:
        _stop(replicas)
    jobs = q.list()
    assert {j.state for j in jobs} == {"succeeded"} and all(j.attempts == 1 for j in jobs)
    assert sorted(_ran(home)) == ids  # each ran exactly once
    assert {j.claimed_by for j in jobs} == {"replica-a", "replica-b"}  # both took part


def test_a_replica_that_dies_mid_job_has_it_finished_by_the_other(home, tmp_path):
    """Replica A (dispatcher and worker) is killed while its job trains: B leaves the job alone while its
    heartbeat is fresh, then requeues it and runs it to the end; nothing else runs twice."""
    q = get_queue()
    q.add(_job("long"))
    a = _replica(home, tmp_path, "replica-a", seconds=60, stale=1.5)
    procs = [a]
    try:
        job = _wait(lambda: (j := q.get("long")).pid and "long" in _ran(home) and j)
        assert job.claimed_by == "replica-a"
        b = _replica(home, tmp_path, "replica-b", seconds=0.2, stale=1.5)
        procs.append(b)
        q.add(_job("short"))
        _wait(lambda: q.get("short").state == "succeeded")  # B works, and leaves A's live job alone
        assert q.get("long").state == "running" and q.get("long").claimed_by == "replica-a"
        killed = time.monotonic()
        os.killpg(job.pid, signal.SIGKILL)  # the machine goes: its worker
        os.killpg(a.pid, signal.SIGKILL)  # and its dispatcher
        done = _wait(lambda: (j := q.get("long")).state in FINAL and j)
        assert time.monotonic() - killed >= 1.0  # not before the heartbeat was stale
    finally:
        _stop(procs)
    assert done.state == "succeeded" and done.attempts == 2 and done.claimed_by == "replica-b"
    assert "The app replica running this job stopped answering; it goes back to the queue for attempt 2 of 3" in \
        " ".join(e.get("message", "") for e in q.events("long"))
    assert sorted(_ran(home)) == ["long", "long", "short"]  # the killed run, its rerun, and the short job once
