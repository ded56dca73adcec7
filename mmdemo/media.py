"""Decoding and checking images and audio: every bad file becomes one plain sentence (``InputError``).

Images come out as RGB ``PIL.Image`` with EXIF orientation applied; audio as mono float32 NumPy at the
sample rate the model wants. Limits (bytes, pixels, seconds) are checked before full decoding where the
header allows it, so a decompression bomb or a two-hour recording costs nothing. Audio cut short (an upload
or copy that stopped early) is refused: libsndfile quietly reports only the samples a WAV still holds, so
its header's data size is compared with the bytes that are there, and every decode with the count promised.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmdemo.config import Limits
from mmdemo.errors import InputError, LimitError

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".mp3"}

ImageSource = str | Path | bytes | Image.Image
EXIF_ORIENTATION = 0x0112
DECODED_BYTES = 128 * 1024 * 1024  # decoded images kept by decoded_image, in RGB bytes
DECODED_SECONDS = 300.0  # ... and for how long (a request's check and its run come seconds apart)


def _mb(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _seconds(x: float) -> str:
    """2.0, 0.25, 0.0003: one decimal, or one significant digit for the tiny durations of a cut-off file."""
    return f"{x:.1f}" if x >= 0.1 else f"{x:.1g}"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _check_file(path: Path, kind: str, max_bytes: int) -> None:
    if not path.exists():
        raise InputError(f"{path.name}: the file does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"{path.name}: this is a folder, not a {kind} file.")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name} is empty (0 bytes); upload the {kind} again.")
    if size > max_bytes:
        raise LimitError(
            f"{path.name} is {_mb(size)}, over the {_mb(max_bytes)} limit for {kind} files; "
            f"use a smaller file."
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        lo = 0.0 if img.mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image(src: ImageSource, limits: Limits | None = None, name: str | None = None) -> Image.Image:
    """Open, check and normalise one image. Raises ``InputError`` with a sentence naming the file."""
    limits = limits or Limits()
    if isinstance(src, Image.Image):
        label = name or "the image"
        img = src
    else:
        if isinstance(src, bytes):
            data = src
            label = name or "the uploaded image"
            if not data:
                raise InputError(f"{label} is empty (0 bytes); upload the image again.")
            if len(data) > limits.max_image_bytes:
                raise LimitError(f"{label} is {_mb(len(data))}, over the {_mb(limits.max_image_bytes)} limit.")
        else:
            path = Path(src)
            label = name or path.name
            _check_file(path, "image", limits.max_image_bytes)
            data = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise LimitError(f"{label} has too many pixels to decode safely; use a smaller image.") from None
        except UnidentifiedImageError:
            if _looks_like_text(data[:512]):
                raise InputError(f"{label} is a text file, not an image; upload a JPEG, PNG or WebP.") from None
            raise InputError(
                f"{label} is not an image format that can be read (supported: JPEG, PNG, WebP, BMP, GIF, "
                f"TIFF); convert it or upload another file."
            ) from None
        if img.format not in IMAGE_FORMATS:
            raise InputError(f"{label} is a {img.format} image, which is not supported; convert it to PNG or JPEG.")
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise LimitError(
            f"{label} is {w}x{h} pixels, over the limit of {limits.max_image_pixels:,} pixels; "
            f"resize it and try again."
        )
    if w == 0 or h == 0:
        raise InputError(f"{label} has no pixels; upload another image.")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else exif_transpose would only copy the pixels
            img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{label} is truncated or corrupt and cannot be decoded ({err}); upload it again.") from None


class _DecodedImages:
    """The last images :func:`decoded_image` decoded, by file identity (path, size, modification time)."""

    def __init__(self, max_bytes: int, seconds: float):
        self.max_bytes, self.seconds = max_bytes, seconds
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, tuple[float, Image.Image]] = OrderedDict()

    def get(self, key: tuple) -> Image.Image | None:
        with self._lock:
            self._expire()
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[1]

    def put(self, key: tuple, img: Image.Image) -> None:
        size = img.width * img.height * 3
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (time.monotonic(), img)
            self._expire()
            while sum(i.width * i.height * 3 for _, i in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (when, _) in self._items.items() if now - when > self.seconds]:
            del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


DECODED = _DecodedImages(DECODED_BYTES, DECODED_SECONDS)


def decoded_image(path: str | Path, limits: Limits | None = None) -> Image.Image:
    """:func:`load_image` for a file, remembered for a few minutes: a request's check and its run decode it once.

    Keyed by the file's path, size and modification time (a changed file is decoded again) and the limits.
    The same ``Image`` is returned to every caller: treat it as read-only (Pillow's operations return new
    images). A file that fails is not remembered; each attempt says why.
    """
    limits = limits or Limits()
    file = Path(path)
    try:
        st = file.stat()
    except OSError:
        return load_image(file, limits)  # says what is wrong with it
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns, limits)
    img = DECODED.get(key)
    if img is None:
        img = load_image(file, limits)
        DECODED.put(key, img)
    return img


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | Path, limits: Limits | None = None) -> AudioInfo:
    """Check an audio file's size, format and duration from its header, without decoding it."""
    import soundfile as sf

    limits = limits or Limits()
    path = Path(path)
    _check_file(path, "audio", limits.max_audio_bytes)
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        raise InputError(
            f"{path.name} has an unsupported audio type ({path.suffix or 'no extension'}); "
            f"use WAV, FLAC, OGG or MP3."
        )
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        with path.open("rb") as fh:
            head = fh.read(512)
        if _looks_like_text(head):
            raise InputError(f"{path.name} is a text file, not audio; upload a WAV, FLAC, OGG or MP3 file.") from None
        raise InputError(f"{path.name} is corrupt or not really {path.suffix} audio; export it again.") from None
    result = AudioInfo(sample_rate=int(info.samplerate), frames=int(info.frames), channels=int(info.channels))
    promised = _wav_promised_seconds(path)
    if promised is not None and result.sample_rate > 0:
        raise _cut_short(path.name, promised, result.duration)
    if result.frames <= 0 or result.sample_rate <= 0:
        raise InputError(f"{path.name} contains no audio samples; upload a recording that is not empty.")
    if result.duration > limits.max_audio_seconds:
        raise LimitError(
            f"{path.name} lasts {result.duration:.0f} s, over the {limits.max_audio_seconds:.0f} s limit; "
            f"trim it and try again."
        )
    _check_min_duration(path.name, result.duration, limits)
    return result


