"""Fine-tune tab: upload a dataset, read its validation report, submit a LoRA job, follow it, use its adapter.

Jobs run in worker processes behind :mod:`mmdemo.jobs` (started once per app by ``warm_up``/``build``); this
module only lays out widgets and polls the job's stored progress with ``gr.Timer``, so a reloaded page or
another browser re-attaches. The owner is the logged-in Hugging Face user (``gr.OAuthProfile``) or an
anonymous id kept in the browser (``gr.BrowserState``); each owner sees and cancels only their own jobs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from mmdemo import jobs
from mmdemo.config import folder_problem, get_settings
from mmdemo.errors import InputError, JobError, MMDemoError
from mmdemo.models.registry import TASKS
from mmdemo.ui.common import file_path, owner_of, user_errors
from mmdemo.ui.context import CHECK_CONCURRENCY, UIContext

TITLE = "Fine-tune"
log = logging.getLogger(__name__)
PRESET_HELP = {"quick": "Quick: a few minutes; rank 8, at least 60 steps",
               "balanced": "Balanced: rank 16, about twice as long",
               "thorough": "Thorough: rank 32, about four times as long"}
JOB_HEADERS = ["id", "task", "state", "queue position", "phase", "step", "loss", "adapter"]


def validate(upload, task: str) -> tuple[str, pd.DataFrame]:
    """The dataset's report (counts, problems) and a preview of its first examples."""
    path = file_path(upload)
    if not path:
        raise InputError("Upload a zip of your dataset first (media files plus metadata.csv).")
    with tempfile.TemporaryDirectory(prefix="inspect-", dir=_scratch()) as workdir:  # a check only: nothing kept
        report = jobs.inspect_dataset(path, task, Path(workdir))
        preview = pd.DataFrame(report.preview(8))
    status = "✅ Ready to train." if report.ok else "❌ Fix these problems, then upload again."
    return f"{status}\n\n{report.summary()}", preview


def _scratch() -> Path:
    folder = get_settings().home / "uploads"  # on the data disk: an unpacked dataset can be large
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobError(folder_problem(err) or f"The data folder (MMDEMO_HOME) cannot be used ({err.strerror}).") \
            from None
    return folder


def _int(value) -> int | None:
    return None if value in (None, "", 0) else int(value)


def _float(value) -> float | None:
    return None if value in (None, "", 0) else float(value)


def submit(upload, task, preset, epochs, lr, rank, alpha, batch_size, browser_id, profile: gr.OAuthProfile | None = None,
           *, checkpoint: str | None = None) -> str:
    """Queue a job; returns its id."""
    path = file_path(upload)
    if not path:
        raise InputError("Upload a zip of your dataset first (media files plus metadata.csv).")
    job = jobs.submit(task, path, owner=owner_of(browser_id, profile), preset=preset, model=checkpoint,
                      epochs=_int(epochs), learning_rate=_float(lr), rank=_int(rank), alpha=_int(alpha),
                      batch_size=_int(batch_size))
    return job.id


def public_record(job: jobs.Job) -> dict:
    """The job's record as the page and the API show it: names, not server paths."""
    record = job.record()
    result = dict(record.get("result") or {})
    if "adapter" in result:
        result["adapter"] = job.name  # the name the Model lists and the download use
    record["result"] = result or None
    if record.get("model") and Path(record["model"]).is_absolute():
        record["model"] = Path(record["model"]).name
    return scrub(record)


def scrub(value):
    """``value`` with every mention of the data folder's location replaced by ``MMDEMO_HOME``."""
    if isinstance(value, str):
        home = get_settings().home
        for prefix in {str(home.resolve()), str(home.absolute())}:
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


def job_table(browser_id, profile: gr.OAuthProfile | None = None) -> pd.DataFrame:
    try:
        owner = owner_of(browser_id, profile)
    except InputError:  # the page has not got its id yet: nothing to list
        return pd.DataFrame([], columns=JOB_HEADERS)
    rows = [[j.id, j.task, j.state, j.position or "", "" if j.state in jobs.FINAL else (j.phase or ""),
             f"{j.step or 0}/{j.total or 0}",
             "" if j.loss is None else round(j.loss, 4), j.name if j.state == "succeeded" else ""]
            for j in jobs.list_jobs(owner)]
    return pd.DataFrame(rows, columns=JOB_HEADERS)


