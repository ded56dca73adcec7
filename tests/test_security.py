"""The app as a hostile visitor meets it: the data folder is not served, nobody uses or sees another user's
adapters and jobs, no server path leaks in an answer. Through ``gradio_client`` and plain HTTP, as a visitor
would send them, against the app served in-process on the tiny checkpoints."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, make_image, make_lora, make_shapes_dataset, make_tone, serve_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

ALICE, BOB = "alice-browser-0001", "bob-browser-0002"
REFUSED = "There is no adapter called"


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    """Alice has a private adapter for every task and one finished fine-tuning job; Bob has nothing."""
    from mmdemo import jobs

    home = tmp_path_factory.mktemp("security-home")
    work = tmp_path_factory.mktemp("security-data")
    names = {}
    for task in ("caption", "vqa", "retrieval"):
        names[task] = f"{task}-alices"
        make_lora(tiny_models[task], task, home / "adapters" / names[task], owner=f"anon:{ALICE}", seed=3)
    data = make_shapes_dataset(work / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(work / "shapes"), "zip", root_dir=data)
    with serve_app(tiny_models, home) as url:
        client = Client(url, verbose=False)
        job_id = client.predict(handle_file(archive), "caption", "quick", 1, None, None, None, None, ALICE,
                                api_name="/finetune_submit")
        job = jobs.wait(job_id, timeout=240)
        assert job.state == "succeeded", job.error
        yield {"url": url, "client": client, "home": home, "names": names, "job": job, "checkpoints": tiny_models}


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _file_url(app, path) -> str:
    return app["url"] + "gradio_api/file=" + urllib.parse.quote(str(path))


def test_the_data_folder_is_not_served(app):
    home, job = app["home"], app["job"]
    private = [home / "jobs.sqlite3", home / ".browser-secret", home / "runs" / job.id / "log.txt",
               home / "runs" / job.id / "upload.zip", next((home / "runs" / job.id).rglob("metadata.csv")),
               home / "adapters" / job.name / "adapter_model.safetensors",
               home / "adapters" / app["names"]["caption"] / "adapter_config.json"]
    for path in private:
        if not path.name.endswith(".zip"):
            assert path.is_file(), path  # it exists: only the server refuses it
        assert _get(_file_url(app, path)) in (403, 404), path
        assert _get(_file_url(app, path.relative_to(home.parent))) in (403, 404), path  # relative spellings too
    sneaky = ROOT / "assets" / ".." / "mmdemo" / "config.py"  # out of an allowed folder by '..'
    assert _get(_file_url(app, sneaky)) in (403, 404)
    # what a page must play or show is served: bundled assets
    assert _get(_file_url(app, ROOT / "assets" / "sounds" / "beep.wav")) == 200


def test_library_clips_are_served_to_play(app, tmp_path):
    from mmdemo.ui import audio

    report, _ = audio.add_clips([str(make_tone(tmp_path / "shared_tone.wav", 500.0))],
                                checkpoint=app["checkpoints"]["retrieval"])
    assert "Added 1" in report
    clip = next((app["home"] / "library-clips").rglob("shared_tone.wav"))
    assert _get(_file_url(app, clip)) == 200


def test_nobody_uses_another_users_adapter(app, tmp_path):
    client, names = app["client"], app["names"]
    img = handle_file(str(make_image(tmp_path / "x.png")))
    clip = handle_file(str(ROOT / "assets" / "sounds" / "beep.wav"))
    calls = {
        "caption": lambda who: client.predict([img], "", 1, 5, names["caption"], who, api_name="/caption"),
        "vqa": lambda who: client.predict(img, "what color?", 1, 3, names["vqa"], who, api_name="/vqa"),
        "search_audio": lambda who: client.predict("a beep", 3, names["retrieval"], who, api_name="/search_audio"),
        "classify_audio": lambda who: client.predict(clip, "beep, rain", 2, names["retrieval"], who,
                                                     api_name="/classify_audio"),
        "similar_audio": lambda who: client.predict(clip, 2, names["retrieval"], who, api_name="/similar_audio"),
    }
    for endpoint, call in calls.items():
        assert call(ALICE), endpoint  # the owner may
        for stranger in (BOB, None, ""):
            with pytest.raises(Exception, match=REFUSED):
                call(stranger)
    # the download and publish paths use the same resolver
    from mmdemo.ui import finetune

    with pytest.raises(Exception, match="no job"):
        finetune.download(app["job"].id, BOB)
    with pytest.raises(Exception, match="no job"):
        finetune.publish(app["job"].id, "bob/stolen", BOB)


def test_jobs_are_private_and_ids_are_checked_the_same_everywhere(app, tmp_path):
    client, job = app["client"], app["job"]
    for stranger in (BOB, "bob-browser-0002 "):
        with pytest.raises(Exception, match="no job"):
            client.predict(job.id, stranger, api_name="/job_status")
        with pytest.raises(Exception, match="no job"):
            client.predict(job.id, stranger, api_name="/job_cancel")
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = handle_file(shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data))
    for blank in (" ", ""):  # refused the same way at submit and at every lookup
        with pytest.raises(Exception, match="no session id yet"):
            client.predict(archive, "caption", "quick", 1, None, None, None, None, blank, api_name="/finetune_submit")
        with pytest.raises(Exception, match="no session id yet"):
            client.predict(job.id, blank, api_name="/job_status")
    with pytest.raises(Exception, match="not valid"):
        client.predict(job.id, "x;y", api_name="/job_cancel")
    assert client.predict(job.id, ALICE, api_name="/job_status")["state"] == "succeeded"


def test_answers_carry_no_server_paths(app):
    from mmdemo.ui import finetune

    home, job = app["home"], app["job"]
    record = app["client"].predict(job.id, ALICE, api_name="/job_status")
    text = json.dumps(record)
    assert record["result"]["adapter"] == job.name and record["result"]["metrics_after"]
    assert str(home) not in text and "/tmp/" not in text, text
    progress, _curve, log, _metrics, _examples = finetune.details(job.id, ALICE)
    assert str(home) not in progress and str(home.resolve()) not in log
    # the owner's download is a short-lived copy outside MMDEMO_HOME
    archive = finetune.download(job.id, ALICE)
    assert archive.endswith(".zip") and not archive.startswith(str(home))
