"""One :class:`~mmdemo.config.Settings`, built once from the environment and the flags, and passed down.

The environment round-trips through ``to_env``; flags win over the environment; bad values are one sentence;
``app.py`` writes nothing to ``os.environ``; a job worker started by the dispatcher of an app configured only by
flags trains with those flags' checkpoint and data folder (checked with the fake worker: no model, a few seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from mmdemo.config import Limits, Settings, get_settings, install, is_settings_var
from mmdemo.errors import InputError
from mmdemo.jobs.dispatcher import Dispatcher, default_slots
from mmdemo.jobs.queue import FINAL, Job
from mmdemo.models.loading import more_checkpoints, resolve_checkpoint
from mmdemo.models.registry import TASKS
from mmdemo.ui import app as ui_app
from mmdemo.ui.context import UIContext

FAKE = Path(__file__).with_name("fake_worker.py")

FULL_ENV = {
    "MMDEMO_HOME": "/srv/mmdemo",
    "MMDEMO_CAPTION_MODEL": "someone/caption",
    "MMDEMO_IMAGE_SEARCH_MODEL": "/models/siglip",
    "MMDEMO_CAPTION_MORE_MODELS": "a/one, b/two,a/one",
    "MMDEMO_VQA_MORE_MODELS": "NONE",
    "MMDEMO_DEVICE": "cuda:1",
    "MMDEMO_DTYPE": "float16",
    "MMDEMO_MAX_IMAGE_PIXELS": "1000000",
    "MMDEMO_MAX_IMAGE_MB": "0.3",
    "MMDEMO_MAX_AUDIO_MB": "12.5",
    "MMDEMO_MAX_AUDIO_SECONDS": "30",
    "MMDEMO_MIN_AUDIO_SECONDS": "0.02",
    "MMDEMO_MAX_QUEUED_JOBS": "5",
    "MMDEMO_KEEP_RUNS_DAYS": "forever",
    "MMDEMO_FAST": "yes",
    "MMDEMO_JOB_SLOTS": "2",
    "MMDEMO_GPU_CONCURRENCY": "4",
    "MMDEMO_QUEUE_SIZE": "10",
    "MMDEMO_MCP": "1",
    "GRADIO_SERVER_NAME": "0.0.0.0",
    "GRADIO_SERVER_PORT": "8080",
}


def _ours(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(("MMDEMO_", "GRADIO_", "HF_"))}


@pytest.fixture
def uninstalled():
    """Whatever a test installs is taken back: the other tests read the environment."""
    previous = install(None)
    yield
    install(previous)


# ------------------------------------------------------------------------------------------- the environment
def test_every_setting_is_read_and_round_trips_through_to_env():
    settings = Settings.from_env(FULL_ENV)
    assert settings.home == Path("/srv/mmdemo")
    assert settings.models == {"caption": "someone/caption", "image_search": "/models/siglip"}
    assert settings.more_models == {"caption": ("a/one", "b/two"), "vqa": ()}
    assert (settings.device, settings.dtype, settings.fast, settings.mcp) == ("cuda:1", "float16", True, True)
    assert (settings.job_slots, settings.gpu_concurrency, settings.queue_size) == (2, 4, 10)
    assert (settings.host, settings.port, settings.max_queued_jobs, settings.keep_runs_days) == ("0.0.0.0", 8080, 5, 0)
    assert settings.limits == Limits(1_000_000, int(0.3 * 1024 * 1024), int(12.5 * 1024 * 1024), 30.0, 0.02)
    env = settings.to_env()
    assert all(is_settings_var(name) for name in env)
    assert Settings.from_env(env) == settings
    assert Settings.from_env(Settings().to_env()) == Settings() == Settings.from_env({})


def test_task_model_vars_are_read_for_every_task_and_unset_is_not_none():
    settings = Settings.from_env({"MMDEMO_VQA_MORE_MODELS": "none", "MMDEMO_RETRIEVAL_MODEL": " x/clap ",
                                  "MMDEMO_CAPTION_MORE_MODELS": "  "})
    assert settings.models == {"retrieval": "x/clap"}
    assert more_checkpoints("vqa", settings) == []  # "none": none
    assert more_checkpoints("caption", settings) == list(TASKS["caption"].more_checkpoints)  # blank: not set
    assert resolve_checkpoint("retrieval", settings=settings) == "x/clap"
    assert resolve_checkpoint("retrieval", "given/one", settings) == "given/one"
    for task in TASKS:  # every task of the registry has its two variables, by the generic names
        assert Settings.from_env({TASKS[task].env_var: "m"}).models == {task: "m"}
        assert Settings.from_env({TASKS[task].more_env_var: "m1,m2"}).more_models == {task: ("m1", "m2")}
    assert not is_settings_var("MMDEMO_CHROMIUM") and not is_settings_var("MMDEMO_CAPTION_MODELS")


def test_the_model_layer_reads_the_settings_not_the_environment(monkeypatch, uninstalled):
    monkeypatch.setenv("MMDEMO_IMAGE_SEARCH_MODEL", "env/siglip")
    assert resolve_checkpoint("image_search") == "env/siglip"  # nothing installed: the environment, now
    install(Settings(models={"image_search": "installed/siglip"}, more_models={"caption": ()}))
    assert get_settings().models == {"image_search": "installed/siglip"}
    assert resolve_checkpoint("image_search") == "installed/siglip" and more_checkpoints("caption") == []
    install(None)
    assert resolve_checkpoint("image_search") == "env/siglip"


@pytest.mark.parametrize("name, value, words", [
    ("MMDEMO_JOB_SLOTS", "0", "MMDEMO_JOB_SLOTS must be 1 or more, not 0."),
    ("MMDEMO_JOB_SLOTS", "two", "MMDEMO_JOB_SLOTS must be a whole number, but it is 'two'."),
    ("MMDEMO_GPU_CONCURRENCY", "0", "MMDEMO_GPU_CONCURRENCY (or --gpu-concurrency) must be 1 or more, not 0."),
    ("MMDEMO_QUEUE_SIZE", "-1", "MMDEMO_QUEUE_SIZE must be 1 or more, not -1."),
    ("MMDEMO_MCP", "maybe", "MMDEMO_MCP must be 1 (on) or 0 (off), but it is 'maybe'."),
    ("GRADIO_SERVER_PORT", "70000", "GRADIO_SERVER_PORT (--port) must be a port number from 1 to 65535, not 70000."),
    ("MMDEMO_CAPTION_MORE_MODELS", " , ", "MMDEMO_CAPTION_MORE_MODELS must list checkpoints"),
    ("MMDEMO_MAX_AUDIO_MB", "lots", "MMDEMO_MAX_AUDIO_MB must be a number, but it is 'lots'."),
])
def test_a_bad_value_is_one_sentence(name, value, words):
    with pytest.raises(InputError) as caught:
        Settings.from_env({name: value})
    text = str(caught.value)
    assert text.startswith(words) and text.endswith(".") and "\n" not in text


def test_a_model_var_of_no_task_is_refused_where_the_tasks_are_known():
    args = ui_app.parse_args([])
    assert Settings.from_env({"MMDEMO_CAPTON_MODEL": "x"}).models == {"capton": "x"}  # config knows no tasks
    with pytest.raises(InputError, match=r"^MMDEMO_CAPTON_MODEL is set, but capton is no task; the tasks are "
                                         r"caption, vqa, retrieval, image_search: fix its name or unset it\.$"):
        ui_app.app_settings(args, {"MMDEMO_CAPTON_MODEL": "x"})


# ------------------------------------------------------------------------------------------------ the flags
def test_flags_win_over_the_environment():
    env = {"MMDEMO_HOME": "/env/home", "MMDEMO_CAPTION_MODEL": "env/caption", "MMDEMO_VQA_MODEL": "env/vqa",
           "MMDEMO_CAPTION_MORE_MODELS": "env/more", "MMDEMO_GPU_CONCURRENCY": "3", "GRADIO_SERVER_PORT": "1234",
           "GRADIO_SERVER_NAME": "10.0.0.1", "MMDEMO_FAST": "0", "MMDEMO_QUEUE_SIZE": "7"}
    args = ui_app.parse_args(["--home", "/flag/home", "--caption-model", "flag/caption", "--caption-more-models",
                              "none", "--vqa-more-models", "f/one,f/two", "--gpu-concurrency", "2", "--port", "999",
                              "--host", "127.0.0.2", "--fast", "--mcp"])
    settings = ui_app.app_settings(args, env)
    assert settings.home == Path("/flag/home")
    assert settings.models == {"caption": "flag/caption", "vqa": "env/vqa"}  # a flag for one task keeps the others
    assert settings.more_models == {"caption": (), "vqa": ("f/one", "f/two")}
    assert (settings.gpu_concurrency, settings.port, settings.host, settings.fast, settings.mcp) == (
        2, 999, "127.0.0.2", True, True)
    assert settings.queue_size == 7  # no flag: the environment's
    assert ui_app.app_settings(ui_app.parse_args([]), env) == Settings.from_env(env)  # no flags: the environment
    with pytest.raises(InputError, match="must be 1 or more, not 0"):
        ui_app.app_settings(ui_app.parse_args(["--gpu-concurrency", "0"]), env)
    ctx = ui_app.configure(args, env)
    assert ctx.settings == settings and ctx.gpu_concurrency == 2
    assert ctx.checkpoint("caption") == "flag/caption" and ctx.checkpoint("vqa") == "env/vqa"
    assert ctx.base_models("caption").more == () and ctx.base_models("vqa").more == ("f/one", "f/two")


def test_main_with_flags_installs_the_settings_and_writes_no_environment(tmp_path, monkeypatch, uninstalled):
    """``python app.py --tiny-models --home H --vqa-model V ...`` up to ``launch`` (faked)."""
    seen: dict = {}

    class FakeDemo:
        def queue(self, **kwargs):
            seen["queue"] = kwargs

        def launch(self, **kwargs):
            seen["launch"] = kwargs

    def build_app(ctx, warm_up=True):
        seen["ctx"] = ctx
        return FakeDemo()

    monkeypatch.setattr(ui_app, "build_app", build_app)
    for name in list(os.environ):
        if name.startswith("MMDEMO_") and name != "MMDEMO_DEVICE":
            monkeypatch.delenv(name)
    before = dict(os.environ)
    home = tmp_path / "home"
    ui_app.main(["--tiny-models", "--home", str(home), "--vqa-model", "flag/vqa", "--fast", "--port", "7999",
                 "--gpu-concurrency", "2"])
    assert _ours(os.environ) == _ours(before)  # no MMDEMO_ variable was set or changed (torch sets its own)
    settings = seen["ctx"].settings
    assert get_settings() is settings  # installed: what the rest of the process reads
    assert settings.home == home and settings.fast and settings.models["vqa"] == "flag/vqa"
    tiny = (home / "tiny-models").resolve()
    assert Path(settings.models["caption"]).parent == tiny and Path(settings.models["retrieval"]).parent == tiny
    assert all(Path(c).parent == tiny for c in settings.more_models["caption"])
    assert seen["ctx"].tiny and seen["ctx"].gpu_concurrency == 2
    assert seen["queue"] == {"max_size": 64, "default_concurrency_limit": 2}
    assert seen["launch"]["server_port"] == 7999 and seen["launch"]["server_name"] is None


def test_a_bad_setting_stops_the_app_with_its_sentence(monkeypatch, uninstalled):
    monkeypatch.setenv("MMDEMO_QUEUE_SIZE", "0")
    with pytest.raises(SystemExit, match=r"^mmdemo: MMDEMO_QUEUE_SIZE must be 1 or more, not 0\.$"):
        ui_app.main([])
    with pytest.raises(InputError):  # nothing was installed: the environment is read, and refused, again
        get_settings()


# --------------------------------------------------------------------------------------------- job workers
def _job(job_id: str, model: str | None = None) -> Job:
    from mmdemo.jobs.train import TrainConfig

    config = TrainConfig.from_preset("quick", batch_size=8)
    return Job(id=job_id, owner="alice", task="caption", model=model, preset="quick",
               config={k: getattr(config, k) for k in config.__dataclass_fields__}, data="unused",
               name=f"caption-{job_id}", state="queued", created=time.time())


def test_child_env_replaces_the_settings_variables_only(monkeypatch):
    monkeypatch.setenv("MMDEMO_CAPTION_MODEL", "env/caption")
    monkeypatch.setenv("MMDEMO_CHROMIUM", "/usr/bin/chromium")  # no setting: passed on as it is
    before = dict(os.environ)
    settings = Settings(home=Path("/x"), more_models={"caption": ()})
    env = settings.child_env()
    assert dict(os.environ) == before
    assert "MMDEMO_CAPTION_MODEL" not in env and env["MMDEMO_CAPTION_MORE_MODELS"] == "none"
    assert env["MMDEMO_CHROMIUM"] == "/usr/bin/chromium" and env["PATH"] == os.environ["PATH"]
    assert Settings.from_env(env) == settings


def test_job_slots_come_from_the_settings(home):
    assert default_slots(Settings(job_slots=3)) == 3
    assert Dispatcher(settings=Settings(home=home, job_slots=2)).slots == 2


def test_a_job_of_an_app_configured_by_flags_runs_with_the_flags(tmp_path, monkeypatch):
    """The app gets its model and data folder from flags only, the environment says otherwise: the worker its
    dispatcher starts trains the flags' checkpoint, under the flags' data folder, and sees no HF_TOKEN."""
    env_home = tmp_path / "env-home"
    monkeypatch.setenv("MMDEMO_HOME", str(env_home))
    monkeypatch.setenv("MMDEMO_CAPTION_MODEL", "env/caption")
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.delenv("MMDEMO_FAST", raising=False)
    flag_home, flag_model = tmp_path / "flag-home", str(tmp_path / "flag-caption")
    before = dict(os.environ)
    ctx = ui_app.configure(ui_app.parse_args(["--home", str(flag_home), "--caption-model", flag_model,
                                              "--caption-more-models", "m/one,m/two", "--fast"]))
    assert _ours(os.environ) == _ours(before)
    d = Dispatcher(settings=ctx.settings, slots=1, poll=0.05,
                   worker_command=[sys.executable, str(FAKE), "worker-settings"])
    assert d.queue.home == flag_home
    d.queue.add(_job("j1"))
    try:
        deadline = time.monotonic() + 60
        while (job := d.queue.get("j1")).state not in FINAL and time.monotonic() < deadline:
            d.step()
            time.sleep(d.poll)
    finally:
        d.stop(kill_workers=True)
    assert job.state == "succeeded", d.queue.log_tail("j1", lines=50)
    seen = json.loads((flag_home / "runs" / "j1" / "settings.json").read_text())
    assert seen["home"] == str(flag_home.absolute()) and seen["checkpoint"] == flag_model
    assert seen["more"] == ["m/one", "m/two"] and seen["fast"] is True and seen["hf_token"] is False
    assert Path(seen["out"]).parent == flag_home / "adapters"
    assert not env_home.exists()  # nothing of the job went where the environment pointed
    assert os.environ["MMDEMO_CAPTION_MODEL"] == "env/caption"  # the parent's environment is untouched


def test_the_ui_context_holds_the_settings(home):
    settings = Settings(home=home, models={"vqa": "ctx/vqa"}, more_models={"vqa": ("ctx/other",)})
    ctx = UIContext(settings=settings)
    assert ctx.checkpoint("vqa") == "ctx/vqa" and ctx.base_models("vqa").more == ("ctx/other",)
    assert UIContext().settings == get_settings()  # default: the process's, when made
