"""Fine-tune tab: upload a dataset, read its report, name and submit a LoRA job, follow it, read and use its result.

Jobs run in worker processes behind :mod:`mmdemo.jobs` (started once per app by ``warm_up``/``build``); this
module only lays out widgets and reads the job's stored record and events, every 2 s (``gr.Timer``) and when the
page opens, so a reloaded page or another browser re-attaches to the newest job. Each page keeps the last event it
has seen in its own session state (:class:`JobFeed`) and asks only for newer ones; the timeline and the loss chart
are folded from those and redrawn only when something changed. Everything the page says about
a job comes from one place, :func:`describe`, fed by the job's row (state, phase, step of total): the progress
line, the bar and the job list never disagree. The owner is the logged-in Hugging Face user (``gr.OAuthProfile``)
or an anonymous id kept in the browser (``gr.BrowserState``); each owner sees, cancels, renames and deletes only
their own jobs and adapters.
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from mmdemo import jobs
from mmdemo.config import Settings, folder_problem, get_settings
from mmdemo.data import example_zip, plural
from mmdemo.errors import InputError, JobError, MMDemoError
from mmdemo.jobs.evaluate import METRICS, verdict
from mmdemo.models.registry import TASKS
from mmdemo.ui.common import BASE, file_path, owner_of, user_errors
from mmdemo.ui.context import CHECK_CONCURRENCY, DETAILED, UIContext

TITLE = "Fine-tune"
log = logging.getLogger(__name__)

PRESET_HELP = {"quick": "Quick: a few minutes (rank 8, at least 60 steps)",
               "balanced": "Balanced: about twice as long (rank 16, at least 150 steps)",
               "thorough": "Thorough: about five times as long (rank 32, at least 300 steps)"}
FIELDS = ("epochs", "learning_rate", "rank", "alpha", "batch_size", "min_steps")
FIELD_LABELS = {"epochs": "Epochs", "learning_rate": "Learning rate", "rank": "LoRA rank", "alpha": "LoRA alpha",
                "batch_size": "Batch size", "min_steps": "Minimum steps"}
FIELD_INFO = {
    "epochs": "How many times training goes through all your examples (1 to 200); more learns more, but can "
              "learn them by heart.",
    "learning_rate": "How big each learning step is (above 0, at most 0.1); too high makes training unstable, too "
                     "low learns little.",
    "rank": "LoRA rank: how much the adapter can learn, and its size (1 to 256); 8 to 32 is usual.",
    "alpha": "LoRA alpha: how strongly the adapter changes the model (1 to 1024); typing a rank sets it to twice "
             "the rank, as in the presets, so that a bigger rank does not learn slower.",
    "batch_size": "How many examples each step learns from (1 to 256); lower it if memory runs out.",
    "min_steps": "Training runs at least this many steps (0 to 100,000), so a small dataset gets more epochs "
                 "than asked for.",
}
def preview_headers(task: str) -> list[str]:
    """The columns of the dataset preview: the file and the task's metadata columns."""
    return ["file_name", *TASKS[task].columns]


JOB_HEADERS = ["adapter", "task", "status", "submitted", "job"]
ADAPTER_HEADERS = ["name", "task", "created (UTC)", "preset", "score on held-out examples", "shared"]
METRIC_HEADERS = ["measure", "base model", "fine-tuned", "change"]
EXAMPLE_HEADERS = ["example", "fine-tuned model", "expected", "base model"]
STAGES = ("checking the dataset", "loading the base model", "preparing the examples", "scoring the base model",
          "training", "scoring the fine-tuned model", "saving the adapter")
STAGE_START = (0, 2, 4, 6, 10, 90, 96, 100)  # overall percent at which each stage starts (training is most)
NO_JOB = "No job yet: upload a dataset and submit it; its progress shows here."


def _table(headers: list[str], rows: list[list] | None = None) -> pd.DataFrame:
    """A table that shows its column names even when empty (a bare one shows ``1 | 2 | 3``)."""
    return pd.DataFrame(rows or [], columns=headers)


# ------------------------------------------------------------------------------------------------ the dataset
def validate(upload, task: str) -> tuple[str, pd.DataFrame, dict | None]:
    """The dataset's report (counts, problems, each a sentence), a preview of its first examples, and its
    counts (``{"train", "test"}``, for the training plan); a gentle hint while nothing is uploaded."""
    task = task if task in TASKS else "caption"
    path = file_path(upload)
    if not path:
        return (f"Upload a zip of your dataset: {TASKS[task].data_help}. Not sure how? Download the example dataset "
                f"and look inside.", _table(preview_headers(task)), None)
    with tempfile.TemporaryDirectory(prefix="inspect-", dir=_scratch()) as workdir:  # a check only: nothing kept
        report = jobs.inspect_dataset(path, task, Path(workdir))
        rows = report.preview(8)
    preview = _table(preview_headers(task), [[r.get("file"), *(r.get(c, "") for c in preview_headers(task)[1:])]
                                             for r in rows])
    status = "**Ready to train.**" if report.ok else "**Not ready yet**: fix the problems below, then upload again."
    counts = {"train": len(report.train), "test": len(report.test)} if report.ok else None
    return f"{status}\n\n{_md(report.summary())}", preview, counts


def _md(text: str) -> str:
    """Text from the dataset (file names, captions) shown literally in Markdown."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", text)


def _scratch() -> Path:
    folder = get_settings().home / "uploads"  # on the data disk: an unpacked dataset can be large
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobError(folder_problem(err) or f"The data folder (MMDEMO_HOME) cannot be used ({err.strerror}).") \
            from None
    return folder


_EXAMPLES_DIR: list[Path] = []


def example_dataset(task: str) -> str:
    """A small example dataset for ``task`` as a zip to download (made once per app, in a temporary folder)."""
    task = task if task in TASKS else "caption"
    if not _EXAMPLES_DIR or not _EXAMPLES_DIR[0].is_dir():
        _EXAMPLES_DIR[:] = [Path(tempfile.mkdtemp(prefix="mmdemo-examples-"))]
    return str(example_zip(task, _EXAMPLES_DIR[0]))


# ---------------------------------------------------------------------------------------------------- settings
def preset_values(preset: str) -> list:
    """The preset's value of each Advanced field, in ``FIELDS`` order."""
    config = jobs.PRESETS.get(preset or "quick", jobs.PRESETS["quick"])
    return [getattr(config, f) for f in FIELDS]


