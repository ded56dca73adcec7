"""Image search (SigLIP): the app's rankings are plain transformers' cosine rankings, the library persists,
bad uploads and queries get plain sentences, and only the library's images are served."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image, serve_app
from mmdemo.errors import InputError, LimitError
from mmdemo.media import load_image
from mmdemo.models import image_search as search
from mmdemo.models.loading import load

SPECS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("purple", "square")]


@pytest.fixture(autouse=True)
def _fresh_libraries():
    """Each test opens its libraries from disk (the process-wide cache is per MMDEMO_HOME path anyway)."""
    search._INDEXES.clear()
    yield
    search._INDEXES.clear()


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    return [make_image(tmp_path / "in" / f"{c}_{s}.png", c, s, size=40 + 8 * i) for i, (c, s) in enumerate(SPECS)]


@pytest.fixture
def emb(tiny_models):
    return search.embedder(tiny_models["image_search"])


def _plain(checkpoint: str, images, texts):
    """Plain transformers, as SigLIP's model card has it: processor with padding="max_length", then the features."""
    from transformers import SiglipModel, SiglipProcessor

    model = SiglipModel.from_pretrained(checkpoint).eval()
    processor = SiglipProcessor.from_pretrained(checkpoint)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor(text=texts, padding="max_length", return_tensors="pt")).pooler_output
    return img, txt


def test_the_tiny_checkpoint_has_the_hub_layout_and_loads_like_it(tiny_models):
    from transformers import AutoProcessor, SiglipTokenizer

    folder = Path(tiny_models["image_search"])
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json",
            "processor_config.json"} <= {p.name for p in folder.iterdir()}
    loaded = load("image_search", str(folder))
    assert type(loaded.model).__name__ == "SiglipModel" and loaded.arch.lora_targets == ("q_proj", "v_proj")
    assert isinstance(AutoProcessor.from_pretrained(folder).tokenizer, SiglipTokenizer)  # SentencePiece, as the Hub's


def test_text_search_ranks_as_plain_siglip_cosine(emb, pictures, tiny_models, home):
    report, index = search.add_images([str(p) for p in pictures], emb)
    assert len(report.added) == 5 and not report.problems and len(index) == 5

    query = "a picture of a red circle"
    img, txt = _plain(tiny_models["image_search"], [load_image(p) for p in pictures], [query])
    cos = torch.nn.functional.cosine_similarity(txt, img).numpy()
    assert len(set(np.round(cos, 4))) == 5  # no ties: the order below is the model's, not the tie-break's
    hits = search.search_text(query, emb, k=5)
    stored = {i.name: i.path for i in index.images}
    assert [h.name for h in hits] == [pictures[i].name for i in np.argsort(-cos, kind="stable")]
    assert [h.path for h in hits] == [stored[h.name] for h in hits]
    np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1], atol=1e-5)
    assert search.search_text(query, emb, k=2) == hits[:2]  # top-k cuts the same ranking


def test_image_query_ranks_labels_and_images_as_plain_siglip_cosine(emb, pictures, tiny_models, home):
    search.add_images([str(p) for p in pictures], emb)
    labels = ["a red circle", "a blue square", "the sea at night", "a dog", "stripes"]
    img, txt = _plain(tiny_models["image_search"], [load_image(p) for p in pictures], labels)
    label_cos = torch.nn.functional.cosine_similarity(txt, img[1:2]).numpy()
    ranked = search.classify_image(pictures[1], ", ".join(labels), emb, k=5)
    assert [h.label for h in ranked] == [labels[i] for i in np.argsort(-label_cos, kind="stable")]
    np.testing.assert_allclose([h.score for h in ranked], np.sort(label_cos)[::-1], atol=1e-5)

    image_cos = torch.nn.functional.cosine_similarity(img[3:4], img).numpy()
    similar = search.similar_images(pictures[3], emb, k=5)
    assert [h.name for h in similar] == [pictures[i].name for i in np.argsort(-image_cos, kind="stable")]
    assert similar[0].name == pictures[3].name and similar[0].score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([h.score for h in similar], np.sort(image_cos)[::-1], atol=1e-5)


