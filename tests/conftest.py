"""Shared fixtures: tiny checkpoints built once per session, media made on the fly, an isolated MMDEMO_HOME.

No test touches the network: HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMDEMO_DEVICE", "cpu")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The project's tiny checkpoints, written through the CLI once per test session."""
    out = tmp_path_factory.mktemp("tiny-models")
    from mmdemo.models.tiny import write_tiny_models

    write_tiny_models(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dir) -> dict[str, str]:
    """task -> tiny checkpoint folder."""
    from mmdemo.models.tiny import TINY_FOR_TASK

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
