"""The dispatcher's failure branches with a fake worker process (tests/fake_worker.py): no model, a few seconds.

Each branch checks what a user sees (the job's state, its sentence, the attempts counted) and that nothing is
left running or ran twice. Also: the SQLite queue has every member of the :class:`JobQueue` protocol.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from mmdemo.jobs.dispatcher import KILL_GRACE_SECONDS, WORKER_COMMAND, Dispatcher
from mmdemo.jobs.queue import FINAL, Job, JobQueue, SQLiteQueue, get_queue, pid_alive
from mmdemo.jobs.train import TrainConfig

FAKE = Path(__file__).with_name("fake_worker.py")
GRACE = 0.5  # seconds from a cancel's SIGTERM to the SIGKILL, here
CONFIG = {k: getattr(c, k) for c in [TrainConfig.from_preset("quick", batch_size=8)] for k in c.__dataclass_fields__}


def _job(job_id: str) -> Job:
    return Job(id=job_id, owner="alice", task="caption", model=None, preset="quick", config=dict(CONFIG),
               data="unused", name=f"caption-{job_id}", state="queued", created=time.time())


@pytest.fixture
def queue(home):
    return get_queue()


@pytest.fixture
def dispatch(queue):
    """``dispatch(behaviour)``: a dispatcher (not started: the test calls its steps) whose workers are fakes."""
    made: list[Dispatcher] = []

    def make(behaviour: str, q: JobQueue | None = None) -> Dispatcher:
        d = Dispatcher(q or queue, slots=1, poll=0.05, worker_command=[sys.executable, str(FAKE), behaviour],
                       kill_grace=GRACE)
        made.append(d)
        return d

    yield make
    for d in made:
        for proc in d.children.values():  # a failed test must not leave a fake behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _notes(queue, job_id: str) -> list[str]:
    path = queue.run_dir(job_id) / "fake.txt"
    return path.read_text().splitlines() if path.is_file() else []


def _pids(queue, job_id: str, what: str = "start") -> list[int]:
    return [int(line.split()[1]) for line in _notes(queue, job_id) if line.startswith(what + " ")]


def _until(dispatcher: Dispatcher, predicate, timeout: float = 15.0):
    """Run the dispatcher's steps until ``predicate()`` is true; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dispatcher.step()
        value = predicate()
        if value:
            return value
        time.sleep(dispatcher.poll)
    raise AssertionError("timed out")


def _finished(queue, job_id: str):
    return lambda: (job := queue.get(job_id)).state in FINAL and job


def _messages(queue, job_id: str) -> list[str]:
    return [e.get("message", "") for e in queue.events(job_id)]


def _settle(dispatcher: Dispatcher, steps: int = 5) -> None:
    """Wait until every worker has exited and been reaped, then a few more turns: nothing may start again."""
    _until(dispatcher, lambda: not dispatcher.children)
    for _ in range(steps):
        dispatcher.step()
        time.sleep(dispatcher.poll)


def _all_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