def test_text_is_padded_to_64_tokens_so_a_query_scores_the_same_alone_and_in_a_batch(emb):
    from mmdemo.models import siglip

    batch = siglip.text_inputs(emb.loaded.processor, ["red", "a picture of a big blue square on the left"])
    assert batch["input_ids"].shape == (2, siglip.TEXT_LENGTH)
    alone = search.ImageEmbedder(emb.loaded, batch_size=1).texts(["red"])
    emb.loaded.memo.clear()
    together = emb.texts(["red", "a picture of a big blue square on the left"])
    np.testing.assert_allclose(alone[0], together[0], atol=1e-6)


def test_the_library_survives_a_restart_and_embeds_nothing_twice(emb, pictures, home, tiny_models, monkeypatch):
    report, index = search.add_images([str(p) for p in pictures[:3]], emb)
    assert len(report.added) == 3
    before = search.search_text("a green triangle", emb, k=3)
    folder = search.index_dir(emb.checkpoint)
    assert {p.name for p in folder.iterdir()} == {"embeddings.npy", "manifest.json", "index.json"}
    assert folder.is_relative_to(home / "indexes")
    assert all(Path(i.path).is_relative_to(search.images_dir()) for i in index.images)  # copies, not the uploads
    for p in pictures[:3]:
        p.unlink()  # the uploads were Gradio's temporary files: the library keeps its own copies

    # a new process: nothing cached in memory, the model loaded again
    search._INDEXES.clear()
    from mmdemo.models import loading

    loading.clear_cache()
    emb2 = search.embedder(tiny_models["image_search"])
    assert [i.name for i in search.library_images(emb2.checkpoint)] == [p.name for p in reversed(pictures[:3])]
    embedded = []
    real = search.ImageEmbedder.images
    monkeypatch.setattr(search.ImageEmbedder, "images", lambda self, imgs: embedded.append(len(imgs)) or real(self, imgs))
    after = search.search_text("a green triangle", emb2, k=3)
    assert [(h.name, h.path) for h in after] == [(h.name, h.path) for h in before]
    np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-6)
    assert embedded == []  # searching embedded no image again

    again = [str(make_image(pictures[0].parent / "again" / p.name, c, s, size=40 + 8 * i))
             for i, (p, (c, s)) in enumerate(zip(pictures[:4], SPECS))]
    report, index = search.add_images(again, emb2)
    assert report.duplicates == [p.name for p in pictures[:3]] and [i.name for i in report.added] == [pictures[3].name]
    assert embedded == [1] and len(index) == 4
    meta = json.loads((folder / "index.json").read_text())
    assert meta["count"] == 4 and meta["model"] == emb2.checkpoint


