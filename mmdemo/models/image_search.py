"""Text <-> image search over a persistent image library (SigLIP): the image half of the text <-> media search.

One embedding space, queried from either side: a text ranks the library's images; an image ranks the
library's images (similar images) and a list of labels the user types (zero-shot classification).
Embeddings are L2-normalised, scores are cosine similarities computed exactly (one NumPy product), so
the ranking is the one plain ``get_text_features``/``get_image_features`` and cosine similarity give (past
``MMDEMO_VECTOR_INDEX_ROWS`` images, an on-disk IVF index finds the rows: :mod:`mmdemo.models.vector_index`).

What is kept under ``MMDEMO_HOME``:

- ``library-images/<content hash>/<file name>``: the images added to the library, each stored once. The
  web app serves this folder (the page shows these images) and nothing else of the library.
- ``indexes/images-<checkpoint>-<hash>/``: ``embeddings.npy`` (float32 rows), ``manifest.json`` (one entry
  per row: path, name, sha256, width, height) and ``index.json`` (model, dimension), written atomically.
  Never served. A restart opens it again; nothing is embedded twice (files are keyed by content hash).
- An adapter's index sits beside the base one (``...--<adapter>-<hash>``): the same images embedded with the
  adapter, filled from the base library on first use and topped up with what it lacks on each use.

Family quirks (how a text is tokenized, how pixels are made) come from the loaded architecture's family
module (``text_inputs``, ``image_inputs``; :func:`mmdemo.models.registry.family_module`); nothing here
imports gradio.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmdemo.archive import extract_zip
from mmdemo.config import folder_problem, get_settings
from mmdemo.errors import InputError, LimitError, MMDemoError
from mmdemo.media import IMAGE_EXTENSIONS, decoded_image, file_sha256, load_image, store_copy
from mmdemo.models import generation, vector_index
from mmdemo.models.loading import Loaded, load
from mmdemo.models.registry import Task, family_module
from mmdemo.models.retrieval import Hit, _atomic_write, _normalise, _top_k

SPEC = Task(
    "image_search", "Image search", "MMDEMO_IMAGE_SEARCH_MODEL", "google/siglip-base-patch16-224",
    ("text_to_image_r1", "text_to_image_r5", "image_to_text_r1", "image_to_text_r5"), "image",
    columns=("text",), data_help="images, each with a description to find it by: `metadata.csv` with the columns "
                                 "`file_name,text`",
    tiny="siglip", examples="shapes",
)
TASK = SPEC.name
IMAGES_FOLDER = "library-images"  # under MMDEMO_HOME: the only library folder the web app serves
MAX_UPLOADS = 200  # images per upload (loose files plus those inside zips)
MAX_ZIP_BYTES = 1024**3  # an uploaded zip may unpack to at most this much
MAX_TEXT_CHARS = 300  # a query or a label; the model's token limit is checked too
MAX_LABELS = 50  # each label is one text-tower pass
MAX_TOP_K = 50
TEXT_CACHE_SIZE = 4096  # text embeddings kept per loaded model (repeated queries and labels are free)
IMAGE_KINDS = "JPEG, PNG, WebP, BMP, GIF or TIFF"
BUNDLED = Path(__file__).resolve().parents[2] / "assets" / "images"  # the pictures every new library starts with


def bundled_images() -> list[Path]:
    """The bundled example pictures, which seed a library that has none yet (the tab and the CLI alike)."""
    return sorted(p for p in BUNDLED.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------------------ embedding
class ImageEmbedder:
    """Texts and images to L2-normalised embeddings of one loaded checkpoint (and adapter), NumPy float32."""

    def __init__(self, loaded: Loaded, adapter: str | Path | None = None, batch_size: int = 16):
        self.family = family_module(loaded.arch)  # the registry admits only families this task supports
        self.loaded = loaded
        self.adapter = str(adapter) if adapter else None
        self.batch_size = batch_size

    @property
    def checkpoint(self) -> str:
        return self.loaded.checkpoint

    @property
    def dim(self) -> int:
        """Size of the shared embedding space (the vision tower's pooled output)."""
        return int(self.loaded.model.config.vision_config.hidden_size)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """One embedding per text; each (text, adapter) is embedded once per loaded model (a small LRU)."""
        import torch

        texts = [t.strip() for t in texts]
        if not texts or not all(texts):
            raise InputError("Type some text to search for.")
        memo = self.loaded.memo
        found: dict[str, np.ndarray] = {}
        with self.loaded.lock:
            for t in dict.fromkeys(texts):
                if ("text", self.adapter, t) in memo:
                    memo.move_to_end(("text", self.adapter, t))
                    found[t] = memo[("text", self.adapter, t)]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            batch = self.family.text_inputs(self.loaded.processor, chunk, self.loaded.device)
            with self.loaded.using(self.adapter) as model, torch.inference_mode():
                feats = _normalise(model.get_text_features(**batch).pooler_output.float().cpu().numpy())
                for text, vec in zip(chunk, feats):
                    found[text] = memo[("text", self.adapter, text)] = vec
                while len(memo) > TEXT_CACHE_SIZE:
                    memo.popitem(last=False)
        return np.stack([found[t] for t in texts])

    def images(self, images: Sequence) -> np.ndarray:
        """One embedding per RGB ``PIL`` image."""
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        feats = []
        for start in range(0, len(images), self.batch_size):
            batch = self.family.image_inputs(self.loaded.processor, images[start:start + self.batch_size],
                                             self.loaded.device, self.loaded.dtype)
            with self.loaded.using(self.adapter) as model, torch.inference_mode():
                feats.append(model.get_image_features(**batch).pooler_output.float().cpu().numpy())
        return _normalise(np.concatenate(feats))

    def files(self, paths: Sequence[str | Path]) -> np.ndarray:
        limits = get_settings().limits
        return self.images([load_image(p, limits) for p in paths])


def embedder(model: str | Loaded | None = None, adapter: str | Path | None = None) -> ImageEmbedder:
    """The embedder of ``model`` (a checkpoint, a loaded model, or the task's configured checkpoint)."""
    return ImageEmbedder(model if isinstance(model, Loaded) else load(TASK, model), adapter)


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class LibraryImage:
    path: str
    name: str
    sha256: str
    width: int
    height: int


@dataclass
class AddReport:
    added: list[LibraryImage] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # names whose content is already in the library
    problems: list[str] = field(default_factory=list)  # one sentence per file that could not be used


class ImageIndex:
    """A persistent, append-only set of image embeddings (rows) with their manifest."""

    VERSION = 1

    def __init__(self, path: str | Path, model: str, dim: int, images: list[LibraryImage], embeddings: np.ndarray):
        self.path = Path(path)
        self.model = model
        self.dim = dim
        self.images = images
        self.embeddings = embeddings
        self.lock = threading.RLock()
        self.stamp = self._stamp()  # index.json as last read or written here: another process's save changes it
        self._ann: vector_index.VectorIndex | None = None  # past MMDEMO_VECTOR_INDEX_ROWS rows

    def __len__(self) -> int:
        return len(self.images)

    @property
    def hashes(self) -> set[str]:
        return {i.sha256 for i in self.images}

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / "index.json").is_file()

    def _stamp(self) -> tuple | None:
        try:
            st = (self.path / "index.json").stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def changed_on_disk(self) -> bool:
        return self._stamp() != self.stamp

    @classmethod
    def open(cls, path: str | Path) -> ImageIndex:
        path = Path(path)
        if not cls.exists(path):
            raise InputError("The image library has no index yet; add some images first.")
        try:
            meta = json.loads((path / "index.json").read_text())
            images = [LibraryImage(**i) for i in json.loads((path / "manifest.json").read_text())]
            # past the vector-index threshold the rows stay on disk (memory-mapped): searches read the IVF index
            mmap = "r" if vector_index.use_for(len(images)) else None
            emb = (np.load(path / "embeddings.npy", mmap_mode=mmap) if images
                   else np.zeros((0, meta["dim"]), np.float32))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"The image library's index is damaged ({type(err).__name__}); ask the app's owner to "
                             f"delete it so it is built again.") from None
        if len(emb) != len(images):
            raise InputError("The image library's index is damaged (rows and manifest differ); ask the app's owner "
                             "to delete it so it is built again.")
        return cls(path, meta["model"], int(meta["dim"]), images, emb.astype(np.float32, copy=False))

    @classmethod
    def open_or_create(cls, path: str | Path, model: str, dim: int) -> ImageIndex:
        if cls.exists(path):
            index = cls.open(path)
            if index.model != model or index.dim != dim:
                raise InputError(f"The image index in {Path(path).name} was built with {index.model}, not {model}; "
                                 f"use that model or another library folder.")
            return index
        return cls(path, model, dim, [], np.zeros((0, dim), np.float32))

    def save(self) -> None:
        """Write atomically, the manifest and rows before ``index.json``: a crash leaves the previous index."""
        with self.lock:
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / "embeddings.npy", lambda fh: np.save(fh, self.embeddings), binary=True)
            _atomic_write(self.path / "manifest.json",
                          lambda fh: json.dump([asdict(i) for i in self.images], fh, indent=1))
            _atomic_write(self.path / "index.json",
                          lambda fh: json.dump({"model": self.model, "dim": self.dim, "count": len(self.images),
                                                "version": self.VERSION}, fh, indent=1))
            self.stamp = self._stamp()
            self._ann = vector_index.for_rows(self.path, self.embeddings, self._ann)  # built here, not in a search

    def append(self, images: list[LibraryImage], vectors: np.ndarray) -> None:
        with self.lock:
            self.images.extend(images)
            self.embeddings = np.concatenate([self.embeddings, vectors.astype(np.float32).reshape(-1, self.dim)])

    def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows by cosine (score descending, then row) and their scores: one exact product, or from
        ``MMDEMO_VECTOR_INDEX_ROWS`` rows on the on-disk IVF index (exact scores, approximate rows)."""
        with self.lock:
            self._ann = vector_index.for_rows(self.path, self.embeddings, self._ann)
            if self._ann is not None:
                return self._ann.search(query, min(k, len(self.embeddings)))
            scores = self.embeddings @ np.ascontiguousarray(query, dtype=np.float32)
            order = _top_k(scores, k)
            return order, scores[order]

    def search_vector(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        with self.lock:
            if not self.images:
                raise InputError("The image library is empty; add some images first.")
            order, scores = self.top_k(query, k)
            return [Hit(rank=r + 1, score=float(s), path=self.images[i].path, name=self.images[i].name)
                    for r, (i, s) in enumerate(zip(order, scores))]


# ------------------------------------------------------------------------------------------------ the library
def images_dir() -> Path:
    """Where library images are stored: the one folder of the image library the web app serves."""
    return get_settings().home / IMAGES_FOLDER


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:40]


def index_dir(checkpoint: str, adapter: str | Path | None = None) -> Path:
    """The index folder of ``checkpoint``'s library, or of ``adapter`` (a folder) on it (a sibling)."""
    digest = hashlib.sha1(checkpoint.encode()).hexdigest()[:8]
    base = get_settings().indexes_dir / f"images-{_slug(Path(checkpoint).name)}-{digest}"
    if adapter is None:
        return base
    folder = Path(adapter).expanduser().resolve()
    key = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}--{_slug(folder.name)}-{key}")


