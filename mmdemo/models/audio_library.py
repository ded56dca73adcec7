"""The shared audio library: bundled clips + uploads, kept under ``MMDEMO_HOME``, searched by text or by a sound.

The Audio search tab and ``python -m mmdemo library`` both call this module (no gradio here). The library is an
``AudioIndex`` under ``MMDEMO_HOME/indexes/library-<checkpoint>/``; uploaded clips are copied to
``MMDEMO_HOME/library-clips/<content hash>/`` first (Gradio's upload folder is temporary), so the same clip is
stored once. A text query ranks clips; a sound ranks a list of labels and finds similar clips.

Searching with a fine-tuned retrieval adapter needs the clips embedded by that adapter, so each adapter gets its
own index in a sibling folder (``library-<checkpoint>--<adapter>-<hash of its folder>``). The base library stays
the list of clips; an adapter's library is filled on first use and topped up on each use with the base clips it
lacks (only those are embedded), so it persists across restarts.

Functions take the loaded model (``Loaded``) from the caller, which chooses the device (the tab loads on the CPU
under ZeroGPU); ``cached=False`` reads the index from disk at every call, for processes that share it with others
that write it (ZeroGPU workers).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mmdemo.archive import extract_zip
from mmdemo.config import folder_problem, get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import AUDIO_EXTENSIONS, file_sha256, store_copy
from mmdemo.models import generation
from mmdemo.models.loading import Loaded
from mmdemo.models.retrieval import AudioIndex, Embedder, find_audio_files

BUNDLED = Path(__file__).resolve().parents[2] / "assets" / "sounds"  # the clips every new library starts with
MAX_UPLOADS = 500  # clips per upload
MAX_LABELS = 50  # each label is one text-tower pass; 10,000 would hold the shared model for a minute
MAX_TEXT_CHARS = 300  # a query or a label; the model's token limit is checked too
MAX_TOP_K = 50

log = logging.getLogger(__name__)
_INDEXES: dict[str, AudioIndex] = {}
_INDEX_LOCK = threading.Lock()
_FILL_LOCKS: dict[str, threading.Lock] = {}  # adapter library folder -> lock held while it is topped up
_EMBEDDERS: dict[tuple, Embedder] = {}  # (model key, adapter folder) -> its Embedder, reused by every request
_EMBEDDER_LOCK = threading.Lock()


def bundled_clips() -> list[Path]:
    return sorted(p for p in BUNDLED.glob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def clips_dir() -> Path:
    """Where uploaded library clips are kept: the one folder under MMDEMO_HOME the web server serves."""
    return get_settings().home / "library-clips"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:40]


def index_dir(checkpoint: str, adapter: str | None = None) -> Path:
    """The library folder for ``checkpoint`` (the base library), or for ``adapter`` on it (a sibling)."""
    digest = hashlib.sha1(checkpoint.encode()).hexdigest()[:8]
    base = get_settings().indexes_dir / f"library-{_slug(Path(checkpoint).name)}-{digest}"
    if adapter is None:
        return base
    folder = Path(adapter).expanduser().resolve()
    key = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}--{_slug(folder.name)}-{key}")


def embedder(loaded: Loaded, adapter: str | None = None) -> Embedder:
    """The ``Embedder`` for ``loaded`` (and ``adapter``), made once (it builds the audio feature transform)."""
    key = (loaded.task, loaded.checkpoint, loaded.device, str(loaded.dtype), adapter)
    with _EMBEDDER_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None or emb.loaded is not loaded:  # a model loaded again (tests clear the cache) gets a new one
            emb = _EMBEDDERS[key] = Embedder(loaded, adapter=adapter)
    return emb


def _open(path: Path, emb: Embedder, cached: bool) -> AudioIndex:
    """The index at ``path`` from this process's cache (opened or created on first use); hold _INDEX_LOCK."""
    index = _INDEXES.get(str(path)) if cached else None
    if index is None:
        index = AudioIndex.open_or_create(path, emb.checkpoint, emb.dim)
        _INDEXES[str(path)] = index
    return index


def library(loaded: Loaded, adapter: str | None = None, cached: bool = True) -> tuple[AudioIndex, Embedder]:
    """The library index and embedder for ``loaded``, or for ``adapter`` (a folder) on it.

    The base library gets the bundled clips on first use. An adapter's library holds the same clips
    embedded with the adapter: the base clips whose content it lacks are embedded now, nothing else.
    """
    try:
        return _library(loaded, adapter, cached)
    except OSError as err:  # a read-only or full MMDEMO_HOME: one sentence, not a traceback
        problem = folder_problem(err, "The audio library's folder (under MMDEMO_HOME)")
        if problem is None:
            raise
        raise InputError(problem) from None


