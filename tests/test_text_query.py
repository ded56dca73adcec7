"""Text queries: the oneDNN text tower gives plain ``get_text_features``' embeddings and ranking, and the query
cache is keyed by text and adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_lora
from mmdemo.models.kernels import onednn_forward, onednn_linears, onednn_usable
from mmdemo.models.loading import load
from mmdemo.models.retrieval import AudioIndex, Clip, Embedder

QUERIES = ["a barking dog", "rain on a tin roof", "a high beep", "a siren far away", "wind"]


pytestmark = pytest.mark.usefixtures("onednn_for_tiny")


def _plain(folder: str, adapter=None):
    from transformers import ClapModel, ClapProcessor

    model = ClapModel.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, ClapProcessor.from_pretrained(folder).tokenizer


def _plain_embedding(model, tok, text: str) -> np.ndarray:
    with torch.no_grad():  # one unpadded query, as a plain transformers user embeds it
        vec = model.get_text_features(**tok([text], return_tensors="pt")).pooler_output[0].numpy()
    return vec / np.linalg.norm(vec)


def _tower_linears(loaded):
    """The tower's own Linear layers (a LoRA adapter loaded by an earlier test adds its small A/B ones)."""
    return [m for name, m in loaded.model.text_model.named_modules()
            if type(m) is torch.nn.Linear and ".lora_" not in name]


@pytest.mark.skipif(not onednn_usable(), reason="this torch build has no oneDNN")
def test_fast_text_tower_matches_plain_get_text_features(tiny_models, one_thread, tmp_path):
    folder = tiny_models["retrieval"]
    emb = Embedder(load("retrieval", folder))
    ours = emb.texts(QUERIES)
    linears = _tower_linears(emb.loaded)
    assert linears and all(m.forward.__func__ is onednn_forward for m in linears)  # the fast path was taken
    model, tok = _plain(folder)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((500, ours.shape[1])).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    clips = [Clip(path=f"/c{i}.wav", name=f"c{i}.wav", sha256=f"{i:064x}", duration=1.0) for i in range(len(rows))]
    index = AudioIndex(tmp_path / "idx", emb.checkpoint, rows.shape[1], clips, rows)
    for text, vec in zip(QUERIES, ours):
        plain = _plain_embedding(model, tok, text)
        assert float(vec @ plain) >= 0.9999
        plain_top = np.argsort(-(rows @ plain), kind="stable")[:10]
        assert [h.name for h in index.search_vector(vec, 10)] == [f"c{i}.wav" for i in plain_top]


@pytest.mark.skipif(not onednn_usable(), reason="this torch build has no oneDNN")
def test_fast_text_tower_keeps_adapters_and_gradients(tiny_models, one_thread, tmp_path):
    folder = tiny_models["retrieval"]
    loaded = load("retrieval", folder)
    assert onednn_linears(loaded.model, loaded.arch.onednn_parts)
    adapter = make_lora(folder, "retrieval", tmp_path / "lora", seed=3)
    vec = Embedder(loaded, adapter=adapter).texts(["a barking dog"])[0]
    model, tok = _plain(folder, adapter)
    assert float(vec @ _plain_embedding(model, tok, "a barking dog")) >= 0.9999
    # with gradients on (training), the layers take torch's own path and can be trained
    layer = _tower_linears(loaded)[0]
    x = torch.randn(2, layer.in_features, requires_grad=True)
    with torch.enable_grad():
        y = layer(x)
        y.sum().backward()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert x.grad is not None


def test_query_cache_is_per_text_and_adapter(tiny_models, one_thread, tmp_path, monkeypatch):
    folder = tiny_models["retrieval"]
    loaded = load("retrieval", folder)
    adapter = make_lora(folder, "retrieval", tmp_path / "lora-cache", seed=4)
    calls = []
    real = loaded.model.get_text_features
    monkeypatch.setattr(loaded.model, "get_text_features", lambda **kw: calls.append(1) or real(**kw))
    text = "a query asked twice by the cache test"
    base = Embedder(loaded).texts([text])[0]
    assert len(calls) == 1
    np.testing.assert_array_equal(Embedder(loaded).texts([text])[0], base)  # a new Embedder, same model: cached
    assert len(calls) == 1
    tuned = Embedder(loaded, adapter=adapter).texts([text])[0]  # another adapter: embedded again
    assert len(calls) == 2 and not np.allclose(tuned, base)
    np.testing.assert_array_equal(Embedder(loaded, adapter=adapter).texts([text])[0], tuned)
    assert len(calls) == 2


def test_large_index_scores_in_torch_with_numpys_ranking(tmp_path):
    """From PREFILTER_MIN_ROWS rows on, scoring runs in torch (no OpenBLAS spinning); the ranking is NumPy's."""
    from mmdemo.models import retrieval

    rng = np.random.default_rng(1)
    rows = rng.standard_normal((retrieval.PREFILTER_MIN_ROWS + 7, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[100:103] = rows[5]  # exact ties go to the lower row
    clips = [Clip(path=f"/c{i}.wav", name=f"c{i}.wav", sha256=f"{i:064x}", duration=1.0) for i in range(len(rows))]
    index = AudioIndex(tmp_path / "idx", "m", 32, clips, rows)
    for query in [rows[5], *rng.standard_normal((5, 32)).astype(np.float32)]:
        scores = rows @ query
        order, got = index.top_k(query, 10)
        assert order.tolist() == np.lexsort((np.arange(len(rows)), -scores))[:10].tolist()
        np.testing.assert_allclose(got, scores[order], atol=1e-6)
    assert index.top_k(rows[5], 4)[0].tolist() == [5, 100, 101, 102]
