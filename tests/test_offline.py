"""Without the Hub: a Hub id that is not cached fails in seconds with a sentence saying what to do.

The Hub is "down" here the way it is on a machine without internet, not through ``HF_HUB_OFFLINE``:
the variable is unset and ``HF_ENDPOINT`` points at a closed local port, so every request is refused.
huggingface_hub reads both variables (and the cache folder) once at import, so the tests patch its
constants as well as the environment. Nothing here reaches the network.
"""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_image
from mmdemo.errors import ModelLoadError
from mmdemo.models import hub, loading

UNCACHED = "mmdemo-tests/not-cached-blip"  # a Hub id that no cache here holds
CACHED = "mmdemo-tests/cached-blip"  # filled from the tiny caption checkpoint by ``hf_cache_with``


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point_hub_at(monkeypatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    hub.forget_probe()


@pytest.fixture
def no_hub(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE unset, the Hub on a closed port, an empty Hugging Face cache; returns the cache folder."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{_free_port()}")  # nothing listens there once the socket closed
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    loading.forget_failures()
    yield cache
    loading.forget_failures()
    hub.forget_probe()


def hf_cache_with(cache: Path, repo_id: str, folder: str) -> Path:
    """Put a checkpoint folder into the cache as the Hub's ``main`` revision of ``repo_id`` (what a download leaves)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_uncached_hub_id_fails_fast_and_says_what_to_do(no_hub):
    from mmdemo.ui import gpu

    start = time.monotonic()
    with pytest.raises(ModelLoadError) as first:
        loading.load("caption", UNCACHED)
    assert time.monotonic() - start < 5  # one refused probe instead of ~25 s of retries
    sentence = str(first.value)
    for words in (UNCACHED, "--tiny-models", "python -m mmdemo download", "MMDEMO_CAPTION_MODEL", "cache"):
        assert words in sentence, sentence
    assert "\n" not in sentence and sentence.endswith(".")

    # Every later click gets the same sentence at once, from the model layer and from the UI's entry point.
    for again in (lambda: loading.load("caption", UNCACHED), lambda: gpu.loaded("caption", UNCACHED)):
        start = time.monotonic()
        with pytest.raises(ModelLoadError) as later:
            again()
        assert time.monotonic() - start < 0.5
        assert str(later.value) == sentence


def test_failures_are_forgotten_after_a_while_or_when_the_hub_is_back(no_hub, monkeypatch):
    with pytest.raises(ModelLoadError):
        loading.load("vqa", UNCACHED)
    assert loading.recent_failure("vqa", UNCACHED) is not None
    assert loading.recent_failure("caption", UNCACHED) is None  # remembered per task and checkpoint

    monkeypatch.setattr(hub, "_probe", lambda timeout: True)  # the Hub answers again
    hub.forget_probe()
    assert hub.reachable()
    assert loading.recent_failure("vqa", UNCACHED) is None

    monkeypatch.setattr(hub, "_probe", lambda timeout: False)
    hub.forget_probe()
    with pytest.raises(ModelLoadError):
        loading.load("vqa", UNCACHED)
    monkeypatch.setattr(loading, "FAILURE_TTL", 0.0)
    time.sleep(0.01)
    assert loading.recent_failure("vqa", UNCACHED) is None


def test_probe_is_shared_for_a_while_and_skipped_offline(no_hub, monkeypatch):
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(hub, "_probe", lambda timeout: calls.append(timeout) or False)
    assert [hub.reachable() for _ in range(5)] == [False] * 5
    assert len(calls) == 1

    monkeypatch.setattr(hub, "PROBE_TTL", 0.0)
    hub.reachable()
    assert len(calls) == 2  # an old answer is asked again, so a Hub that comes back is noticed

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.reachable() is False and hub.known_reachable() is False
    assert len(calls) == 2  # HF_HUB_OFFLINE=1: never ask


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_real_probe_against_a_closed_port_and_a_server(no_hub, monkeypatch):
    start = time.monotonic()
    assert hub.reachable() is False
    assert time.monotonic() - start < hub.PROBE_TIMEOUT + 0.5

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        assert hub.reachable() is True
    finally:
        server.shutdown()
        server.server_close()


def test_cached_hub_id_loads_without_the_hub(no_hub, tiny_models):
    hf_cache_with(no_hub, CACHED, tiny_models["caption"])
    assert hub.is_cached(CACHED) and not hub.is_cached(UNCACHED)
    assert loading.hub_options("caption", CACHED) == {"local_files_only": True}
    start = time.monotonic()
    loaded = loading.load("caption", CACHED)
    assert time.monotonic() - start < 10  # no retries: transformers alone would back off ~25 s per file
    assert type(loaded.model).__name__ == "BlipForConditionalGeneration"


def test_partly_cached_hub_id_fails_fast(no_hub, tiny_models, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):  # no tokenizer or processor files
        shutil.copy(Path(tiny_models["caption"]) / name, partial / name)
    hf_cache_with(no_hub, CACHED + "-partial", str(partial))
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="only partly in the local Hugging Face cache.*--tiny-models"):
        loading.load("caption", CACHED + "-partial")
    assert time.monotonic() - start < 10


def test_local_tiny_checkpoint_loads_without_asking_the_hub(no_hub, tiny_models, monkeypatch):
    def probe(timeout):
        raise AssertionError("a local folder must not probe the Hub")

    monkeypatch.setattr(hub, "_probe", probe)
    loaded = loading.load("vqa", tiny_models["vqa"])
    assert loaded.checkpoint == tiny_models["vqa"]


def test_quiet_restores_logger_levels_when_nested():
    logger = logging.getLogger("huggingface_hub")
    before = logger.level
    with hub.quiet():
        with hub.quiet():
            assert logger.level == logging.ERROR
        assert logger.level == logging.ERROR  # the outer load is still running
    assert logger.level == before


def test_status_has_one_line_per_model_on_the_page_and_in_the_terminal(no_hub, tiny_models, capsys):
    from mmdemo.ui.status import ModelStatus

    status = ModelStatus()
    checkpoints = {"caption": tiny_models["caption"], "vqa": UNCACHED, "retrieval": UNCACHED + "-clap"}
    assert status.markdown(checkpoints) == ""
    status.warm_up(checkpoints).join(timeout=60)
    assert status.done()

    page = status.markdown(checkpoints)
    items = [line for line in page.splitlines() if line.startswith("- ")]
    assert len(items) == 3, page
    assert items[0] == "- Caption (blip-caption): ready"
    assert items[1].startswith("- Visual QA (not-cached-blip): **could not load** — Checkpoint")
    assert items[2].startswith("- Audio search (not-cached-blip-clap): **could not load** — Checkpoint")
    assert all("--tiny-models" in item for item in items[1:])

    terminal = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmdemo: ")]
    assert len(terminal) == 3, terminal
    assert terminal[0].startswith("mmdemo: Caption (blip-caption): ready")
    assert "could not load" in terminal[1] and "could not load" in terminal[2]


@pytest.mark.slow
def test_app_reports_every_model_failed_within_seconds(tmp_path):
    """``python app.py`` on a machine without the Hub and without a cache: four short lines, then a served page."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and not k.startswith("MMDEMO_")}
    env.update(MMDEMO_HOME=str(tmp_path / "home"), MMDEMO_DEVICE="cpu", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}",
               GRADIO_SERVER_PORT=str(_free_port()), GRADIO_ANALYTICS_ENABLED="False")
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        failed: list[str] = []
        while len(failed) < 4:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - start < 30, log_path.read_text()[-3000:]  # ~100 s before this change
            time.sleep(0.2)
            failed = [ln for ln in log_path.read_text().splitlines() if "could not load" in ln]
        took = time.monotonic() - start
        time.sleep(1.0)  # anything a late retry would add
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = "\n".join(lines)
    print(f"app.py reported four failed models after {took:.1f} s:\n{text}")
    assert [ln.split(":")[1].strip() for ln in failed] == ["Caption (blip-image-captioning-base)",
                                                          "Visual QA (blip-vqa-base)",
                                                          "Audio search (clap-htsat-unfused)",
                                                          "Image search (siglip-base-patch16-224)"]
    assert all("--tiny-models" in ln and "python -m mmdemo download" in ln for ln in failed)
    assert "Retrying" not in text and "Traceback" not in text
    assert len(lines) <= 9, text


def test_cli_sentence_for_an_unreachable_hub(no_hub, tmp_path):
    """The CLI shows the same fail-fast sentence (``python -m mmdemo caption`` exits 2 with it)."""
    from conftest import run_cli

    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": os.environ["HF_ENDPOINT"], "HF_HOME": os.environ["HF_HOME"],
           "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"]}
    start = time.monotonic()
    proc = run_cli("caption", str(make_image(tmp_path / "a.png")), "--model", UNCACHED, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 60
    assert "--tiny-models" in proc.stderr and "Retrying" not in proc.stderr
