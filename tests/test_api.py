"""``gradio_client`` against the app served in-process on the tiny checkpoints: every api_name from
DESIGN.md, the shapes of its results, errors as sentences, and batching of concurrent caption requests."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import ROOT, make_image, make_shapes_dataset, serve_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

API_NAMES = {"caption", "vqa", "search_audio", "classify_audio", "similar_audio", "search_images", "classify_image",
             "similar_images", "finetune_submit", "job_status", "job_cancel"}
ALICE, BOB = "alice-browser-0001", "bob-browser-0002"  # two visitors' browser ids


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """The app on a free port with an isolated MMDEMO_HOME; yields a connected Client."""
    with serve_app(tiny_models, tmp_path_factory.mktemp("api-home")) as url:
        yield Client(url, verbose=False)


def test_every_design_api_name_is_exposed(served):
    named = served.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {name.lstrip("/") for name in named} >= API_NAMES


def test_caption_returns_one_row_per_image(served, tmp_path):
    images = [make_image(tmp_path / f"{c}.png", c) for c in ("red", "green", "blue")]
    table = served.predict([handle_file(str(p)) for p in images], "", 2, 8, "base", ALICE, api_name="/caption")
    assert table["headers"] == ["image", "caption"]
    assert [row[0] for row in table["data"]] == ["red.png", "green.png", "blue.png"]
    assert all(isinstance(row[1], str) and row[1] for row in table["data"])


def test_vqa_returns_one_answer_per_question(served, tmp_path):
    img = make_image(tmp_path / "q.png")
    table = served.predict(handle_file(str(img)), "what color?\nhow many shapes?", 1, 5, "base", None,
                           api_name="/vqa")
    assert table["headers"] == ["question", "answer"]
    assert [row[0] for row in table["data"]] == ["what color?", "how many shapes?"]
    assert all(row[1] for row in table["data"])


def test_search_audio_ranks_library_clips(served):
    table, plot = served.predict("a high beep", 4, "base", ALICE, api_name="/search_audio")
    assert table["headers"] == ["rank", "clip", "score"] and [r[0] for r in table["data"]] == [1, 2, 3, 4]
    scores = [r[2] for r in table["data"]]
    assert scores == sorted(scores, reverse=True) and all(r[1].endswith(".wav") for r in table["data"])
    assert plot["columns"] == ["item", "score"] and len(plot["data"]) == 4


def test_classify_and_similar_audio(served):
    clip = handle_file(str(ROOT / "assets" / "sounds" / "beep.wav"))
    table, plot = served.predict(clip, "beep, rain, siren", 2, "base", ALICE, api_name="/classify_audio")
    assert table["headers"] == ["rank", "label", "score"] and len(table["data"]) == 2
    assert {r[1] for r in table["data"]} <= {"beep", "rain", "siren"} and len(plot["data"]) == 2
    similar = served.predict(clip, 3, "base", None, api_name="/similar_audio")
    assert similar["headers"] == ["rank", "clip", "score"] and len(similar["data"]) == 3
    assert similar["data"][0][1] == "beep.wav" and similar["data"][0][2] == pytest.approx(1.0, abs=1e-3)


def test_project_errors_reach_the_client_as_their_sentence(served, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("hello, I am text")
    with pytest.raises(Exception, match="is a text file, not an image"):
        served.predict([handle_file(str(fake))], "", 2, 8, "base", ALICE, api_name="/caption")
    with pytest.raises(Exception, match="is a text file, not an image"):  # Gradio's Image input lets it through
        served.predict(handle_file(str(fake)), "what is it?", 1, 5, "base", ALICE, api_name="/vqa")
    with pytest.raises(Exception, match="Type some text to search for"):
        served.predict("   ", 3, "base", ALICE, api_name="/search_audio")
    with pytest.raises(Exception, match="There is no adapter called 'missing'"):
        served.predict("a high beep", 3, "missing", ALICE, api_name="/search_audio")


def test_concurrent_caption_requests_share_forward_passes(served, tmp_path, monkeypatch):
    """16 users at once are served in fewer forward passes than requests (Gradio batch=True)."""
    from mmdemo.models import blip as caption_model  # the BLIP family's batches

    passes: list[int] = []
    lock = threading.Lock()
    original = caption_model.caption_generate  # BLIP's generate, with cross-attention keys once per image

    def counting_generate(model, *args, **kwargs):
        with lock:
            passes.append(int(kwargs["pixel_values"].shape[0]))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(caption_model, "caption_generate", counting_generate)
    images = [make_image(tmp_path / f"u{i}.png", ("red", "green", "blue", "black")[i % 4],
                         ("circle", "square", "triangle")[i % 3]) for i in range(16)]
    jobs = [served.submit([handle_file(str(p))], "", 2, 8, "base", ALICE, api_name="/caption") for p in images]
    results = [job.result(timeout=120) for job in jobs]
    assert all(len(r["data"]) == 1 and r["data"][0][1] for r in results)
    assert [r["data"][0][0] for r in results] == [p.name for p in images]  # each user gets their own caption
    print(f"16 concurrent caption requests -> forward passes of sizes {passes}")
    assert sum(passes) == 16
    assert len(passes) < 16, f"16 requests took {len(passes)} forward passes: {passes}"


def test_finetune_submit_status_and_cancel(served, tmp_path):
    """A programmer's round trip: submit a dataset, read the job's record, cancel it; others cannot see it."""
    import shutil

    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data)
    # the last two (optional) inputs: the adapter's name and the minimum number of steps
    job_id = served.predict(handle_file(archive), "caption", "quick", 1, None, None, None, None, "api-user-1",
                            "api-shapes", 30, api_name="/finetune_submit")
    assert isinstance(job_id, str) and job_id
    record = served.predict(job_id, "api-user-1", api_name="/job_status")
    assert record["id"] == job_id and record["task"] == "caption" and record["label"] == "api-shapes"
    assert record["state"] in {"queued", "running", "succeeded"} and record["config"]["epochs"] == 1
    assert record["config"]["min_steps"] == 30 and record["plan"]["steps"] == 30
    with pytest.raises(Exception, match="job"):
        served.predict(job_id, "api-user-2", api_name="/job_status")
    cancelled = served.predict(job_id, "api-user-1", api_name="/job_cancel")
    assert cancelled["id"] == job_id and cancelled["state"] in {"cancelled", "running", "succeeded"}
    if cancelled["state"] == "running":  # a running job stops within seconds
        deadline = time.monotonic() + 60
        while cancelled["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            cancelled = served.predict(job_id, "api-user-1", api_name="/job_status")
    assert cancelled["state"] in {"cancelled", "succeeded"}

    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    with pytest.raises(Exception, match="not a zip archive"):
        served.predict(handle_file(str(bad)), "caption", "quick", None, None, None, None, None, "api-user-1",
                       "", None, api_name="/finetune_submit")


def test_a_long_prefix_batched_with_normal_requests_fails_only_itself(served, tmp_path):
    """Six users at once through the API, one with a 20,000-character prefix: five captions, one sentence."""
    images = [make_image(tmp_path / f"b{i}.png", ("red", "green", "blue")[i % 3]) for i in range(6)]
    prefixes = ["", "a picture of", "", "", "", "red " * 5000]
    jobs = [served.submit([handle_file(str(p))], prefix, 3, 20, "base", ALICE, api_name="/caption")
            for p, prefix in zip(images, prefixes)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result(timeout=120)["data"][0][1])
        except Exception as err:  # noqa: BLE001 - alone in its batch, the bad request raises its sentence
            outcomes.append(f"Refused: {err}")
    assert all(o and not o.startswith("Refused:") for o in outcomes[:5]), outcomes
    assert outcomes[5].startswith("Refused:") and "prefix is 19,999 characters long" in outcomes[5], outcomes[5]
