"""The Fine-tune tab's handlers, called as plain functions (no browser): report, submit, status, cancel."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_shapes_dataset
from mmdemo.errors import InputError, JobError
from mmdemo.ui import finetune as tab


def test_validate_submit_status_and_cancel(home, tmp_path, tiny_models):
    data = make_shapes_dataset(tmp_path / "data", "caption", per_class=1)
    archive = shutil.make_archive(str(tmp_path / "up"), "zip", root_dir=data)
    summary, preview = tab.validate(archive, "caption")
    assert summary.startswith("✅") and "12 examples" in summary and len(preview) == 8
    bad, _ = tab.validate(archive, "vqa")
    assert bad.startswith("❌") and "question, answer" in bad
    job_id = tab.submit(archive, "caption", "quick", 2, None, None, None, None, "browser-a",
                        checkpoint=tiny_models["caption"])
    status = tab.job_status(job_id, "browser-a")
    assert status["state"] == "queued" and status["position"] == 1 and status["config"]["epochs"] == 2
    assert "queue position 1" in tab.progress_html(status)
    assert list(tab.job_table("browser-a")["id"]) == [job_id] and tab.job_table("browser-b").empty
    with pytest.raises(JobError):
        tab.job_status(job_id, "browser-b")
    assert tab.job_cancel(job_id, "browser-a")["state"] == "cancelled"
    progress, curve, log, metrics, examples = tab.details(job_id, "browser-a")
    assert "cancelled" in progress and curve.empty
    with pytest.raises(InputError, match="no adapter yet"):
        tab.download(job_id, "browser-a")
    with pytest.raises(InputError, match="Upload a zip"):
        tab.submit(None, "caption", "quick", None, None, None, None, None, "browser-a")