# ------------------------------------------------------------------------------------------ the protocol
def _members(protocol: type) -> list[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return sorted(names)


def test_the_sqlite_queue_has_every_member_of_the_protocol(home):
    """A backend missing a method, or taking other arguments, is caught here rather than by a user's job."""
    members = _members(JobQueue)
    used = {"home", "path", "add", "find_duplicate", "list", "get", "cancel", "events", "log_tail", "labels",
            "set_label", "run_dir", "claim", "release", "running", "requeue", "set_pid", "heartbeat",
            "cancel_requested", "progress", "finish", "expired", "clean"}
    assert used <= set(members)  # what code outside the queue calls (see the protocol's docstring)
    queue = SQLiteQueue(home)
    for name in members:
        wanted = inspect.getattr_static(JobQueue, name)
        assert hasattr(queue, name), f"SQLiteQueue has no {name}"
        if isinstance(wanted, property):
            assert not callable(getattr(queue, name)), name
            continue
        assert (wanted.__doc__ or "").strip(), f"JobQueue.{name} says nothing of its contract"
        have = inspect.signature(getattr(SQLiteQueue, name))
        want = inspect.signature(wanted)
        for param in want.parameters.values():
            got = have.parameters.get(param.name)
            assert got is not None, f"SQLiteQueue.{name} has no parameter {param.name}"
            assert got.kind == param.kind and got.default == param.default, f"SQLiteQueue.{name}({param.name})"
        extra = [p for p in have.parameters.values() if p.name not in want.parameters]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"SQLiteQueue.{name} needs more"
        assert list(want.parameters) == list(have.parameters)[:len(want.parameters)], f"order of {name}"


def test_the_default_worker_is_the_real_one(home):
    d = Dispatcher(get_queue(), slots=1)
    assert d.worker_command == WORKER_COMMAND == (sys.executable, "-m", "mmdemo.jobs.worker")
    assert d.kill_grace == KILL_GRACE_SECONDS == 3.0


# ------------------------------------------------------------------------ a worker that dies every time
@pytest.mark.parametrize("behaviour", ["oom", "exit137"])
def test_a_worker_killed_for_memory_is_retried_then_fails_with_a_fix(queue, dispatch, behaviour):
    queue.add(_job("j1"))
    d = dispatch(behaviour)
    job = _until(d, _finished(queue, "j1"))
    _settle(d)
    job = queue.get("j1")
    assert job.state == "failed" and job.attempts == 3 and job.pid is None
    assert job.error == ("The training process was killed, most likely because the machine ran out of memory, and "
                         "after 3 tries the job was stopped; submit it again with a batch size smaller than 8.")
    messages = _messages(queue, "j1")
    for attempt in (2, 3):
        assert ("The training process was killed, most likely because the machine ran out of memory; it goes back "
                f"to the queue for attempt {attempt} of 3, starting from the beginning, as no checkpoint was saved "
                "yet.") in messages
    assert messages[-1] == job.error
    starts = _pids(queue, "j1")
    assert len(starts) == 3 and len(set(starts)) == 3  # one worker per attempt, none after the last
    assert _all_gone(starts) and d.children == {}


def test_a_worker_that_crashes_every_attempt_fails_and_points_to_the_log(queue, dispatch):
    queue.add(_job("j1"))
    d = dispatch("crash")
    _until(d, _finished(queue, "j1"))
    _settle(d)
    job = queue.get("j1")
    assert job.state == "failed" and job.attempts == 3
    assert job.error == ("The training process stopped unexpectedly (exit code 1), and after 3 tries the job was "
                         "stopped; read the job's log for the cause before you submit it again.")
    assert "attempt 2 of 3" in job.note or "attempt 3 of 3" in job.note
    log = queue.log_tail("j1", lines=200)
    assert log.count("ZeroDivisionError: the fake worker crashed") == 3  # the cause is where the sentence says
    starts = _pids(queue, "j1")
    assert len(starts) == 3 and _all_gone(starts) and d.children == {}


# --------------------------------------------------------------------------------------------- cancelling
def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(queue, dispatch):
    queue.add(_job("j1"))
    d = dispatch("stubborn")
    _until(d, lambda: "training" in _notes(queue, "j1"))
    worker, child = _pids(queue, "j1")[0], _pids(queue, "j1", "child")[0]
    t0 = time.monotonic()
    assert queue.cancel("j1", "alice").state == "running"  # asked; the worker is being stopped
    job = _until(d, _finished(queue, "j1"))
    waited = time.monotonic() - t0
    _settle(d)
    assert job.state == "cancelled" and job.attempts == 1 and job.error is None
    assert GRACE <= waited < GRACE + 5
    messages = _messages(queue, "j1")
    assert messages[-2:] == ["You asked to cancel; the training is being stopped.", "Cancelled."]
    # one SIGTERM from the cancel, one from the dispatcher when it saw the cancel; not one every poll
    assert 1 <= _notes(queue, "j1").count("TERM") <= 2
    assert _all_gone([worker, child])  # SIGKILL went to the worker's whole process group
    assert len(_pids(queue, "j1")) == 1 and d.children == {}


def test_a_cancel_while_the_job_waits_to_be_retried_ends_it(queue, dispatch):
    """The worker died, the job went back to the queue for its next attempt, and then its owner cancelled it."""
    queue.add(_job("j1"))
    d = dispatch("oom")
    d.start_jobs()
    d.children["j1"].wait(timeout=10)
    d.reap()
    job = queue.get("j1")
    assert job.state == "queued" and job.attempts == 1 and "attempt 2 of 3" in job.note
    assert queue.cancel("j1", "alice").state == "cancelled"
    _settle(d)
    job = queue.get("j1")
    assert job.state == "cancelled" and job.attempts == 1 and job.error is None
    assert _messages(queue, "j1")[-1] == "Cancelled while waiting in the queue to be tried again after an interruption."
    starts = _pids(queue, "j1")
    assert len(starts) == 1 and _all_gone(starts)


def test_a_cancel_between_the_workers_death_and_its_requeue_wins(queue, dispatch):
    queue.add(_job("j1"))
    d = dispatch("oom")
    d.start_jobs()
    d.children["j1"].wait(timeout=10)
    assert queue.cancel("j1", "alice").state == "running"  # not reaped yet: the dispatcher has not seen the death
    _settle(d)
    job = queue.get("j1")
    assert job.state == "cancelled" and job.attempts == 1 and job.error is None
    assert _messages(queue, "j1")[-1] == "Cancelled."
    assert len(_pids(queue, "j1")) == 1

    class CancelFirst:
        """A queue whose owner cancels at the last moment: after the dispatcher looked at the job, before the
        requeue (the dispatcher takes any JobQueue)."""

        def __getattr__(self, name):
            return getattr(queue, name)

        def requeue(self, job_id, cause, error=None):
            queue.cancel(job_id)
            queue.requeue(job_id, cause, error)

    queue.add(_job("j2"))
    d2 = dispatch("oom", CancelFirst())
    d2.start_jobs()
    d2.children["j2"].wait(timeout=10)
    _settle(d2)
    job = queue.get("j2")
    assert job.state == "cancelled" and job.attempts == 1 and len(_pids(queue, "j2")) == 1
    assert _messages(queue, "j2")[-1] == "Cancelled."


# ------------------------------------------------------------- the real worker around a fake training
def test_the_real_worker_records_a_cancel_itself(queue, dispatch):
    queue.add(_job("j1"))
    d = dispatch("worker-sleep")
    _until(d, lambda: "training" in _notes(queue, "j1"))
    pid = queue.get("j1").pid
    queue.cancel("j1", "alice")
    job = _until(d, _finished(queue, "j1"), timeout=GRACE + 10)
    _settle(d)
    assert job.state == "cancelled" and job.error is None and job.attempts == 1
    assert _messages(queue, "j1").count("Cancelled.") == 1  # recorded once, by the worker or the dispatcher
    assert _all_gone([pid]) and d.children == {}


def test_a_sigterm_that_is_not_a_cancel_requeues_the_job(queue, dispatch):
    """A server shutdown sends SIGTERM to every process: the job resumes later instead of failing."""
    queue.add(_job("j1"))
    d = dispatch("worker-sleep")
    _until(d, lambda: "training" in _notes(queue, "j1"))
    first = queue.get("j1").pid
    os.killpg(first, signal.SIGTERM)
    job = _until(d, lambda: (j := queue.get("j1")).attempts == 2 and j)
    assert job.error is None and job.note == (
        "The training process was stopped from outside, as a server shutdown or restart does; it goes back to the "
        "queue for attempt 2 of 3, starting from the beginning, as no checkpoint was saved yet.")
    assert "Stopped by SIGTERM without a cancel" in queue.log_tail("j1")
    _until(d, lambda: _notes(queue, "j1").count("training") == 2)
    queue.cancel("j1", "alice")
    job = _until(d, _finished(queue, "j1"), timeout=GRACE + 10)
    _settle(d)
    assert job.state == "cancelled" and job.attempts == 2
    assert "Attempt 2 of 3: the previous run was interrupted; no checkpoint was saved, so training starts from " \
           "the beginning." in _messages(queue, "j1")
    assert _all_gone(_pids(queue, "j1")) and len(_pids(queue, "j1")) == 2


def test_a_failure_the_worker_recorded_is_not_retried(queue, dispatch):
    queue.add(_job("j1"))
    d = dispatch("worker-fail")
    job = _until(d, _finished(queue, "j1"))
    _settle(d)
    job = queue.get("j1")
    assert job.state == "failed" and job.attempts == 1
    assert job.error == ("Training stopped with an unexpected error (RuntimeError: fake training broke); the log "
                         "shows where. Submit again, and report it if it happens again.")
    assert len(_pids(queue, "j1")) == 1 and _all_gone(_pids(queue, "j1"))


def test_a_second_sigterm_does_not_interrupt_the_workers_clean_up():
    code = ("import os, signal, time\n"
            "from mmdemo.jobs.worker import on_sigterm\n"
            "signal.signal(signal.SIGTERM, on_sigterm)\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "finally:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.1)\n"
            "    print('clean-up done', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 143 and out.stdout == "clean-up done\n", out.stderr


def test_an_outcome_and_its_record_are_written_once(queue):
    """The worker and the dispatcher may both record a cancel: the first wins, and the timeline says it once."""
    queue.add(_job("j1"))
    queue.claim(1)
    queue.finish("j1", "cancelled")
    queue.finish("j1", "cancelled")
    queue.finish("j1", "failed", error="Something else.")
    queue.requeue("j1", "The app stopped while this job ran")
    job = queue.get("j1")
    assert job.state == "cancelled" and job.error is None
    assert _messages(queue, "j1")[-2:] == ["Started.", "Cancelled."]


def test_a_server_shutdown_that_uses_up_the_attempts_says_so():
    from mmdemo.jobs.dispatcher import death_sentences

    job = _job("j1")
    job.attempts = 3
    for code in (143, -signal.SIGTERM):
        assert death_sentences(code, job) == (
            "The training process was stopped from outside, as a server shutdown or restart does",
            "The training process was stopped from outside, as a server shutdown or restart does, and after 3 tries "
            "the job was stopped; submit it again once the server runs without restarting.")