_INDEXES: dict[str, ImageIndex] = {}
_INDEX_LOCK = threading.Lock()  # held while an index is opened or created, never while embedding
_WRITE_LOCKS: dict[str, threading.Lock] = {}  # index folder -> held while images are added to it


def _cached(path: Path, emb: ImageEmbedder) -> ImageIndex:
    """The index at ``path``, opened once per process and again when another process saved it since."""
    with _INDEX_LOCK:
        index = _INDEXES.get(str(path))
        if index is None or index.changed_on_disk():
            index = _INDEXES[str(path)] = ImageIndex.open_or_create(path, emb.checkpoint, emb.dim)
        return index


def _write_lock(path: Path) -> threading.Lock:
    with _INDEX_LOCK:
        return _WRITE_LOCKS.setdefault(str(path), threading.Lock())


def _folder_error(err: OSError) -> InputError:
    problem = folder_problem(err, "The image library's folder (under MMDEMO_HOME)")
    if problem is None:
        raise err
    return InputError(problem)


def library(emb: ImageEmbedder, seed: Iterable[str | Path] = ()) -> ImageIndex:
    """The library index for ``emb`` (its checkpoint, and its adapter if it has one), ready to search.

    The base library gets the ``seed`` images (the app's bundled examples, kept where they are) the first
    time it is created. An adapter's library holds the base library's images embedded with the adapter:
    those it lacks are embedded now, nothing else.
    """
    try:
        base_emb = emb if emb.adapter is None else ImageEmbedder(emb.loaded, None, emb.batch_size)
        base_path = index_dir(emb.checkpoint)
        base = _cached(base_path, base_emb)
        if not ImageIndex.exists(base_path):
            with _write_lock(base_path):
                if not ImageIndex.exists(base_path):
                    _add_checked(base, base_emb, [(Path(p), Path(p).name) for p in seed], AddReport(), store=False)
        if emb.adapter is None:
            return base
        own_path = index_dir(emb.checkpoint, emb.adapter)
        own = _cached(own_path, emb)
        with _write_lock(own_path):
            have = own.hashes
            missing = [(Path(i.path), i.name) for i in list(base.images) if i.sha256 not in have]
            if missing or not ImageIndex.exists(own_path):
                _add_checked(own, emb, missing, AddReport(), store=False)
        return own
    except OSError as err:  # a read-only or full MMDEMO_HOME: one sentence, not a traceback
        raise _folder_error(err) from None


