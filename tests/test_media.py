"""Images and audio: every mode normalised, every bad file refused with one sentence."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, make_tone
from mmdemo.config import Limits
from mmdemo.errors import InputError, LimitError
from mmdemo.media import load_audio, load_image, prepare_audio


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA", "1", "I;16", "I", "F"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    src = Image.new("RGB", (20, 10), (200, 30, 30))
    if mode == "I;16":
        img = Image.fromarray((np.ones((10, 20)) * 40000).astype(np.uint16), mode="I;16")
    else:
        img = src.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_keeps_brightness(tmp_path):
    img = Image.fromarray((np.ones((8, 8)) * 65535).astype(np.uint16), mode="I;16")
    img.save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png").getpixel((0, 0)) == (255, 255, 255)


def test_transparency_goes_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (30, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 30)


def test_bytes_and_pil_inputs(tmp_path):
    path = make_image(tmp_path / "a.png")
    assert load_image(path.read_bytes()).size == (64, 64)
    assert load_image(Image.open(path)).mode == "RGB"


def _sentence(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    good = make_image(tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(bytes(range(256)) * 4)
    Image.new("RGB", (8, 8)).save(tmp_path / "p.ppm")
    cases = {
        "empty.png": "empty",
        "notes.png": "text file",
        "cut.png": "truncated or corrupt",
        "junk.jpg": "not an image format",
        "p.ppm": "not supported",
        "missing.png": "does not exist",
    }
    for name, words in cases.items():
        with pytest.raises(InputError) as exc:
            load_image(tmp_path / name)
        assert words in _sentence(exc.value) and name in str(exc.value)


def test_pixel_limit_stops_decompression_bombs(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")  # compresses to a few KB
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    with pytest.raises(LimitError, match="pixels"):
        load_image(tmp_path / "bomb.png", Limits(max_image_pixels=1_000_000))


def test_image_byte_limit(tmp_path):
    path = make_image(tmp_path / "a.png")
    with pytest.raises(LimitError, match="limit"):
        load_image(path, Limits(max_image_bytes=10))


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_audio_formats_decode_to_mono_at_target_rate(tmp_path, fmt, ext):
    import soundfile as sf

    sr = 22050
    stereo = np.stack([np.sin(np.arange(sr) / 10), np.zeros(sr)], axis=1).astype(np.float32) * 0.3
    sf.write(tmp_path / f"a.{ext}", stereo, sr, format=fmt)
    out = load_audio(tmp_path / f"a.{ext}", 48000)
    assert out.ndim == 1 and out.dtype == np.float32
    assert abs(len(out) - 48000) < 48000 * 0.01


def test_bad_audio(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("hello, I am text\n")
    good = make_tone(tmp_path / "good.wav", seconds=1.0).read_bytes()
    (tmp_path / "garbage.flac").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "clip.aiff2").write_bytes(good)
    cases = {
        "empty.wav": "empty",
        "notes.wav": "text file",
        "garbage.flac": "corrupt",
        "clip.aiff2": "unsupported audio type",
    }
    for name, words in cases.items():
        with pytest.raises(InputError) as exc:
            load_audio(tmp_path / name, 48000)
        assert words in _sentence(exc.value) and name in str(exc.value)


def test_audio_duration_and_size_limits(tmp_path):
    path = make_tone(tmp_path / "long.wav", seconds=3.0)
    with pytest.raises(LimitError, match="lasts 3 s"):
        load_audio(path, 48000, Limits(max_audio_seconds=2))
    with pytest.raises(LimitError, match="limit"):
        load_audio(path, 48000, Limits(max_audio_bytes=100))


def test_microphone_int16_is_scaled_and_resampled():
    samples = (np.sin(np.arange(16000) / 5) * 32767).astype(np.int16)
    out = prepare_audio(samples, 16000, 48000)
    assert out.dtype == np.float32 and abs(len(out) - 48000) <= 1 and 0.9 < np.abs(out).max() < 1.2  # int16 full scale -> about 1.0 (resampler ringing at the edges)
    with pytest.raises(InputError, match="no audio"):
        prepare_audio(np.zeros(0, np.int16), 16000, 48000)


def _cut_wav(path, seconds: float = 2.0, keep_samples: int = 4, sr: int = 16000):
    """A real 16-bit WAV whose header promises ``seconds`` but whose bytes stop after ``keep_samples``."""
    import soundfile as sf

    sf.write(path, (0.3 * np.sin(np.arange(int(sr * seconds)) / 10)).astype(np.float32), sr, subtype="PCM_16")
    data = path.read_bytes()
    header = len(data) - int(sr * seconds) * 2  # 16-bit mono: 2 bytes a sample after the header
    path.write_bytes(data[: header + 2 * keep_samples])
    return path


def test_truncated_wav_is_refused_naming_the_file(tmp_path):
    import soundfile as sf

    path = _cut_wav(tmp_path / "x.wav")
    assert sf.info(str(path)).frames == 4  # libsndfile itself only counts what is there: it does not notice
    with pytest.raises(InputError) as exc:
        load_audio(path, 48000)
    assert _sentence(exc.value) == ("x.wav is cut short: its header promises 2.0 s but it holds 0.0003 s; "
                                    "export it again.")
    half = _cut_wav(tmp_path / "half.wav", keep_samples=16000)
    with pytest.raises(InputError, match=r"half.wav is cut short: its header promises 2.0 s but it holds 1.0 s"):
        load_audio(half, 48000)


def test_truncated_mp3_is_refused(tmp_path):
    """Formats without a byte count: decoding stops short of the frames the header announced."""
    import soundfile as sf

    sr = 16000
    sf.write(tmp_path / "full.mp3", (0.1 * np.random.default_rng(0).standard_normal(2 * sr)).astype(np.float32),
             sr, format="MP3")
    data = (tmp_path / "full.mp3").read_bytes()
    (tmp_path / "cut.mp3").write_bytes(data[: len(data) // 2])
    assert load_audio(tmp_path / "full.mp3", sr).size == 2 * sr
    with pytest.raises(InputError, match=r"cut.mp3 is cut short: its header promises 2.0 s"):
        load_audio(tmp_path / "cut.mp3", sr)


def test_wav_with_a_streaming_placeholder_size_still_loads(tmp_path):
    """A WAV written to a pipe has 0xFFFFFFFF as its data size: not a cut file."""
    path = make_tone(tmp_path / "piped.wav", seconds=0.5)
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert abs(len(load_audio(path, 16000)) - 8000) <= 1


def test_too_short_clips_are_refused_with_the_minimum(tmp_path, monkeypatch):
    short = make_tone(tmp_path / "blip.wav", seconds=0.05)
    with pytest.raises(LimitError) as exc:
        load_audio(short, 48000)
    assert _sentence(exc.value) == "blip.wav lasts only 0.05 s, shorter than the 0.1 s minimum; use a longer clip."
    with pytest.raises(LimitError, match="shorter than the 0.01 s minimum"):
        prepare_audio(np.ones(80, np.float32), 16000, 48000, label="the recording", limits=Limits(min_audio_seconds=0.01))
    assert load_audio(short, 48000, Limits(min_audio_seconds=0.01)).size == 2400
    monkeypatch.setenv("MMDEMO_MIN_AUDIO_SECONDS", "0.02")
    assert Limits.from_env().min_audio_seconds == 0.02
    monkeypatch.setenv("MMDEMO_MIN_AUDIO_SECONDS", "-1")
    with pytest.raises(InputError, match="MMDEMO_MIN_AUDIO_SECONDS must be zero or more"):
        Limits.from_env()


def test_a_normal_clip_still_loads(tmp_path):
    out = load_audio(make_tone(tmp_path / "ok.wav", seconds=1.0), 48000)
    assert out.dtype == np.float32 and abs(len(out) - 48000) <= 1


def test_audio_library_reports_cut_and_short_clips_as_failed(tiny_models, tmp_path):
    """The Audio search library goes through the same loader: bad clips are listed by name, good ones kept."""
    from mmdemo.models.retrieval import AudioIndex, embedder

    emb = embedder(tiny_models["retrieval"])
    good = make_tone(tmp_path / "good.wav")
    cut = _cut_wav(tmp_path / "x.wav")
    short = make_tone(tmp_path / "blip.wav", seconds=0.05)
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, dim=32)
    report = index.add_files([good, cut, short], emb)
    assert [c.name for c in report.added] == ["good.wav"]
    failed = {p.rsplit("/", 1)[1]: sentence for p, sentence in report.failed}
    assert set(failed) == {"x.wav", "blip.wav"}
    assert failed["x.wav"].startswith("x.wav is cut short") and "0.1 s minimum" in failed["blip.wav"]
