"""The audio index persists, grows without re-embedding what it has, and reports bad files."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_tone
from mmdemo.errors import InputError
from mmdemo.models.retrieval import AudioIndex, embedder


def test_index_grows_without_reembedding(tiny_models, tmp_path, monkeypatch):
    emb = embedder(tiny_models["retrieval"])
    lib = tmp_path / "lib"
    first = [make_tone(lib / f"t{i}.wav", freq=200 + 100 * i) for i in range(3)]
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, dim=32)
    assert len(index.add_files(first, emb).added) == 3

    reopened = AudioIndex.open(tmp_path / "idx")
    assert len(reopened) == 3 and reopened.model == emb.checkpoint
    np.testing.assert_array_equal(reopened.embeddings, index.embeddings)

    embedded = []
    real = emb.waveforms
    monkeypatch.setattr(emb, "waveforms", lambda clips: embedded.append(len(clips)) or real(clips))
    copy = lib / "copy-of-t0.wav"
    copy.write_bytes(first[0].read_bytes())
    new = make_tone(lib / "new.wav", freq=1200)
    report = reopened.add_files([*first, copy, new], emb)
    assert [c.name for c in report.added] == ["new.wav"]
    assert len(report.duplicates) == 4
    assert embedded == [1]  # only the new clip went through the model
    assert len(AudioIndex.open(tmp_path / "idx")) == 4


def test_bad_files_reported_good_ones_kept(tiny_models, tmp_path):
    emb = embedder(tiny_models["retrieval"])
    good = make_tone(tmp_path / "good.wav")
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "empty.flac").write_bytes(b"")
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, dim=32)
    report = index.add_files([good, tmp_path / "bad.wav", tmp_path / "empty.flac"], emb)
    assert [c.name for c in report.added] == ["good.wav"]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in report.failed) == ["bad.wav", "empty.flac"]


def test_empty_and_damaged_indexes(tiny_models, tmp_path):
    emb = embedder(tiny_models["retrieval"])
    with pytest.raises(InputError, match="not an audio index"):
        AudioIndex.open(tmp_path / "nothing")
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, dim=32)
    with pytest.raises(InputError, match="empty"):
        index.search_text("dog", emb)
    index.add_files([make_tone(tmp_path / "a.wav")], emb)
    (tmp_path / "idx" / "manifest.json").write_text("[")
    with pytest.raises(InputError, match="damaged"):
        AudioIndex.open(tmp_path / "idx")
    with pytest.raises(InputError, match="built with"):
        AudioIndex.open_or_create(tmp_path / "idx2", "m1", 32).save() or AudioIndex.open_or_create(tmp_path / "idx2", "m2", 32)


def test_text_embeddings_are_cached(tiny_models, monkeypatch):
    emb = embedder(tiny_models["retrieval"])
    model = emb.loaded.model
    calls = []
    real = model.get_text_features
    monkeypatch.setattr(model, "get_text_features", lambda **kw: calls.append(1) or real(**kw))
    first = emb.texts(["a barking dog", "rain on a roof", "a barking dog"])
    again = emb.texts(["rain on a roof", "a barking dog", "a new text"])
    np.testing.assert_array_equal(first[0], again[1])
    np.testing.assert_array_equal(first[0], first[2])
    assert len(calls) == 2  # one batch for the first two texts, one for the only new one
