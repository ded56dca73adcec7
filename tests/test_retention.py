"""Storage and polling: finished runs are deleted after ``MMDEMO_KEEP_RUNS_DAYS`` while adapters and job records
stay, running and queued jobs are never touched, half-written files are removed at start-up and complete ones
kept, a page reads only the events it has not seen, a long job's step records stay bounded, and each user is told
how much space their own jobs and adapters take.

Jobs run in this process (``run_job`` after a ``claim``, as the dispatcher's worker would) on the tiny checkpoints.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import run_next_job
from mmdemo import jobs
from mmdemo.config import Settings, get_settings
from mmdemo.errors import InputError
from mmdemo.jobs import retention
from mmdemo.jobs.dispatcher import Dispatcher
from mmdemo.jobs.queue import STEP_EVENTS, Job, get_queue, is_step_record, thin_losses
from mmdemo.ui import common
from mmdemo.ui import finetune as tab

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores

A, B = "browser-aaaa-1111", "browser-bbbb-2222"
DAY = 86400.0


@pytest.fixture(autouse=True)
def systmp(tmp_path, monkeypatch) -> Path:
    """The system's temporary folder for this test: the download sweep must not see other processes' downloads."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _backdate(job_id: str, days: float) -> None:
    """Make a job look as if it was submitted, ran and ended ``days`` days ago."""
    shift = days * DAY
    with sqlite3.connect(get_queue().path) as db:
        db.execute("UPDATE jobs SET created=created-?, started=started-?, finished=finished-? WHERE id=?",
                   (shift, shift, shift, job_id))


def _job(job_id: str, owner: str = "alice", created: float | None = None) -> Job:
    return Job(id=job_id, owner=owner, task="caption", model=None, preset="quick", config={"batch_size": 8},
               data="unused", name=f"caption-{job_id}", state="queued", created=created or time.time())


def _fill(folder: Path, size: int, name: str = "data.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x" * size)
    return folder


def _make_old(path: Path, days: float = 2) -> None:
    """Set the modification time of ``path`` and everything in it ``days`` back."""
    when = time.time() - days * DAY
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (when, when), follow_symlinks=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ the setting
def test_the_retention_setting_reads_days_or_forever_and_refuses_anything_else(monkeypatch):
    monkeypatch.delenv("MMDEMO_KEEP_RUNS_DAYS", raising=False)
    assert get_settings().keep_runs_days == 7 and get_settings().keep_runs_seconds == 7 * DAY
    for raw, seconds in (("0.5", DAY / 2), ("30", 30 * DAY), ("forever", None), ("Forever", None), ("0", None),
                         ("", 7 * DAY)):
        monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", raw)
        assert get_settings().keep_runs_seconds == seconds, raw
    for raw, sentence in (("a week", "MMDEMO_KEEP_RUNS_DAYS must be a number of days (0 or forever keeps finished "
                                     "runs forever), but it is 'a week'."),
                          ("-1", "MMDEMO_KEEP_RUNS_DAYS must be 0 or more days (0 or forever keeps finished runs "
                                 "forever), not -1."),
                          ("nan", "MMDEMO_KEEP_RUNS_DAYS must be 0 or more days")):
        monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", raw)
        with pytest.raises(InputError) as exc:
            get_settings()
        assert str(exc.value).startswith(sentence) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="must be 0 or more days"):
        Settings(keep_runs_days=float("inf"))
    assert retention.keep_words(7) == "7 days" and retention.keep_words(1) == "1 day"
    assert retention.keep_words(0.5) == "12 hours" and retention.keep_words(0.01) == "14 minutes"