def _cut_short(label: str, promised: float, held: float) -> InputError:
    holds = f"{_seconds(held)} s" if held > 0 else "no samples"
    return InputError(f"{label} is cut short: its header promises {_seconds(promised)} s but it holds {holds}; "
                      f"export it again.")


def _check_min_duration(label: str, seconds: float, limits: Limits) -> None:
    if seconds < limits.min_audio_seconds:
        raise LimitError(
            f"{label} lasts only {_seconds(seconds)} s, shorter than the {limits.min_audio_seconds:g} s minimum; "
            f"use a longer clip."
        )


_STREAMING_SIZES = (0, 0xFFFFFFFF)  # writers that cannot seek back (a pipe) leave these as the data size


def _wav_promised_seconds(path: Path) -> float | None:
    """For a WAV whose data chunk is shorter than its header says, the duration the header promises; else None.

    Walks the RIFF chunks up to ``data`` (RIFX big-endian and RF64's 64-bit sizes included). Not a WAV, a
    header it cannot follow, or a streaming placeholder size: None, and the decoder's own checks apply.
    """
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX", b"RF64") or head[8:12] != b"WAVE":
            return None
        order = ">" if head[:4] == b"RIFX" else "<"
        byte_rate = block_align = 0
        rf64_size: int | None = None
        for _ in range(64):  # fmt, fact, LIST, bext, JUNK ... come before the data
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, (size,) = chunk[:4], struct.unpack(order + "I", chunk[4:])
            start = fh.tell()
            if cid == b"ds64":
                body = fh.read(16)
                if len(body) == 16:
                    rf64_size = struct.unpack("<Q", body[8:16])[0]
            elif cid == b"fmt ":
                body = fh.read(14)
                if len(body) == 14:
                    byte_rate, block_align = struct.unpack(order + "IH", body[8:14])
            elif cid == b"data":
                if head[:4] == b"RF64" and size == 0xFFFFFFFF and rf64_size is not None:
                    size = rf64_size
                elif size in _STREAMING_SIZES:
                    return None
                held = path.stat().st_size - start
                # less than one whole frame missing is a writer's rounding, not a cut
                if byte_rate <= 0 or size - held < max(block_align, 1):
                    return None
                return size / byte_rate
            fh.seek(start + size + (size & 1))  # chunks are padded to an even length
    return None


