"""The audio search task: text <-> audio retrieval (CLAP), one embedding space queried from either side, over a
saved index; how it is trained (``prepare``) and scored (``evaluate``: R@1/R@5 both ways).

Clips are decoded to mono at the model's rate. Clips longer than CLAP's window (10 s) are cut into
consecutive windows whose embeddings are averaged, instead of CLAP's ``rand_trunc`` random crop, so a
clip always gets the same embedding. Shorter clips go through the feature extractor unchanged, so
their embeddings are exactly ``ClapModel.get_audio_features`` of the processor's features.

An index is a folder: ``embeddings.npy`` (float32, L2-normalised rows), ``manifest.json`` (one entry per
row: path, name, sha256, duration) and ``index.json`` (model, dimension). Adding files skips any whose
content hash is already there, so nothing is embedded twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmdemo.config import get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import AUDIO_EXTENSIONS, audio_info, file_sha256, load_audio, prepare_audio
from mmdemo.models import fast, vector_index
from mmdemo.models.features import TorchClapFeatures
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import Task, family_module

SPEC = Task(
    "retrieval", "Audio search", "MMDEMO_RETRIEVAL_MODEL", "laion/clap-htsat-unfused",
    ("text_to_audio_r1", "text_to_audio_r5", "audio_to_text_r1", "audio_to_text_r5"), "audio",
    columns=("text",), data_help="sound clips, each with a description: `metadata.csv` with the columns "
                                 "`file_name,text`",
    tiny="clap", examples="sounds", cli_command="search",
)

MIN_TAIL_SECONDS = 1.0  # a last window shorter than this is dropped when the clip has full windows
TEXT_CACHE_SIZE = 4096  # text embeddings kept per loaded model: repeated queries and label lists are free
PREFILTER_MIN_ROWS = 20_000  # from this many clips on, scoring runs in torch; in fast mode an int8 pass first


class Embedder:
    """Texts and waveforms to L2-normalised CLAP embeddings (NumPy float32)."""

    def __init__(self, loaded: Loaded, adapter: str | Path | None = None, batch_size: int = 32):
        self.loaded = loaded
        self.adapter = adapter
        self.batch_size = batch_size
        fe = loaded.processor.feature_extractor
        self.sample_rate: int = int(fe.sampling_rate)
        self.window: int = int(fe.nb_max_samples)
        self._features = None if fe.truncation == "fusion" else TorchClapFeatures(fe, device=loaded.device)

    @property
    def checkpoint(self) -> str:
        return self.loaded.checkpoint

    @property
    def dim(self) -> int:
        """Size of the shared embedding space."""
        return int(self.loaded.model.config.projection_dim)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """One embedding per text. Each (text, adapter) is embedded once per loaded model: repeats come from
        a small LRU (``TEXT_CACHE_SIZE``), so a repeated query costs only the scoring."""
        import torch

        texts = [t.strip() for t in texts]
        if not texts or not all(texts):
            raise InputError("Type some text to search for.")
        memo, adapter = self.loaded.memo, (str(self.adapter) if self.adapter else None)
        found: dict[str, np.ndarray] = {}
        with self.loaded.lock:
            for t in dict.fromkeys(texts):
                if ("text", adapter, t) in memo:
                    memo.move_to_end(("text", adapter, t))
                    found[t] = memo[("text", adapter, t)]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        tok = self.loaded.processor.tokenizer
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            batch = tok(chunk, padding=True, truncation=True, return_tensors="pt").to(self.loaded.device)
            with self.loaded.using(self.adapter) as model, torch.inference_mode():
                feats = _normalise(model.get_text_features(**batch).pooler_output.float().cpu().numpy())
                for text, vec in zip(chunk, feats):
                    found[text] = memo[("text", adapter, text)] = vec
                while len(memo) > TEXT_CACHE_SIZE:
                    memo.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def windows(self, samples: np.ndarray) -> list[np.ndarray]:
        """Consecutive model-sized windows of a clip (one window for clips up to 10 s)."""
        if len(samples) <= self.window:
            return [samples]
        wins = [samples[i:i + self.window] for i in range(0, len(samples), self.window)]
        if len(wins) > 1 and len(wins[-1]) < MIN_TAIL_SECONDS * self.sample_rate:
            wins.pop()
        return wins

    def waveforms(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """One embedding per clip (mono float32 at ``self.sample_rate``)."""
        import torch

        windows: list[np.ndarray] = []
        owner: list[int] = []
        for i, clip in enumerate(clips):
            for w in self.windows(clip):
                windows.append(w)
                owner.append(i)
        fe = self.loaded.processor.feature_extractor
        feats = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            if self._features is not None:  # torch log-mel on the model's device (same features, faster)
                inputs = {"input_features": self._features(chunk)}
            else:
                inputs = fe(chunk, sampling_rate=self.sample_rate, return_tensors="pt").to(self.loaded.device)
            inputs["input_features"] = inputs["input_features"].to(self.loaded.dtype)
            # fast mode: the exported audio tower, unless an adapter on the audio tower is active (it has no LoRA)
            exported = fast.audio_for(self.loaded, self.adapter) if self._features is not None else None
            if exported is not None:
                emb = exported(inputs["input_features"])
            else:
                with self.loaded.using(self.adapter) as model, torch.inference_mode():
                    emb = model.get_audio_features(**inputs).pooler_output
            feats.append(emb.float().cpu().numpy())
        per_window = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
        owner_arr = np.asarray(owner)
        result = np.stack([per_window[owner_arr == i].mean(axis=0) for i in range(len(clips))])
        return _normalise(result)

    def files(self, paths: Sequence[str | Path]) -> np.ndarray:
        limits = get_settings().limits
        return self.waveforms([load_audio(p, self.sample_rate, limits) for p in paths])


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedder(model: str | Loaded | None = None, adapter: str | Path | None = None) -> Embedder:
    return Embedder(model if isinstance(model, Loaded) else load("retrieval", model), adapter)


@dataclass
class Clip:
    path: str
    name: str
    sha256: str
    duration: float


@dataclass
class Hit:
    rank: int
    score: float
    path: str | None = None
    label: str | None = None
    name: str | None = None

    def record(self) -> dict:
        rec = {"rank": self.rank}
        if self.label is not None:
            rec["label"] = self.label
        else:
            rec["path"] = self.path
        rec["score"] = round(float(self.score), 6)
        return rec


@dataclass
class AddReport:
    added: list[Clip] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # paths whose content is already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, sentence)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=int)
    idx = np.argpartition(-scores, k - 1)[:k]
    # stable order: score descending, then index ascending
    return idx[np.lexsort((idx, -scores[idx]))]


class Int8Rows:
    """An int8 copy of an index's rows for fast mode: a cheap first pass picks candidates, fp32 ranks them.

    Scoring reads every row for each query (100,000 x 512 fp32 rows: 205 MB, ~25 ms on 2 cores). This copy is
    a quarter of that, scored by fbgemm's int8 kernel (~4 ms; scores within ~0.002 of fp32 for unit vectors).
    The best ``CANDIDATES_PER_HIT`` x k rows by int8 score are scored again in fp32, so the scores shown are
    fp32's; a true top-k row is missed only if int8 rounding moves it behind that many others. Not exact (a
    rigorous bound on the int8 error is ~10x looser than the error seen and leaves thousands of candidates),
    so only fast mode uses it; ``bench/search.py`` measures the top-10 overlap.
    """

    CANDIDATES_PER_HIT = 20

    def __init__(self, rows: np.ndarray):
        import warnings

        import torch

        w = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        step = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; still the CPU path
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, step, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.source = rows  # the array this copy was made from (an index replaces its array when clips are added)

    @staticmethod
    def usable() -> bool:
        import torch

        return torch.backends.quantized.engine in ("x86", "fbgemm")

    def candidates(self, query: np.ndarray, k: int) -> np.ndarray:
        """Row indices (ascending) of the rows with the best int8 scores for ``query``."""
        import torch

        # reduce_range: 7-bit activations, no int16 overflow in the AVX2 kernel
        approx = torch.ops.quantized.linear_dynamic(torch.from_numpy(query)[None], self.packed, True)[0].numpy()
        n = min(len(approx), max(self.CANDIDATES_PER_HIT * k, 200))
        return np.sort(np.argpartition(-approx, n - 1)[:n])


def find_audio_files(source: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Audio files under a folder (recursively), and the other files found there as problems."""
    source = Path(source)
    if source.is_file():
        return [source], []
    if not source.is_dir():
        raise InputError(f"{source} does not exist; give a folder, a zip archive or audio files.")
    found, other = [], []
    for p in sorted(source.rglob("*")):
        if not p.is_file() or any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(source).parts):
            continue
        if p.suffix.lower() in AUDIO_EXTENSIONS:
            found.append(p)
        else:
            other.append((str(p), f"{p.name} is not an audio file (WAV, FLAC, OGG or MP3), so it was skipped."))
    return found, other


