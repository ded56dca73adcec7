"""Playwright drives Debian's Chromium against ``python app.py --tiny-models`` on localhost.

In each tab it uploads, clicks and reads a non-empty result from the page, and writes a screenshot to
``test-artifacts/screenshots/`` (``MMDEMO_UPDATE_SCREENSHOTS=1`` also copies them to docs/screenshots/
for the README). Skipped when Chromium or Playwright is missing; CI installs both (see .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_image, make_shapes_dataset, make_tone, serve_app, start_app

CHROMIUM = os.environ.get("MMDEMO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
ASSETS = ROOT / "assets"
TIMEOUT_MS = 60_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); browser tests skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python app.py --tiny-models`` in a subprocess on a free port with its own MMDEMO_HOME."""
    with start_app(tmp_path_factory.mktemp("browser-home") / "home") as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(app_url)
        expect(pg.locator("#model-status")).to_contain_text("ready", timeout=TIMEOUT_MS)
        # the Caption tab's other base models are named too, with when they load
        expect(pg.locator("#model-status")).to_contain_text("Caption (florence2): loads when first chosen in the "
                                                            "Model list")
        yield pg
        browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.wait_for_timeout(300)  # let transitions settle
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("MMDEMO_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)


def _assert_filled(table, known: list[str]) -> None:
    """The table shows more than its headers and the inputs echoed back: the model's outputs."""
    text = table.inner_text()
    for word in known:
        text = text.replace(word, "")
    assert any(ch.isalnum() for ch in text), f"no result text in {table.inner_text()!r}"


def _open_tab(page, title: str) -> None:
    page.get_by_role("tab", name=title, exact=True).first.click()


SMALL_PRINT = re.compile(r"Ran on CPU \(float32\) · model [\w.-]+ · no adapter · took \d+(\.\d+)? m?s")


def _assert_small_print(page, elem_id: str) -> None:
    """The line under a tab's results: where it ran, on which model and adapter, how long it took; no path."""
    info = page.locator(f"#{elem_id}")
    expect(info).to_contain_text(SMALL_PRINT)
    text = info.inner_text()
    assert not re.search(r"(^|\s)/\w", text) and str(ROOT) not in text, text


def _assert_preview_whole(page) -> None:
    """Each image of the Caption preview lies inside the gallery's visible box (not cut off at its bottom)."""
    gallery = page.locator("#caption-preview")
    expect(gallery.locator("img").first).to_be_visible()

    def outside() -> list:
        outer = gallery.bounding_box()
        boxes = [img.bounding_box() for img in gallery.locator("img").all()]
        return [(box, outer) for box in boxes
                if not (box["y"] >= outer["y"] - 1 and box["y"] + box["height"] <= outer["y"] + outer["height"] + 1)]

    # the gallery lays its images out over a few frames after they appear (seen on a busy machine): wait for it
    deadline = time.monotonic() + 10
    while (bad := outside()) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert not bad, bad


def _assert_headers(table, headers: list[str]) -> None:
    """An empty table shows its column names (not ``1 | 2 | 3``)."""
    cells = [t.strip() for t in table.locator("th").all_inner_texts() if t.strip()]
    assert cells[:len(headers)] == headers, cells


def test_banner_says_outputs_are_meaningless(page):
    expect(page.locator("#tiny-banner")).to_contain_text("meaningless")


def test_caption_tab(page):
    _open_tab(page, "Caption")
    _assert_headers(page.locator("#caption-output"), ["image", "caption"])
    images = [str(ASSETS / "images" / n) for n in ("red_circle.png", "house_scene.png")]
    page.locator("#caption-files input[type=file]").set_input_files(images)
    page.locator("#caption-run").click()
    out = page.locator("#caption-output")
    expect(out).to_contain_text("house_scene.png")
    expect(out).to_contain_text("red_circle.png")
    _assert_filled(out, ["Captions", "image", "caption", "house_scene.png", "red_circle.png"])
    _assert_small_print(page, "caption-info")
    _shot(page, "caption")


def test_caption_tab_with_another_base_model(page):
    """The Model list offers Florence-2 (short and detailed) and SmolVLM beside BLIP; the caption and its small
    print come from the chosen one."""
    _open_tab(page, "Caption")
    page.locator("#caption-files input[type=file]").set_input_files(str(ASSETS / "images" / "red_circle.png"))
    page.locator("#caption-adapter input").click()
    page.get_by_role("option", name="florence2 (detailed)", exact=True).click()
    page.locator("#caption-run").click()
    expect(page.locator("#caption-info")).to_contain_text("· model florence2 · no adapter ·")
    out = page.locator("#caption-output")
    expect(out).to_contain_text("red_circle.png")
    _assert_filled(out, ["Captions", "image", "caption", "red_circle.png"])
    _shot(page, "caption_models")
    page.locator("#caption-adapter input").click()
    page.get_by_role("option", name="base", exact=True).click()
    page.locator("#caption-files button[aria-label='Clear']").first.click()  # the next test starts with no files


def test_vqa_tab(page):
    _open_tab(page, "Visual QA")
    _assert_headers(page.locator("#vqa-output"), ["question", "answer"])
    page.locator("#vqa-image input[type=file]").set_input_files(str(ASSETS / "images" / "shapes.png"))
    page.locator("#vqa-questions textarea").fill("what color is the square?\nhow many shapes are there?")
    page.locator("#vqa-run").click()
    out = page.locator("#vqa-output")
    expect(out).to_contain_text("how many shapes are there?")
    _assert_filled(out, ["Answers", "question", "answer", "what color is the square?", "how many shapes are there?"])
    _assert_small_print(page, "vqa-info")
    _shot(page, "vqa")


def test_audio_tab_text_search_and_upload(page, tmp_path):
    _open_tab(page, "Audio search")
    expect(page.locator("#audio-library")).to_contain_text("beep.wav")
    expect(page.locator("#retrieval-adapter input")).to_have_value("base")  # the user's adapters are offered here
    _assert_headers(page.locator("#audio-results"), ["rank", "clip", "score"])
    junk = tmp_path / "junk.wav"
    junk.write_text("this is text, not a sound")
    page.locator("#audio-uploads input[type=file]").set_input_files(
        [str(make_tone(tmp_path / "my_tone.wav", 880.0)), str(junk)])
    page.locator("#audio-add").click()
    report = page.locator("#audio-report")
    expect(report).to_contain_text("Added 1 clip.")
    expect(report).to_contain_text("1 file could not be used")
    expect(report).to_contain_text("junk.wav is a text file")
    expect(report).not_to_contain_text("(s)")
    expect(page.locator("#audio-library")).to_contain_text("my_tone.wav")
    uploads = page.locator("#audio-uploads")  # emptied once its files are in the library
    expect(uploads).not_to_contain_text("my_tone.wav")
    expect(uploads).not_to_contain_text("junk.wav")
    expect(uploads.locator("input[type=file]")).to_have_count(1)
    page.locator("#audio-query textarea, #audio-query input").first.fill("a high beep")
    page.locator("#audio-search").click()
    expect(page.locator("#audio-results")).to_contain_text(".wav")
    expect(page.locator("audio, #waveform, .waveform-container").first).to_be_attached()
    _assert_small_print(page, "audio-text-info")
    _shot(page, "audio_search_text")


def test_audio_tab_sound_query(page):
    _open_tab(page, "Audio search")
    page.get_by_role("tab", name="Search by sound").click()
    _assert_headers(page.locator("#audio-labels-out"), ["rank", "label", "score"])
    _assert_headers(page.locator("#audio-similar"), ["rank", "clip", "score"])
    page.locator("#audio-sound input[type=file]").set_input_files(str(ASSETS / "sounds" / "siren.wav"))
    page.locator("#audio-match").click()
    labels = page.locator("#audio-labels-out")
    expect(labels).to_contain_text("1")
    expect(page.locator("#audio-similar")).to_contain_text("siren.wav")
    _assert_filled(labels, ["rank", "label", "score", "Best labels"])
    _assert_small_print(page, "audio-labels-info")
    _assert_small_print(page, "audio-similar-info")
    _shot(page, "audio_search_sound")


def test_finetune_tab_trains_an_adapter_that_the_caption_tab_uses(page, tmp_path):
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data)
    _open_tab(page, "Fine-tune")
    page.locator("#ft-upload input[type=file]").set_input_files(archive)
    expect(page.locator("#ft-report")).to_contain_text("Ready to train")
    expect(page.locator("#ft-preview")).to_contain_text(".png")
    page.locator("#ft-submit").click()
    expect(page.locator("#ft-job textarea, #ft-job input").first).to_have_value(re.compile(r"\d{8}-\d{6}-\w+"))
    expect(page.locator("#ft-submitted")).to_contain_text("which makes the adapter shapes-caption")
    expect(page.locator("#ft-jobs")).to_contain_text("Finished in", timeout=240_000)
    expect(page.locator("#ft-metrics")).to_contain_text("BLEU-4")
    expect(page.locator("#ft-progress")).to_contain_text("Finished in")
    expect(page.locator("#ft-timeline")).to_contain_text("Submitted; waiting in the queue.")
    _shot(page, "finetune")

    _open_tab(page, "Caption")
    page.locator("#caption-adapter input").click()
    page.get_by_role("option", name="shapes-caption").click()  # the adapter's readable name (from the zip's)
    page.locator("#caption-files input[type=file]").set_input_files(str(ASSETS / "images" / "red_circle.png"))
    page.locator("#caption-run").click()
    out = page.locator("#caption-output")
    expect(out).to_contain_text("red_circle.png")
    _assert_filled(out, ["Captions", "image", "caption", "red_circle.png"])