def to_mono(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.dtype.kind in "iu":
        scale = float(np.iinfo(samples.dtype).max)
        samples = samples.astype(np.float32) / scale
    samples = samples.astype(np.float32, copy=False)
    if samples.ndim == 2:
        # (frames, channels) as soundfile and gradio give it
        samples = samples.mean(axis=1) if samples.shape[1] <= 16 else samples.mean(axis=0)
    return np.ascontiguousarray(samples.reshape(-1))


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return samples
    import soxr  # librosa's own resampler ("soxr_hq"), without importing librosa and numba

    return soxr.resample(samples, orig_sr, target_sr, quality="HQ").astype(np.float32)


def prepare_audio(samples: np.ndarray, sample_rate: int, target_sr: int, label: str = "the recording",
                  limits: Limits | None = None) -> np.ndarray:
    """In-memory audio (a microphone recording, say) to mono float32 at ``target_sr``, checked."""
    limits = limits or Limits()
    mono = to_mono(samples)
    if mono.size == 0 or sample_rate <= 0:
        raise InputError(f"{label} contains no audio samples; record or upload again.")
    if mono.size / sample_rate > limits.max_audio_seconds:
        raise LimitError(f"{label} is longer than the {limits.max_audio_seconds:.0f} s limit; trim it.")
    _check_min_duration(label, mono.size / sample_rate, limits)
    if not np.isfinite(mono).all():
        raise InputError(f"{label} contains invalid (NaN or infinite) samples; export it again.")
    return resample(mono, sample_rate, target_sr)


def load_audio(path: str | Path, target_sr: int, limits: Limits | None = None) -> np.ndarray:
    """Decode an audio file to mono float32 at ``target_sr`` (WAV, FLAC, OGG/Vorbis, MP3)."""
    import soundfile as sf

    path = Path(path)
    info = audio_info(path, limits)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise InputError(f"{path.name} is truncated or corrupt and cannot be decoded ({err}); export it again.") from None
    if data.shape[0] == 0:
        raise InputError(f"{path.name} contains no audio samples; upload a recording that is not empty.")
    # A cut MP3 or FLAC decodes without error but short of the count its header gave. Slack of one MP3
    # frame (1152 samples) or 1%: frame-based decoders may end a little before an estimated count.
    if info.frames - data.shape[0] > max(1152, info.frames // 100):
        raise _cut_short(path.name, info.duration, data.shape[0] / info.sample_rate)
    return prepare_audio(data, int(sr or info.sample_rate), target_sr, label=path.name, limits=limits)


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_copy(src: Path, target: Path, name: str) -> Path:
    """Copy an upload to ``target`` in a library folder (Gradio's upload folder is temporary), once: a ``target``
    already there is kept. ``target``'s folder is named by the content hash, so the same content is stored once.

    Written to a hidden temporary name and renamed, so a full disk or a crash never leaves a partial file that a
    later upload of the same content would take for complete. A failure is one sentence naming the file ``name``.
    """
    import contextlib
    import errno
    import shutil

    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        tmp.replace(target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # only if empty: another file of the same content may live there
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or type(err).__name__).lower()
        raise InputError(f"{name} could not be stored in the library ({why}); free some space or ask the app's "
                         f"owner to, then add it again.") from None
    return target
