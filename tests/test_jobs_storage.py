"""A data folder that cannot be written (read-only, full, a file in the way) reads as one sentence, and the
dispatcher logs such an error once, backs off, and says when it works again.

Tests run as root, where permission bits do not stop a write: read-only and full folders are made with a
real tmpfs mount where the machine allows it (skipped elsewhere), and with a failing write otherwise.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_shapes_dataset
from mmdemo import jobs
from mmdemo.config import ensure_writable
from mmdemo.errors import JobError
from mmdemo.jobs.dispatcher import MAX_BACKOFF_SECONDS, Dispatcher
from mmdemo.jobs.queue import Job, SQLiteQueue, get_queue
from mmdemo.jobs.worker import failure_sentence

READ_ONLY = ("The data folder (MMDEMO_HOME) cannot be written (read-only file system); point MMDEMO_HOME at a "
             "writable folder.")
FULL = ("The data folder (MMDEMO_HOME) cannot be written (no space left on the device); free some space or point "
        "MMDEMO_HOME at another disk.")


def _job(job_id: str, owner: str = "alice") -> Job:
    return Job(id=job_id, owner=owner, task="caption", model=None, preset="quick", config={"batch_size": 8},
               data="unused", name=f"caption-{job_id}", state="queued", created=time.time())


def _failing_write(monkeypatch, code: int) -> None:
    def write_bytes(self, data):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


# ------------------------------------------------------------------------------------------ ensure_writable
def test_ensure_writable_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "a" / "b"
    assert ensure_writable(folder) is None
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize("code,sentence", [
    (errno.EROFS, READ_ONLY),
    (errno.ENOSPC, FULL),
    (errno.EACCES, "The data folder (MMDEMO_HOME) cannot be written (permission denied); point MMDEMO_HOME at a "
                   "writable folder."),
    (errno.EIO, "The data folder (MMDEMO_HOME) cannot be written (input/output error); point MMDEMO_HOME at a "
                "writable folder."),
])
def test_ensure_writable_says_why_without_the_path(tmp_path, monkeypatch, code, sentence):
    _failing_write(monkeypatch, code)
    assert ensure_writable(tmp_path / "home") == sentence
    assert str(tmp_path) not in sentence


def test_a_file_in_the_way(tmp_path):
    (tmp_path / "home").write_text("not a folder")
    assert ensure_writable(tmp_path / "home") == ("The data folder (MMDEMO_HOME) cannot be written (a file of the "
                                                  "same name is in the way); remove that file or point MMDEMO_HOME "
                                                  "at a writable folder.")
    assert "a file is in the way" in ensure_writable(tmp_path / "home" / "sub")
    with pytest.raises(JobError, match="in the way"):
        SQLiteQueue(tmp_path / "home")


# ------------------------------------------------------------------------------------------------ the queue
def test_opening_the_queue_on_an_unwritable_folder_is_one_sentence(home, monkeypatch, caplog):
    _failing_write(monkeypatch, errno.EROFS)
    with caplog.at_level(logging.DEBUG, logger="mmdemo.jobs.queue"):
        with pytest.raises(JobError) as exc:
            get_queue()
    assert str(exc.value) == READ_ONLY
    assert str(home) in caplog.text  # the path is for the log, not for web users
    monkeypatch.undo()
    assert get_queue().list() == []  # nothing broken was cached: it works once the folder does


def _connect_that_fails(monkeypatch, message: str) -> None:
    """sqlite3.connect whose connections refuse to change anything, as SQLite does on a full disk."""
    real_connect = sqlite3.connect

    class Connection:
        def __init__(self, *args, **kwargs):
            self._db = real_connect(*args, **kwargs)

        def execute(self, sql, *args):
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                raise sqlite3.OperationalError(message)
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)

        def __setattr__(self, name, value):
            if name == "_db":
                object.__setattr__(self, name, value)
            else:
                setattr(self._db, name, value)

    monkeypatch.setattr(sqlite3, "connect", Connection)


def test_queue_writes_on_a_full_disk_are_one_sentence(home, monkeypatch):
    queue = get_queue()
    queue.add(_job("j1"))
    _connect_that_fails(monkeypatch, "database or disk is full")
    with pytest.raises(JobError) as exc:
        queue.add(_job("j2"))
    assert str(exc.value) == FULL
    with pytest.raises(JobError, match="no space left"):
        queue.cancel("j1")
    assert [j.id for j in queue.list()] == ["j1"]  # reads still work, and the failed insert left nothing


def test_other_database_errors_are_not_blamed_on_the_folder(home, monkeypatch):
    queue = get_queue()
    _connect_that_fails(monkeypatch, "database is locked")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        queue.add(_job("j1"))


def test_submit_on_a_full_disk_is_one_sentence_and_leaves_no_run_folder(home, tmp_path, monkeypatch):
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    get_queue()

    def copytree(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(home / "runs"))

    monkeypatch.setattr(jobs.shutil, "copytree", copytree)
    with pytest.raises(JobError) as exc:
        jobs.submit("caption", data, owner="alice")
    assert str(exc.value) == FULL
    assert list((home / "runs").iterdir()) == [] and jobs.list_jobs("alice") == []


def test_a_worker_that_fills_the_disk_fails_with_the_folder_sentence():
    assert failure_sentence(OSError(errno.ENOSPC, "No space left on device", "/data/runs/x")) == FULL


# ----------------------------------------------------------------------------------------------- dispatcher
class _Clock:
    """Stands in for the dispatcher's stop event: records each wait and stops after ``steps`` of them."""

    def __init__(self, steps: int):
        self.waits: list[float] = []
        self.steps = steps

    def is_set(self) -> bool:
        return len(self.waits) >= self.steps

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.is_set()