def _see(page, sentence: str) -> None:
    """The sentence is visible in the page (Gradio shows a handler's gr.Error as a toast)."""
    expect(page.get_by_text(sentence, exact=False).first).to_be_visible(timeout=30_000)


def _cells(table) -> str:
    """The table's rows as the visitor reads them (not the timer Gradio shows while an event runs)."""
    return table.locator("table").first.inner_text()


def _close_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        if close.is_visible():
            close.click()


def test_caption_errors_are_shown_and_keep_the_results(page, tmp_path):
    _open_tab(page, "Caption")
    files = page.locator("#caption-files input[type=file]")
    out = page.locator("#caption-output")
    files.set_input_files(str(ASSETS / "images" / "red_circle.png"))
    _assert_preview_whole(page)  # a single image is shown whole, not cropped to the gallery's height
    page.locator("#caption-run").click()
    expect(out).to_contain_text("red_circle.png")
    expect(out).not_to_contain_text("processing")
    before = _cells(out)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image")
    cases = [(str(empty), "empty.png is empty"), (str(text), "notes.png is a text file, not an image"),
             (None, "Upload at least one image to caption.")]
    for upload, sentence in cases:
        _close_toasts(page)
        page.locator("#caption-files button[aria-label='Clear']").first.click()  # the field keeps adding files
        if upload is not None:
            files.set_input_files(upload)
        page.locator("#caption-run").click()
        _see(page, sentence)
        assert _cells(out) == before  # the captions already on screen stay
    _close_toasts(page)
    files.set_input_files(str(ASSETS / "images" / "red_circle.png"))
    page.locator("#caption-prompt textarea, #caption-prompt input").first.fill("red " * 3000)
    page.locator("#caption-run").click()
    _see(page, "The prefix is 11,999 characters long")
    page.locator("#caption-prompt textarea, #caption-prompt input").first.fill("")
    _close_toasts(page)