class AudioIndex:
    """A persistent, append-only library of clip embeddings."""

    def __init__(self, path: str | Path, model: str, dim: int, clips: list[Clip], embeddings: np.ndarray):
        self.path = Path(path)
        self.model = model
        self.dim = dim
        self.clips = clips
        self.embeddings = embeddings
        self._lock = threading.RLock()
        self._hashes = {c.sha256 for c in clips}
        self._int8: Int8Rows | None = None
        self._ann: vector_index.VectorIndex | None = None  # past MMDEMO_VECTOR_INDEX_ROWS rows

    def __len__(self) -> int:
        return len(self.clips)

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / "index.json").is_file()

    @classmethod
    def open(cls, path: str | Path) -> AudioIndex:
        path = Path(path)
        if not cls.exists(path):
            raise InputError(f"{path} is not an audio index (no index.json); build one with `python -m mmdemo index`.")
        try:
            meta = json.loads((path / "index.json").read_text())
            clips = [Clip(**c) for c in json.loads((path / "manifest.json").read_text())]
            # past the vector-index threshold the rows stay on disk (memory-mapped): searches read the IVF index
            mmap = "r" if vector_index.use_for(len(clips)) else None
            emb = np.load(path / "embeddings.npy", mmap_mode=mmap) if clips else np.zeros((0, meta["dim"]), np.float32)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"The audio index in {path} is damaged ({err}); build it again.") from None
        if len(emb) != len(clips):
            raise InputError(f"The audio index in {path} is damaged (rows and manifest differ); build it again.")
        return cls(path, meta["model"], int(meta["dim"]), clips, emb.astype(np.float32, copy=False))

    @classmethod
    def open_or_create(cls, path: str | Path, model: str, dim: int) -> AudioIndex:
        if cls.exists(path):
            index = cls.open(path)
            if index.model != model:
                raise InputError(
                    f"The index in {path} was built with {index.model}, not {model}; use that model "
                    f"or build a new index in another folder."
                )
            return index
        return cls(path, model, dim, [], np.zeros((0, dim), np.float32))

    def save(self) -> None:
        """Write atomically: a crash mid-save leaves the previous index intact."""
        with self._lock:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / "embeddings.npy", lambda fh: np.save(fh, self.embeddings), binary=True)
            _atomic_write(self.path / "manifest.json",
                          lambda fh: json.dump([asdict(c) for c in self.clips], fh, indent=1))
            _atomic_write(self.path / "index.json",
                          lambda fh: json.dump({"model": self.model, "dim": self.dim, "count": len(self.clips),
                                                "version": 1}, fh, indent=1))
            self._ann = vector_index.for_rows(self.path, self.embeddings, self._ann)  # built here, not in a search

    def add_files(
        self,
        paths: Iterable[str | Path],
        emb: Embedder,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> AddReport:
        """Check, decode and embed new files; bad files are reported, good ones kept. Saves at the end."""
        limits = get_settings().limits
        if emb.dim != self.dim or emb.checkpoint != self.model:
            raise InputError(
                f"The index in {self.path} was built with {self.model}, not {emb.checkpoint}; "
                f"use that model or build a new index in another folder."
            )
        report = AddReport()
        pending: list[tuple[Path, str, float, np.ndarray]] = []
        seen = set(self._hashes)

        def flush() -> None:
            if not pending:
                return
            vectors = emb.waveforms([w for *_, w in pending])
            with self._lock:
                for p, digest, duration, _ in pending:
                    clip = Clip(path=str(p.resolve()), name=p.name, sha256=digest, duration=round(duration, 3))
                    self.clips.append(clip)
                    self._hashes.add(digest)
                    report.added.append(clip)
                self.embeddings = np.concatenate([self.embeddings, vectors.astype(np.float32)])
            pending.clear()

        for p in map(Path, paths):
            try:
                info = audio_info(p, limits)
                digest = file_sha256(p)
                if digest in seen:
                    report.duplicates.append(str(p))
                else:
                    seen.add(digest)
                    pending.append((p, digest, info.duration, load_audio(p, emb.sample_rate, limits)))
            except MMDemoError as err:
                report.failed.append((str(p), str(err)))
            if progress:
                progress(1)
            if len(pending) >= batch_size:
                flush()
        flush()
        if report.added or not self.exists(self.path):
            self.save()
        return report

    def search_vector(self, query: np.ndarray, top_k: int = 10, approximate: bool = False) -> list[Hit]:
        with self._lock:
            if not self.clips:
                raise InputError("The audio library is empty; add some clips first.")
            order, scores = self.top_k(query, top_k, approximate)
            return [Hit(rank=r + 1, score=float(s), path=self.clips[i].path, name=self.clips[i].name)
                    for r, (i, s) in enumerate(zip(order, scores))]

    def top_k(self, query: np.ndarray, k: int, approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows for ``query`` by fp32 cosine (score descending, then row) and their scores.

        ``approximate`` (fast mode) picks candidates with an int8 pass first (:class:`Int8Rows`): the scores
        are fp32's, the rows nearly always the same. From ``MMDEMO_VECTOR_INDEX_ROWS`` rows on, an on-disk IVF
        index (:mod:`mmdemo.models.vector_index`) answers instead, in either mode: exact scores, approximate rows."""
        import torch

        query = np.ascontiguousarray(query, dtype=np.float32)
        with self._lock:
            rows = self.embeddings
            k = min(k, len(rows))
            self._ann = vector_index.for_rows(self.path, rows, self._ann)
            if self._ann is not None:  # past MMDEMO_VECTOR_INDEX_ROWS: the on-disk IVF index, approximate
                return self._ann.search(query, k)
            if approximate and len(rows) >= PREFILTER_MIN_ROWS and 0 < k <= len(rows) // 100 and Int8Rows.usable():
                if self._int8 is None or self._int8.source is not rows:
                    self._int8 = Int8Rows(rows)
                cand = self._int8.candidates(query, k)
                scores = rows[cand] @ query
                order = _top_k(scores, k)  # candidates ascend, so ties still go to the lower row
                return cand[order], scores[order]
            if len(rows) >= PREFILTER_MIN_ROWS:
                # torch, not NumPy's OpenBLAS: its worker threads spin after a call and slowed the next text
                # query's torch threads by ~30 ms on 2 cores; torch's own pool does not compete with itself
                scores = torch.mv(torch.from_numpy(rows), torch.from_numpy(query)).numpy()
            else:
                scores = rows @ query
            order = _top_k(scores, k)
            return order, scores[order]

    def search_text(self, text: str, emb: Embedder, top_k: int = 10) -> list[Hit]:
        return self.search_vector(emb.texts([text])[0], top_k, approximate=emb.loaded.fast)


def rank_labels(query: np.ndarray, labels: Sequence[str], emb: Embedder, top_k: int = 5) -> list[Hit]:
    """Zero-shot classification: candidate texts ranked by cosine similarity to an audio embedding."""
    labels = [lab.strip() for lab in labels if lab and lab.strip()]
    if not labels:
        raise InputError("Give at least one label to rank, such as 'dog barking, rain'.")
    scores = emb.texts(labels) @ query
    return [Hit(rank=r + 1, score=float(scores[i]), label=labels[i]) for r, i in enumerate(_top_k(scores, top_k))]


def embed_query_audio(emb: Embedder, path: str | Path | None = None,
                      samples: np.ndarray | None = None, sample_rate: int | None = None) -> np.ndarray:
    """An audio query from a file or from in-memory samples (a microphone recording)."""
    limits = get_settings().limits
    if path is not None:
        wave = load_audio(path, emb.sample_rate, limits)
    elif samples is not None and sample_rate:
        wave = prepare_audio(samples, sample_rate, emb.sample_rate, limits=limits)
    else:
        raise InputError("Upload or record a sound to search with.")
    return emb.waveforms([wave])[0]


def _atomic_write(target: Path, write: Callable, binary: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------- training and scoring
def prepare(loaded: Loaded, examples, seed: int = 0):
    """Training inputs for ``file_name,text`` rows (sound clips) and their collator, built by the model's family."""
    return family_module(loaded.arch).prepare_retrieval(loaded, examples, seed=seed)


def fitted_decoding(loaded: Loaded, train) -> None:
    """Search does not generate: nothing to fit."""
    return None


def evaluate(loaded: Loaded, examples, adapter=None, options=None):
    """R@1/R@5 text-to-audio and audio-to-text over the held-out clips, embedded as the library embeds them."""
    from mmdemo.metrics import search_scores

    emb = Embedder(loaded, adapter=adapter)
    return search_scores(emb.texts([e.text for e in examples]), emb.files([e.path for e in examples]), examples,
                         media="audio")


def verdict(c: dict) -> str:
    return (f"The fine-tuned model finds the right description for {c['adapter_right']} of {c['total']} held-out "
            f"clips; the base model for {c['base_right']}.")
