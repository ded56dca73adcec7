"""The app's start-up as a visitor meets it, in Chromium: a restart keeps who is who, and an unwritable data
folder is said once while the other tabs keep serving. Each test starts its own ``python app.py``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, free_port, make_shapes_dataset, start_app

CHROMIUM = os.environ.get("MMDEMO_CHROMIUM", "/usr/bin/chromium")
ASSETS = ROOT / "assets"
TIMEOUT_MS = 60_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); browser tests skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


def _open_tab(page, title: str) -> None:
    page.get_by_role("tab", name=title, exact=True).first.click()


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])


def test_the_same_browser_sees_its_jobs_after_a_restart(tmp_path):
    """Restarting ``python app.py`` on the same MMDEMO_HOME keeps who is who: the browser's id still opens."""
    home, port = tmp_path / "home", free_port()
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data)
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        with start_app(home, port, env={"MMDEMO_JOB_SLOTS": "1"}) as url:
            page.goto(url, wait_until="domcontentloaded")
            _open_tab(page, "Fine-tune")
            page.locator("#ft-upload input[type=file]").set_input_files(archive)
            expect(page.locator("#ft-report")).to_contain_text("Ready to train")
            page.locator("#ft-submit").click()
            job_box = page.locator("#ft-job textarea, #ft-job input").first
            expect(job_box).to_have_value(re.compile(r"\d{8}-\d{6}-\w+"))
            job_id = job_box.input_value()
            expect(page.locator("#ft-jobs")).to_contain_text(job_id)
            # cancelled, so that its training does not take the CPU from the restarts below
            page.locator("#ft-cancel").click()
            expect(page.locator("#ft-jobs")).to_contain_text("Cancelled")
        page.close()  # the old page's connections went with the old app
        with start_app(home, port) as url:  # the same folder and address: a restart or an upgrade
            page = context.new_page()  # the same browser: its cookies and storage
            page.goto(url, wait_until="domcontentloaded")
            _open_tab(page, "Fine-tune")
            expect(page.locator("#ft-jobs")).to_contain_text(job_id)
            other = browser.new_context().new_page()  # another browser is someone else
            other.set_default_timeout(TIMEOUT_MS)
            other.goto(url, wait_until="domcontentloaded")
            _open_tab(other, "Fine-tune")
            expect(other.locator("#ft-jobs")).to_be_visible()
            other.wait_for_timeout(3000)
            assert job_id not in other.locator("#ft-jobs").inner_text()
        browser.close()


def test_an_unwritable_data_folder_is_said_once_and_the_app_still_serves(tmp_path):
    """MMDEMO_HOME blocked by a file: the app starts, says so in one sentence, and captions still work."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    home = blocker / "home"
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        with start_app(home, None, log_dir=tmp_path) as url:
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#home-banner")).to_contain_text("The data folder (MMDEMO_HOME) cannot be written")
            expect(page.locator("#model-status")).to_contain_text("ready")
            page.locator("#caption-files input[type=file]").set_input_files(str(ASSETS / "images" / "shapes.png"))
            page.locator("#caption-run").click()
            expect(page.locator("#caption-output")).to_contain_text("shapes.png")
            _open_tab(page, "Fine-tune")
            data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
            page.locator("#ft-upload input[type=file]").set_input_files(
                shutil.make_archive(str(tmp_path / "shapes"), "zip", root_dir=data))
            page.locator("#ft-submit").click()
            expect(page.get_by_text("cannot be written").last).to_be_visible()
        browser.close()
    log = tmp_path.glob("app-*.log")
    text = "".join(p.read_text() for p in log)
    assert "Traceback" not in text, text[-3000:]
    assert text.count("cannot be written") <= 3, text[-3000:]
