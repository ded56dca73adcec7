"""Shared fixtures: tiny checkpoints built once per session, media made on the fly, an isolated MMDEMO_HOME.

No test touches the network: HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMDEMO_DEVICE", "cpu")
# Every process this test session starts (apps, job workers, Ray nodes) inherits this mark; the clean-up fixtures
# touch only processes that carry it, so two test runs on one machine never kill each other's workers.
TEST_RUN_VAR = "MMDEMO_TEST_RUN"
TEST_RUN = os.environ[TEST_RUN_VAR] = f"{os.getpid()}-{time.time_ns()}"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The project's tiny checkpoints, written through the CLI once per test session."""
    out = tmp_path_factory.mktemp("tiny-models")
    from mmdemo.models.tiny import write_tiny_models

    write_tiny_models(out)
    return out


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the CI machine has 2 shared cores, and tiny models gain nothing from more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tiny_dir) -> dict[str, str]:
    """task -> tiny checkpoint folder. The tabs' other base models are the other tiny families, as under
    ``python app.py --tiny-models`` (``MMDEMO_<TASK>_MORE_MODELS``, set for the session)."""
    from mmdemo.models.registry import TASKS
    from mmdemo.models.tiny import TINY_FOR_TASK, tiny_more_for_task

    for task, names in tiny_more_for_task().items():
        os.environ[TASKS[task].more_env_var] = ",".join(str(tiny_dir / name) for name in names)
    return {task: str(tiny_dir / name) for task, name in TINY_FOR_TASK.items()}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty MMDEMO_HOME for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("MMDEMO_HOME", str(h))
    return h