def test_seed_images_fill_an_empty_library_once(emb, pictures, home):
    index = search.library(emb, seed=pictures[:2])
    assert [i.name for i in index.images] == [p.name for p in pictures[:2]]
    assert all(i.path == str(p.resolve()) for i, p in zip(index.images, pictures))  # bundled: kept where they are
    search._INDEXES.clear()
    assert len(search.library(emb, seed=pictures)) == 2  # an existing library is not seeded again


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_bad_uploads_are_reported_in_sentences_and_the_good_ones_kept(emb, pictures, home, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is text, not a picture")
    from PIL import Image

    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(noisy.getvalue()[:len(noisy.getvalue()) // 2])  # an upload that stopped half-way
    other = tmp_path / "readme.txt"
    other.write_text("hello")
    png = io.BytesIO()
    load_image(pictures[1]).save(png, "PNG")
    slip = _zip(tmp_path / "slip.zip", {"../../evil.png": png.getvalue(), "ok/blue.png": png.getvalue()})
    empty = _zip(tmp_path / "empty.zip", {})
    notzip = tmp_path / "fake.zip"
    notzip.write_text("not a zip")

    report, index = search.add_images([str(pictures[0]), str(text), str(cut), str(other), str(slip), str(empty),
                                       str(notzip)], emb)
    assert [i.name for i in report.added] == [pictures[0].name, "blue.png"]
    said = "\n".join(report.problems)
    assert "notes.png is a text file, not an image; upload a JPEG, PNG or WebP." in said
    assert "cut.png is truncated or corrupt and cannot be decoded" in said
    assert "readme.txt is not an image (JPEG, PNG, WebP, BMP, GIF or TIFF) or a zip of images" in said
    assert "../../evil.png points outside the archive's folder (a zip-slip entry), so it was skipped." in said
    assert "empty.zip holds no images (JPEG, PNG, WebP, BMP, GIF or TIFF); zip a folder of images." in said
    assert "fake.zip is not a zip archive (or it is damaged); zip the folder again." in said
    assert len(report.problems) == 6 and "Traceback" not in said and str(tmp_path) not in said
    assert not (home.parent / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert len(index) == 2


def test_limits_and_bad_queries_are_refused_with_sentences(emb, pictures, home, monkeypatch, tmp_path):
    monkeypatch.setattr(search, "MAX_UPLOADS", 2)
    with pytest.raises(LimitError, match="3 images were uploaded; add at most 2 at a time."):
        search.add_images([str(p) for p in pictures[:3]], emb)
    with pytest.raises(InputError, match="Upload images"):
        search.add_images([], emb)
    monkeypatch.setenv("MMDEMO_MAX_IMAGE_PIXELS", "1000")
    report, _ = search.add_images([str(pictures[0])], emb)
    assert report.problems == [f"{pictures[0].name} is 40x40 pixels, over the limit of 1,000 pixels; resize it and "
                               f"try again."]
    monkeypatch.delenv("MMDEMO_MAX_IMAGE_PIXELS")
    with pytest.raises(InputError, match="The image library is empty; add some images first."):
        search.search_text("a dog", emb)
    search.add_images([str(pictures[0])], emb)
    with pytest.raises(InputError, match="Type some text to search for"):
        search.search_text("   ", emb)
    with pytest.raises(InputError, match=r"The search text is \d+ tokens long; this model reads at most 64"):
        search.search_text(" ".join(["red"] * 70), emb)
    with pytest.raises(InputError, match="The search text is 301 characters long; keep it under 300."):
        search.search_text("a" * 301, emb)
    with pytest.raises(InputError, match="Top-k must be between 1 and 50, not 0."):
        search.search_text("a dog", emb, k=0)
    with pytest.raises(InputError, match="60 labels were given; rank at most 50 at a time."):
        search.classify_image(pictures[0], ",".join(f"label {i}" for i in range(60)), emb)
    with pytest.raises(InputError, match="Write at least one label"):
        search.classify_image(pictures[0], " , ", emb)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    with pytest.raises(InputError, match=r"bad\.jpg (is not an image format that can be read|is truncated or corrupt)"):
        search.similar_images(bad, emb)


def test_tab_handlers_answer_in_words_without_server_paths(emb, pictures, home, tiny_models):
    from mmdemo.ui import images

    checkpoint = tiny_models["image_search"]
    junk = pictures[0].parent / "junk.png"
    junk.write_text("text")
    said, rows = images.add_images([str(pictures[0]), str(junk)], checkpoint=checkpoint)
    n = len(images.bundled_images()) + 1
    assert said.startswith(f"**Added 1 image.** The library holds {n} images. 1 file could not be used:")
    assert "- junk.png is a text file" in said and str(home) not in said
    assert rows[0] == [pictures[0].name, "40 x 40"] and len(rows) == n
    table, gallery, info = images.search_images("a red circle", 3, "base", None, checkpoint=checkpoint)
    assert [r[0] for r in table] == [1, 2, 3] and all(isinstance(r[1], str) and "/" not in r[1] for r in table)
    assert all(Path(path).is_file() and caption.startswith(f"{i + 1}. ") for i, (path, caption) in enumerate(gallery))
    assert info.startswith("Ran on CPU (float32) · model siglip · no adapter · took ")
    labels, info = images.classify_image(str(pictures[0]), "red, blue", 5, "base", None, checkpoint=checkpoint)
    assert sorted(r[1] for r in labels) == ["blue", "red"]
    table, gallery, _ = images.similar_images(str(pictures[0]), 2, "base", None, checkpoint=checkpoint)
    assert table[0][1] == pictures[0].name and table[0][2] == pytest.approx(1.0, abs=1e-4)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_only_the_library_images_are_served_not_the_index(tiny_models, tmp_path, pictures):
    from gradio_client import Client

    from mmdemo.ui import app as ui_app

    home = tmp_path / "served-home"
    with serve_app(tiny_models, home) as url:
        assert str(search.images_dir().resolve()) in ui_app.launch_kwargs()["allowed_paths"]
        from mmdemo.ui import images

        images.add_images([str(pictures[2])], checkpoint=tiny_models["image_search"])
        stored = next(search.images_dir().rglob("*.png"))
        index = search.index_dir(tiny_models["image_search"])

        def file_url(path: Path) -> str:
            return url + "gradio_api/file=" + urllib.parse.quote(str(path))

        assert _status(file_url(stored)) == 200
        for private in (index / "embeddings.npy", index / "manifest.json", index / "index.json"):
            assert private.is_file() and _status(file_url(private)) in (403, 404), private
        client = Client(url, verbose=False)
        table = client.predict("a green triangle", 20, "base", None, api_name="/search_images")[0]  # all of them
        assert pictures[2].name in [row[1] for row in table["data"]]
        with pytest.raises(Exception, match="Type some text to search for"):
            client.predict("", 3, "base", None, api_name="/search_images")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fine_tuning_on_image_text_pairs_raises_recall_and_the_tab_searches_with_the_adapter(tiny_models, home,
                                                                                           tmp_path):
    """The job path (dataset checks, SigLIP's sigmoid loss through the Trainer, held-out R@1/R@5 both ways) learns
    12 picture classes from 8 examples each; the adapter then serves the Image search tab by name."""
    from bench.learning import make_pictures
    from mmdemo.jobs.evaluate import METRICS, verdict
    from mmdemo.jobs.train import TrainConfig, finetune
    from mmdemo.ui import images

    data = make_pictures(tmp_path / "data", "caption", train_per_class=8, test_per_class=1)  # texts: "red stripes"
    config = TrainConfig.from_preset("quick", epochs=25, learning_rate=3e-3, rank=16, batch_size=8, min_steps=0)
    out = home / "adapters" / "shapes-search"
    result = finetune("image_search", data, out, model=tiny_models["image_search"], config=config,
                      workdir=tmp_path / "work")
    before, after = result["metrics_before"], result["metrics_after"]
    print(json.dumps({"before": before, "after": after}))
    assert set(after) == {"text_to_image_r1", "text_to_image_r5", "image_to_text_r1", "image_to_text_r5"} <= set(METRICS)
    assert before["text_to_image_r1"] <= 0.17 and before["image_to_text_r1"] <= 0.17  # 1 or 2 of 12: chance
    assert after["text_to_image_r1"] >= before["text_to_image_r1"] + 0.3, (before, after)
    assert after["image_to_text_r1"] >= before["image_to_text_r1"] + 0.3, (before, after)
    assert after["text_to_image_r5"] >= before["text_to_image_r5"] and after["image_to_text_r5"] >= 0.9
    assert result["training"]["steps_done"] == 300 and result["losses"][-1]["loss"] < result["losses"][0]["loss"] / 3
    sentence = verdict("image_search", result["comparison"])
    assert sentence.startswith("The fine-tuned model finds the right description for") and "held-out images" in sentence
    card = (out / "README.md").read_text()
    assert "SiglipModel" in card and "Image search tab" in card

    checkpoint = tiny_models["image_search"]
    base_rows, _, _ = images.search_images("red stripes", 6, "base", None, checkpoint=checkpoint)
    rows, gallery, info = images.search_images("red stripes", 6, "shapes-search", None, checkpoint=checkpoint)
    assert "adapter shapes-search" in info and len(rows) == 6
    assert [r[2] for r in rows] != [r[2] for r in base_rows]  # the adapter's embeddings, not the base model's
    assert search.index_dir(checkpoint, out).is_dir() and search.index_dir(checkpoint).is_dir()