# ----------------------------------------------------------------------- the retention policy on a real job
def test_a_finished_job_older_than_the_retention_is_cleaned_and_its_adapter_kept(home, archive, tiny_models,
                                                                                  tmp_path, monkeypatch, caplog):
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import CAPTION_DEFAULTS
    from mmdemo.models.loading import load

    monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", "7")
    owner = f"anon:{A}"
    kw = dict(checkpoint=tiny_models["caption"], min_steps=20)
    old = tab.submit(archive, "caption", "quick", 1, 1e-3, None, None, None, A, name="old-one", **kw)
    assert run_next_job() == "succeeded"
    recent = tab.submit(archive, "caption", "quick", 2, 1e-3, None, None, None, A, name="recent-one", **kw)
    assert run_next_job() == "succeeded"
    queue = get_queue()
    before = tab.panel(old, A)
    lines_before = tab.timeline(jobs.events(old, owner=owner), tab.job_status(old, A))
    steps_before = [e for e in jobs.events(old, owner=owner) if is_step_record(e)]
    assert len(steps_before) == 20 and queue.run_dir(old).is_dir()
    adapter = home / "adapters" / jobs.get(old, owner).name
    adapter_files = sorted(p.name for p in adapter.iterdir())
    _backdate(old, 8)
    _backdate(recent, 6)  # within the 7 days: kept whole

    with caplog.at_level(logging.INFO, logger="mmdemo.jobs.dispatcher"):
        Dispatcher(queue, slots=1).clean_up()
    said = [r.getMessage() for r in caplog.records if r.name == "mmdemo.jobs.dispatcher"]
    assert len(said) == 1 and said[0].startswith("Deleted 1 finished job's run folder (")
    assert said[0].endswith("finished more than 7 days ago (MMDEMO_KEEP_RUNS_DAYS); their adapters are kept.")

    # the run folder and the per-step records are gone; the other job is untouched
    assert not queue.run_dir(old).exists() and queue.run_dir(recent).is_dir()
    events = jobs.events(old, owner=owner)
    steps = [e["step"] for e in events if is_step_record(e)]
    assert steps == [1, 5, 10, 15, 20]  # the timeline's milestones: first, each quarter, last
    assert len([e for e in jobs.events(recent, owner=owner) if is_step_record(e)]) == 20
    # the job record stays, with everything the panel showed: status, verdict, scores, examples, chart, timeline
    job = jobs.get(old, owner)
    assert job.state == "succeeded" and job.cleaned and job.result["metrics_after"]
    assert tab.job_table(A)["job"].tolist() == [recent, old]
    after = tab.panel(old, A)
    for part in ("verdict", "help"):
        assert after[part] == before[part], part
    for part in ("metrics", "examples", "curve"):
        assert after[part].equals(before[part]), part
    assert len(after["curve"]) == 20
    assert tab.timeline(events, tab.job_status(old, A)) == lines_before
    assert "Finished in" in after["progress"] and "were deleted just now" in after["progress"]
    assert "Training done: 20 steps; the loss went from" in after["timeline"]
    log_text = Path(tab.log_download(old, A)).read_text()
    assert log_text.startswith("This job's log was deleted with the rest of its run folder")
    # the adapter is kept, listed, and still loads and captions as the held-out table says
    assert sorted(p.name for p in adapter.iterdir()) == adapter_files
    assert "old-one" in tab.adapter_names(A) and "pick **old-one** in the Model list" in after["verdict"]
    folder = common.adapter_path("caption", "old-one", owner)
    model = load("caption", tiny_models["caption"])
    row = after["examples"].iloc[0]
    image = tmp_path / "data" / row["example"]
    assert caption([image], options=CAPTION_DEFAULTS, adapter=folder, model=model) == [row["fine-tuned model"]]
    # cleaning again finds nothing; the adapter goes only when its owner deletes it
    assert not retention.clean_expired(queue, 7 * DAY)
    assert tab.delete("old-one", A) == "Deleted “old-one”." and not adapter.exists()


def test_running_and_queued_jobs_are_never_cleaned(home, monkeypatch):
    queue = get_queue()
    long_ago = time.time() - 60 * DAY
    for i, job_id in enumerate(("running", "queued", "cancelled")):
        queue.add(_job(job_id, created=long_ago + i))
        _fill(queue.run_dir(job_id) / "upload", 1000)
        (queue.run_dir(job_id) / "work" / "checkpoints" / "checkpoint-10").mkdir(parents=True)  # no trainer_state
        _make_old(queue.run_dir(job_id), 60)
    assert queue.claim(1).id == "running"
    queue.cancel("cancelled")
    _backdate("cancelled", 30)
    monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", "forever")
    dispatcher = Dispatcher(queue, slots=1)
    dispatcher.clean_up()
    assert all(queue.run_dir(j).is_dir() for j in ("running", "queued", "cancelled"))  # forever: nothing expires
    assert not (queue.run_dir("cancelled") / "work" / "checkpoints" / "checkpoint-10").exists()  # half-written
    for job_id in ("running", "queued"):  # a live or resuming job's checkpoints are its own business
        assert (queue.run_dir(job_id) / "work" / "checkpoints" / "checkpoint-10").is_dir()
    monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", "1")
    dispatcher.clean_up()  # rate-limited: nothing happens until the next turn
    assert queue.run_dir("cancelled").is_dir()
    dispatcher.clean_up(force=True)
    assert not queue.run_dir("cancelled").exists() and queue.get("cancelled").cleaned
    for job_id in ("running", "queued"):
        assert (queue.run_dir(job_id) / "upload" / "data.bin").is_file() and queue.get(job_id).cleaned is None
    assert queue.clean("running") is False and queue.run_dir("running").is_dir()  # even when asked directly


