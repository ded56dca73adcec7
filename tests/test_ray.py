"""Jobs on a real local Ray cluster (``MMDEMO_RAY_ADDRESS``): a head and two worker nodes, each ``ray start --block``
in its own session on this machine, started once for the module.

The jobs ask for the ``worker`` resource (``MMDEMO_RAY_RESOURCES``), which only the non-head nodes have; the app is
``python -m mmdemo.jobs.dispatcher`` in a subprocess. Checked: a tiny fine-tune runs on a worker node and the app's
restart mid-job re-attaches to it (it runs once); a cancel stops the actor within seconds; a node killed mid-job (all
its processes, SIGKILL) has its job resumed on the other node from its checkpoint; an actor killed for good sends its
job back to the queue, whose next attempt resumes from the checkpoint. Both nodes share this machine's
disk, as a real cluster shares MMDEMO_HOME (see the README).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # comes with accelerate and peft
import pytest
import ray  # requirements-dev.txt: CI installs it, so nothing here is skipped

from conftest import ROOT, free_port, make_shapes_dataset, wait_for
from mmdemo import jobs
from mmdemo.config import Settings, is_settings_var
from mmdemo.errors import InputError
from mmdemo.jobs.queue import checkpoint_step, get_queue
from mmdemo.jobs.ray_backend import NAMESPACE, actor_name, actor_options

pytestmark = pytest.mark.slow

FAST = dict(learning_rate=1e-3, epochs=1, batch_size=8)
RAY = str(Path(sys.executable).with_name("ray"))


_wait = wait_for


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its ``ray start --block`` and every process under it (Ray's workers run in their own
    sessions, so a process group would miss them)."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


class Cluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        # a killed node is declared dead after ~1.5 s instead of ~30 s
        self.env = {**os.environ, "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "500", "RAY_health_check_initial_delay_ms": "0"}

    def node(self, name: str, *args: str) -> None:
        log = open(Path(self.temp) / f"{name}.log", "w")
        # ports of its own: nodes on one machine would otherwise race for the same default agent ports
        ports = [f"--{kind}-port={free_port()}" for kind in ("node-manager", "object-manager", "metrics-export",
                                                             "dashboard-agent-listen", "dashboard-agent-grpc",
                                                             "runtime-env-agent")]
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1", "--object-store-memory=80000000",
             *ports, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> Cluster:
        self.node("head", "--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                  '--resources={"head": 1}')
        _wait(self._gcs_listens, timeout=60, poll=0.5)
        for name in ("w1", "w2"):
            self.worker(name)
        ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False)
        deadline, tries = time.monotonic() + 240, 1
        while len(self.alive()) < 3:
            for name in ("w1", "w2"):
                # on a loaded machine a node may miss Ray's fixed 30 s to register, and exit: start it again
                if self.nodes[name].poll() is not None and tries < 4:
                    tries += 1
                    self.worker(name)
            if time.monotonic() > deadline:
                logs = {name: (Path(self.temp) / f"{name}.log").read_text()[-1500:] for name in self.nodes}
                raise AssertionError(f"the cluster did not come up: {self.alive()}\n{logs}")
            time.sleep(0.5)
        return self

    def worker(self, name: str) -> None:
        self.node(name, f"--address={self.address}", f'--resources={{"worker": 1, "{name}": 1}}')

    def _gcs_listens(self) -> bool:
        assert self.nodes["head"].poll() is None, (Path(self.temp) / "head.log").read_text()[-3000:]
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def alive(self) -> dict[str, dict]:
        """node id -> its resources, of the live nodes."""
        return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

    def name_of(self, node_id_prefix: str) -> str:
        (resources,) = [r for n, r in self.alive().items() if n.startswith(node_id_prefix)]
        return next(name for name in self.nodes if name in resources)

    def stop(self) -> None:
        ray.shutdown()
        for proc in self.nodes.values():
            _kill_tree(proc)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def data(tmp_path):
    return make_shapes_dataset(tmp_path / "data", "caption", per_class=1)


class App:
    """``python -m mmdemo.jobs.dispatcher`` with the cluster's address: the app's job side, restartable."""

    def __init__(self, home: Path, cluster: Cluster):
        self.env = {**os.environ, "MMDEMO_HOME": str(home), "MMDEMO_RAY_ADDRESS": cluster.address,
                    "MMDEMO_RAY_RESOURCES": '{"worker": 1}', "MMDEMO_JOB_SLOTS": "2"}
        self.log = home.parent / "dispatcher.log"
        self.proc: subprocess.Popen | None = None

    def start(self, threaded: bool = False) -> App:
        """``threaded``: the dispatcher in a daemon thread, as ``app.py`` runs it (``ray.init`` off the main thread)."""
        command = (["-c", "import time; from mmdemo.jobs import start_dispatcher; start_dispatcher(); time.sleep(600)"]
                   if threaded else ["-m", "mmdemo.jobs.dispatcher"])
        with self.log.open("a") as fh:
            self.proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def app(home, cluster):
    home.mkdir(parents=True, exist_ok=True)
    a = App(home, cluster)
    yield a
    a.kill()
    for job in get_queue().running():  # what a failed test left on the cluster
        try:
            ray.kill(ray.get_actor(actor_name(job.id), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass


def _messages(job_id: str) -> list[str]:
    return [e.get("message") or "" for e in jobs.events(job_id)]


def _actor_gone(job_id: str) -> bool:
    try:
        ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_actor_options_ask_for_a_gpu_where_the_cluster_has_them():
    assert actor_options({}, {"CPU": 8, "GPU": 2}) == {"num_cpus": 1, "num_gpus": 1}
    assert actor_options({}, {"CPU": 8}) == {"num_cpus": 1, "num_gpus": 0}
    assert actor_options({"GPU": 1, "CPU": 4, "memory": 1e9, "a100": 1}, {}) == {
        "num_cpus": 4, "num_gpus": 1, "memory": 1e9, "resources": {"a100": 1}}


def test_the_ray_settings_round_trip_and_a_bad_value_is_one_sentence():
    env = {"MMDEMO_RAY_ADDRESS": " head:6379 ", "MMDEMO_RAY_RESOURCES": '{"GPU": 1, "a100": 0.5}'}
    settings = Settings.from_env(env)
    assert (settings.ray_address, settings.ray_resources) == ("head:6379", {"GPU": 1, "a100": 0.5})
    assert Settings.from_env(settings.to_env()) == settings and all(is_settings_var(k) for k in settings.to_env())
    assert "MMDEMO_RAY_ADDRESS" not in Settings().to_env() and Settings().ray_resources == {}
    with pytest.raises(InputError, match="MMDEMO_RAY_RESOURCES must be a JSON object"):
        Settings.from_env({"MMDEMO_RAY_RESOURCES": "GPU=1"})
    with pytest.raises(InputError, match="a number above 0, like"):
        Settings.from_env({"MMDEMO_RAY_RESOURCES": '{"GPU": "one"}'})


def test_without_a_ray_address_jobs_run_locally_and_ray_is_never_imported(tmp_path):
    code = ("import sys; from mmdemo.jobs.dispatcher import Dispatcher; d = Dispatcher(); d.step(); "
            "assert d.cluster is None and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMDEMO_RAY")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "MMDEMO_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_job_runs_on_a_worker_node_and_an_app_restart_reattaches_to_it(cluster, app, home, data, tiny_models):
    queue = get_queue()
    job = jobs.submit("caption", data, owner="alice", model=tiny_models["caption"], min_steps=60, **FAST)
    app.start()
    running = _wait(lambda: (j := queue.get(job.id)).phase == "training" and (j.step or 0) >= 3 and j, timeout=150)
    assert running.pid is None  # nothing local to signal
    app.kill()  # the app dies mid-job; the cluster and the actor do not
    time.sleep(1)
    assert queue.get(job.id).state == "running" and not _actor_gone(job.id)
    app.start()
    done = jobs.wait(job.id, timeout=180)
    assert done.state == "succeeded", (done.error, queue.log_tail(job.id, 80))
    assert done.attempts == 1 and (done.phase, done.step, done.total) == ("finished", 60, 60)
    messages = _messages(job.id)
    ran = [m for m in messages if m.startswith("Running on cluster node")]
    assert len(ran) == 1, messages  # one actor, trained once
    node = ran[0].rsplit("(", 1)[1].rstrip(").")
    assert cluster.name_of(node) in ("w1", "w2")  # not the head
    events = jobs.events(job.id)
    steps = [e for e in events if e.get("phase") == "training" and e.get("loss") is not None]
    assert steps and all(e.get("eta") is not None for e in steps[:-1])
    assert {"training", "evaluating", "saving", "succeeded"} <= {e["phase"] for e in events}
    log = queue.log_tail(job.id, 400)
    assert "re-attached to Ray actor" in log and "step=" in log
    assert (home / "adapters" / done.name / "adapter_model.safetensors").is_file()
    assert done.result["resumed_from_step"] is None
    _wait(lambda: _actor_gone(job.id), timeout=10)


def test_cancel_stops_the_job_on_its_node_within_seconds(cluster, app, home, data, tiny_models):
    queue = get_queue()
    job = jobs.submit("caption", data, owner="bob", model=tiny_models["caption"], min_steps=100_000, **FAST)
    app.start(threaded=True)
    _wait(lambda: (j := queue.get(job.id)).phase == "training" and j.step, timeout=150)
    t0 = time.monotonic()
    jobs.cancel(job.id, "bob")
    done = _wait(lambda: (j := queue.get(job.id)).state in jobs.FINAL and j, timeout=15)
    assert done.state == "cancelled" and time.monotonic() - t0 < 10
    _wait(lambda: _actor_gone(job.id), timeout=10)
    assert not (home / "adapters" / done.name).exists()


def test_a_node_killed_mid_job_resumes_it_on_another_node_from_its_checkpoint(cluster, app, data, tiny_models):
    queue = get_queue()
    job = jobs.submit("caption", data, owner="carol", model=tiny_models["caption"], min_steps=160, save_steps=25,
                      **FAST)
    app.start()
    _wait(lambda: (checkpoint_step(queue.run_dir(job.id)) or 0) >= 25, timeout=150)
    first = next(m for m in _messages(job.id) if m.startswith("Running on cluster node"))
    victim = cluster.name_of(first.rsplit("(", 1)[1].rstrip(")."))
    _kill_tree(cluster.nodes[victim])
    done = jobs.wait(job.id, timeout=200)
    assert done.state == "succeeded", (done.error, queue.log_tail(job.id, 80))
    messages = _messages(job.id)
    moved = next(m for m in messages if m.startswith("The cluster node running this job stopped"))
    step = int(moved.rsplit("resumed from step ", 1)[1].rstrip("."))
    assert 25 <= step < 160 and done.result["resumed_from_step"] == step
    assert any(m.startswith(f"Resuming from the checkpoint at step {step} of 160") for m in messages)
    node = moved.split("(", 1)[1].split(")", 1)[0]
    assert cluster.name_of(node) == ({"w1", "w2"} - {victim}).pop()
    assert done.attempts == 1  # Ray restarted the actor: the queue never saw the job stop


def test_an_actor_gone_for_good_sends_its_job_back_to_the_queue_to_resume(cluster, app, data, tiny_models):
    """Killed without a restart (as when its restarts are used up): the job is requeued like a local worker that
    died, and its next attempt, a new actor of the same name, resumes from the checkpoint."""
    queue = get_queue()
    job = jobs.submit("caption", data, owner="dave", model=tiny_models["caption"], min_steps=120, save_steps=25,
                      **FAST)
    app.start()
    _wait(lambda: (checkpoint_step(queue.run_dir(job.id)) or 0) >= 25, timeout=150)
    ray.kill(ray.get_actor(actor_name(job.id), namespace=NAMESPACE), no_restart=True)
    done = jobs.wait(job.id, timeout=200)
    assert done.state == "succeeded", (done.error, queue.log_tail(job.id, 80))
    assert done.attempts == 2 and done.result["resumed_from_step"] >= 25
    assert any(m.startswith("The Ray actor running this job stopped (its node was lost, or it was killed); it goes "
                            "back to the queue for attempt 2 of 3, resuming from the checkpoint of step")
               for m in _messages(job.id))
