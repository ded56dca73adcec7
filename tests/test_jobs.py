"""The durable job queue: positions, user separation, cancel, worker processes and recovery after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_shapes_dataset, wait_for
from mmdemo import jobs
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.dispatcher import Dispatcher
from mmdemo.jobs.queue import Job, checkpoint_step, get_queue, pid_alive
from mmdemo.jobs.worker import failure_sentence
from mmdemo.models.loading import ADAPTER_META

FAST = dict(learning_rate=1e-3, epochs=1, batch_size=8)


@pytest.fixture
def data(tmp_path):
    return make_shapes_dataset(tmp_path / "data", "caption", per_class=1)


_wait = wait_for


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
    last = jobs.events(a1.id, owner="alice")[-1]
    assert last["phase"] == "cancelled" and last["message"].startswith("Cancelled while waiting in the queue")
    # the adapters the jobs will make have readable names, unique per owner; folders stay unique on disk
    names = [jobs.get(j.id, o).display_name for j, o in ((a1, "alice"), (a2, "alice"), (b1, "bob"))]
    assert names == ["data-caption", "data-caption-2", "data-caption"]
    assert a2.name == f"caption-{a2.id}" and a2.plan["steps"] == 150 and a2.plan["train_examples"] == 10


def test_a_duplicate_of_a_waiting_or_running_job_is_refused(home, data, tiny_models):
    """Same owner, data, task, model and settings while the first waits or runs: refused, even in a race."""
    kw = dict(model=tiny_models["caption"], **FAST)
    first = jobs.submit("caption", data, owner="alice", **kw)
    with pytest.raises(JobError, match=f"You already have this job waiting in the queue \\(job {first.id}, adapter "
                                       f"“data-caption”\\): the same dataset, task and settings"):
        jobs.submit("caption", data, owner="alice", **kw)
    racing = Job(**{**first.__dict__, "id": "x2", "name": "caption-x2", "label": "other", "position": None})
    with pytest.raises(JobError, match="You already have this job"):
        get_queue().add(racing)  # past the early check: the insert's transaction refuses it
    assert jobs.submit("caption", data, owner="bob", **kw).state == "queued"  # another owner may
    assert jobs.submit("caption", data, owner="alice", **{**kw, "epochs": 2}).state == "queued"  # other settings
    with pytest.raises(InputError, match="will already make an adapter called “data-caption”"):
        jobs.submit("caption", data, owner="alice", name="data-caption", **{**kw, "epochs": 3})
    get_queue().claim(1)  # running: still a duplicate
    with pytest.raises(JobError, match="You already have this job running"):
        jobs.submit("caption", data, owner="alice", **kw)
    jobs.cancel(first.id, "alice")  # being stopped: it may be submitted again at once, name and all
    again = jobs.submit("caption", data, owner="alice", name="data-caption", **kw)
    assert again.state == "queued" and again.display_name == "data-caption"


def test_submit_refuses_bad_data_and_bad_settings(home, data):
    with pytest.raises(InputError, match="learning rate must be more than 0 and at most 0.1"):
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

    oom = OutOfMemoryError("CUDA out of memory. Tried to allocate")
    assert "smaller batch size" in failure_sentence(oom)
    assert failure_sentence(InputError("x.png is corrupt.")) == "x.png is corrupt."
    quick = failure_sentence(oom, preset="quick", batch_size=8)
    assert quick == ("The GPU ran out of memory; close other jobs on this GPU and submit again with a batch size "
                     "smaller than 8.")
    assert "Quick preset" in failure_sentence(oom, preset="thorough", batch_size=8)
    assert "Quick" not in failure_sentence(MemoryError(), preset="quick", batch_size=4)
    assert "more memory" in failure_sentence(oom, preset="quick", batch_size=1)


def test_submit_refuses_a_fourth_waiting_job_of_one_user(home, data, tiny_models, monkeypatch):
    kw = dict(model=tiny_models["caption"], learning_rate=1e-3, batch_size=8)
    first = [jobs.submit("caption", data, owner="alice", epochs=e, **kw) for e in (1, 2, 3)]  # not duplicates
    get_queue().claim(1)  # one of them running: still counts
    with pytest.raises(JobError) as exc:
        jobs.submit("caption", data, owner="alice", epochs=4, **kw)
    assert str(exc.value) == ("You already have 3 jobs waiting or running; wait for one to finish or cancel one, "
                              "then submit again.")
    assert len(jobs.list_jobs("alice")) == 3 and len(list((home / "runs").iterdir())) == 3  # nothing left behind
    assert jobs.submit("caption", data, owner="bob", epochs=1, **kw).state == "queued"  # the limit is per user
    jobs.cancel(first[-1].id, "alice")
    assert jobs.submit("caption", data, owner="alice", epochs=4, **kw).state == "queued"

    monkeypatch.setenv("MMDEMO_MAX_QUEUED_JOBS", "1")
    with pytest.raises(JobError, match="^You already have 1 job waiting or running;"):
        jobs.submit("caption", data, owner="bob", epochs=2, **kw)
    monkeypatch.setenv("MMDEMO_MAX_QUEUED_JOBS", "0")
    with pytest.raises(InputError, match="MMDEMO_MAX_QUEUED_JOBS must be 1 or more"):
        jobs.submit("caption", data, owner="carol", **kw)


def test_the_job_limit_is_counted_in_the_same_transaction_as_the_insert(home):
    """Two submits racing past the early check: the queue itself refuses the one over the limit."""
    queue = get_queue()
    queue.add(_job("j1", "alice"), limit=2)
    queue.add(_job("j2", "alice"), limit=2)
    with pytest.raises(JobError, match="You already have 2 jobs"):
        queue.add(_job("j3", "alice"), limit=2)
    assert [j.id for j in queue.list("alice")] == ["j2", "j1"]


# ------------------------------------------------------------------- a worker that dies without an outcome
def _job(job_id, owner="alice", preset="quick", batch_size=8):
    return Job(id=job_id, owner=owner, task="caption", model=None, preset=preset,
               config={"preset": preset, "batch_size": batch_size}, data="unused", name=f"caption-{job_id}",
               state="queued", created=time.time())


class _DeadWorker:
    """Stands in for the worker's Popen: it has already exited with ``code``."""

    def __init__(self, code):
        self.code = code
        self.pid = 999_999

    def poll(self):
        return self.code


