"""Libraries past ``MMDEMO_VECTOR_INDEX_ROWS`` rows search an on-disk FAISS IVF index; below it, exact search.

The threshold is set low (a few thousand rows) through the environment, which ``get_settings()`` reads when no
settings are installed. Rows are clustered unit vectors (like real embeddings; bench/vector_index.py also
measures the structureless random case). Seconds in all.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from mmdemo.config import Settings
from mmdemo.errors import InputError
from mmdemo.models import vector_index
from mmdemo.models.image_search import ImageIndex, LibraryImage
from mmdemo.models.retrieval import AudioIndex, Clip, _top_k

pytest.importorskip("faiss")

DIM = 64


def clustered(n: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, DIM)).astype(np.float32) * 0.08
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    c = np.random.default_rng(7).standard_normal((40, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clips(start: int, n: int) -> list[Clip]:
    return [Clip(path=f"/lib/c{i}.wav", name=f"c{i}.wav", sha256=f"{i:064x}", duration=1.0) for i in range(start, n)]


def audio_index(folder, rows: np.ndarray) -> AudioIndex:
    index = AudioIndex(folder, "tiny-clap", DIM, clips(0, len(rows)), rows)
    index.save()
    return index


def exact(rows: np.ndarray, query: np.ndarray, k: int = 10) -> list[int]:
    return _top_k(rows @ query, k).tolist()


def ids(hits) -> list[int]:
    return [int(h.name.removeprefix("c").removesuffix(".wav")) for h in hits]


def test_past_the_threshold_the_ivf_index_finds_the_exact_top_10(tmp_path, monkeypatch, centres):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "2000")
    rows = clustered(4000, 1, centres)
    index = audio_index(tmp_path / "lib", rows)
    assert (tmp_path / "lib" / vector_index.FILE).is_file()  # built when saved, not in the first search
    queries = clustered(30, 2, centres)
    overlap = [len(set(ids(index.search_vector(q, 10))) & set(exact(rows, q))) / 10 for q in queries]
    assert np.mean(overlap) >= 0.9, overlap
    hits = index.search_vector(rows[123], 5)  # an exact duplicate of a row finds that row first
    assert ids(hits)[0] == 123 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_adding_rows_extends_the_index_and_reopening_maps_the_rows(tmp_path, monkeypatch, centres):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "2000")
    rows = clustered(3000, 1, centres)
    index = audio_index(tmp_path / "lib", rows)
    more = clustered(400, 3, centres)
    index.clips += clips(3000, 3400)
    index.embeddings = np.concatenate([index.embeddings, more])
    index.save()
    assert vector_index.VectorIndex.open(tmp_path / "lib").ntotal == 3400
    assert ids(index.search_vector(more[17], 3))[0] == 3017

    reopened = AudioIndex.open(tmp_path / "lib")
    assert isinstance(reopened.embeddings, np.memmap)  # past the threshold the rows stay on disk
    assert ids(reopened.search_vector(more[17], 3))[0] == 3017
    (tmp_path / "lib" / vector_index.FILE).unlink()  # derived data: a missing index is built again
    assert ids(AudioIndex.open(tmp_path / "lib").search_vector(rows[5], 3))[0] == 5
    assert vector_index.VectorIndex.open(tmp_path / "lib").ntotal == 3400


def test_a_stale_index_is_rebuilt(tmp_path, monkeypatch, centres):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "1000")
    rows = clustered(2500, 1, centres)
    vector_index.VectorIndex.build(tmp_path, clustered(2600, 9, centres))  # covers more rows than the library
    index = vector_index.ensure(tmp_path, rows)
    assert index.ntotal == 2500 and vector_index.VectorIndex.open(tmp_path, 2500) is not None
    (tmp_path / vector_index.FILE).write_bytes(b"not an index")
    assert vector_index.ensure(tmp_path, rows).search(rows[9], 1)[0].tolist() == [9]


def test_below_the_threshold_search_is_exact_and_unchanged(tmp_path, monkeypatch, centres):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "5000")
    rows = clustered(4000, 1, centres)
    index = audio_index(tmp_path / "lib", rows)
    assert not (tmp_path / "lib" / vector_index.FILE).exists()
    assert not isinstance(AudioIndex.open(tmp_path / "lib").embeddings, np.memmap)
    for q in clustered(10, 2, centres):
        hits = index.search_vector(q, 10)
        assert ids(hits) == exact(rows, q)
        assert [h.score for h in hits] == [float(s) for s in (rows @ q)[exact(rows, q)]]


def test_the_image_library_uses_the_index_past_the_threshold(tmp_path, monkeypatch, centres):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "2000")
    rows = clustered(2500, 1, centres)
    images = [LibraryImage(path=f"/img/i{i}.png", name=f"i{i}.png", sha256=f"{i:064x}", width=8, height=8)
              for i in range(len(rows))]
    index = ImageIndex(tmp_path / "images", "tiny-siglip", DIM, images[:1500], rows[:1500])
    index.save()
    assert not (tmp_path / "images" / vector_index.FILE).exists()
    below = index.search_vector(rows[700], 10)
    assert [h.name for h in below] == [f"i{i}.png" for i in exact(rows[:1500], rows[700])]
    index.append(images[1500:], rows[1500:])
    index.save()
    assert vector_index.VectorIndex.open(tmp_path / "images").ntotal == 2500
    assert index.search_vector(rows[2222], 3)[0].name == "i2222.png"
    assert ImageIndex.open(tmp_path / "images").search_vector(rows[2222], 3)[0].name == "i2222.png"


def test_without_faiss_search_stays_exact_and_says_so_once(tmp_path, monkeypatch, centres, caplog):
    monkeypatch.setenv("MMDEMO_VECTOR_INDEX_ROWS", "1000")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    monkeypatch.setattr(vector_index, "_warned", False)
    rows = clustered(1500, 1, centres)
    with caplog.at_level(logging.WARNING, logger="mmdemo.models.vector_index"):
        index = audio_index(tmp_path / "lib", rows)
        q = clustered(1, 2, centres)[0]
        assert ids(index.search_vector(q, 10)) == exact(rows, q)
    assert not (tmp_path / "lib" / vector_index.FILE).exists()
    assert sum("faiss-cpu is not installed" in r.getMessage() for r in caplog.records) == 1


def test_the_threshold_is_a_setting():
    settings = Settings.from_env({"MMDEMO_VECTOR_INDEX_ROWS": "50000"})
    assert settings.vector_index_rows == 50_000 and Settings.from_env(settings.to_env()) == settings
    assert Settings().vector_index_rows == 200_000
    with pytest.raises(InputError, match=r"^MMDEMO_VECTOR_INDEX_ROWS must be 1 or more rows, not 0\.$"):
        Settings.from_env({"MMDEMO_VECTOR_INDEX_ROWS": "0"})