def test_vqa_errors_are_shown(page, tmp_path):
    _open_tab(page, "Visual QA")
    questions = page.locator("#vqa-questions textarea")
    questions.fill("what color is it?")
    clear = page.locator("#vqa-image button[aria-label='Remove Image']")
    if clear.count():  # the image of the earlier test
        clear.first.click()
    page.locator("#vqa-run").click()
    _see(page, "Upload an image to ask about.")
    _close_toasts(page)
    page.locator("#vqa-image input[type=file]").set_input_files(str(ASSETS / "images" / "shapes.png"))
    questions.fill("   ")
    page.locator("#vqa-run").click()
    _see(page, "Ask at least one question about the image.")
    _close_toasts(page)
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image")
    page.locator("#vqa-image button[aria-label='Remove Image']").first.click()
    page.locator("#vqa-image input[type=file]").set_input_files(str(text))
    questions.fill("what color is it?")
    page.locator("#vqa-run").click()
    _see(page, "notes.png is a text file, not an image")
    _close_toasts(page)
    page.locator("#vqa-image button[aria-label='Remove Image']").first.click()
    page.locator("#vqa-image input[type=file]").set_input_files(str(ASSETS / "images" / "shapes.png"))
    questions.fill("what " * 80)
    page.locator("#vqa-run").click()
    _see(page, "A question is 82 tokens long")
    _close_toasts(page)


def test_compare_tab(page):
    """One image through every model the visitor may use: the base row has an output and a time; a request
    without a question shows the Visual QA tab's sentence; with one, the base row has its answer."""
    _open_tab(page, "Compare")
    out = page.locator("#compare-output")
    _assert_headers(out, ["model", "output", "time"])
    page.locator("#compare-image input[type=file]").set_input_files(str(ASSETS / "images" / "red_circle.png"))
    page.locator("#compare-run").click()
    base_row = re.compile(r"^base\n(.+)\n(\d+(\.\d+)? m?s)$", re.MULTILINE)  # model, output, time: one cell a line
    expect(out).to_contain_text(base_row, use_inner_text=True)
    expect(out).not_to_contain_text("processing")
    rows = out.inner_text()
    base = base_row.search(rows)
    assert base and any(ch.isalnum() for ch in base.group(1)), rows
    expect(page.locator("#compare-info")).to_contain_text(re.compile(r"Ran on CPU \(float32\) · "
                                                                     r"\d+ models? compared · took"))
    # the Caption tab's other base models have their rows too (--tiny-models: the tiny Florence-2 and SmolVLM)
    for name in ("florence2", "florence2 (detailed)", "smolvlm"):
        assert re.search(rf"^{re.escape(name)}\n.+\n\d+(\.\d+)? m?s$", rows, re.MULTILINE), rows
    assert str(ROOT) not in page.locator("#compare-info").inner_text()
    _shot(page, "compare")

    page.locator("#compare-task").get_by_text("Visual QA", exact=True).click()
    question = page.locator("#compare-question textarea, #compare-question input").first
    expect(question).to_be_visible()
    page.locator("#compare-run").click()  # no question yet
    _see(page, "Ask at least one question about the image.")
    _close_toasts(page)
    question.fill("what color is the circle?")
    page.locator("#compare-run").click()
    expect(out).not_to_contain_text("processing")
    expect(out).to_contain_text(base_row, use_inner_text=True)