# ---------------------------------------------------------------------------------------- start-up clean-up
def test_start_up_removes_half_written_files_and_keeps_complete_ones(home, systmp, caplog):
    queue = get_queue()
    dead = _dead_pid()
    adapters = home / "adapters"
    gone = [
        _fill(adapters / f".caption-x.tmp-{dead}", 100, "adapter_model.safetensors"),  # its process is dead
        _fill(adapters / f".caption-w.tmp-{os.getpid()}", 100, "adapter_model.safetensors"),  # alive, but old
        _fill(adapters / ".deleting-caption-z-123", 100),
        _fill(home / "uploads" / "inspect-abc123", 100),
        _fill(home / "runs" / "20260101-000000-000000000000", 100),  # no job has it
        _fill(systmp / "mmdemo-download-abc", 100, "shapes.zip"),
    ]
    _make_old(gone[1])
    for path in gone[3:]:
        _make_old(path)
    good = _fill(adapters / "caption-good", 100, "adapter_config.json")
    (good / "mmdemo.json").write_text('{"task": "caption", "owner": "alice"}')
    meta_tmp = good / f".mmdemo.json.tmp-{dead}"
    meta_tmp.write_text("{")
    clip = _fill(home / "library-clips" / "0123456789abcdef", 100, "dog.wav")
    part = clip / ".cat.wav.part"
    part.write_bytes(b"RIFF")
    _make_old(part)
    lonely = home / "library-clips" / "fedcba9876543210" / ".owl.wav.part"
    _fill(lonely.parent, 10, ".owl.wav.part")
    _make_old(lonely.parent)
    probe = home / f".mmdemo-probe-{dead}-abcd1234"
    probe.write_bytes(b"probe")
    queue.add(_job("over"))
    queue.cancel("over")
    queue.add(_job("waiting"))
    checkpoints = {}
    for job_id in ("over", "waiting"):
        folder = queue.run_dir(job_id) / "work" / "checkpoints"
        for name, complete in (("checkpoint-5", True), ("checkpoint-10", False), ("tmp-checkpoint-15", False)):
            _fill(folder / name, 50, "adapter_model.safetensors")
            if complete:
                (folder / name / "trainer_state.json").write_text("{}")
        checkpoints[job_id] = folder
    kept = [
        good / "adapter_config.json",
        good / "mmdemo.json",
        clip / "dog.wav",
        _fill(adapters / f".caption-y.tmp-{os.getpid()}", 100),  # a save under way in a live process
        _fill(home / "uploads" / "inspect-new", 100),  # a dataset check under way
        _fill(home / "runs" / "20260102-000000-000000000000", 100),  # a submit copying its dataset
        _fill(home / "library-clips" / "00000000aaaaaaaa", 10, ".fresh.wav.part"),  # an upload under way
        _fill(systmp / "mmdemo-download-new", 100, "shapes.zip"),
        checkpoints["over"] / "checkpoint-5" / "trainer_state.json",
        *(checkpoints["waiting"] / name for name in ("checkpoint-5", "checkpoint-10", "tmp-checkpoint-15")),
        queue.path,
    ]
    with caplog.at_level(logging.INFO, logger="mmdemo.jobs.dispatcher"):
        Dispatcher(queue, slots=1).clean_up()
    for path in [*gone, meta_tmp, part, lonely, lonely.parent, probe, checkpoints["over"] / "checkpoint-10",
                 checkpoints["over"] / "tmp-checkpoint-15"]:
        assert not path.exists(), path
    for path in kept:
        assert path.exists(), path
    said = [r for r in caplog.records if r.name == "mmdemo.jobs.dispatcher"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert said[0].getMessage() == (
        "Start-up clean-up removed 2 unfinished adapter saves, 1 half-deleted adapter, 1 half-written adapter "
        "details file, 2 partial library uploads, 1 abandoned dataset check, 2 half-written checkpoints of jobs that "
        "are over, 1 run folder without a job, 1 write probe and 1 expired download folder (720 bytes).")
    assert not retention.clean_leftovers(queue)  # nothing more to find


def test_a_shared_home_keeps_a_fresh_save_whose_pid_is_not_alive_here(home):
    """With a job store several replicas share, the pid in a half-written file's name may be another machine's
    process: only the file's age says it is abandoned."""
    queue = get_queue()
    dead = _dead_pid()
    save = _fill(home / "adapters" / f".caption-z.tmp-{dead}", 100, "adapter_model.safetensors")

    class Shared:  # the shared-store queue names its machine (mmdemo.jobs.pg_queue.PostgresQueue.machine)
        machine = "another-host"

        def __getattr__(self, name):
            return getattr(queue, name)

    assert not retention.clean_leftovers(Shared()) and save.exists()
    old = time.time() - 2 * retention.LEFTOVER_SECONDS
    os.utime(save, (old, old))
    for f in save.rglob("*"):
        os.utime(f, (old, old))
    retention.clean_leftovers(Shared())
    assert not save.exists()


# ------------------------------------------------------------------------------------------------- polling
def test_a_page_reads_only_the_events_it_has_not_seen(home, archive, tiny_models, monkeypatch):
    queue = get_queue()
    job_id = tab.submit(archive, "caption", "quick", None, None, None, None, None, A,
                        checkpoint=tiny_models["caption"])
    queue.claim(1)
    read = []
    real = jobs.events

    def spy(job_id, since=0, owner=None, queue=None):
        got = real(job_id, since=since, owner=owner, queue=queue)
        read.append((since, [e["seq"] for e in got]))
        return got

    monkeypatch.setattr(jobs, "events", spy)
    *parts, seen = tab.refresh(job_id, A, {})
    first = read[-1][1]
    assert read[-1][0] == 0 and len(first) == 2  # submitted, started
    *parts, seen = tab.refresh(job_id, A, seen)
    assert read[-1] == (first[-1], [])  # nothing new crossed
    assert all(p == {"__type__": "update"} for p in parts)  # and nothing was sent
    for step in (1, 2, 3):
        queue.progress(job_id, {"phase": "training", "step": step, "total": 60, "loss": 3.0 - step / 10})
    *parts, seen = tab.refresh(job_id, A, seen)
    since, new = read[-1]
    assert since == first[-1] and len(new) == 3
    curve, timeline = parts[tab.POLL_PARTS.index("curve")], parts[tab.POLL_PARTS.index("timeline")]
    assert curve.to_dict("list") == {"step": [1, 2, 3], "loss": [2.9, 2.8, 2.7]}
    assert "Step 3 of 60, loss 2.700 (latest)." in timeline and "Started." in timeline
    # a reload starts a fresh page state: it reads everything once; so does showing another job
    *parts, _ = tab.refresh(job_id, A, {})
    assert read[-1] == (0, [*first, *new])
    other = tab.submit(archive, "caption", "quick", 3, None, None, None, None, A, checkpoint=tiny_models["caption"])
    *parts, seen = tab.refresh(other, A, seen)
    assert read[-1][0] == 0 and len(read[-1][1]) == 1 and "Submitted" in parts[tab.POLL_PARTS.index("timeline")]
    *parts, seen = tab.refresh(job_id, A, seen)
    assert read[-1] == (0, [*first, *new]) and "Step 3 of 60" in parts[tab.POLL_PARTS.index("timeline")]
    assert queue.events(job_id, since=new[0]) == real(job_id, since=new[0])  # the queue's own "since"
    assert [e["seq"] for e in queue.events(job_id, since=new[0])] == new[1:]


def test_a_timeline_folded_poll_by_poll_reads_as_the_whole(home, archive, tiny_models):
    job_id = tab.submit(archive, "caption", "quick", 1, 1e-3, None, None, None, A,
                        checkpoint=tiny_models["caption"], min_steps=20)
    assert run_next_job() == "succeeded"
    events = jobs.events(job_id, owner=f"anon:{A}")
    record = tab.job_status(job_id, A)
    whole = tab.timeline(events, record)
    assert whole[0][1] == "Submitted; waiting in the queue." and whole[-1][1].startswith("Finished in")
    for chunk in (1, 2, 3, 7):
        folded = tab.Timeline()
        for start in range(0, len(events), chunk):
            folded.feed(events[start:start + chunk])
        assert folded.lines(record) == whole, chunk


def test_a_long_job_stores_a_bounded_number_of_step_records(home):
    queue = get_queue()
    queue.add(_job("long"))
    queue.claim(1)
    total, stop = 3000, 2345
    for step in range(1, stop + 1):
        queue.progress("long", {"phase": "training", "step": step, "total": total, "loss": round(5 - step / 1000, 3),
                                "eta": 1.0})
    job = queue.get("long")
    assert (job.step, job.loss) == (stop, round(5 - stop / 1000, 3))  # the row follows every step
    queue.cancel("long")
    queue.finish("long", "cancelled")
    steps = [e["step"] for e in queue.events("long") if is_step_record(e)]
    assert len(steps) <= STEP_EVENTS and steps[0] == 1 and steps[-1] == stop  # first, evenly spaced, where it stopped
    assert all(s % 6 == 0 for s in steps[1:-1])
    lines = tab.timeline(queue.events("long"), queue.get("long").record())
    assert any(s.startswith(f"Training done: {stop:,} steps; the loss went from 4.999 to") for _, s in lines)
    assert queue.clean("long")
    assert [e["step"] for e in queue.events("long") if is_step_record(e)] == [1, 750, 1500, 2250, stop]
    assert tab.timeline(queue.events("long"), queue.get("long").record()) == lines
    losses = [{"step": s, "loss": 1.0} for s in range(1, 100_001)]
    thinned = thin_losses(losses, 100_000)
    assert len(thinned) <= STEP_EVENTS + 1 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 100_000


# --------------------------------------------------------------------------------------------- disk space
def test_the_space_line_counts_only_the_visitor_s_own_jobs_and_adapters(home, monkeypatch):
    monkeypatch.delenv("MMDEMO_KEEP_RUNS_DAYS", raising=False)
    queue = get_queue()
    a, b = f"anon:{A}", f"anon:{B}"
    queue.add(_job("a1", owner=a))
    queue.add(_job("a2", owner=a))
    queue.add(_job("b1", owner=b))
    _fill(queue.run_dir("a1") / "upload", 300_000)
    _fill(queue.run_dir("a2") / "work" / "checkpoints" / "checkpoint-1", 200_000)
    _fill(queue.run_dir("b1"), 5_000_000)

    def adapter(name: str, owner: str | None, size: int, published: bool = False) -> None:
        folder = _fill(home / "adapters" / name, size, "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text("{}")
        meta = {"task": "caption", "owner": owner, "published": published, "name": name}
        (folder / "mmdemo.json").write_text(__import__("json").dumps(meta))

    adapter("mine", a, 1_000_000)
    adapter("theirs-published", b, 2_000_000, published=True)  # A may use it, but it is not A's
    adapter("operators", None, 3_000_000)
    mine = retention.folder_size(home / "adapters" / "mine")
    assert jobs.disk_usage(a) == {"jobs": 500_000, "adapters": mine, "total": 500_000 + mine}
    assert jobs.disk_usage(b)["jobs"] == 5_000_000 and jobs.disk_usage(b)["adapters"] > 2_000_000
    text = tab.space_text(A)
    assert text == (f"Your jobs and adapters use **{retention.size_words(500_000 + mine)}** on this server (jobs "
                    f"488 KB, adapters {retention.size_words(mine)}). A finished job's files (its copy of your "
                    f"dataset, checkpoints and log) are deleted 7 days after it ends, though its scores stay in the "
                    f"list; adapters are kept until you delete them.")
    assert retention.size_words(500_000 + mine) == "1.4 MB" and retention.size_words(0) == "0 bytes"
    assert tab.space_text("") == ""  # no id yet: nothing to say
    *parts, seen = tab.refresh("", A, {})
    assert parts[tab.POLL_PARTS.index("space")] == text
    measured = []
    real = jobs.disk_usage
    monkeypatch.setattr(jobs, "disk_usage", lambda owner: measured.append(owner) or real(owner))
    queue.claim(1)  # a1 starts: its status in the list changes with every step, its space is measured now and then
    queue.progress("a1", {"phase": "training", "step": 1, "total": 60, "loss": 2.0})
    *parts, seen = tab.refresh("", A, seen)
    assert parts[tab.POLL_PARTS.index("space")] == {"__type__": "update"} and measured == []
    assert not isinstance(parts[tab.POLL_PARTS.index("jobs")], dict)  # the list itself is sent
    queue.add(_job("a3", owner=a))  # a job comes: measured again
    _fill(queue.run_dir("a3"), 1_000_000)
    *parts, seen = tab.refresh("", A, seen)
    assert measured == [a] and "(jobs 1.4 MB," in parts[tab.POLL_PARTS.index("space")]
    monkeypatch.setenv("MMDEMO_KEEP_RUNS_DAYS", "forever")
    assert "Finished jobs' files (your dataset copies, checkpoints and logs) are kept; adapters are kept until you " \
           "delete them." in tab.space_text(A)
    assert "5.0 MB" not in tab.space_text(A) and "4.8 MB" in tab.space_text(B)
