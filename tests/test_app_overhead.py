"""The app's work around the models: each image decoded once per request (check and run included), decoded
images remembered only while the file is unchanged, one ``Embedder`` per model and adapter, and every model
read from disk once however many requests and the warm-up ask for it at the same time."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from PIL import Image

from conftest import ROOT, make_image, make_lora
from mmdemo.errors import InputError
from mmdemo.media import DECODED, decoded_image
from mmdemo.models import loading
from mmdemo.ui import audio, caption, images, vqa


@pytest.fixture
def opened(monkeypatch):
    """Counts the image files Pillow opens (every decode starts with one); the memory of decodes starts empty."""
    DECODED.clear()
    names: Counter = Counter()
    real = Image.open

    def counting(fp, *args, **kwargs):
        names[getattr(fp, "name", None) or "bytes"] += 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    yield names
    DECODED.clear()


def test_a_caption_request_decodes_each_image_once(tmp_path, tiny_models, home, opened, one_thread):
    images = [str(make_image(tmp_path / f"{c}.png", c)) for c in ("red", "blue")]
    ck = tiny_models["caption"]
    caption.check_request(images, "", 2, 5, "base", None, checkpoint=ck)  # the page's check, then the run
    rows, _ = caption.caption_batch([images], [""], [2], [5], ["base"], checkpoint=ck)
    assert [r[0] for r in rows[0]] == ["red.png", "blue.png"] and all(r[1] for r in rows[0])
    assert sum(opened.values()) == 2  # one decode per image for the whole request


def test_a_vqa_request_decodes_its_image_once(tmp_path, tiny_models, home, opened, one_thread):
    image = str(make_image(tmp_path / "q.png"))
    ck = tiny_models["vqa"]
    questions = "what color?\nwhat shape?\nhow many?"
    vqa.check_request(image, questions, 1, 5, "base", None, checkpoint=ck)
    rows, _ = vqa.vqa_batch([image], [questions], [1], [5], ["base"], checkpoint=ck)
    assert [r[0] for r in rows[0]] == questions.splitlines() and all(r[1] for r in rows[0])
    assert sum(opened.values()) == 1  # not once per question, not again after the check


def test_a_changed_or_bad_file_is_decoded_again(tmp_path, opened):
    path = make_image(tmp_path / "x.png", "red", size=64)
    first = decoded_image(path)
    assert decoded_image(path) is first and sum(opened.values()) == 1
    make_image(path, "blue", size=80)  # the same name, new content
    second = decoded_image(path)
    assert second is not first and second.size == (80, 80) and sum(opened.values()) == 2
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for _ in range(2):  # a failure is not remembered: each attempt says why
        with pytest.raises(InputError, match="is a text file"):
            decoded_image(bad)
    assert sum(opened.values()) == 4


def test_one_embedder_per_model_and_adapter(tiny_models, home, tmp_path, one_thread):
    loaded = loading.load("retrieval", tiny_models["retrieval"])
    adapter = str(make_lora(tiny_models["retrieval"], "retrieval", tmp_path / "lora"))
    base = audio.embedder(loaded)
    assert audio.embedder(loaded) is base
    tuned = audio.embedder(loaded, adapter)
    assert tuned is not base and tuned.adapter == adapter and audio.embedder(loaded, adapter) is tuned
    audio.search_audio("a high beep", 3, "base", None, checkpoint=tiny_models["retrieval"])
    assert audio.library(tiny_models["retrieval"])[1] is base  # the requests use the same one


def test_every_model_is_read_from_disk_once(tiny_models, home, tmp_path, monkeypatch, one_thread):
    """The warm-up and the first requests of every tab, all at once, load each checkpoint once."""
    from transformers import PreTrainedModel

    from mmdemo.ui.status import ModelStatus

    loading.clear_cache()
    reads: Counter = Counter()
    real = PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        reads[str(path)] += 1
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    image = str(make_image(tmp_path / "i.png"))
    clip = str(ROOT / "assets" / "sounds" / "beep.wav")
    calls = [
        lambda: caption.caption_batch([[image]], [""], [1], [5], ["base"], checkpoint=tiny_models["caption"]),
        lambda: vqa.vqa_batch([image], ["what?"], [1], [5], ["base"], checkpoint=tiny_models["vqa"]),
        lambda: audio.search_audio("a beep", 3, "base", None, checkpoint=tiny_models["retrieval"]),
        lambda: audio.classify_audio(clip, "beep, rain", 2, "base", None, checkpoint=tiny_models["retrieval"]),
        lambda: images.search_images("a dog", 3, "base", None, checkpoint=tiny_models["image_search"]),
    ]
    errors = []

    def run(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    warm = ModelStatus().warm_up(dict(tiny_models))
    threads = [threading.Thread(target=run, args=(fn,)) for fn in calls * 2]
    for t in threads:
        t.start()
    for t in [*threads, warm]:
        t.join()
    assert not errors
    assert reads == Counter({str(tiny_models[t]): 1 for t in tiny_models})
    assert len(loading.loaded_models()) == len(tiny_models)