def _library(loaded: Loaded, adapter: str | None, cached: bool) -> tuple[AudioIndex, Embedder]:
    emb = embedder(loaded)
    path = index_dir(emb.checkpoint)
    with _INDEX_LOCK:
        index = _open(path, emb, cached)
        if not AudioIndex.exists(path):
            index.add_files(bundled_clips(), emb)
        if adapter is None:
            return index, emb
        emb = embedder(loaded, adapter)
        own = _open(index_dir(emb.checkpoint, adapter), emb, cached)
        fill_lock = _FILL_LOCKS.setdefault(str(own.path), threading.Lock())
    # Filled outside _INDEX_LOCK (embedding a big library takes a while; the base library stays usable),
    # but one filler per adapter library, so two requests never embed the same clip twice.
    with fill_lock:
        have = {c.sha256 for c in own.clips}
        missing = [c.path for c in list(index.clips) if c.sha256 not in have]
        if missing or not AudioIndex.exists(own.path):
            report = own.add_files(missing, emb)
            for _path, why in report.failed:  # e.g. a clip deleted by hand since it joined the base library
                log.warning("a clip is missing from the %s library: %s", Path(adapter).name, why)
    return own, emb


def library_rows(checkpoint: str) -> list[list]:
    """The clips in the library as ``[name, seconds]``, newest first (read from disk; needs no model)."""
    path = index_dir(checkpoint)
    with _INDEX_LOCK:
        index = _INDEXES.get(str(path))
    if index is None:
        if not AudioIndex.exists(path):
            return [[p.name, None] for p in bundled_clips()]
        index = AudioIndex.open(path)
    return [[c.name, round(c.duration, 2)] for c in reversed(index.clips)]  # newest first


@dataclass
class Added:
    """What adding uploads did: clips added, clips already there, one sentence per file not used, the total."""

    added: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)
    total: int = 0


def add_uploads(paths: list[str | Path], loaded: Loaded, cached: bool = True) -> Added:
    """Add audio files (and the clips inside zips) to the library of ``loaded``'s checkpoint.

    Every file is checked; a bad one is reported in a sentence and not kept, the others are added. Zips are
    unpacked safely (:func:`mmdemo.archive.extract_zip`). At most ``MAX_UPLOADS`` clips at a time.
    """
    if not paths:
        raise InputError("Upload audio files (WAV, FLAC, OGG or MP3) or a zip of them to add.")
    store = clips_dir()
    problems: list[tuple[str, str]] = []
    candidates: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="mmdemo-upload-") as tmp:
        for raw in map(Path, paths):
            if raw.suffix.lower() == ".zip":
                try:
                    extracted = extract_zip(raw, Path(tmp) / raw.stem)
                except MMDemoError as err:
                    problems.append((raw.name, str(err)))
                    continue
                problems += [(raw.name, p) for p in extracted.problems]
                found, other = find_audio_files(extracted.root)
                candidates += found
                problems += [(Path(p).name, why) for p, why in other]
            elif raw.suffix.lower() in AUDIO_EXTENSIONS:
                candidates.append(raw)
            else:
                problems.append((raw.name, f"{raw.name} is not an audio file (WAV, FLAC, OGG or MP3) or a zip, "
                                           f"so it was skipped."))
        if len(candidates) > MAX_UPLOADS:
            raise InputError(f"{len(candidates)} clips were uploaded; add at most {MAX_UPLOADS} at a time.")
        original = {}
        for p in candidates:
            try:
                original[str(_store(p, store))] = p.name
            except InputError as err:
                problems.append((p.name, str(err)))
        index, emb = library(loaded, cached=cached)
        report = index.add_files(list(original), emb)
    for path, why in report.failed:
        shutil.rmtree(Path(path).parent, ignore_errors=True)  # a bad file is reported, not kept
        problems.append((original.get(path, Path(path).name), why))
    return Added(len(report.added), len(report.duplicates), [why for _name, why in problems], len(index))


def _store(src: Path, store: Path) -> Path:
    """Copy an upload into the library folder, in a folder named by its content hash (kept once)."""
    return store_copy(src, store / file_sha256(src)[:16] / src.name, src.name)


# ----------------------------------------------------------------------------------------------- checks
def check_top_k(value) -> int:
    try:
        k = int(value or 5)
    except (TypeError, ValueError):
        raise InputError("Top-k must be a whole number.") from None
    if not 1 <= k <= MAX_TOP_K:
        raise InputError(f"Top-k must be between 1 and {MAX_TOP_K}, not {k}.")
    return k


def check_query(text: str | None, loaded: Loaded) -> str:
    return generation.check_query(loaded, text, "a high beep", MAX_TEXT_CHARS)


def split_labels(labels: str | None, loaded: Loaded) -> list[str]:
    """The comma- or line-separated labels, each within the model's text limit, at most ``MAX_LABELS``."""
    return generation.split_labels(loaded, labels, "beep, rain, siren", MAX_LABELS, MAX_TEXT_CHARS)