def _checkpoint(queue, job_id, step):
    folder = queue.run_dir(job_id) / "work" / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")


def _die(dispatcher, job_id, code):
    """Claim the job as the dispatcher would, and have its worker die with ``code``."""
    claimed = dispatcher.queue.claim(1)
    assert claimed.id == job_id
    dispatcher.children[job_id] = _DeadWorker(code)
    dispatcher.reap()
    assert job_id not in dispatcher.children
    return dispatcher.queue.get(job_id)


@pytest.mark.parametrize("preset", ["quick", "thorough"])
def test_a_killed_worker_is_retried_then_failed_with_a_sentence_that_fits_the_job(home, preset):
    queue = get_queue()
    dispatcher = Dispatcher(queue, slots=1)
    queue.add(_job("j1", preset=preset))
    job = _die(dispatcher, "j1", -signal.SIGKILL)  # no checkpoint yet
    assert job.state == "queued" and job.attempts == 1
    assert job.note == ("The training process was killed, most likely because the machine ran out of memory; it "
                        "goes back to the queue for attempt 2 of 3, starting from the beginning, as no checkpoint "
                        "was saved yet.")
    _checkpoint(queue, "j1", 20)
    _checkpoint(queue, "j1", 40)
    job = _die(dispatcher, "j1", 137)  # the same kill seen through a shell
    assert job.state == "queued"
    assert "attempt 3 of 3, resuming from the checkpoint of step 40." in job.note
    assert job.note in [e["message"] for e in queue.events("j1")]
    job = _die(dispatcher, "j1", -signal.SIGKILL)
    assert job.state == "failed" and job.attempts == 3
    if preset == "quick":
        assert job.error == ("The training process was killed, most likely because the machine ran out of memory, "
                             "and after 3 tries the job was stopped; submit it again with a batch size smaller "
                             "than 8.")
    else:
        assert job.error.endswith("submit it again with a batch size smaller than 8 or the Quick preset.")
    assert [e for e in queue.events("j1")][-1]["phase"] == "failed"