def progress_html(job: dict) -> str:
    total, step = job.get("total") or 0, job.get("step") or 0
    pct = 100 * step / total if total else (100 if job["state"] == "succeeded" else 0)
    eta = f", about {job['eta']:.0f} s left" if job.get("eta") else ""
    where = f"queue position {job['position']}" if job["state"] == "queued" else (job.get("phase") or "")
    err = f"<p><b>{job['error']}</b></p>" if job.get("error") else ""
    note = f"<p>{job['note']}</p>" if job.get("note") and job["state"] != "succeeded" else ""
    return (f"<p><b>{job['state']}</b> — {where} {step}/{total}{eta}</p>"
            f"<progress value='{pct:.0f}' max='100' style='width:100%'></progress>{err}{note}")


def details(job_id, browser_id, profile: gr.OAuthProfile | None = None):
    """Everything the job panel shows: progress, loss curve, log tail, metrics and examples."""
    empty = pd.DataFrame({"step": [], "loss": []})
    if not job_id:
        return "", empty, "", pd.DataFrame(), pd.DataFrame()
    owner = owner_of(browser_id, profile)
    job = public_record(jobs.get(job_id, owner))
    events = jobs.events(job_id, owner=owner)
    curve = pd.DataFrame([{"step": e["step"], "loss": e["loss"]} for e in events
                          if e.get("phase") == "training" and "loss" in e]) if events else empty
    result = job.get("result") or {}
    before, after = result.get("metrics_before") or {}, result.get("metrics_after") or {}
    metrics = pd.DataFrame([{"metric": k, "base model": before.get(k), "adapter": v} for k, v in after.items()])
    examples = pd.DataFrame(result.get("examples") or [])
    return (progress_html(job), curve if len(curve) else empty, scrub(jobs.log_tail(job_id, 30, owner=owner)),
            metrics, examples)