def test_audio_errors_are_shown_and_keep_the_results(page):
    _open_tab(page, "Audio search")
    page.get_by_role("tab", name="Search by text").click()
    query = page.locator("#audio-query textarea, #audio-query input").first
    query.fill("a siren")
    page.locator("#audio-search").click()
    results = page.locator("#audio-results")
    expect(results).to_contain_text(".wav")
    expect(results).not_to_contain_text("processing")
    before = _cells(results)
    query.fill("   ")
    page.locator("#audio-search").click()
    _see(page, "Type some text to search for")
    assert _cells(results) == before
    _close_toasts(page)

    page.get_by_role("tab", name="Search by sound").click()
    if page.locator("#audio-sound input[type=file]").count():  # else the earlier test's siren.wav is loaded
        page.locator("#audio-sound input[type=file]").set_input_files(str(ASSETS / "sounds" / "siren.wav"))
    page.locator("#audio-match").click()
    labels_out = page.locator("#audio-labels-out")
    expect(labels_out).to_contain_text(re.compile(r"beep|siren|rain|bird|whistle|drum|hum|speech|bell|chord"))
    expect(page.locator("#audio-similar")).to_contain_text("siren.wav")
    page.wait_for_timeout(500)
    before = _cells(labels_out)
    page.locator("#audio-labels textarea").fill(" , ")
    page.locator("#audio-match").click()
    _see(page, "Write at least one label to rank")
    page.wait_for_timeout(500)
    assert _cells(labels_out) == before  # the labels stay, with no red "Error" badge over them
    expect(labels_out).not_to_contain_text("Error")
    _close_toasts(page)
    page.locator("#audio-labels textarea").fill(", ".join(f"label{i}" for i in range(60)))
    page.locator("#audio-match").click()
    _see(page, "60 labels were given; rank at most 50 at a time.")
    _close_toasts(page)
    page.locator("#audio-labels textarea").fill("beep, rain")


def test_a_request_refused_in_a_shared_batch_says_so_in_words(page, tiny_models, tmp_path, monkeypatch):
    """Two visitors' captions served by one call, the page's failing on its own: its row starts "Refused: " (a
    word, where an emoji would be an empty box without an emoji font) and the other visitor still gets a caption.

    Runs against the app served in this process, so the model can be made to fail on one image.
    """
    import time

    from gradio_client import Client, handle_file

    from mmdemo.ui import caption

    real = caption.caption_model.caption

    def slow_and_fragile(images, *args, **kwargs):  # the decoded images; the blue (fragile) one fails
        time.sleep(3)  # the queue waits meanwhile, so the requests that come next are batched together
        if any(img.getpixel((32, 32)) == (0, 0, 255) for img in images):
            raise RuntimeError("out of memory")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(caption.caption_model, "caption", slow_and_fragile)
    first, fragile, other = (make_image(tmp_path / f"{name}.png", color)
                             for name, color in (("first", "red"), ("fragile", "blue"), ("other", "green")))
    with serve_app(tiny_models, tmp_path / "home") as url:
        client = Client(url, verbose=False)
        context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(url)
            pg.locator("#caption-files input[type=file]").set_input_files(str(fragile))
            busy = client.submit([handle_file(str(first))], "", 1, 5, "base", "visitor-one-0001", api_name="/caption")
            time.sleep(1.0)  # the first request holds the model
            pg.locator("#caption-run").click()
            time.sleep(1.0)
            later = client.submit([handle_file(str(other))], "", 1, 5, "base", "visitor-two-0002", api_name="/caption")
            out = pg.locator("#caption-output")
            expect(out).to_contain_text("Refused: The model could not caption this request (RuntimeError)",
                                        timeout=120_000)
            assert busy.result(timeout=120)["data"][0][1]
            assert later.result(timeout=120)["data"][0][1]  # the other visitor's caption was served
        finally:
            context.close()