def test_a_crashed_worker_is_retried_and_a_cancel_still_wins(home):
    queue = get_queue()
    dispatcher = Dispatcher(queue, slots=1)
    queue.add(_job("j1"))
    job = _die(dispatcher, "j1", -signal.SIGSEGV)
    assert job.state == "queued" and job.note.startswith("The training process stopped unexpectedly (signal SIGSEGV);")
    job = _die(dispatcher, "j1", 1)
    assert job.state == "queued" and "(exit code 1)" in job.note
    job = _die(dispatcher, "j1", 1)
    assert job.state == "failed" and "read the job's log" in job.error and "Quick" not in job.error

    queue.add(_job("j2"))
    queue.claim(1)
    queue.cancel("j2")  # asked while the worker was dying (its pid is unknown here, so no signal is sent)
    dispatcher.children["j2"] = _DeadWorker(-signal.SIGKILL)
    dispatcher.reap()
    assert queue.get("j2").state == "cancelled"
    queue.add(_job("j3"))
    queue.claim(1)
    queue.cancel("j3")
    queue.requeue("j3", "The app stopped while this job ran")  # recovery after a restart: the cancel wins too
    assert queue.get("j3").state == "cancelled"


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
        assert [a["folder"] for a in adapters] == [job.name] and adapters[0]["owner"] == "alice"
        assert adapters[0]["name"] == job.display_name == "data-caption"
        assert (job.phase, job.step, job.total) == ("finished", 5, 5)  # what it trained, not "saving 1/1"
        assert jobs.list_adapters("caption", "bob") == []
        zipped = jobs.zip_adapter(job.name, "alice", home / "dl")
        assert zipped.is_file()
        with pytest.raises(JobError):
            jobs.zip_adapter(job.name, "bob")
        phases = {e["phase"] for e in jobs.events(done.id)}
        assert {"queued", "starting", "validating", "loading model", "training", "evaluating", "saving",
                "succeeded"} <= phases
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


@pytest.mark.slow
def test_a_worker_killed_after_a_checkpoint_resumes_from_it_and_succeeds(home, data, tiny_models, monkeypatch):
    """The kernel's OOM killer in miniature: SIGKILL to the worker alone, the app's dispatcher lives on."""
    import re

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    queue = get_queue()
    job = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=150, save_steps=20,
                      **FAST)
    dispatcher = Dispatcher(queue, slots=1, poll=0.2).start()
    try:
        running = _wait(lambda: (checkpoint_step(queue.run_dir(job.id)) or 0) >= 20 and queue.get(job.id),
                        timeout=180)
        os.killpg(running.pid, signal.SIGKILL)
        _wait(lambda: not pid_alive(running.pid), timeout=10)
        done = jobs.wait(job.id, timeout=240)
        assert done.state == "succeeded", (done.error, queue.log_tail(job.id))
        assert done.attempts == 2 and done.pid is None
        messages = [e.get("message", "") for e in jobs.events(job.id)]
        note = next(m for m in messages if m.startswith("The training process was killed"))
        step = int(re.search(r"attempt 2 of 3, resuming from the checkpoint of step (\d+)\.$", note).group(1))
        assert step >= 20 and done.note == note
        assert f"Attempt 2 of 3: the previous run was interrupted; resuming from the checkpoint of step {step}." \
            in messages
        assert any(m.startswith(f"Resuming from the checkpoint at step {step} of 150") for m in messages)
        assert done.result["resumed_from_step"] == step
        assert (home / "adapters" / done.name / "adapter_model.safetensors").is_file()
    finally:
        dispatcher.stop(kill_workers=True)


def _start_app(home):
    env = {**os.environ, "MMDEMO_HOME": str(home), "MMDEMO_JOB_SLOTS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmdemo.jobs.dispatcher"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_while_a_job_runs_and_another_waits_loses_nothing(home, data, tiny_models):
    """The app and its worker are killed (as a container restart does); on restart both jobs finish."""
    first = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=160, save_steps=25,
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