def make_image(path: Path, color: str = "red", shape: str = "circle", size: int = 64, mode: str = "RGB") -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, size // 5), (size // 5, size * 4 // 5), (size * 4 // 5, size * 4 // 5)], fill=color)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_tone(path: Path, freq: float = 440.0, seconds: float = 1.0, sr: int = 16000, kind: str = "sine",
              fmt: str | None = None) -> Path:
    import soundfile as sf

    t = np.arange(int(sr * seconds)) / sr
    if kind == "sine":
        wave = 0.3 * np.sin(2 * np.pi * freq * t)
    elif kind == "noise":
        wave = 0.2 * np.random.default_rng(int(freq)).standard_normal(len(t))
    elif kind == "chirp":
        wave = 0.3 * np.sin(2 * np.pi * (freq + 2000 * t / seconds) * t)
    else:  # pulses
        wave = 0.3 * np.sin(2 * np.pi * freq * t) * (np.sin(2 * np.pi * 4 * t) > 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.astype(np.float32), sr, format=fmt)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m mmdemo ARGS`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmdemo", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def run_cli_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same command through ``mmdemo.cli.main`` in this process: its exit status, stdout and stderr, without a
    new interpreter's 10-20 s of importing torch and transformers on a 2-core machine (a checkpoint loaded once
    serves the later calls). What only a real process shows (no traceback, the exit status of an uncaught
    error) is checked through :func:`run_cli`."""
    import io
    from unittest import mock

    from mmdemo import cli

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(["mmdemo", *args], code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------ fine-tuning datasets (tests/test_finetune*.py)
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def make_shapes_dataset(root: Path, task: str = "caption", per_class: int = 4, seed: int = 0) -> Path:
    """A learnable image dataset: coloured shapes with captions, or questions about colour and shape.

    12 classes (4 colours x 3 shapes); sizes and positions jitter so that no two images are the same.
    """
    import csv

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for color in COLORS:
        for shape in SHAPES:
            for k in range(per_class):
                name = f"{color}_{shape}_{k}.png"
                img = Image.new("RGB", (32, 32), "white")
                draw = ImageDraw.Draw(img)
                s = int(rng.integers(16, 26))
                x, y = (int(v) for v in rng.integers(0, 32 - s, size=2))
                box = (x, y, x + s, y + s)
                if shape == "circle":
                    draw.ellipse(box, fill=color)
                elif shape == "square":
                    draw.rectangle(box, fill=color)
                else:
                    draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
                img.save(root / name)
                if task == "vqa":
                    rows.append({"file_name": name, "question": "what color is it?", "answer": color})
                    rows.append({"file_name": name, "question": "what shape is it?", "answer": shape})
                else:
                    rows.append({"file_name": name, "text": f"a picture of a {color} {shape}"})
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


SOUNDS = (  # (kind, frequency, description): clearly different sounds, described in the tiny vocabulary
    ("sine", 220.0, "a low tone"),
    ("sine", 1760.0, "a high tone"),
    ("noise", 1.0, "loud noise"),
    ("chirp", 300.0, "a rising sweep"),
    ("pulse", 660.0, "short beep pulses"),
    ("sine", 660.0, "a soft hum"),
)


def make_sounds_dataset(root: Path, per_class: int = 4, seconds: float = 1.0, start: int = 0) -> Path:
    """A learnable audio dataset: six kinds of synthetic sound, each with its description."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (kind, freq, text) in enumerate(SOUNDS):
        for k in range(start, start + per_class):
            name = f"s{c}_{k}.wav"
            make_tone(root / name, freq=freq * (1 + 0.03 * k) if kind != "noise" else freq + k, seconds=seconds,
                      sr=16000, kind=kind)
            rows.append({"file_name": name, "text": text})
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return root


# ------------------------------------------------------------------------------------- the app, served in-process
def wait_for(predicate, timeout: float = 120.0, poll: float = 0.2):
    """``predicate()``'s first true value, asked every ``poll`` seconds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(tiny_models: dict[str, str], home: Path, max_batch_size: int = 16):
    """The app on the tiny checkpoints on a free port, with ``MMDEMO_HOME`` = ``home``; yields its URL."""
    from mmdemo.ui import app as ui_app
    from mmdemo.ui.context import UIContext

    old = os.environ.get("MMDEMO_HOME")
    os.environ["MMDEMO_HOME"] = str(home)
    demo = ui_app.build_app(UIContext(checkpoints=tiny_models, tiny=True, max_batch_size=max_batch_size),
                            warm_up=False)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **ui_app.launch_kwargs(port))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        if old is None:
            os.environ.pop("MMDEMO_HOME", None)
        else:
            os.environ["MMDEMO_HOME"] = old


LORA_MODEL_CLASS = {"caption": "BlipForConditionalGeneration", "vqa": "BlipForQuestionAnswering",
                    "retrieval": "ClapModel"}


def make_lora(checkpoint: str, task: str, folder: Path, owner: str | None = None, seed: int = 0,
              published: bool = False) -> Path:
    """A random (non-zero) LoRA for a tiny checkpoint, saved as the Fine-tune tab saves adapters."""
    import json

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = getattr(transformers, LORA_MODEL_CLASS[task]).from_pretrained(checkpoint)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["query", "value"],
                                           init_lora_weights=False))
    peft.save_pretrained(folder)
    (folder / "mmdemo.json").write_text(json.dumps({"task": task, "owner": owner, "published": published}))
    return folder


@contextlib.contextmanager
def start_app(home: Path, port: int | None = None, args: tuple[str, ...] = ("--tiny-models",),
              env: dict | None = None, timeout: float = 120, log_dir: Path | None = None):
    """``python app.py ARGS`` in a subprocess with ``MMDEMO_HOME`` = ``home``; yields its URL.

    Its output goes to ``app-PORT.log`` in ``log_dir`` (default: beside ``home``, which may be unwritable).
    """
    import time
    import urllib.request

    port = port or free_port()
    full_env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "MMDEMO_HOME": str(home), "HF_HUB_OFFLINE": "1",
                "MMDEMO_DEVICE": "cpu", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    log_path = (log_dir or home.parent) / f"app-{port}.log"
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=full_env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"app.py did not answer in {timeout:.0f} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        try:
            yield url
        except BaseException:  # the test failed while the app ran: its log tail goes into pytest's report
            log.flush()
            print(f"--- the end of {log_path.name} ---\n{log_path.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
            raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def started_by_this_run(pid: int | str) -> bool:
    """Whether process ``pid`` was started by this test session (it carries ``TEST_RUN`` in its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TEST_RUN_VAR}={TEST_RUN}".encode() in environ.split(b"\0")


def _orphaned_job_workers() -> set[int]:
    """The pids of this test session's ``python -m mmdemo.jobs.worker`` processes whose app has gone (a worker
    outlives its app by design: a restarted app takes it over). Another session's workers are never listed."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"mmdemo.jobs.worker" not in (entry / "cmdline").read_bytes():
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes() if ppid > 1 else b""
        except (OSError, ValueError, IndexError):
            continue
        if not started_by_this_run(entry.name):
            continue
        if ppid != os.getpid() and b"app.py" not in parent and b"mmdemo" not in parent:
            pids.add(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def _no_orphaned_workers():
    """A training worker left behind by an app a test stopped ends with that test, so that it does not take the
    2 cores from the tests after it. Workers of apps still running (module-scoped apps) are left alone."""
    linux = sys.platform.startswith("linux")
    before = _orphaned_job_workers() if linux else set()
    yield
    if not linux:
        return
    for pid in _orphaned_job_workers() - before:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:  # the dispatcher's workers lead their own session
                os.killpg(pid, 9)
            else:
                os.kill(pid, 9)


@pytest.fixture(scope="session")
def sensitive(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The tiny BLIP checkpoints with their matrices redrawn at std 0.1.

    At the tiny models' 0.02 init every image gets nearly the same caption, so agreement would prove
    little; at 0.1 the outputs depend on the image and the question (tests/test_parity.py asserts it).
    """
    import shutil

    import torch
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    out = {}
    for task, cls in (("caption", BlipForConditionalGeneration), ("vqa", BlipForQuestionAnswering)):
        folder = tmp_path_factory.mktemp("sensitive") / task
        shutil.copytree(tiny_models[task], folder)
        model = cls.from_pretrained(folder)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
        model.save_pretrained(folder)
        out[task] = str(folder)
    return out


@pytest.fixture
def onednn_for_tiny(monkeypatch):
    """The tiny checkpoints' matrices through oneDNN too (the app keeps torch's kernel for such small ones)."""
    from mmdemo.models import kernels

    monkeypatch.setattr(kernels, "ONEDNN_MIN_WEIGHT", 0)


@pytest.fixture
def small_rows_calls(monkeypatch) -> list[int]:
    """The row count of every product handed to the compiled small-rows kernel (mmdemo.models.kernels), which
    still computes them."""
    from mmdemo.models import kernels

    calls: list[int] = []
    real = kernels.small_rows_linear

    def spy(x, weight, bias):
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(kernels, "small_rows_linear", spy)
    return calls


@pytest.fixture
def archive(tmp_path):
    """A zipped caption dataset of one picture per class."""
    import shutil

    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    return shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data)


def run_next_job() -> str:
    """Run the next queued job to its end in this process, as a worker would; returns its final state."""
    from mmdemo.jobs.queue import get_queue
    from mmdemo.jobs.worker import run_job

    job = get_queue().claim(1)
    assert job is not None
    return run_job(job.id)


# ------------------------------------------------------------------- a throwaway PostgreSQL server (the jobs queue)
def postgres_bindir() -> Path | None:
    """Where Debian's PostgreSQL server programs are (``initdb``, ``pg_ctl``): on the PATH or the newest
    ``/usr/lib/postgresql/<version>/bin``; ``None`` where none is installed."""
    import shutil

    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parent.parent.name.isdigit()]
    return max(versions, key=lambda p: int(p.parent.name), default=None)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own for the session, on a free local port, its files in a temporary folder;
    yields the URL of its ``postgres`` database (trust login as ``postgres``) and is stopped at the end.

    As root it runs as the ``postgres`` user (PostgreSQL refuses to run as root). Skipped only where no server
    programs are installed at all; ``scripts/test.sh`` installs Debian's ``postgresql`` package where it can,
    so CI runs these tests.
    """
    import shutil
    import tempfile

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) here: install Debian's postgresql package "
                    "(scripts/test.sh does, as root)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="mmdemo-pg-"))  # not under pytest's root-only tmp folders
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def run(*args: str) -> None:
        out = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log = (folder / "log.txt").read_text() if (folder / "log.txt").is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {out.stdout}{out.stderr}{log}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
        "--no-sync")
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
               f"-c full_page_writes=off -c max_connections=200")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log.txt"), "-w", "-t", "60", "-o", options,
        "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