def _store(src: Path, name: str, digest: str) -> Path:
    """Copy an upload into ``library-images/<hash>/`` (Gradio's upload folder is temporary); kept once."""
    return store_copy(src, images_dir() / digest[:16] / (_slug(Path(name).stem) + Path(name).suffix.lower()), name)


def _add_checked(index: ImageIndex, emb: ImageEmbedder, files: list[tuple[Path, str]], report: AddReport,
                 store: bool = True, progress: Callable[[int], None] | None = None) -> AddReport:
    """Decode, check and embed ``files`` ((path, name shown)) not yet in ``index``; store uploads; save at the end.

    Hold the index's write lock. A file that cannot be used is a sentence in ``report.problems``.
    """
    limits = get_settings().limits
    seen = index.hashes
    pending: list[tuple[LibraryImage, object]] = []

    def flush() -> None:
        if pending:
            vectors = emb.images([img for _, img in pending])
            index.append([entry for entry, _ in pending], vectors)
            report.added.extend(entry for entry, _ in pending)
            pending.clear()

    for path, name in files:
        try:
            img = load_image(path, limits, name=name)
            digest = file_sha256(path)
            if digest in seen:
                report.duplicates.append(name)
            else:
                seen.add(digest)
                kept = _store(path, name, digest) if store else path
                entry = LibraryImage(path=str(Path(kept).resolve()), name=name, sha256=digest,
                                     width=img.width, height=img.height)
                pending.append((entry, img))
        except MMDemoError as err:
            report.problems.append(str(err))
        if progress:
            progress(1)
        if len(pending) >= emb.batch_size:
            flush()
    flush()
    if report.added or not ImageIndex.exists(index.path):
        index.save()
    return report


