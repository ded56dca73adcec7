"""The Fine-tune tab's handlers, called as plain functions (no browser), point by point: one source of truth
for progress, re-attaching after a reload, a readable timeline and the raw log, Advanced settings, dataset
reports and example datasets, results people can read (and that the Caption tab reproduces), named adapters
(rename, delete), submit feedback and duplicates, and a truthful model card.

Jobs run in this process (``run_job`` after a ``claim``, as the dispatcher's worker would) on the tiny
checkpoints, so a whole job takes a few seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_next_job
from mmdemo import jobs
from mmdemo.errors import InputError, JobError
from mmdemo.jobs.evaluate import verdict
from mmdemo.jobs.queue import get_queue
from mmdemo.models.loading import ADAPTER_META
from mmdemo.ui import common
from mmdemo.ui import finetune as tab

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores

A, B = "browser-aaaa-1111", "browser-bbbb-2222"  # two visitors' browser ids
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF\uFE0F]")  # boxes without an emoji font


def _text(*values) -> str:
    return "\n".join(v.to_string() if hasattr(v, "to_string") else str(v) for v in values)


# ----------------------------------------------------------------------------------------- 5. the dataset
def test_the_report_before_an_upload_is_a_hint_not_an_error(home):
    for task in ("caption", "vqa", "retrieval"):
        text, preview, counts = tab.validate(None, task)
        assert text.startswith("Upload a zip of your dataset") and counts is None
        assert list(preview.columns) == tab.preview_headers(task)  # headers, not 1 | 2 | 3


def test_reports_say_what_is_wrong_in_sentences(home, archive):
    text, preview, counts = tab.validate(archive, "caption")
    assert text.startswith("**Ready to train.**") and "12 examples in 12 files" in text and len(preview) == 8
    assert counts == {"train": 10, "test": 2}
    bad, _, counts = tab.validate(archive, "vqa")
    assert bad.startswith("**Not ready yet**") and counts is None
    assert "has the columns file\\_name and text, but the vqa task needs file\\_name, question and answer" in bad
    assert not EMOJI.search(text + bad)
    with pytest.raises(InputError) as exc:
        tab.submit(archive, "vqa", "quick", None, None, None, None, None, A)
    message = str(exc.value)
    assert ".;" not in message and ".." not in message and message.count("(1 problem)") == 1, message


def test_example_datasets_download_and_pass_their_own_check(home, tmp_path):
    for task in ("caption", "vqa", "retrieval"):
        path = Path(tab.example_dataset(task))
        assert path.name == f"{task}-example.zip" and path.stat().st_size < 400_000
        assert not str(path).startswith(str(home))  # nothing under MMDEMO_HOME is served
        text, _, counts = tab.validate(str(path), task)
        assert text.startswith("**Ready to train.**"), text
        assert counts["train"] >= 10


# ---------------------------------------------------------------------------------------- 4. settings
def test_advanced_fields_show_the_preset_and_refuse_impossible_values(home):
    assert tab.preset_values("quick") == [5, 3e-4, 8, 16, 8, 60]
    assert tab.preset_values("thorough") == [20, 1e-4, 32, 64, 8, 300]
    plan = tab.plan_text({"train": 10, "test": 2}, "quick", *tab.preset_values("quick"))
    assert "**60 steps** (30 epochs)" in plan and "5 epochs would be 10 steps, fewer than the minimum of 60" in plan
    assert "**100 steps** (50 epochs)" in tab.plan_text({"train": 10, "test": 2}, "quick", 50)
    assert tab.plan_text(None, "quick").startswith("Upload a dataset")
    cases = {(0, None, None): "Epochs must be a whole number from 1 to 200, not 0.",
             (2.5, None, None): "Epochs must be a whole number, not 2.5.",
             (None, 0, None): "The learning rate must be more than 0 and at most 0.1",
             (None, None, 1000): "The LoRA rank must be a whole number from 1 to 256, not 1000."}
    for (epochs, lr, rank), sentence in cases.items():
        assert sentence in tab.plan_text({"train": 10, "test": 2}, "quick", epochs, lr, rank)
        with pytest.raises(InputError, match=re.escape(sentence)):
            jobs.TrainConfig.from_preset("quick", **tab.overrides(epochs, lr, rank))
    for field in tab.FIELDS:
        assert tab.FIELD_INFO[field] and "\n" not in tab.FIELD_INFO[field]


# ------------------------------------------------------------------- 1, 2, 8: queue, submit and re-attach
def test_a_fresh_job_waits_in_words_and_a_cancelled_one_has_no_full_bar(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", 2, None, None, None, None, A, checkpoint=tiny_models["caption"])
    record = tab.job_status(job_id, A)
    assert record["state"] == "queued" and record["position"] == 1 and record["config"]["epochs"] == 2
    assert tab.describe(record)["title"] == "Waiting in the queue (position 1)"
    html = tab.progress_html(record)
    assert "Waiting in the queue (position 1)" in html and "<progress" not in html and "0/0" not in html
    row = tab.job_table(A).iloc[0]
    assert row["status"] == "Waiting in the queue (position 1)" and row["job"] == job_id
    assert tab.job_table(B).empty and list(tab.job_table(B).columns) == tab.JOB_HEADERS
    with pytest.raises(JobError):
        tab.job_status(job_id, B)
    assert tab.job_cancel(job_id, A)["state"] == "cancelled"
    parts = tab.panel(job_id, A)
    assert "Cancelled while waiting in the queue" in parts["progress"] and "<progress" not in parts["progress"]
    assert parts["curve"].empty and list(parts["metrics"].columns) == tab.METRIC_HEADERS
    assert "Cancelled while waiting in the queue; it never started." in parts["timeline"]
    with pytest.raises(InputError, match="no adapter yet"):
        tab.download(job_id, A)
    with pytest.raises(InputError, match="Upload a zip"):
        tab.submit(None, "caption", "quick", None, None, None, None, None, A)


def test_a_claimed_job_is_starting_not_queued_and_the_list_agrees_with_the_panel(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", None, None, None, None, None, A,
                        checkpoint=tiny_models["caption"])
    queue = get_queue()
    queue.claim(1)
    record = tab.job_status(job_id, A)
    assert record["state"] == "running" and record["phase"] == "starting" and record["step"] is None
    assert tab.describe(record)["title"] == "Running: checking the dataset"
    assert tab.panel(job_id, A)["curve"].empty and "Started." in tab.panel(job_id, A)["timeline"]
    queue.progress(job_id, {"phase": "training", "step": 12, "total": 60, "loss": 2.5, "eta": 30.0})
    parts = tab.panel(job_id, A)  # events read since the last poll are added to those seen before
    assert parts["curve"].to_dict("list") == {"step": [12], "loss": [2.5]}
    assert "Step 12 of 60, loss 2.500 (latest)." in parts["timeline"] and "Started." in parts["timeline"]
    with pytest.raises(JobError, match="no job"):
        tab.panel(job_id, B)  # the cache serves nobody else
    record = tab.job_status(job_id, A)
    d = tab.describe(record)
    assert d["short"] == "Training, step 12 of 60" and "about 30 seconds of training left" in d["detail"]
    assert 10 < d["percent"] < 90
    assert tab.job_table(A).iloc[0]["status"] == d["short"]  # one source of truth


def test_submit_feedback_duplicates_and_names(home, archive, tiny_models):
    kw = dict(checkpoint=tiny_models["caption"])
    first = tab.submit(archive, "caption", "quick", None, None, None, None, None, A, name="shapes-v1", **kw)
    text = tab.submitted_text(first, A)
    assert "**Submitted**: job" in text and "**shapes-v1**" in text and "number 1 in the queue, next to start" in text
    assert "trains 60 steps" in text and "no finished job to time it by yet" in text
    with pytest.raises(JobError, match="You already have this job waiting in the queue .* the same dataset, task "
                                       "and settings"):
        tab.submit(archive, "caption", "quick", None, None, None, None, None, A, **kw)  # a double click
    assert len(jobs.list_jobs(f"anon:{A}")) == 1
    with pytest.raises(InputError, match="will already make an adapter called “shapes-v1”"):
        tab.submit(archive, "caption", "quick", 3, None, None, None, None, A, name="shapes-v1", **kw)
    with pytest.raises(InputError, match="cannot be an adapter name"):
        tab.submit(archive, "caption", "quick", 3, None, None, None, None, A, name="my adapter!", **kw)
    with pytest.raises(InputError, match="“base” means the model without an adapter"):
        tab.submit(archive, "caption", "quick", 3, None, None, None, None, A, name="base", **kw)
    second = tab.submit(archive, "caption", "quick", 3, None, None, None, None, A, **kw)  # other settings: fine
    assert jobs.get(second, f"anon:{A}").display_name == "shapes-caption"  # from the file name
    assert "number 2 in the queue (1 job ahead of it)" in tab.submitted_text(second, A)
    other = tab.submit(archive, "caption", "quick", None, None, None, None, None, B, **kw)  # same job, other user
    assert jobs.get(other, f"anon:{B}").display_name == "shapes-caption"


def test_a_reload_opens_the_running_job_else_the_newest(home, archive, tiny_models):
    assert tab.latest_job(A) == "" and tab.latest_job("") == ""
    kw = dict(checkpoint=tiny_models["caption"])
    older = tab.submit(archive, "caption", "quick", 1, None, None, None, None, A, **kw)
    newer = tab.submit(archive, "caption", "quick", 2, None, None, None, None, A, **kw)
    assert tab.latest_job(A) == newer
    get_queue().claim(1)  # the older one starts
    assert tab.latest_job(A) == older and tab.latest_job(B) == ""


# ------------------------------------------------------- a whole job: 1, 3, 6, 7, 9 on what it really did
@pytest.fixture
def finished(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", 1, 1e-3, None, None, None, A, name="shapes-v1",
                        checkpoint=tiny_models["caption"], min_steps=20)
    assert run_next_job() == "succeeded"
    return job_id


def test_a_finished_job_shows_its_real_totals_and_wall_time(finished):
    record = tab.job_status(finished, A)
    assert record["phase"] == "finished" and (record["step"], record["total"]) == (20, 20)
    d = tab.describe(record)
    assert d["title"].startswith("Finished in ") and d["percent"] == 100
    assert d["detail"] == "Trained 20 of 20 steps (10 epochs over 10 examples)."
    assert "saving" not in tab.progress_html(record) and "1/1" not in tab.progress_html(record)
    assert tab.job_table(A).iloc[0]["status"] == d["title"]
    assert record["result"]["adapter_name"] == "shapes-v1" and "losses" not in record["result"]


def test_the_timeline_reads_as_sentences_and_the_raw_log_is_a_private_download(finished, home):
    parts = tab.panel(finished, A)
    lines = tab.timeline(jobs.events(finished, owner=f"anon:{A}"), tab.job_status(finished, A))
    sentences = [s for _, s in lines]
    assert sentences[0] == "Submitted; waiting in the queue." and sentences[-1].startswith("Finished in ")
    assert any(s.startswith("Base model scores on the held-out examples: BLEU-4 ") for s in sentences)
    assert any(s.startswith("Fine-tuned model scores on the held-out examples: BLEU-4 ") for s in sentences)
    assert any(s.startswith("Training done: 20 steps; the loss went from ") for s in sentences)
    assert len(lines) < 25  # milestones, not a line per step
    html = parts["timeline"]
    assert html.index("Finished in") < html.index("Submitted")  # newest first: the latest line is in view
    for raw in ("{", "phase=", "message=", str(home), "/tmp/"):
        assert raw not in html, raw
    assert list(parts["curve"].columns) == ["step", "loss"] and len(parts["curve"]) == 20
    log = Path(tab.log_download(finished, A))
    assert log.is_file() and not str(log).startswith(str(home)) and str(home) not in log.read_text()
    with pytest.raises(JobError, match="no job"):
        tab.log_download(finished, B)


def test_results_explain_the_metrics_and_the_caption_tab_gives_the_table_s_caption(finished, tiny_models, tmp_path):
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import CAPTION_DEFAULTS
    from mmdemo.models.loading import load

    parts = tab.panel(finished, A)
    comparison = tab.job_status(finished, A)["result"]["comparison"]
    assert comparison["total"] == 2 and parts["verdict"].startswith(f"**{verdict('caption', comparison)}**")
    assert "pick **shapes-v1** in the Model list of the Caption tab" in parts["verdict"]
    assert list(parts["metrics"]["measure"]) == ["BLEU-4", "CIDEr"]
    assert "higher is better" in parts["help"] and "BLEU-4" in parts["help"] and "CIDEr" in parts["help"]
    table = parts["examples"]
    assert list(table.columns) == tab.EXAMPLE_HEADERS and table.columns[1] == "fine-tuned model" and len(table) == 2
    # the adapter chosen by name in the Caption tab, decoded with the tab's defaults, gives the table's caption
    folder = common.adapter_path("caption", "shapes-v1", f"anon:{A}")
    data = Path(tmp_path) / "data"
    model = load("caption", tiny_models["caption"])
    for _, row in table.iterrows():
        image = data / row["example"]
        assert caption([image], options=CAPTION_DEFAULTS, adapter=folder, model=model) == [row["fine-tuned model"]]
        assert caption([image], options=CAPTION_DEFAULTS, model=model) == [row["base model"]]
    assert not EMOJI.search(_text(*parts.values()))


def test_verdicts_are_one_plain_sentence():
    c = {"total": 20, "better": 14, "worse": 2, "same": 4, "base_right": 3, "adapter_right": 15}
    assert verdict("caption", c) == ("The fine-tuned model matches the held-out captions better than the base model "
                                     "on 14 of 20 examples (worse on 2 and the same on 4).")
    assert verdict("caption", {**c, "better": 0, "worse": 0, "same": 20}).startswith(
        "The fine-tuned model writes the same captions as the base model for all 20 held-out examples")
    assert verdict("vqa", c) == ("The fine-tuned model answers 15 of 20 held-out questions exactly right; the base "
                                 "model answered 3.")
    assert verdict("retrieval", c) == ("The fine-tuned model finds the right description for 15 of 20 held-out "
                                       "clips; the base model for 3.")
    assert verdict("caption", None) == "There were no held-out examples to compare the two models on."


def test_the_model_card_records_what_ran(finished, home):
    job = jobs.get(finished, f"anon:{A}")
    folder = home / "adapters" / job.name
    meta = json.loads((folder / ADAPTER_META).read_text())
    assert meta["name"] == "shapes-v1" and meta["preset"] == "quick"
    assert meta["hyperparameters"]["epochs"] == 1  # asked for
    assert meta["training"]["steps_done"] == 20 and meta["training"]["epochs_done"] == 10  # what ran
    assert meta["training"]["raised_by_min_steps"] is True and meta["comparison"]["total"] == 2
    card = (folder / "README.md").read_text()
    assert "# shapes-v1" in card and "Trained 20 of 20 steps: 10 epochs (1 were asked for" in card
    assert "at least 20 steps" in card and "| BLEU-4 |" in card and "higher is better" in card
    assert "epochs=1" not in card and str(home) not in card and "/tmp/" not in card
    assert "/" not in json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_named_adapters_are_listed_renamed_and_deleted_by_their_owner_only(finished, home, archive, tiny_models):
    owner = f"anon:{A}"
    table = tab.adapter_table(A)
    row = table.iloc[0]
    assert (row["name"], row["task"], row["preset"], row["shared"]) == ("shapes-v1", "Caption", "quick (changed)",
                                                                         "private")
    assert row["score on held-out examples"].startswith("BLEU-4 ") and "(base model " in row["score on held-out examples"]
    assert tab.adapter_table(B).empty and list(tab.adapter_table(B).columns) == tab.ADAPTER_HEADERS
    assert common.adapter_choices("caption", owner) == ["base", "shapes-v1"]  # the other tabs' Model list
    assert common.adapter_choices("caption", f"anon:{B}") == ["base"]
    # a name is unique per owner: another visitor may use it, the owner may not twice
    with pytest.raises(InputError, match="You already have an adapter called “shapes-v1”"):
        tab.submit(archive, "caption", "quick", 7, None, None, None, None, A, name="shapes-v1",
                   checkpoint=tiny_models["caption"])
    for stranger in (B,):
        with pytest.raises(JobError, match="There is no adapter called 'shapes-v1' of yours"):
            tab.rename("shapes-v1", "mine-now", stranger)
        with pytest.raises(JobError, match="There is no adapter called 'shapes-v1' of yours"):
            tab.delete("shapes-v1", stranger)
        with pytest.raises(JobError, match="There is no adapter called 'shapes-v1' of yours"):
            tab.download_adapter("shapes-v1", stranger)
    with pytest.raises(InputError, match="cannot be an adapter name"):
        tab.rename("shapes-v1", "../x", A)
    assert tab.rename("shapes-v1", "shapes-v2", A) == ("Renamed “shapes-v1” to “shapes-v2”. The Model lists of the "
                                                       "other tabs show the new name.")
    assert common.adapter_choices("caption", owner) == ["base", "shapes-v2"]
    assert common.adapter_path("caption", "shapes-v2", owner).endswith(jobs.get(finished, owner).name)
    assert tab.job_table(A).iloc[0]["adapter"] == "shapes-v2" and "**shapes-v2**" in tab.panel(finished, A)["verdict"]
    archive_path = Path(tab.download_adapter("shapes-v2", A))
    assert archive_path.name == "shapes-v2.zip" and not str(archive_path).startswith(str(home))
    import zipfile

    with zipfile.ZipFile(archive_path) as zf:
        assert "shapes-v2/adapter_config.json" in zf.namelist()
    # published: the copy on the Hub stays, and the sentence says so
    folder = home / "adapters" / jobs.get(finished, owner).name
    meta = json.loads((folder / ADAPTER_META).read_text())
    (folder / ADAPTER_META).write_text(json.dumps({**meta, "published": True, "hub_repo": "alice/shapes"}))
    assert common.adapter_choices("caption", f"anon:{B}") == ["base", "shapes-v2"]  # everyone may use it now...
    with pytest.raises(JobError, match="only its owner can delete it"):
        tab.delete("shapes-v2", B)  # ...but not delete it
    said = tab.delete("shapes-v2", A)
    assert said.startswith("Deleted “shapes-v2” from this app.") and "alice/shapes" in said and "not deleted" in said
    assert not folder.exists() and common.adapter_choices("caption", owner) == ["base"]
    assert "has been deleted" in tab.panel(finished, A)["verdict"]


def test_the_estimate_comes_from_earlier_jobs(finished, archive, tiny_models):
    assert jobs.estimate_seconds("caption", 20) > 0 and jobs.estimate_seconds("vqa", 20) is None
    job_id = tab.submit(archive, "caption", "quick", 2, None, None, None, None, A,
                        checkpoint=tiny_models["caption"])
    assert "from the last jobs on this server, expect it to take about" in tab.submitted_text(job_id, A)


def test_a_failed_job_says_where_and_why(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", 1, None, None, None, None, A, checkpoint="/no/such/model")
    assert run_next_job() == "failed"
    record = tab.job_status(job_id, A)
    d = tab.describe(record)
    assert d["title"].startswith("Failed while ") and d["percent"] is None and d["detail"]
    assert tab.job_table(A).iloc[0]["status"] == "Failed"


def test_the_page_refresh_sends_only_what_changed(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", None, None, None, None, None, A,
                        checkpoint=tiny_models["caption"])
    first = tab.refresh(job_id, A, {})
    *parts, seen = first
    assert len(parts) == len(tab.POLL_PARTS) and "Waiting in the queue (position 1)" in parts[1]
    *again, seen = tab.refresh(job_id, A, seen)
    assert all(isinstance(p, dict) and p.get("__type__") == "update" and len(p) == 1 for p in again)  # all skipped
    get_queue().claim(1)
    *changed, _ = tab.refresh(job_id, A, seen)
    assert "Running: checking the dataset" in changed[1] and "Checking the dataset" in changed[0].to_string()
    *strangers, _ = tab.refresh(job_id, B, {})  # another visitor's job id: a sentence, not an error
    assert "There is no job" in strangers[1] and strangers[0].empty