def download(job_id, browser_id, profile: gr.OAuthProfile | None = None) -> str:
    """A zip of the job's adapter for its owner, in a private temporary folder (nothing under MMDEMO_HOME is
    served); the web server copies it to its own short-lived cache for the page's download link."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    job = jobs.get(job_id, owner)
    if job.state != "succeeded":
        raise InputError(f"Job {job_id} has no adapter yet ({job.state}); wait until it has succeeded.")
    return str(jobs.zip_adapter(job.name, owner))


def publish(job_id, repo_id, browser_id, profile: gr.OAuthProfile | None = None,
            oauth_token: gr.OAuthToken | None = None) -> str:
    """Upload the job's adapter with the signed-in user's token (or HF_TOKEN); the token is not kept."""
    owner = owner_of(browser_id, profile)
    if not job_id:
        raise InputError("Pick a job from the list.")
    job = jobs.get(job_id, owner)
    if job.state != "succeeded":
        raise InputError(f"Job {job_id} has no adapter yet ({job.state}); wait until it has succeeded.")
    token = getattr(oauth_token, "token", None) or os.environ.get("HF_TOKEN")
    url = jobs.publish_adapter(job.name, repo_id, token, owner=owner)
    return f"Published to {url}"


def start_jobs() -> None:
    """Start this app's dispatcher (idempotent; it resumes interrupted jobs and runs queued ones).

    A data folder that cannot be written is said once at start-up (see ``mmdemo.ui.app``), and each
    Fine-tune action then answers with the same sentence; it must not stop the other tabs from serving.
    """
    try:
        jobs.start_dispatcher()
    except MMDemoError as err:  # said once by the app at start-up; each Fine-tune action says it again
        log.debug("fine-tuning is unavailable: %s", err)


def warm_up(ctx: UIContext) -> None:
    start_jobs()


def build(ctx: UIContext) -> None:
    start_jobs()
    browser_id = ctx.browser_id
    with gr.Row():
        with gr.Column():
            task = gr.Radio(list(TASKS), value="caption", label="Task", elem_id="ft-task")
            upload = gr.File(label="Dataset (zip: media files + metadata.csv)", file_types=[".zip"], elem_id="ft-upload")
            gr.Markdown("Captions: `file_name,text` · VQA: `file_name,question,answer` · Audio: `file_name,text`. "
                        "Optional `train/` and `test/` folders; otherwise 10% is held out.")
            preset = gr.Radio(list(jobs.PRESETS), value="quick", label="Preset",
                              info=" · ".join(PRESET_HELP.values()))
            with gr.Accordion("Advanced", open=False):
                epochs = gr.Number(label="Epochs (empty: preset)", precision=0)
                lr = gr.Number(label="Learning rate (empty: preset)")
                rank = gr.Number(label="LoRA rank", precision=0)
                alpha = gr.Number(label="LoRA alpha", precision=0)
                batch = gr.Number(label="Batch size", precision=0)
            go = gr.Button("Submit job", variant="primary", elem_id="ft-submit")
        with gr.Column():
            report = gr.Markdown(elem_id="ft-report")
            preview_table = gr.Dataframe(label="First examples", interactive=False, elem_id="ft-preview")
    with gr.Row():
        jobs_table = gr.Dataframe(headers=JOB_HEADERS, label="Your jobs (click one)", interactive=False,
                                  elem_id="ft-jobs")
    with gr.Row():
        job_id = gr.Textbox(label="Job", interactive=False, elem_id="ft-job")
        cancel_btn = gr.Button("Cancel job", variant="stop")
    status_json = gr.JSON(visible=False)
    progress = gr.HTML(elem_id="ft-progress")
    with gr.Row():
        curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Training loss")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="ft-log")
    metrics = gr.Dataframe(label="Held-out metrics: base model vs adapter", interactive=False, elem_id="ft-metrics")
    examples = gr.Dataframe(label="Held-out examples", interactive=False, elem_id="ft-examples")
    with gr.Row():
        dl_btn = gr.Button("Download adapter (zip)")
        dl_file = gr.File(label="Adapter zip")
        repo = gr.Textbox(label="Hub repository", placeholder="your-name/my-adapter")
        pub_btn = gr.Button("Publish to the Hub")
    pub_msg = gr.Markdown()
    timer = gr.Timer(2.0)

    upload.change(user_errors(validate), [upload, task], [report, preview_table], api_visibility="private")
    task.change(user_errors(validate), [upload, task], [report, preview_table], api_visibility="private")
    def submit_handler(dataset, task, preset, epochs, learning_rate, rank, alpha, batch_size, browser_id,
                       profile: gr.OAuthProfile | None = None) -> str:
        return submit(dataset, task, preset, epochs, learning_rate, rank, alpha, batch_size, browser_id, profile,
                      checkpoint=ctx.checkpoint(task))

    submitted = go.click(user_errors(submit_handler), [upload, task, preset, epochs, lr, rank, alpha, batch, browser_id],
                         job_id, api_name="finetune_submit")
    submitted.success(job_table, browser_id, jobs_table, api_visibility="private", queue=False)
    # queued (not queue=False): only a queued event's gr.Error reaches the page as a message
    job_id.change(user_errors(job_status), [job_id, browser_id], status_json, api_name="job_status",
                  concurrency_limit=CHECK_CONCURRENCY, concurrency_id="check")
    cancel_btn.click(user_errors(job_cancel), [job_id, browser_id], status_json, api_name="job_cancel",
                     concurrency_limit=CHECK_CONCURRENCY, concurrency_id="check")

    def pick(evt: gr.SelectData, table):
        return table.iloc[evt.index[0], 0] if evt is not None and len(table) else gr.update()

    jobs_table.select(pick, jobs_table, job_id, api_visibility="private", queue=False)
    poll_outputs = [progress, curve, log, metrics, examples]
    timer.tick(user_errors(details), [job_id, browser_id], poll_outputs, api_visibility="private", queue=False)
    timer.tick(job_table, browser_id, jobs_table, api_visibility="private", queue=False)
    dl_btn.click(user_errors(download), [job_id, browser_id], dl_file, api_visibility="private")
    pub_btn.click(user_errors(publish), [job_id, repo, browser_id], pub_msg, api_visibility="private")