def collect_uploads(paths: Iterable[str | Path], workdir: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """The image files among uploads (zips are unpacked safely under ``workdir``) and a sentence per other file."""
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    for n, raw in enumerate(map(Path, paths)):
        suffix = raw.suffix.lower()
        if suffix == ".zip":
            try:  # unpacking is bounded too: bytes, and files (the images are counted against MAX_UPLOADS after)
                extracted = extract_zip(raw, workdir / f"{n}-{_slug(raw.stem)}", max_bytes=MAX_ZIP_BYTES,
                                        max_files=5 * MAX_UPLOADS)
            except MMDemoError as err:
                problems.append(str(err))
                continue
            problems += extracted.problems
            inside = [p for p in sorted(extracted.files) if p.is_file()]
            images = [p for p in inside if p.suffix.lower() in IMAGE_EXTENSIONS]
            problems += [f"{p.relative_to(extracted.root)} in {raw.name} is not an image ({IMAGE_KINDS}), so it "
                         f"was skipped." for p in inside if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if not images and not extracted.problems:
                problems.append(f"{raw.name} holds no images ({IMAGE_KINDS}); zip a folder of images.")
            found += [(p, p.name) for p in images]
        elif suffix in IMAGE_EXTENSIONS:
            found.append((raw, raw.name))
        else:
            problems.append(f"{raw.name} is not an image ({IMAGE_KINDS}) or a zip of images, so it was skipped.")
    return found, problems


def add_images(uploads: Sequence[str | Path], emb: ImageEmbedder, seed: Iterable[str | Path] = (),
               progress: Callable[[int], None] | None = None) -> tuple[AddReport, ImageIndex]:
    """Add uploaded images (and the images inside uploaded zips) to the base library; report what happened.

    Bad files are reported and skipped; good ones are copied into the library folder, embedded and saved.
    """
    uploads = [p for p in uploads if p]
    if not uploads:
        raise InputError(f"Upload images ({IMAGE_KINDS}) or a zip of them to add.")
    if emb.adapter is not None:
        emb = ImageEmbedder(emb.loaded, None, emb.batch_size)  # the base library is the list of images
    index = library(emb, seed)
    report = AddReport()
    with tempfile.TemporaryDirectory(prefix="mmdemo-images-") as tmp:
        files, report.problems = collect_uploads(uploads, Path(tmp))
        if len(files) > MAX_UPLOADS:
            raise LimitError(f"{len(files):,} images were uploaded; add at most {MAX_UPLOADS} at a time.")
        try:
            with _write_lock(index.path):
                _add_checked(index, emb, files, report, progress=progress)
        except OSError as err:
            raise _folder_error(err) from None
    return report, index


def library_images(checkpoint: str, seed: Iterable[str | Path] = ()) -> list[LibraryImage]:
    """The images in ``checkpoint``'s library, newest first, read from disk (needs no model); ``seed`` if none yet."""
    path = index_dir(checkpoint)
    with _INDEX_LOCK:
        index = _INDEXES.get(str(path))
    if index is None or index.changed_on_disk():
        if not ImageIndex.exists(path):
            return [LibraryImage(path=str(Path(p).resolve()), name=Path(p).name, sha256="", width=0, height=0)
                    for p in seed]
        index = ImageIndex.open(path)
    with index.lock:
        return list(reversed(index.images))


# ------------------------------------------------------------------------------------------------ queries
def check_top_k(value) -> int:
    try:
        k = int(value if value not in (None, "") else 5)
    except (TypeError, ValueError):
        raise InputError("Top-k must be a whole number.") from None
    if not 1 <= k <= MAX_TOP_K:
        raise InputError(f"Top-k must be between 1 and {MAX_TOP_K}, not {k}.")
    return k


def check_query(text: str | None, loaded: Loaded) -> str:
    return generation.check_query(loaded, text, "a red circle", MAX_TEXT_CHARS)


def split_labels(labels: str | None, loaded: Loaded) -> list[str]:
    """The comma- or line-separated labels, each within the model's text limit, at most ``MAX_LABELS``."""
    return generation.split_labels(loaded, labels, "a dog, a cat, a house", MAX_LABELS, MAX_TEXT_CHARS)


def query_image(path: str | Path | None):
    """The query image, decoded and checked (a sentence if it is missing or unusable)."""
    if not path:
        raise InputError(f"Upload an image ({IMAGE_KINDS}) to search with.")
    return decoded_image(path, get_settings().limits)


def search_text(text: str, emb: ImageEmbedder, k: int = 5, seed: Iterable[str | Path] = ()) -> list[Hit]:
    """Text -> the library's images, best first, with their cosine scores."""
    text = check_query(text, emb.loaded)
    k = check_top_k(k)
    index = library(emb, seed)
    return index.search_vector(emb.texts([text])[0], k)


def similar_images(image: str | Path, emb: ImageEmbedder, k: int = 5, seed: Iterable[str | Path] = ()) -> list[Hit]:
    """Image -> the library's most similar images (an image that is in the library comes first, at ~1.0)."""
    img = query_image(image)
    k = check_top_k(k)
    index = library(emb, seed)
    return index.search_vector(emb.images([img])[0], k)


def rank_labels(query: np.ndarray, labels: Sequence[str], emb: ImageEmbedder, k: int = 5) -> list[Hit]:
    """Zero-shot classification: the labels ranked by cosine similarity to an image embedding."""
    labels = [lab.strip() for lab in labels if lab and lab.strip()]
    if not labels:
        raise InputError("Give at least one label to rank, such as 'a dog, a cat'.")
    scores = emb.texts(labels) @ query
    return [Hit(rank=r + 1, score=float(scores[i]), label=labels[i]) for r, i in enumerate(_top_k(scores, k))]


def classify_image(image: str | Path, labels: str | Sequence[str], emb: ImageEmbedder, k: int = 5) -> list[Hit]:
    """Image -> the best labels from ``labels`` (a comma- or line-separated text, or a list); needs no library."""
    img = query_image(image)
    candidates = split_labels(labels if isinstance(labels, str) else "\n".join(labels), emb.loaded)
    k = check_top_k(k)
    return rank_labels(emb.images([img])[0], candidates, emb, k)


# ------------------------------------------------------------------------------------- training and scoring
def prepare(loaded: Loaded, examples, seed: int = 0):
    """Training inputs for ``file_name,text`` rows (images) and their collator, built by the model's family."""
    return family_module(loaded.arch).prepare_image_search(loaded, examples, seed=seed)


def fitted_decoding(loaded: Loaded, train) -> None:
    """Search does not generate: nothing to fit."""
    return None


def evaluate(loaded: Loaded, examples, adapter=None, options=None):
    """R@1/R@5 text-to-image and image-to-text over the held-out images, embedded as the library embeds them
    (the same texts, 64 tokens for SigLIP, and pixels)."""
    from mmdemo.metrics import search_scores

    emb = ImageEmbedder(loaded, adapter=adapter)
    return search_scores(emb.texts([e.text for e in examples]), emb.files([e.path for e in examples]), examples,
                         media="image")


def verdict(c: dict) -> str:
    return (f"The fine-tuned model finds the right description for {c['adapter_right']} of {c['total']} held-out "
            f"images; the base model for {c['base_right']}.")