def alpha_for_rank(rank, preset: str):
    """The alpha that keeps the preset's alpha/rank ratio for a typed rank (the field as it is for anything else)."""
    config = jobs.PRESETS.get(preset or "quick", jobs.PRESETS["quick"])
    try:
        return jobs.TrainConfig.from_preset(config.preset, rank=_whole(rank, "The LoRA rank")).alpha
    except InputError:
        return gr.skip()


def _whole(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, not {value!r}.") from None
    if not number.is_integer():
        raise InputError(f"{what} must be a whole number, not {number:g}.")
    return int(number)


def _number(value, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, not {value!r}.") from None


def overrides(epochs=None, lr=None, rank=None, alpha=None, batch_size=None, min_steps=None) -> dict:
    """The Advanced fields as training settings; empty ones keep the preset's, impossible ones are refused
    (by :class:`mmdemo.jobs.TrainConfig`, with a sentence)."""
    return {"epochs": _whole(epochs, "Epochs"), "learning_rate": _number(lr, "The learning rate"),
            "rank": _whole(rank, "The LoRA rank"), "alpha": _whole(alpha, "The LoRA alpha"),
            "batch_size": _whole(batch_size, "The batch size"), "min_steps": _whole(min_steps, "Minimum steps")}


def plan_text(counts: dict | None, preset: str, epochs=None, lr=None, rank=None, alpha=None, batch_size=None,
              min_steps=None) -> str:
    """What the settings will do with this dataset, in words (steps and epochs after the minimum-steps rule)."""
    try:
        config = jobs.TrainConfig.from_preset(preset, **overrides(epochs, lr, rank, alpha, batch_size, min_steps))
    except MMDemoError as err:
        return f"**These settings cannot be used**: {err}"
    if not counts:
        return "Upload a dataset to see how many steps these settings train."
    return _plan_words(jobs.training_plan(config, counts["train"]))


def _plan_words(plan: dict) -> str:
    epochs = f"{plan['epochs']:g} {'epoch' if plan['epochs'] == 1 else 'epochs'}"
    text = (f"This trains **{plan['steps']:,} steps** ({epochs}): {plural(plan['train_examples'], 'example')} in "
            f"batches of {plan['batch_size']} make {plural(plan['steps_per_epoch'], 'step')} per epoch.")
    if plan["raised_by_min_steps"]:
        asked = plan["epochs_requested"] * plan["steps_per_epoch"]
        text += (f" {plural(plan['epochs_requested'], 'epoch')} would be {plural(asked, 'step')}, fewer than the "
                 f"minimum of {plan['min_steps']:,}, so training runs longer.")
    return text


# ------------------------------------------------------------------------------------------------------ submit
def base_model_names(ctx, task: str) -> list[str]:
    """The base models a ``task`` adapter can be trained on: ``base`` (the tab's default) and the tab's others."""
    if task not in TASKS:
        return [BASE]
    return [BASE, *(n for n in ctx.base_models(task).names() if not n.endswith(DETAILED))]


def base_checkpoint(ctx, task: str, name: str | None) -> str | None:
    """The checkpoint of the base model chosen by ``name`` (empty: the tab's default); a sentence for another."""
    if task not in TASKS or not name or name == BASE:
        return ctx.checkpoint(task) if task in TASKS else None
    entries = ctx.base_models(task).entries()
    if name not in entries or name.endswith(DETAILED):
        raise InputError(f"{name} is not a base model of the {TASKS[task].title} tab; choose one of "
                         f"{', '.join(base_model_names(ctx, task))}.")
    return entries[name][0]


def submit(upload, task, preset, epochs, lr, rank, alpha, batch_size, browser_id,
           profile: gr.OAuthProfile | None = None, *, checkpoint: str | None = None, name: str | None = None,
           min_steps=None) -> str:
    """Queue a job; returns its id. ``name`` names the adapter (empty: a readable free name)."""
    path = file_path(upload)
    owner = owner_of(browser_id, profile)
    if not path:
        raise InputError("Upload a zip of your dataset first (media files plus metadata.csv).")
    if task not in TASKS:
        raise InputError(f"Pick a task: {', '.join(TASKS)}.")
    job = jobs.submit(task, path, owner=owner, preset=preset or "quick", model=checkpoint,
                      name=(name or "").strip() or None,
                      **overrides(epochs, lr, rank, alpha, batch_size, min_steps))
    return job.id


def submitted_text(job_id: str, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """The confirmation after a submit: which adapter, the queue position and a time estimate."""
    if not job_id:
        return ""
    job = jobs.get(job_id, owner_of(browser_id, profile))
    plan = job.plan or {}
    if job.state == "queued" and job.position:
        ahead = job.position - 1
        where = (f"It is number {job.position} in the queue"
                 + (f" ({plural(ahead, 'job')} ahead of it)." if ahead else ", next to start."))
    else:
        where = "It has already started." if job.state == "running" else f"It has already {job.state}."
    steps = plan.get("steps")
    estimate = jobs.estimate_seconds(job.task, steps) if steps else None
    if estimate is not None:
        when = (f" It trains {steps:,} steps; from the last jobs on this server, expect it to take about "
                f"{_duration(estimate)} once it starts.")
    elif steps:
        when = (f" It trains {steps:,} steps; this server has no finished job to time it by yet, so the progress "
                f"bar shows the time left once training starts.")
    else:
        when = ""
    return f"**Submitted**: job {job.id}, which makes the adapter **{job.display_name}**. {where}{when}"


# ------------------------------------------------------------------------------------------------ API: status
def public_record(job: jobs.Job) -> dict:
    """The job's record as the page and the API show it: names, not server paths."""
    record = job.record()
    result = dict(record.get("result") or {})
    if "adapter" in result:
        result["adapter"] = job.name  # the folder's name: resolves like the display name, for API clients
        result["adapter_name"] = job.display_name  # what the Model lists show
    result.pop("losses", None)  # the events carry them; the record stays small
    record["result"] = result or None
    if record.get("model") and Path(record["model"]).is_absolute():
        record["model"] = Path(record["model"]).name
    return scrub(record)


def scrub(value):
    """``value`` with every mention of the data folder's location replaced by ``MMDEMO_HOME``."""
    if isinstance(value, str):
        home = get_settings().home
        for prefix in sorted({str(home.resolve()), str(home.absolute())}, key=len, reverse=True):
            value = value.replace(prefix, "MMDEMO_HOME")
        return value
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def job_status(job_id: str, browser_id, profile: gr.OAuthProfile | None = None) -> dict:
    """The job's record: state, queue position, phase, step/total, loss, ETA, metrics when finished."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    return public_record(jobs.get(job_id, owner))


def job_cancel(job_id: str, browser_id, profile: gr.OAuthProfile | None = None) -> dict:
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    return public_record(jobs.cancel(job_id, owner))


def latest_job(browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """The job a freshly opened page shows: the owner's newest running job, else their newest job, else ""."""
    try:
        owner = owner_of(browser_id, profile)
        mine = jobs.list_jobs(owner)  # newest first
    except MMDemoError:  # no id yet, or a data folder that cannot be used (the page's banner says so)
        return ""
    running = [j for j in mine if j.state == "running"]
    return (running or mine or [None])[0].id if mine else ""


# -------------------------------------------------------------------------------------- one job, in words
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return plural(seconds, "second")
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _ago(when: float | None, now: float | None = None) -> str:
    if not when:
        return ""
    seconds = max(0, (now or time.time()) - when)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{plural(int(seconds // 86400), 'day')} ago"


def _stage(job: dict) -> int:
    """Which of ``STAGES`` a job is in (7: done), from its row's phase."""
    phase = job.get("phase") or ""
    if phase == "evaluating":
        return 5 if job.get("loss") is not None else 3  # a loss is recorded once training has run
    order = {"starting": 0, "queued": 0, "validating": 0, "loading model": 1, "preprocessing": 2, "training": 4,
             "saving": 6, "finished": 7}
    return order.get(phase, 0)


def describe(job: dict) -> dict:
    """Where the job is, in words: ``title``, ``detail``, ``percent`` (None: no bar) and ``short`` (the list).

    The one place the page turns a job's row into words, so the progress line, the bar and the job list agree.
    """
    state = job["state"]
    step, total = job.get("step") or 0, job.get("total") or 0
    stage = _stage(job)
    plan = job.get("plan") or {}
    training = (job.get("result") or {}).get("training") or {}
    if state == "queued":
        where = f" (position {job['position']})" if job.get("position") else ""
        title = f"Waiting in the queue{where}"
        detail = job.get("note") or "It starts as soon as a training slot is free."
        if plan.get("steps"):
            detail += f" It will train {plan['steps']:,} steps."
        return {"title": title, "detail": detail, "percent": None, "short": title}
    if state == "running":
        what = STAGES[min(stage, 6)]
        if job.get("cancel_requested"):
            return {"title": "Stopping: you cancelled this job", "detail": "The training process is being stopped.",
                    "percent": None, "short": "Stopping"}
        detail = f"Stage {min(stage, 6) + 1} of {len(STAGES)}: {what}."
        short = what[0].upper() + what[1:]
        if stage == 4 and total:
            loss = f", loss {job['loss']:.3f}" if job.get("loss") is not None else ""
            eta = f", about {_duration(job['eta'])} of training left" if job.get("eta") else ""
            detail = f"Step {step:,} of {total:,}{loss}{eta}. {detail}"
            short = f"Training, step {step:,} of {total:,}"
        if job.get("note"):
            detail += f" {job['note']}"
        within = min(1.0, step / total) if total else 0.0
        low, high = STAGE_START[min(stage, 6)], STAGE_START[min(stage, 6) + 1]
        return {"title": f"Running: {what}", "detail": detail, "percent": low + (high - low) * within,
                "short": short}
    took = (job["finished"] - job["started"]) if job.get("finished") and job.get("started") else None
    gone = (f" Its files (the copy of the dataset and the log) were deleted {_ago(job['cleaned'])}: this server keeps "
            f"a finished job's files for a limited time." if job.get("cleaned") else "")
    if state == "succeeded":
        done, planned = training.get("steps_done", step), training.get("steps", total)
        epochs = training.get("epochs_done")
        detail = f"Trained {done:,} of {planned:,} steps" if planned else "Trained"
        if epochs is not None:
            detail += (f" ({epochs:g} {'epoch' if epochs == 1 else 'epochs'} over "
                       f"{plural(training.get('train_examples', 0), 'example')})")
        detail += "." + gone
        title = f"Finished in {_duration(took)}" if took is not None else "Finished"
        return {"title": title, "detail": detail, "percent": 100.0, "short": title}
    at = f", at step {step:,} of {total:,}" if stage == 4 and total else ""
    if state == "failed":
        return {"title": f"Failed while {STAGES[min(stage, 6)]}{at}", "detail": (job.get("error") or "") + gone,
                "percent": None, "short": "Failed"}
    if not job.get("started"):
        return {"title": "Cancelled while waiting in the queue", "detail": "It never started." + gone,
                "percent": None, "short": "Cancelled before it started"}
    return {"title": f"Cancelled while {STAGES[min(stage, 6)]}{at}",
            "detail": "You cancelled it; nothing was saved." + gone, "percent": None, "short": "Cancelled"}


def progress_html(job: dict) -> str:
    """The job panel's headline, detail line and (while it runs, or when it is done) a bar."""
    d = describe(job)
    e = html.escape
    bar = ""
    if d["percent"] is not None:
        bar = (f"<progress value='{d['percent']:.0f}' max='100' style='width:100%;height:14px' "
               f"aria-label='overall progress'>{d['percent']:.0f}%</progress>")
    name = job.get("label") or job.get("name") or ""
    return (f"<div class='ft-status'><p style='font-size:1.15em;margin:0 0 .2em 0'><b>{e(d['title'])}</b></p>"
            f"{bar}<p style='margin:.3em 0'>{e(d['detail'])}</p>"
            f"<p style='margin:0;opacity:.7;font-size:.9em'>Job {e(str(job.get('id', '')))} · adapter "
            f"{e(name)} · {e(job.get('task') or '')}</p></div>")


def _metric_value(key: str, value) -> str:
    if key in METRICS:
        return METRICS[key].show(value)  # x100, as the papers print it
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


def _scores(metrics: dict | None) -> str:
    return ", ".join(f"{METRICS[k].label if k in METRICS else k} {_metric_value(k, v)}"
                     for k, v in (metrics or {}).items())


class Timeline:
    """What happened, folded one event at a time, so a poll feeds it only the events it has not seen yet.

    Kept small whatever the job's length: one line per stage, training summarised in a few milestones (a
    quarter of the steps, the loss from the first to the last step of each stretch), not a line per step.
    """

    def __init__(self) -> None:
        self.t0: float | None = None  # the first event's time: lines say the time since the submit
        self.rows: list[tuple[float, str | None]] = []  # (time, sentence); None: the finished job's title
        self.trained = False
        self.first: dict | None = None  # the first and latest step with a loss of the training under way
        self.last: dict | None = None
        self.marks: set[int] = set()  # quarters of the steps already said

    def feed(self, events: list[dict]) -> Timeline:
        for ev in events:
            if self.t0 is None:
                self.t0 = ev["time"]
            phase, message = ev.get("phase"), (ev.get("message") or "").strip()
            if phase == "training":
                self.trained = True
                if message:
                    self.rows.append((ev["time"], message))
                if ev.get("loss") is None:
                    continue
                self.first, self.last = self.first or ev, ev
                total = ev.get("total") or 0
                quarter = int(4 * ev["step"] / total) if total else 0
                if 0 < quarter < 4 and quarter not in self.marks:
                    self.marks.add(quarter)
                    self.rows.append((ev["time"], f"Step {ev['step']:,} of {total:,} ({quarter * 25}%), loss "
                                                  f"{ev['loss']:.3f}."))
                continue
            if self.last is not None:
                self.rows.append((ev["time"], f"Training done: {self.last['step']:,} steps; the loss went from "
                                              f"{self.first['loss']:.3f} to {self.last['loss']:.3f} (lower is "
                                              f"better)."))
                self.first = self.last = None
            if phase == "evaluating" and ev.get("metrics"):
                who = "Fine-tuned model" if self.trained else "Base model"
                self.rows.append((ev["time"], f"{who} scores on the held-out examples: {_scores(ev['metrics'])}."))
            elif phase == "succeeded":
                self.rows.append((ev["time"], None))
            elif message:
                self.rows.append((ev["time"], message))
        return self

    def lines(self, job: dict) -> list[tuple[str, str]]:
        """Oldest first, as (time since submit, sentence); a running job's latest step last."""
        def when(t: float) -> str:
            s = max(0, int(t - (self.t0 or t)))
            return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

        lines = []
        for t, sentence in self.rows:
            if sentence is None:
                sentence = f"{describe(job)['title'] if job.get('state') == 'succeeded' else 'Finished'}."
            lines.append((when(t), sentence))
        if self.last is not None and job.get("state") == "running":
            last = self.last
            lines.append((when(last["time"]), f"Step {last['step']:,} of {last.get('total') or 0:,}, loss "
                                              f"{last['loss']:.3f} (latest)."))
        return lines


def timeline(events: list[dict], job: dict) -> list[tuple[str, str]]:
    """What happened, oldest first, as (time since submit, sentence): one line per stage, training summarised
    in a few milestones rather than a line per step."""
    return Timeline().feed(events).lines(job)


def _timeline_html(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    items = "".join(f"<li><span style='opacity:.65;font-variant-numeric:tabular-nums'>{html.escape(t)}</span> "
                    f"&nbsp;{html.escape(scrub(s))}</li>" for t, s in reversed(rows))
    return (f"<div class='ft-timeline'><p style='margin:0 0 .3em 0'><b>Timeline</b> (newest first; time since "
            f"you submitted)</p><ul style='margin:0;padding-left:1.2em;max-height:22em;overflow-y:auto'>{items}"
            f"</ul></div>")


def timeline_html(events: list[dict], job: dict) -> str:
    """The timeline, newest first so the latest line is always in view."""
    return _timeline_html(timeline(events, job))


MAX_CURVE_POINTS = 1000  # a long run's chart is thinned to this many points (the last step always kept)


def _add_points(points: dict[int, float], events: list[dict]) -> None:
    """Add the training losses of ``events`` to ``points`` (step -> loss), kept under twice the chart's points."""
    for e in events:
        if e.get("phase") == "training" and e.get("loss") is not None:
            points[int(e["step"])] = float(e["loss"])  # a resumed job repeats steps: the later record wins
    if len(points) > 2 * MAX_CURVE_POINTS:  # only a job stored before step records were thinned has this many
        steps = sorted(points)
        for s in steps[:-1][1::2]:
            del points[s]


def _curve(points: dict[int, float]) -> pd.DataFrame:
    steps = sorted(points)
    if len(steps) > MAX_CURVE_POINTS:
        every = -(-len(steps) // MAX_CURVE_POINTS)
        steps = steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])
    # typed even when empty: the chart keeps the axis types of its first value (object columns would be
    # drawn as categories, a label per step and per loss value)
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"),
                         "loss": pd.Series([points[s] for s in steps], dtype="float64")})


def loss_curve(events: list[dict]) -> pd.DataFrame:
    points: dict[int, float] = {}
    _add_points(points, events)
    return _curve(points)


def _result_curve(job: jobs.Job) -> pd.DataFrame | None:
    """A succeeded job's chart from the loss log stored with its result (its step records may be cleaned)."""
    losses = (job.result or {}).get("losses")
    if job.state != "succeeded" or not isinstance(losses, list) or not losses:
        return None
    return loss_curve([{"phase": "training", **x} for x in losses if isinstance(x, dict) and "step" in x])


_FEED_LOCK = threading.Lock()  # two polls of one page may overlap: each event is folded once


class JobFeed:
    """One page's view of one job, kept in that page's session (``gr.State``): the last event it has seen, and
    the timeline and loss points folded so far. Each poll asks the queue only for newer events, and the chart and
    timeline are redrawn only when new events came or the job's state changed."""

    def __init__(self, job_id: str | None = None) -> None:
        self.reset(job_id)

    def reset(self, job_id: str | None) -> None:
        self.job_id, self.seq = job_id, 0
        self.timeline = Timeline()
        self.points: dict[int, float] = {}
        self.drawn: tuple | None = None  # the job state the last drawing was made for

    def update(self, job: jobs.Job, record: dict, owner: str) -> tuple[pd.DataFrame | None, str | None]:
        """The job's (loss chart, timeline HTML), each ``None`` when unchanged since the last call."""
        with _FEED_LOCK:
            if job.id != self.job_id:
                self.reset(job.id)
            since = self.seq
        new = jobs.events(job.id, since=since, owner=owner)  # the owner is checked on every call
        with _FEED_LOCK:
            if job.id != self.job_id:  # an overlapping poll switched to another job meanwhile: it draws that one
                return None, None
            fresh = [e for e in new if e["seq"] > self.seq]
            if fresh:
                self.seq = fresh[-1]["seq"]
                self.timeline.feed(fresh)
                _add_points(self.points, fresh)
            state = (job.state, job.started, job.finished, job.cleaned)
            if not fresh and state == self.drawn:
                return None, None
            self.drawn = state
            curve = _result_curve(job)
            return (curve if curve is not None else _curve(self.points)), _timeline_html(self.timeline.lines(record))


def _adapter_exists(job: dict) -> bool:
    folder = get_settings().adapters_dir / str(job.get("name") or "")
    return bool(job.get("name")) and (folder / "adapter_config.json").is_file()


def results(job: dict) -> tuple[str, pd.DataFrame, str, pd.DataFrame]:
    """A finished job's verdict, its metrics table with what each means, and the held-out examples."""
    if job.get("state") != "succeeded" or not job.get("result"):
        return "", _table(METRIC_HEADERS), "", _table(EXAMPLE_HEADERS)
    result, task = job["result"], job["task"]
    before, after = result.get("metrics_before") or {}, result.get("metrics_after") or {}
    name = job.get("label") or job.get("name")
    lines = [f"**{verdict(task, result.get('comparison'))}**" if result.get("comparison") else
             "**Scores on the held-out examples are below.**"]
    if _adapter_exists(job):
        lines.append(f"Use it: pick **{name}** in the Model list of the {(TASKS[task].title if task in TASKS else task)} tab, or "
                     f"download it under “Your adapters” below.")
    else:
        lines.append(f"The adapter {name} of this job has been deleted.")
    rows = []
    for key, value in after.items():
        base = before.get(key)
        change = ""
        if isinstance(value, (int, float)) and isinstance(base, (int, float)):
            diff = value - base
            amount = METRICS[key].show_change(diff) if key in METRICS else f"{diff:+.3f}"
            change = "no change" if abs(diff) < 5e-4 else f"{amount} ({'better' if diff > 0 else 'worse'})"
        rows.append([METRICS[key].label if key in METRICS else key, _metric_value(key, base),
                     _metric_value(key, value), change])
    n = (result.get("data") or {}).get("test") or (result.get("comparison") or {}).get("total")
    held = f"the {n} held-out examples" if n else "the held-out examples"
    explain = [f"- **{METRICS[k].label}**: {METRICS[k].meaning}" for k in after if k in METRICS]
    explain.append(f"\nAll scores come from {held}, which training never saw. With few examples they vary a lot: "
                   f"read the examples below too.")
    examples = []
    for ex in result.get("examples") or []:
        what = f"{ex.get('file', '')}: {ex['question']}" if ex.get("question") else ex.get("file", "")
        examples.append([what, ex.get("adapter", ""), ex.get("reference", ""), ex.get("base", "")])
    return "\n\n".join(lines), _table(METRIC_HEADERS, rows), "\n".join(explain), _table(EXAMPLE_HEADERS, examples)


def panel(job_id, browser_id, profile: gr.OAuthProfile | None = None, feed: JobFeed | None = None) -> dict:
    """Everything the job panel shows, by part: progress, curve, timeline, verdict, metrics, help, examples.

    ``feed`` is the page's :class:`JobFeed` (only new events are read; ``curve`` and ``timeline`` are ``None``
    when unchanged); without one, every event of the job is read.
    """
    if not job_id:
        if feed is not None:
            feed.reset(None)
        return {"progress": f"<p>{NO_JOB}</p>", "curve": loss_curve([]), "timeline": "", "verdict": "",
                "metrics": _table(METRIC_HEADERS), "help": "", "examples": _table(EXAMPLE_HEADERS)}
    owner = owner_of(browser_id, profile)
    job = jobs.get(job_id, owner)
    record = public_record(job)
    curve, timeline_part = (feed or JobFeed()).update(job, record, owner)
    verdict_md, metrics, explain, examples = results(record)
    return {"progress": progress_html(record), "curve": curve, "timeline": timeline_part, "verdict": verdict_md,
            "metrics": metrics, "help": explain, "examples": examples}


def details(job_id, browser_id, profile: gr.OAuthProfile | None = None):
    """The job panel's main parts: (progress, loss curve, timeline, metrics, examples)."""
    p = panel(job_id, browser_id, profile)
    return p["progress"], p["curve"], p["timeline"], p["metrics"], p["examples"]


def job_table(browser_id, profile: gr.OAuthProfile | None = None) -> pd.DataFrame:
    try:
        owner = owner_of(browser_id, profile)
    except InputError:  # the page has not got its id yet: nothing to list
        return _table(JOB_HEADERS)
    now = time.time()
    rows = [[j.display_name, TASKS[j.task].title if j.task in TASKS else j.task, describe(j.record())["short"],
             _ago(j.created, now), j.id] for j in jobs.list_jobs(owner)]
    return _table(JOB_HEADERS, rows)


def log_download(job_id, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """The job's full raw log (for experts), as a private temporary file for its owner."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list first.")
    return str(jobs.log_file(job_id, owner))


# -------------------------------------------------------------------------------------------------- adapters
def _own_adapters(owner: str) -> list[dict]:
    return [a for a in jobs.list_adapters(None, owner) if a.get("owner") == owner]


def adapter_table(browser_id, profile: gr.OAuthProfile | None = None) -> pd.DataFrame:
    """The owner's adapters: name, task, date, preset, score, and whether they are published."""
    try:
        owner = owner_of(browser_id, profile)
    except InputError:
        return _table(ADAPTER_HEADERS)
    rows = []
    for a in _own_adapters(owner):
        after, before = a.get("metrics_after") or {}, a.get("metrics_before") or {}
        key = next(iter(after), None)
        score = (f"{METRICS[key].label if key in METRICS else key} {_metric_value(key, after[key])} (base model "
                 f"{_metric_value(key, before.get(key))})") if key else ""
        preset = str(a.get("preset") or (a.get("hyperparameters") or {}).get("preset") or "")
        hp = a.get("hyperparameters") or {}
        if preset in jobs.PRESETS and any(hp.get(f) not in (None, getattr(jobs.PRESETS[preset], f)) for f in FIELDS):
            preset += " (changed)"
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(a["created"])) if a.get("created") else ""
        shared = f"published: {a.get('hub_repo')}" if a.get("published") else "private"
        task = TASKS[a["task"]].title if a.get("task") in TASKS else str(a.get("task") or "")
        rows.append([a["name"], task, created, preset, score, shared])
    return _table(ADAPTER_HEADERS, rows)


def adapter_names(browser_id, profile: gr.OAuthProfile | None = None) -> list[str]:
    try:
        return [a["name"] for a in _own_adapters(owner_of(browser_id, profile))]
    except InputError:
        return []


def _need_adapter(name) -> str:
    if not name:
        raise InputError("Pick one of your adapters first (in the list above, or under “Adapter”).")
    return str(name)


def download_adapter(name, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """A zip of an adapter the visitor may use, in a private temporary folder (nothing under MMDEMO_HOME is
    served); the web server copies it to its own short-lived cache for the page's download link."""
    owner = owner_of(browser_id, profile)
    return str(jobs.zip_adapter(_need_adapter(name), owner))


def rename(name, new_name, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    owner = owner_of(browser_id, profile)
    new = jobs.rename_adapter(_need_adapter(name), new_name, owner)
    return f"Renamed “{name}” to “{new}”. The Model lists of the other tabs show the new name."


def delete(name, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    owner = owner_of(browser_id, profile)
    return jobs.delete_adapter(_need_adapter(name), owner)


def publish_adapter(name, repo_id, browser_id, profile: gr.OAuthProfile | None = None,
                    oauth_token: gr.OAuthToken | None = None) -> str:
    """Upload an adapter with the signed-in user's token (or HF_TOKEN); the token is not kept."""
    owner = owner_of(browser_id, profile)
    token = getattr(oauth_token, "token", None) or os.environ.get("HF_TOKEN")
    url = jobs.publish_adapter(_need_adapter(name), (repo_id or "").strip(), token, owner=owner)
    return f"Published to {url}. Everyone using this app can now pick it in the Model lists."


def download(job_id, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """A zip of a job's adapter for its owner (see :func:`download_adapter`)."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    job = jobs.get(job_id, owner)
    if job.state != "succeeded":
        raise InputError(f"Job {job_id} has no adapter yet ({job.state}); wait until it has succeeded.")
    return str(jobs.zip_adapter(job.name, owner))


def publish(job_id, repo_id, browser_id, profile: gr.OAuthProfile | None = None,
            oauth_token: gr.OAuthToken | None = None) -> str:
    """Upload a job's adapter (see :func:`publish_adapter`)."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    job = jobs.get(job_id, owner)
    if job.state != "succeeded":
        raise InputError(f"Job {job_id} has no adapter yet ({job.state}); wait until it has succeeded.")
    token = getattr(oauth_token, "token", None) or os.environ.get("HF_TOKEN")
    url = jobs.publish_adapter(job.name, repo_id, token, owner=owner)
    return f"Published to {url}"


# ------------------------------------------------------------------------------------------------- the page
PANEL_PARTS = ("progress", "curve", "timeline", "verdict", "metrics", "help", "examples")
POLL_PARTS = ("jobs", *PANEL_PARTS, "adapters", "choices", "space")
SPACE_SECONDS = 60.0  # the disk-space line is measured again after this long, or when the job or adapter list changes


def _fingerprint(value) -> str:
    text = value.to_json() if isinstance(value, pd.DataFrame) else repr(value)
    return hashlib.sha1(text.encode()).hexdigest()


def space_text(browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """How much disk space the visitor's jobs and adapters take here, and how long they are kept, in words."""
    try:
        owner = owner_of(browser_id, profile)
    except InputError:  # the page has not got its id yet
        return ""
    usage = jobs.disk_usage(owner)
    days = get_settings().keep_runs_days
    if days:
        kept = (f"A finished job's files (its copy of your dataset, checkpoints and log) are deleted "
                f"{jobs.keep_words(days)} after it ends, though its scores stay in the list")
    else:
        kept = "Finished jobs' files (your dataset copies, checkpoints and logs) are kept"
    return (f"Your jobs and adapters use **{jobs.size_words(usage['total'])}** on this server (jobs "
            f"{jobs.size_words(usage['jobs'])}, adapters {jobs.size_words(usage['adapters'])}). {kept}; adapters "
            f"are kept until you delete them.")


def refresh(job_id, browser_id, seen: dict | None, profile: gr.OAuthProfile | None = None) -> list:
    """Every live part of the tab, each skipped when it has not changed since this page last got it.

    ``seen`` is the page's own state: what each part last showed, and the :class:`JobFeed` of the job shown, so
    a poll reads only the events that came since the last one.
    """
    seen = dict(seen or {})
    feed = seen.get("feed")
    if not isinstance(feed, JobFeed):
        feed = seen["feed"] = JobFeed()
    try:
        parts = panel(job_id, browser_id, profile, feed)
    except MMDemoError as err:  # a job that is not (or no longer) the visitor's, or no data folder: say so
        parts = panel("", browser_id, profile, feed)
        parts["progress"] = f"<p>{html.escape(scrub(str(err)))}</p>"
    try:
        parts["jobs"] = job_table(browser_id, profile)
        parts["adapters"] = adapter_table(browser_id, profile)
        parts["choices"] = adapter_names(browser_id, profile)
    except MMDemoError:  # an unwritable data folder: the page's banner says so once; the lists stay empty
        parts.update(jobs=_table(JOB_HEADERS), adapters=_table(ADAPTER_HEADERS), choices=[])
    marks = {key: _fingerprint(value) for key, value in parts.items() if value is not None}
    # measured again when a job comes or goes, an adapter changes (a finished job adds one), or now and then: not
    # at every poll, which changes the job list's status while a job trains
    now = time.monotonic()
    space_key = _fingerprint((marks["adapters"], list(parts["jobs"]["job"]) if "job" in parts["jobs"] else []))
    if seen.get("space_key") != space_key or now - seen.get("space_at", 0.0) > SPACE_SECONDS:
        try:
            parts["space"] = space_text(browser_id, profile)
        except MMDemoError:
            parts["space"] = ""
        marks["space"] = _fingerprint(parts["space"])
        seen["space_key"], seen["space_at"] = space_key, now
    out = []
    for key in POLL_PARTS:
        value = parts.get(key)
        if value is None or seen.get(key) == marks[key]:  # None: the feed has nothing new for it
            out.append(gr.skip())
            continue
        seen[key] = marks[key]
        out.append(gr.update(choices=value) if key == "choices" else value)
    return [*out, seen]


def _shown(fn):
    """``fn`` for an event whose output is a hidden ``gr.File``: show it with the file ``fn`` returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return gr.update(value=fn(*args, **kwargs), visible=True)

    return user_errors(wrapper)


def start_jobs(settings: Settings | None = None) -> None:
    """Start this app's dispatcher (idempotent; it resumes interrupted jobs and runs queued ones); its workers run
    with ``settings``, the app's (default: :func:`get_settings`).

    A data folder that cannot be written is said once at start-up (see ``mmdemo.ui.app``), and each
    Fine-tune action then answers with the same sentence; it must not stop the other tabs from serving.
    """
    try:
        jobs.start_dispatcher(settings=settings)
    except MMDemoError as err:  # said once by the app at start-up; each Fine-tune action says it again
        log.debug("fine-tuning is unavailable: %s", err)


def warm_up(ctx: UIContext) -> None:
    start_jobs(ctx.settings)


def build(ctx: UIContext) -> None:
    start_jobs(ctx.settings)
    browser_id = ctx.browser_id
    private = {"api_visibility": "private"}
    checked = {"concurrency_limit": CHECK_CONCURRENCY, "concurrency_id": "check"}
    gr.Markdown("Teach a model your own examples: **1** upload a dataset and read its report, **2** name the "
                "adapter and submit, **3** follow the job; when it finishes, its adapter appears in the Model list "
                "of the task's tab.")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### 1. Your dataset")
            task = gr.Radio([(TASKS[t].title, t) for t in TASKS], value="caption", label="Task", elem_id="ft-task",
                            info="What the fine-tuned model should do: caption images, answer questions about "
                                 "images, or find sounds by their description.")
            task_help = gr.Markdown(f"A zip of {TASKS['caption'].data_help}. Optional `train/` and `test/` folders; "
                                    f"otherwise about 10% is held out to measure the result.")
            base_model = gr.Dropdown(base_model_names(ctx, "caption"), value="base", label="Base model",
                                     elem_id="ft-base-model",
                                     info="The model the adapter is trained on and used with: base is the tab's "
                                          "default model; the adapter appears in the Model list beside it.")
            with gr.Row():
                example_btn = gr.Button("Download an example dataset", size="sm", elem_id="ft-example-btn")
                example_file = gr.File(label="Example dataset", interactive=False, elem_id="ft-example",
                                       visible=False)
            upload = gr.File(label="Your dataset (zip)", file_types=[".zip"], elem_id="ft-upload")
        with gr.Column():
            report = gr.Markdown(validate(None, "caption")[0], elem_id="ft-report")
            preview_table = gr.Dataframe(_table(preview_headers("caption")), label="First examples",
                                         interactive=False, wrap=True, elem_id="ft-preview", max_height=320)
    counts = gr.State(None)
    gr.Markdown("### 2. Name the adapter and submit")
    with gr.Row():
        name = gr.Textbox(label="Adapter name", placeholder="for example shapes-v1 (empty: made from the file name)",
                          max_length=60, elem_id="ft-name",
                          info="How the Model lists will show it: letters, digits, '-', '_' and '.'.")
        preset = gr.Radio(list(jobs.PRESETS), value="quick", label="Preset", elem_id="ft-preset",
                          info=" · ".join(PRESET_HELP.values()))
    with gr.Accordion("Advanced settings (filled in from the preset)", open=False, elem_id="ft-advanced"):
        values = dict(zip(FIELDS, preset_values("quick")))
        fields = {}
        for row in (FIELDS[:3], FIELDS[3:]):
            with gr.Row():
                for f in row:
                    fields[f] = gr.Number(value=values[f], label=FIELD_LABELS[f], info=FIELD_INFO[f],
                                          precision=None if f == "learning_rate" else 0,
                                          elem_id=f"ft-{f.replace('_', '-')}")
    plan = gr.Markdown(plan_text(None, "quick"), elem_id="ft-plan")
    go = gr.Button("Submit job", variant="primary", elem_id="ft-submit")
    submit_msg = gr.Markdown(elem_id="ft-submitted")

    gr.Markdown("### 3. Your jobs")
    space_box = gr.Markdown(elem_id="ft-space")
    jobs_table = gr.Dataframe(_table(JOB_HEADERS), label="Your jobs (click one to show it)", interactive=False,
                              wrap=True, elem_id="ft-jobs", max_height=260)
    with gr.Row():
        job_id = gr.Textbox(label="Job shown below", interactive=False, elem_id="ft-job", scale=3)
        cancel_btn = gr.Button("Cancel this job", variant="stop", scale=1, elem_id="ft-cancel")
    status_json = gr.JSON(visible=False)
    progress = gr.HTML(f"<p>{NO_JOB}</p>", elem_id="ft-progress")
    with gr.Row():
        curve = gr.LinePlot(loss_curve([]), x="step", y="loss", title="Training loss (lower is better)",
                            x_title="training step", y_title="loss", y_lim=[0, None], height=300, elem_id="ft-curve")
        timeline_box = gr.HTML(elem_id="ft-timeline")
    with gr.Row():
        log_btn = gr.Button("Download the full log (for experts)", size="sm", elem_id="ft-log-btn")
        log_file = gr.File(label="Log", interactive=False, elem_id="ft-log-file", visible=False)
    verdict_box = gr.Markdown(elem_id="ft-verdict")
    metrics = gr.Dataframe(_table(METRIC_HEADERS), label="Held-out scores: base model and fine-tuned model",
                           interactive=False, wrap=True, elem_id="ft-metrics")
    metrics_help = gr.Markdown(elem_id="ft-metrics-help")
    examples = gr.Dataframe(_table(EXAMPLE_HEADERS), label="Held-out examples (as the tabs decode them by default)",
                            interactive=False, wrap=True, column_widths=["16%", "30%", "24%", "30%"],
                            elem_id="ft-examples", max_height=480)

    gr.Markdown("### 4. Your adapters")
    adapters_table = gr.Dataframe(_table(ADAPTER_HEADERS), label="Your adapters (click one to pick it)",
                                  interactive=False, wrap=True, elem_id="ft-adapters", max_height=320)
    with gr.Row():
        chosen = gr.Dropdown(choices=[], value=None, label="Adapter", elem_id="ft-adapter", scale=2,
                             info="One of your adapters, to download, rename, publish or delete.")
        dl_btn = gr.Button("Download (zip)", elem_id="ft-download-btn", scale=1)
        dl_file = gr.File(label="Adapter zip", interactive=False, elem_id="ft-download", visible=False, scale=2)
    with gr.Row():
        new_name = gr.Textbox(label="New name", placeholder="shapes-v2", max_length=60, elem_id="ft-new-name",
                              scale=2)
        rename_btn = gr.Button("Rename", elem_id="ft-rename", scale=1)
        delete_btn = gr.Button("Delete…", variant="stop", elem_id="ft-delete", scale=1)
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown(elem_id="ft-confirm-text")
        confirm_btn = gr.Button("Yes, delete it", variant="stop", elem_id="ft-confirm-delete")
        keep_btn = gr.Button("No, keep it", elem_id="ft-keep")
    with gr.Row():
        repo = gr.Textbox(label="Hub repository", placeholder="your-name/my-adapter", scale=2, elem_id="ft-repo",
                          info="Publishing uploads the adapter with your Hugging Face sign-in and makes it visible "
                               "to everyone using this app.")
        pub_btn = gr.Button("Publish to the Hub", scale=1, elem_id="ft-publish")
    adapter_msg = gr.Markdown(elem_id="ft-adapter-msg")
    seen = gr.State({})
    timer = gr.Timer(2.0)

    # -- 1. the dataset
    def show_task_help(t):
        return f"A zip of {(TASKS[t] if t in TASKS else TASKS['caption']).data_help}. Optional `train/` and `test/` folders; " \
               f"otherwise about 10% is held out to measure the result."

    validated = [report, preview_table, counts]
    upload.change(user_errors(validate), [upload, task], validated, **private, **checked)
    task.change(user_errors(validate), [upload, task], validated, **private, **checked)
    task.change(show_task_help, task, task_help, **private, queue=False)
    example_btn.click(_shown(example_dataset), task, example_file, **private)

    # -- 2. settings and submit
    field_list = [fields[f] for f in FIELDS]
    preset.change(preset_values, preset, field_list, **private, queue=False)
    fields["rank"].input(alpha_for_rank, [fields["rank"], preset], fields["alpha"], **private, queue=False)
    for trigger in (counts.change, preset.change, *(fields[f].change for f in FIELDS)):
        trigger(plan_text, [counts, preset, *field_list], plan, **private, queue=False)

    def submit_handler(dataset, task, preset, epochs, learning_rate, rank, alpha, batch_size, browser_id,
                       adapter_name=None, min_steps=None, base_model=None,
                       profile: gr.OAuthProfile | None = None) -> str:
        return submit(dataset, task, preset, epochs, learning_rate, rank, alpha, batch_size, browser_id, profile,
                      checkpoint=base_checkpoint(ctx, task, base_model), name=adapter_name, min_steps=min_steps)

    task.change(lambda t: gr.update(choices=base_model_names(ctx, t), value="base"), task, base_model, **private,
                queue=False)
    submit_inputs = [upload, task, preset, *(fields[f] for f in FIELDS[:5]), browser_id, name, fields["min_steps"],
                     base_model]
    submitted = go.click(user_errors(submit_handler), submit_inputs, job_id, api_name="finetune_submit")
    submitted.success(user_errors(submitted_text), [job_id, browser_id], submit_msg, **private, queue=False)

    # -- 3. the job panel: one handler fills every live part (the timer, a pick, a reload)
    live = [jobs_table, progress, curve, timeline_box, verdict_box, metrics, metrics_help, examples, adapters_table,
            chosen, space_box, seen]
    # queued (not queue=False): only a queued event's gr.Error reaches the page as a message
    job_id.change(user_errors(job_status), [job_id, browser_id], status_json, api_name="job_status", **checked)
    job_id.change(refresh, [job_id, browser_id, seen], live, **private, queue=False)
    cancelled = cancel_btn.click(user_errors(job_cancel), [job_id, browser_id], status_json, api_name="job_cancel",
                                 **checked)
    cancelled.success(refresh, [job_id, browser_id, seen], live, **private, queue=False)

    def pick(evt: gr.SelectData, table):
        if evt is None or table is None or not len(table) or "job" not in table.columns:
            return gr.update()
        return table["job"].iloc[evt.index[0]]

    jobs_table.select(pick, jobs_table, job_id, **private, queue=False)
    timer.tick(refresh, [job_id, browser_id, seen], live, **private, queue=False)
    log_btn.click(_shown(log_download), [job_id, browser_id], log_file, **private)
    # a reload or a first visit opens the visitor's newest running job, else their newest job
    def open_latest(browser_id, profile: gr.OAuthProfile | None = None):
        return latest_job(browser_id, profile) or gr.skip()  # no job: no change event, no "Pick a job" message

    ctx.ready(open_latest, browser_id, job_id, **private, queue=False)
    ctx.ready(refresh, [job_id, browser_id, gr.State({})], live, **private, queue=False)

    # -- 4. adapters
    def pick_adapter(evt: gr.SelectData, table):
        if evt is None or table is None or not len(table) or "name" not in table.columns:
            return gr.update()
        return gr.update(value=table["name"].iloc[evt.index[0]])

    adapters_table.select(pick_adapter, adapters_table, chosen, **private, queue=False)
    dl_btn.click(_shown(download_adapter), [chosen, browser_id], dl_file, **private)

    def after_change(current, browser_id, profile: gr.OAuthProfile | None = None):
        names = adapter_names(browser_id, profile)
        return adapter_table(browser_id, profile), gr.update(choices=names, value=current if current in names
                                                                else None)

    renamed = rename_btn.click(user_errors(rename), [chosen, new_name, browser_id], adapter_msg, **private)

    def after_rename(new, browser_id, profile: gr.OAuthProfile | None = None):
        return after_change((new or "").strip(), browser_id, profile)

    renamed.success(after_rename, [new_name, browser_id], [adapters_table, chosen], **private, queue=False)

    def ask_delete(name):
        name = _need_adapter(name)
        return gr.update(visible=True), (f"Delete **{name}**? This removes it from this app for good (a copy you "
                                         f"published on the Hub stays there).")

    delete_btn.click(user_errors(ask_delete), chosen, [confirm_row, confirm_text], **private)
    keep_btn.click(lambda: gr.update(visible=False), None, confirm_row, **private, queue=False)
    deleted = confirm_btn.click(user_errors(delete), [chosen, browser_id], adapter_msg, **private)
    deleted.then(lambda: gr.update(visible=False), None, confirm_row, **private, queue=False)
    deleted.success(after_change, [chosen, browser_id], [adapters_table, chosen], **private, queue=False)
    pub_btn.click(user_errors(publish_adapter), [chosen, repo, browser_id], adapter_msg, **private)
