"""The durable job queue: positions, user separation, cancel, worker processes and recovery after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_shapes_dataset
from mmdemo import jobs
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.dispatcher import Dispatcher
from mmdemo.jobs.queue import get_queue, pid_alive
from mmdemo.jobs.worker import failure_sentence
from mmdemo.models.loading import ADAPTER_META

FAST = dict(learning_rate=1e-3, epochs=1, batch_size=8)


@pytest.fixture
def data(tmp_path):
    return make_shapes_dataset(tmp_path / "data", "caption", per_class=1)


def _wait(predicate, timeout=120.0, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out")


def test_submit_positions_owners_and_cancelling_a_queued_job(home, data, tiny_models):
    a1 = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], **FAST)
    b1 = jobs.submit("caption", data, owner="bob", model=tiny_models["caption"], epochs=2)
    a2 = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], preset="balanced")
    assert [j.id for j in jobs.list_jobs("alice")] == [a2.id, a1.id]
    assert jobs.get(a2.id, "alice").position == 3 and jobs.get(b1.id, "bob").position == 2
    assert a2.config["rank"] == 16 and b1.config["epochs"] == 2
    with pytest.raises(JobError, match="no job"):
        jobs.get(a1.id, "bob")
    with pytest.raises(JobError, match="no job"):
        jobs.cancel(a1.id, "bob")
    assert jobs.cancel(a1.id, "alice").state == "cancelled"
    assert jobs.get(b1.id, "bob").position == 1
    with pytest.raises(JobError, match="already cancelled"):
        jobs.cancel(a1.id, "alice")
    assert [e["phase"] for e in jobs.events(a1.id, owner="alice")][-1] == "cancelling"


def test_submit_refuses_bad_data_and_bad_settings(home, data):
    with pytest.raises(InputError, match="learning rate must be between"):
        jobs.submit("caption", data, owner="alice", learning_rate=5)
    with pytest.raises(InputError, match="Unknown preset"):
        jobs.submit("caption", data, owner="alice", preset="fastest")
    (data / "red_circle_0.png").unlink()
    with pytest.raises(InputError, match="red_circle_0.png, which is not in the dataset"):
        jobs.submit("caption", data, owner="alice")
    assert jobs.list_jobs("alice") == [] and not any((home / "runs").iterdir())


def test_failures_read_as_causes_with_a_fix():
    class OutOfMemoryError(RuntimeError):
        pass

    assert "smaller batch size" in failure_sentence(OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert failure_sentence(InputError("x.png is corrupt.")) == "x.png is corrupt."


@pytest.mark.slow
def test_worker_runs_a_job_and_cancel_stops_a_running_one(home, data, tiny_models):
    queue = get_queue()
    dispatcher = Dispatcher(queue, slots=1, poll=0.2).start()
    try:
        done = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=5, **FAST)
        long = jobs.submit("caption", data, owner="bob", model=tiny_models["caption"], min_steps=100_000, **FAST)
        job = jobs.wait(done.id, timeout=180)
        assert job.state == "succeeded", (job.error, queue.log_tail(done.id))
        assert set(job.result["metrics_after"]) == {"bleu4", "cider"} and job.result["examples"]
        adapters = jobs.list_adapters("caption", "alice")
        assert [a["name"] for a in adapters] == [job.name] and adapters[0]["owner"] == "alice"
        assert jobs.list_adapters("caption", "bob") == []
        zipped = jobs.zip_adapter(job.name, "alice", home / "dl")
        assert zipped.is_file()
        with pytest.raises(JobError):
            jobs.zip_adapter(job.name, "bob")
        phases = {e["phase"] for e in jobs.events(done.id)}
        assert {"queued", "validating", "loading model", "training", "evaluating", "saving", "succeeded"} <= phases
        assert "step=" in jobs.log_tail(done.id)

        running = _wait(lambda: (j := queue.get(long.id)).phase == "training" and j.step and j, timeout=120)
        pid = running.pid
        t0 = time.monotonic()
        jobs.cancel(long.id, "bob")
        job = _wait(lambda: (j := queue.get(long.id)).state in jobs.FINAL and j, timeout=15)
        assert job.state == "cancelled" and time.monotonic() - t0 < 10
        _wait(lambda: not pid_alive(pid), timeout=10)
        assert not (home / "adapters" / job.name).exists()
    finally:
        dispatcher.stop(kill_workers=True)


def _start_app(home):
    env = {**os.environ, "MMDEMO_HOME": str(home), "MMDEMO_JOB_SLOTS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmdemo.jobs.dispatcher"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_while_a_job_runs_and_another_waits_loses_nothing(home, data, tiny_models):
    """The app and its worker are killed (as a container restart does); on restart both jobs finish."""
    first = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=400, save_steps=25,
                        **FAST)
    second = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=5, **FAST)
    queue = get_queue()
    app = _start_app(home)
    try:
        running = _wait(lambda: (j := queue.get(first.id)).step and j.step >= 60 and j, timeout=180)
        os.kill(app.pid, signal.SIGKILL)
        app.wait()
        os.killpg(running.pid, signal.SIGKILL)
        _wait(lambda: not pid_alive(running.pid), timeout=10)
        assert queue.get(first.id).state == "running" and queue.get(second.id).state == "queued"
        app = _start_app(home)
        for job_id in (first.id, second.id):
            job = jobs.wait(job_id, timeout=240)
            assert job.state == "succeeded", (job.error, queue.log_tail(job_id))
            meta = json.loads((home / "adapters" / job.name / ADAPTER_META).read_text())
            assert meta["job_id"] == job_id
        job = queue.get(first.id)
        assert job.attempts == 2 and job.result["resumed_from_step"] >= 50
        messages = " ".join(e.get("message", "") for e in jobs.events(first.id))
        assert "The app stopped while this job ran" in messages and "Resuming from the checkpoint at step" in messages
    finally:
        app.kill()
        app.wait()
        for job in queue.running():
            if job.pid:
                os.killpg(job.pid, signal.SIGKILL)


def _start_web_app(home):
    """``python app.py`` itself (the dispatcher runs inside it), on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MMDEMO_HOME": str(home), "MMDEMO_JOB_SLOTS": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "app.py", "--tiny-models", "--no-warm-up"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_of_the_web_app_alone_keeps_the_running_worker(home, data, tiny_models):
    """Only ``app.py`` is killed: its worker runs on in its own session, the restarted app leaves it alone,
    and then runs the queued job. Both adapters appear; the first job was never restarted."""
    first = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=300, **FAST)
    second = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=5, **FAST)
    queue = get_queue()
    app = _start_web_app(home)
    try:
        running = _wait(lambda: (j := queue.get(first.id)).step and j.step >= 20 and j, timeout=180)
        os.kill(app.pid, signal.SIGKILL)
        app.wait()
        assert pid_alive(running.pid)  # the worker outlived the app
        app = _start_web_app(home)
        for job_id in (first.id, second.id):
            job = jobs.wait(job_id, timeout=240)
            assert job.state == "succeeded", (job.error, queue.log_tail(job_id))
            assert (home / "adapters" / job.name / "adapter_model.safetensors").is_file()
        assert queue.get(first.id).attempts == 1
    finally:
        app.kill()
        app.wait()
        for job in queue.running():
            if job.pid:
                os.killpg(job.pid, signal.SIGKILL)


def test_resume_skips_a_checkpoint_killed_mid_save(tmp_path):
    """A SIGKILL during a save leaves a checkpoint without trainer_state.json: resume from the one before."""
    from mmdemo.jobs.train import _last_complete_checkpoint

    assert _last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((25, True), (50, True), (75, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"w")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert _last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-50")
    assert not (tmp_path / "checkpoint-75").exists()
