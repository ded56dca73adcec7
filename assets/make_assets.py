"""Make the example images and sounds bundled in assets/ (no downloaded media).

    python assets/make_assets.py        # rewrites assets/images/*.png and assets/sounds/*.wav

Images are drawn with Pillow; sounds are synthesized with NumPy (tones, sweeps, filtered noise) and
written as 16 kHz mono 16-bit WAV; ``speech.wav`` is spoken by espeak-ng when it is installed
(``apt-get install espeak-ng``) and skipped otherwise. Output is deterministic (fixed seeds).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SR = 16000
SIZE = 256


# ---------------------------------------------------------------------------------------------- images
def _canvas(bg="white"):
    img = Image.new("RGB", (SIZE, SIZE), bg)
    return img, ImageDraw.Draw(img)


def red_circle():
    img, d = _canvas()
    d.ellipse((58, 58, 198, 198), fill="red")
    return img


def shapes():
    img, d = _canvas()
    d.rectangle((20, 30, 110, 120), fill="blue")
    d.polygon([(190, 30), (140, 120), (240, 120)], fill="yellow", outline="black")
    d.ellipse((90, 150, 170, 230), fill="green")
    return img


def house_scene():
    img, d = _canvas("#87ceeb")
    d.rectangle((0, 190, SIZE, SIZE), fill="#4caf50")  # grass
    d.ellipse((190, 20, 240, 70), fill="yellow")  # sun
    d.rectangle((50, 120, 150, 200), fill="#c0392b")  # house
    d.polygon([(40, 120), (100, 70), (160, 120)], fill="#6d4c41")  # roof
    d.rectangle((88, 160, 112, 200), fill="#5d4037")  # door
    d.rectangle((185, 130, 197, 200), fill="#795548")  # trunk
    d.ellipse((160, 90, 222, 150), fill="#2e7d32")  # tree
    return img


def night_sea():
    img, d = _canvas("#0b1a3a")
    d.rectangle((0, 160, SIZE, SIZE), fill="#1565c0")
    d.ellipse((170, 30, 220, 80), fill="white")  # moon
    rng = np.random.default_rng(1)
    for x, y in rng.integers(5, 150, size=(25, 2)):
        d.point((int(x) + 40, int(y) // 1), fill="white")
    d.polygon([(60, 170), (140, 170), (120, 195), (80, 195)], fill="#8d6e63")  # boat
    d.line((100, 170, 100, 110), fill="white", width=3)
    d.polygon([(102, 112), (102, 165), (140, 165)], fill="white")  # sail
    return img


def stripes():
    img, d = _canvas()
    for i, color in enumerate(["red", "orange", "yellow", "green", "blue", "purple"]):
        d.rectangle((0, i * SIZE // 6, SIZE, (i + 1) * SIZE // 6), fill=color)
    return img


def star():
    img, d = _canvas("black")
    cx, cy, r1, r2 = SIZE / 2, SIZE / 2, 110, 45
    pts = []
    for k in range(10):
        r = r1 if k % 2 == 0 else r2
        a = np.pi / 2 + k * np.pi / 5
        pts.append((cx + r * np.cos(a), cy - r * np.sin(a)))
    d.polygon(pts, fill="gold")
    return img


IMAGES = {"red_circle": red_circle, "shapes": shapes, "house_scene": house_scene, "night_sea": night_sea,
          "stripes": stripes, "star": star}


# ---------------------------------------------------------------------------------------------- sounds
def _t(seconds):
    return np.arange(int(SR * seconds)) / SR


def _env(n, attack=0.01, release=0.05):
    a, r = int(attack * SR), int(release * SR)
    e = np.ones(n)
    e[:a] = np.linspace(0, 1, a)
    e[n - r:] = np.linspace(1, 0, r)
    return e


def beep():  # three 1 kHz beeps
    t = _t(0.2)
    b = np.sin(2 * np.pi * 1000 * t) * _env(len(t))
    gap = np.zeros(int(0.15 * SR))
    return 0.4 * np.concatenate([b, gap, b, gap, b, gap])


def siren():  # a tone swinging between 600 and 1200 Hz twice a second
    t = _t(2.5)
    freq = 900 + 300 * np.sin(2 * np.pi * 0.8 * t)
    return 0.35 * np.sin(2 * np.pi * np.cumsum(freq) / SR) * _env(len(t))


def rain():  # low-passed noise with random drops
    rng = np.random.default_rng(0)
    n = int(2.5 * SR)
    noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    drops = (rng.random(n) < 0.002) * rng.random(n)
    drops = np.convolve(drops, np.exp(-np.arange(200) / 30), mode="same")
    return 0.25 * noise + 0.5 * drops


def chirp():  # a rising sweep from 200 Hz to 4 kHz
    t = _t(1.5)
    f0, f1 = 200, 4000
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
    return 0.35 * np.sin(phase) * _env(len(t))


def chord():  # C major: 262, 330, 392 Hz with a slow decay
    t = _t(2.0)
    wave = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) / 3
    return 0.5 * wave * np.exp(-t * 1.2) * _env(len(t))


def drum():  # four low thumps: decaying 60 Hz sine with a noise click
    rng = np.random.default_rng(2)
    t = _t(0.5)
    hit = np.sin(2 * np.pi * 60 * t * (1 + np.exp(-t * 30))) * np.exp(-t * 8)
    hit[:200] += 0.3 * rng.standard_normal(200)
    return 0.6 * np.tile(hit, 4)


def bird():  # quick high down-chirps, like a small bird
    t = _t(0.12)
    phase = 2 * np.pi * (4200 * t - 8000 * t**2)
    call = np.sin(phase) * np.hanning(len(t))
    gap = np.zeros(int(0.08 * SR))
    return 0.35 * np.concatenate([call, gap, call, gap, call, np.zeros(int(0.4 * SR)), call, gap, call])


def bell():  # inharmonic partials with a long decay
    t = _t(2.0)
    partials = [(523, 1.0), (1046 * 1.01, 0.5), (1568 * 1.02, 0.3), (2600, 0.2)]
    wave = sum(a * np.sin(2 * np.pi * f * t) * np.exp(-t * (1.5 + f / 1000)) for f, a in partials)
    return 0.3 * wave * _env(len(t), 0.002, 0.05)


SOUNDS = {"beep": beep, "siren": siren, "rain": rain, "chirp": chirp, "chord": chord, "drum": drum,
          "bird": bird, "bell": bell}
SPEECH = "Hello. This is a test of the audio search demo."


def speech(out: Path) -> bool:
    exe = shutil.which("espeak-ng")
    if not exe:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH], check=True)
        wave, sr = sf.read(raw, dtype="float32")
    import librosa

    wave = librosa.resample(wave, orig_sr=sr, target_sr=SR)
    sf.write(out, wave, SR, subtype="PCM_16")
    return True


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    (HERE / "sounds").mkdir(exist_ok=True)
    for name, draw in IMAGES.items():
        draw().save(HERE / "images" / f"{name}.png", optimize=True)
    for name, make in SOUNDS.items():
        wave = np.clip(make(), -1, 1).astype(np.float32)
        sf.write(HERE / "sounds" / f"{name}.wav", wave, SR, subtype="PCM_16")
    if not speech(HERE / "sounds" / "speech.wav"):
        print("espeak-ng is not installed: speech.wav was not made")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"assets: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