def test_the_dispatcher_logs_an_error_once_backs_off_and_says_when_it_recovered(home, caplog):
    dispatcher = Dispatcher(get_queue(), slots=1, poll=0.5)
    dispatcher._stop = _Clock(steps=12)
    calls = []

    def step():
        calls.append(1)
        if len(calls) <= 8:
            raise JobError(FULL)
        if len(calls) == 9:
            raise sqlite3.OperationalError("database is locked")  # a different error is logged too, once

    dispatcher.step = step
    with caplog.at_level(logging.INFO, logger="mmdemo.jobs.dispatcher"):
        dispatcher.run_forever()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.exc_info is not None for r in errors] == [True, True]
    assert FULL in errors[0].getMessage() and "database is locked" in errors[1].getMessage()
    recovered = [r.getMessage() for r in caplog.records if "works again" in r.getMessage()]
    assert recovered == ["The job dispatcher works again after 9 failed tries."]
    waits = dispatcher._stop.waits
    assert waits[:9] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0] and max(waits) == MAX_BACKOFF_SECONDS
    assert waits[9:] == [0.5, 0.5, 0.5]  # back to the normal poll once it works


def test_a_worker_that_cannot_be_started_leaves_its_job_queued(home, monkeypatch):
    queue = get_queue()
    queue.add(_job("j1"))
    dispatcher = Dispatcher(queue, slots=1)

    def popen(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(JobError) as exc:
        dispatcher.start_jobs()
    assert str(exc.value) == FULL
    job = queue.get("j1")
    assert job.state == "queued" and job.attempts == 0 and dispatcher.children == {}


# -------------------------------------------------------------------------- real read-only and full mounts
@pytest.fixture
def mount(tmp_path):
    """Mount a 1 MB tmpfs with the given options; skipped where mounting is not permitted."""
    mounted = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=1m", "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_real_read_only_folder(mount, monkeypatch):
    home = mount("ro") / "home"
    monkeypatch.setenv("MMDEMO_HOME", str(home))
    assert ensure_writable(home) == READ_ONLY
    with pytest.raises(JobError) as exc:
        get_queue()
    assert str(exc.value) == READ_ONLY


def test_a_real_full_disk(mount, monkeypatch):
    root = mount("rw")
    monkeypatch.setenv("MMDEMO_HOME", str(root / "home"))
    queue = get_queue()
    queue.add(_job("j1"))
    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert ensure_writable(root / "home") == FULL
    with pytest.raises(JobError) as exc:
        queue.add(_job("j2"))
    assert str(exc.value) == FULL
    filler.unlink()
    queue.add(_job("j2"))  # space again: the same queue object works on
    assert {j.id for j in queue.list()} == {"j1", "j2"}
