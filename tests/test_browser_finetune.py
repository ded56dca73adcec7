"""The whole Fine-tune journey as a person does it, in Debian's Chromium against ``python app.py --tiny-models``.

Download the example dataset, upload a dataset and read its report, name the adapter, read the Advanced
settings, be refused an impossible value and a double submit, submit, reload mid-job and find the job panel
filled, wait for the end, read the verdict and how much space the jobs and adapters take, use the adapter in the
Caption tab and get the caption the held-out table shows, download, rename and delete the adapter. Each step checks
the text a person reads.
Screenshots of a running and a finished job go to ``test-artifacts/screenshots/`` (and ``docs/screenshots/``
with ``MMDEMO_UPDATE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, make_shapes_dataset, start_app

CHROMIUM = os.environ.get("MMDEMO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 60_000
LONG_JOB_STEPS = 1000  # long enough (tens of seconds on the tiny model) to reload the page while it trains

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); browser tests skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with start_app(tmp_path_factory.mktemp("browser-ft-home") / "home", env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(app_url)
        expect(pg.locator("#model-status")).to_contain_text("ready", timeout=TIMEOUT_MS)
        yield pg
        browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("MMDEMO_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)


def _open_tab(page, title: str) -> None:
    page.get_by_role("tab", name=title, exact=True).first.click()


def _see(page, sentence: str, timeout: int = 30_000) -> None:
    """The sentence is visible in the page (Gradio shows a handler's gr.Error as a toast)."""
    expect(page.get_by_text(sentence, exact=False).first).to_be_visible(timeout=timeout)


def _close_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        if close.is_visible():
            close.click()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _offers_file(box, name: str) -> None:
    """A file box shows ``name`` (Gradio splits its extension off) with a download link to it."""
    expect(box).to_contain_text(name.rsplit(".", 1)[0])
    expect(box.get_by_role("link").first).to_have_attribute("href", re.compile(re.escape(name) + "$"))


def _first_row(table) -> list[str]:
    """The first data row of a table, one string per cell, as the visitor reads it."""
    row = table.locator("[role=row][aria-rowindex='2']").first  # row 1 is the header
    expect(row).to_be_visible()
    return [" ".join(t.split()) for t in row.locator("[role=gridcell]").all_inner_texts()]


def test_the_fine_tune_journey(page, tmp_path):
    _open_tab(page, "Fine-tune")
    report = page.locator("#ft-report")
    # a task picked before any upload is a hint, not an error
    page.locator("#ft-task label", has_text="Visual QA").click()
    expect(report).to_contain_text("Upload a zip of your dataset: images with questions and answers")
    page.wait_for_timeout(500)
    expect(page.locator(".toast-body")).to_have_count(0)
    # an example dataset for the task, to download
    page.locator("#ft-example-btn").click()
    _offers_file(page.locator("#ft-example"), "vqa-example.zip")

    # upload a caption dataset: with the VQA task the report says which columns it found and needs
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data)
    page.locator("#ft-upload input[type=file]").set_input_files(archive)
    expect(report).to_contain_text("Not ready yet")
    expect(report).to_contain_text("metadata.csv has the columns file_name and text, but the vqa task needs "
                                   "file_name, question and answer")
    page.locator("#ft-task label", has_text="Caption").click()
    expect(report).to_contain_text("Ready to train")
    expect(report).to_contain_text("12 examples in 12 files: 10 to train on, 2 held out")
    expect(page.locator("#ft-preview")).to_contain_text("red_circle_0.png")
    expect(page.locator("#ft-plan")).to_contain_text("This trains 60 steps (30 epochs)")

    # name it; the Advanced fields show the preset's values, and follow the preset
    _field(page, "ft-name").fill("my-shapes")
    page.get_by_text("Advanced settings").click()
    epochs = _field(page, "ft-epochs")
    expect(epochs).to_have_value("5")
    expect(page.get_by_text("LoRA rank: how much the adapter can learn").first).to_be_visible()
    page.locator("#ft-preset label", has_text="balanced").click()
    expect(epochs).to_have_value("10")
    expect(_field(page, "ft-rank")).to_have_value("16")
    page.locator("#ft-preset label", has_text="quick").click()
    expect(epochs).to_have_value("5")
    # an impossible value is refused with a sentence
    epochs.fill("0")
    epochs.press("Tab")
    expect(page.locator("#ft-plan")).to_contain_text("Epochs must be a whole number from 1 to 200, not 0.")
    page.locator("#ft-submit").click()
    _see(page, "Epochs must be a whole number from 1 to 200, not 0.")
    _close_toasts(page)
    epochs.fill("5")
    min_steps = _field(page, "ft-min-steps")
    min_steps.fill(str(LONG_JOB_STEPS))
    min_steps.press("Tab")
    expect(page.locator("#ft-plan")).to_contain_text(f"This trains {LONG_JOB_STEPS:,} steps")

    # submit: a confirmation with the queue position; a second click is refused as a duplicate
    page.locator("#ft-submit").click()
    submitted = page.locator("#ft-submitted")
    expect(submitted).to_contain_text("Submitted: job")
    expect(submitted).to_contain_text("which makes the adapter my-shapes")
    expect(submitted).to_contain_text(f"It trains {LONG_JOB_STEPS:,} steps")
    job_id = _field(page, "ft-job").input_value()
    assert re.fullmatch(r"\d{8}-\d{6}-\w+", job_id), job_id
    page.locator("#ft-submit").click()
    _see(page, "You already have this job")
    _close_toasts(page)
    expect(page.locator("#ft-jobs")).to_contain_text("my-shapes")

    # reload while it trains: the page opens the running job by itself, panel, bar, chart and timeline filled
    progress = page.locator("#ft-progress")
    expect(progress).to_contain_text("Running: training", timeout=120_000)
    page.reload()
    expect(page.locator("#model-status")).to_contain_text("ready", timeout=TIMEOUT_MS)
    _open_tab(page, "Fine-tune")
    expect(_field(page, "ft-job")).to_have_value(job_id)
    expect(progress).to_contain_text("Running: training")
    expect(progress).to_contain_text(re.compile(rf"Step [\d,]+ of {LONG_JOB_STEPS:,}"))
    expect(page.locator("#ft-progress progress")).to_have_count(1)
    timeline = page.locator("#ft-timeline")
    expect(timeline).to_contain_text("Submitted; waiting in the queue.")
    expect(timeline).to_contain_text("Base model scores on the held-out examples: BLEU-4")
    expect(page.locator("#ft-curve")).to_contain_text("training step")
    expect(page.locator("#ft-jobs")).to_contain_text(re.compile(rf"Training, step [\d,]+ of {LONG_JOB_STEPS:,}"))
    _shot(page, "finetune_running")

    # finished: real totals and wall time, a verdict, scores explained, the adapter column in view
    expect(progress).to_contain_text("Finished in", timeout=300_000)
    expect(progress).to_contain_text(f"Trained {LONG_JOB_STEPS:,} of {LONG_JOB_STEPS:,} steps ({LONG_JOB_STEPS // 2} epochs over 10 examples).")
    expect(timeline).to_contain_text(f"Training done: {LONG_JOB_STEPS:,} steps; the loss went from")
    verdict = page.locator("#ft-verdict")
    expect(verdict).to_contain_text(re.compile(r"The fine-tuned model (matches the held-out captions better than "
                                               r"the base model on \d of 2 examples|writes the same captions)"))
    expect(verdict).to_contain_text("Use it: pick my-shapes in the Model list of the Caption tab")
    expect(page.locator("#ft-metrics")).to_contain_text("BLEU-4")
    expect(page.locator("#ft-metrics-help")).to_contain_text("higher is better")
    # how much space this visitor's jobs and adapters take, and how long they are kept
    space = page.locator("#ft-space")
    expect(space).to_contain_text(re.compile(r"Your jobs and adapters use [\d.,]+ (bytes|KB|MB) on this server"))
    expect(space).to_contain_text("are deleted 7 days after it ends")
    expect(space).to_contain_text("adapters are kept until you delete them")
    examples = page.locator("#ft-examples")
    expect(examples).to_contain_text("fine-tuned model")
    image, adapter_caption, _expected, _base = _first_row(examples)
    assert image.endswith(".png") and adapter_caption
    cell = examples.locator("[data-testid='cell-0-1']").first  # the fine-tuned model's first caption
    cell.scroll_into_view_if_needed()
    box, table_box = cell.bounding_box(), examples.bounding_box()
    assert box["x"] + box["width"] <= table_box["x"] + table_box["width"] + 1  # no sideways scrolling needed
    _shot(page, "finetune_finished")

    # the adapter, picked by its name in the Caption tab, gives the caption of the held-out table
    _open_tab(page, "Caption")
    _choose(page, "caption-adapter", "my-shapes")
    clear = page.locator("#caption-files button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#caption-files input[type=file]").set_input_files(str(data / image))
    page.locator("#caption-run").click()
    out = page.locator("#caption-output")
    expect(out).to_contain_text(image)
    expect(out).not_to_contain_text("processing")
    assert _first_row(out) == [image, adapter_caption]

    # download, rename and delete it under "Your adapters"
    _open_tab(page, "Fine-tune")
    adapters = page.locator("#ft-adapters")
    expect(adapters).to_contain_text("my-shapes")
    expect(adapters).to_contain_text("private")
    _choose(page, "ft-adapter", "my-shapes")
    page.locator("#ft-download-btn").click()
    _offers_file(page.locator("#ft-download"), "my-shapes.zip")
    _field(page, "ft-new-name").fill("my-shapes-v2")
    page.locator("#ft-rename").click()
    message = page.locator("#ft-adapter-msg")
    expect(message).to_contain_text("Renamed “my-shapes” to “my-shapes-v2”.")
    expect(adapters).to_contain_text("my-shapes-v2")
    expect(page.locator("#ft-jobs")).to_contain_text("my-shapes-v2")
    expect(page.locator("#ft-adapter input")).to_have_value("my-shapes-v2")
    page.locator("#ft-delete").click()
    expect(page.locator("#ft-confirm-text")).to_contain_text("Delete my-shapes-v2?")
    page.locator("#ft-confirm-delete").click()
    expect(message).to_contain_text("Deleted “my-shapes-v2”.")
    expect(adapters).not_to_contain_text("my-shapes-v2")
    expect(verdict).to_contain_text("has been deleted")
    # and the Caption tab no longer offers it
    _open_tab(page, "Caption")
    page.locator("#caption-adapter input").first.click()
    expect(page.get_by_role("option", name="base", exact=True)).to_be_visible()
    expect(page.get_by_role("option", name="my-shapes-v2", exact=True)).to_have_count(0)
    page.keyboard.press("Escape")
