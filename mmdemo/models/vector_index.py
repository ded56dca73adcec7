"""An on-disk approximate index over a library's rows, for libraries past ``MMDEMO_VECTOR_INDEX_ROWS`` rows.

Below that size a library scores every row exactly (one matrix-vector product). Above it, a FAISS
``IndexIVFFlat`` (inner product: the rows are unit vectors, so it is cosine) finds the top k by scanning only the
``nprobe`` inverted lists whose centroids are nearest the query: a few percent of the rows, so the time grows
far slower than the library. The lists keep the rows in full precision, so the scores are exact inner products;
only a true neighbour filed in a list that is not probed can be missed. ``bench/vector_index.py`` measured
FAISS against LanceDB and exact search (bench/RESULTS.md, section "vector index").

The index is derived: ``embeddings.npy`` stays the source of truth. It lives next to it as ``vectors.faiss``,
written atomically, and is opened memory-mapped, so the rows stay on disk and the page cache holds the lists
that queries touch. It is extended when rows are appended (an index covers rows 0..ntotal-1 of the array) and
rebuilt when it is missing, unreadable, covers more rows than the array, or the library has grown so much that
its lists are too long (a new build would have twice as many lists: the library has grown several-fold).

FAISS is optional (``faiss-cpu``): without it :func:`available` says so once in the log and the library keeps
exact search.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from mmdemo.config import get_settings

log = logging.getLogger(__name__)

FILE = "vectors.faiss"
TRAIN_PER_LIST = 40  # k-means training rows per list (FAISS asks for at least 39)
MIN_PROBES = 8
_warned = False


def available() -> bool:
    """Whether FAISS can be imported; says once in the log why search stays exact when it cannot."""
    global _warned
    try:
        import faiss  # noqa: F401
    except ImportError as err:
        if not _warned:
            log.warning("faiss-cpu is not installed (%s): large libraries use exact search; "
                        "`pip install faiss-cpu` for the on-disk index.", err)
            _warned = True
        return False
    return True


def lists_for(rows: int) -> int:
    """Inverted lists for ``rows`` rows: ~2 sqrt(N), a power of two, at most one list per 40 training rows."""
    return max(1, min(2 ** round(math.log2(max(2.0, 2 * math.sqrt(rows)))), rows // TRAIN_PER_LIST))


def probes_for(nlist: int) -> int:
    """Lists scanned per query: 1/16 of them (at least 8), which kept recall@10 >= 0.95 on clustered rows."""
    return min(nlist, max(MIN_PROBES, nlist // 16))


class VectorIndex:
    """A FAISS IVF-Flat index over the first ``ntotal`` rows of a library's ``embeddings.npy``."""

    def __init__(self, index, path: Path | None):
        self.index = index
        self.path = path  # the file it was read from or written to; None: in memory only
        self.nprobe = probes_for(index.nlist)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @classmethod
    def build(cls, folder: str | Path | None, rows: np.ndarray, seed: int = 0) -> VectorIndex:
        """Train the centroids on a sample of ``rows``, add them all, and write ``folder/vectors.faiss``."""
        import faiss

        nlist = lists_for(len(rows))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(rows.shape[1]), rows.shape[1], nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10  # k-means iterations: the lists barely change after ~10, training time is linear in it
        rng = np.random.default_rng(seed)
        sample = min(len(rows), TRAIN_PER_LIST * nlist)
        pick = np.sort(rng.choice(len(rows), sample, replace=False)) if sample < len(rows) else slice(None)
        index.train(np.ascontiguousarray(rows[pick], dtype=np.float32))
        out = cls(index, None)
        out._add(rows)
        out.save(folder)
        return out

    @classmethod
    def open(cls, folder: str | Path, rows: int | None = None) -> VectorIndex | None:
        """The index in ``folder``, memory-mapped; ``None`` when there is none, it is unreadable, or it does not
        cover exactly ``rows`` rows (when given)."""
        import faiss

        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as err:  # a truncated or foreign file: derived data, so it is built again
            log.warning("The vector index %s cannot be read (%s); it will be built again.", path, err)
            return None
        if rows is not None and index.ntotal != rows:
            return None
        return cls(index, path)

    def _add(self, rows: np.ndarray, chunk: int = 100_000) -> None:
        import faiss

        start = self.ntotal
        if self.path is not None:  # a memory-mapped index is read-only: read it into memory to extend it
            self.index = faiss.read_index(str(self.path))
        for s in range(0, len(rows), chunk):
            block = np.ascontiguousarray(rows[s:s + chunk], dtype=np.float32)
            self.index.add_with_ids(block, np.arange(start + s, start + s + len(block), dtype=np.int64))

    def extend(self, rows: np.ndarray, folder: str | Path | None) -> None:
        """Add ``rows`` (the rows after ``ntotal``) and write the index again."""
        self._add(rows)
        self.save(folder)

    def save(self, folder: str | Path | None) -> None:
        """Write ``folder/vectors.faiss`` atomically and reopen it memory-mapped; no folder: keep it in memory."""
        import faiss

        if folder is None or not Path(folder).is_dir():
            self.path = None
            return
        target = Path(folder) / FILE
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{FILE}.")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.index = faiss.read_index(str(target), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        self.path = target

    def search(self, query: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row ids and scores of the best ``k`` rows found (score descending, then row), fewer if the probed
        lists hold fewer."""
        import faiss

        if k <= 0 or self.ntotal == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        params = faiss.SearchParametersIVF(nprobe=min(self.nlist, nprobe or self.nprobe))
        scores, ids = self.index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k,
                                        params=params)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        order = np.lexsort((ids, -scores))
        return ids[order], scores[order]


def ensure(folder: str | Path | None, rows: np.ndarray, current: VectorIndex | None = None) -> VectorIndex:
    """An index over exactly ``rows``: ``current`` or the one on disk if it covers them, extended when rows were
    appended, built again when it is missing, stale or its lists have grown too long."""
    n = len(rows)
    if current is not None and current.ntotal == n:
        return current
    index = VectorIndex.open(folder) if folder is not None else None  # the file may be newer than ``current``
    if index is None and current is not None and current.path is None:
        index = current  # built before the library was first saved
    if index is not None and index.ntotal > n:
        index = None
    if index is not None and index.ntotal == n:
        return index
    if index is not None and lists_for(n) < 2 * index.nlist:  # grown less than ~4x since it was trained
        index.extend(rows[index.ntotal:], folder)
        return index
    log.info("Building the vector index of %s (%d rows).", folder, n)
    return VectorIndex.build(folder, rows)


def threshold() -> int:
    return get_settings().vector_index_rows


def use_for(rows: int) -> bool:
    """Whether a library of ``rows`` rows searches through the vector index (else: exact search)."""
    return rows >= threshold() and available()


def for_rows(folder: str | Path | None, rows: np.ndarray, current: VectorIndex | None) -> VectorIndex | None:
    """The index to search ``rows`` with, up to date; ``None`` below the threshold or without FAISS."""
    return ensure(folder, rows, current) if use_for(len(rows)) else None
