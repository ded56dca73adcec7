"""Dataset uploads are checked whole before any training: every problem is reported with its file and row."""

from __future__ import annotations

import io
import os
import stat
import zipfile

import pytest

import mmdemo.data as data
from conftest import make_image, make_shapes_dataset, make_sounds_dataset, make_tone
from mmdemo.data import inspect_dataset, load_dataset
from mmdemo.errors import InputError


def _messages(report) -> str:
    return "\n".join(str(p) for p in report.problems)


def test_good_caption_folder_gets_a_fixed_held_out_split(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "caption", per_class=2)
    a = inspect_dataset(root, "caption")
    b = inspect_dataset(root, "caption")
    assert a.ok, a.summary()
    assert a.examples == 24 and len(a.test) >= 2 and {e.file for e in a.test} == {e.file for e in b.test}
    assert not {e.file for e in a.test} & {e.file for e in a.train}
    assert a.preview(2)[0]["text"].startswith("a picture of") and "24 examples" in a.summary()


def test_vqa_rows_share_images_and_stay_in_one_split(tmp_path):
    report = inspect_dataset(make_shapes_dataset(tmp_path / "ds", "vqa", per_class=1), "vqa")
    assert report.ok and report.examples == 24 and report.files == 12
    assert not {e.file for e in report.test} & {e.file for e in report.train}
    assert report.preview(1)[0]["question"]


def test_caption_column_and_jsonl_and_train_test_folders(tmp_path):
    for split, n in (("train", 10), ("test", 3)):
        folder = tmp_path / "ds" / split
        lines = []
        for i in range(n):
            make_image(folder / f"{i}.png", color="red")
            lines.append(f'{{"file_name": "{i}.png", "caption": "a red circle"}}')
        (folder / "metadata.jsonl").write_text("\n".join(lines))
    report = inspect_dataset(tmp_path / "ds", "caption")
    assert report.ok, report.summary()
    assert report.split == "folders" and len(report.train) == 10 and len(report.test) == 3


def test_every_problem_is_reported_with_file_and_row(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "caption", per_class=1)
    make_image(root / "stray.png")  # no row
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt
    (root / "notes.exe").write_bytes(b"MZ")  # not media
    (root / "a.gif.txt").write_text("hello")  # ignored text file
    with (root / "metadata.csv").open("a") as fh:
        fh.write("missing.png,a red circle\n")
        fh.write("red_circle_0.png,\n")  # empty text
        fh.write("broken.png,a broken image\n")
        fh.write("../outside.png,escape\n")
        fh.write(",no file\n")
    report = inspect_dataset(root, "caption")
    text = _messages(report)
    assert not report.ok
    assert "Row 13 of metadata.csv names missing.png, which is not in the dataset; add the file" in text
    assert "Row 14 of metadata.csv (red_circle_0.png) has an empty text; fill it in or remove the row." in text
    assert "broken.png is not an image format that can be read" in text
    assert "Row 16 of metadata.csv names ../outside.png, which is outside the dataset folder" in text
    assert "Row 17 of metadata.csv has an empty file_name" in text
    assert "stray.png has no row in metadata.csv; add a row for it or remove the file." in text
    assert "notes.exe is not a supported image file" in text
    assert "a.gif.txt" not in text
    assert "red_circle_0.png has no row" not in text  # its row is there, with an empty text: said once
    assert "7 problems to fix before training:" in report.summary()
    with pytest.raises(InputError) as exc:
        load_dataset(root, "caption")
    said = str(exc.value)
    assert said.startswith("The dataset cannot be used yet (7 problems): Row 13 of metadata.csv names missing.png")
    assert said.endswith("There are 4 more problems.") and ".;" not in said and ".." not in said, said


def test_wrong_columns_missing_metadata_and_unsupported_media(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "caption", per_class=1)
    report = inspect_dataset(root, "vqa")
    assert _messages(report) == ("metadata.csv has the columns file_name and text, but the vqa task needs file_name, "
                                 "question and answer (missing: question and answer); rename the columns in its "
                                 "first line, or pick the task that fits the data.")  # and not "0 examples" too
    (root / "metadata.csv").unlink()
    assert _messages(inspect_dataset(root, "caption")).startswith(
        "The dataset has no metadata.csv or metadata.jsonl; add one whose first line is file_name,text.")
    sounds = make_sounds_dataset(tmp_path / "snd", per_class=2, seconds=0.2)
    make_tone(sounds / "odd.aiff", seconds=0.2, fmt="AIFF")
    with (sounds / "metadata.csv").open("a") as fh:
        fh.write("odd.aiff,a tone\n")
    (sounds / "fake.wav").write_text("this is not audio")
    with (sounds / "metadata.csv").open("a") as fh:
        fh.write("fake.wav,some text\n")
    text = _messages(inspect_dataset(sounds, "retrieval"))
    assert "odd.aiff (row 13 of metadata.csv) has an unsupported type (.aiff); use FLAC, MP3, OGA, OGG or WAV." in text
    assert "fake.wav is a text file, not audio" in text


def test_too_few_and_too_many_examples_say_how_many(tmp_path, monkeypatch):
    root = tmp_path / "few"
    for i in range(3):
        make_image(root / f"{i}.png")
    (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,a red circle\n" for i in range(3)))
    text = _messages(inspect_dataset(root, "caption"))
    assert "The dataset has 3 usable examples; at least 10 are needed" in text and "add 7 more" in text
    monkeypatch.setattr(data, "MAX_EXAMPLES", 20)
    many = make_shapes_dataset(tmp_path / "many", "caption", per_class=2)
    assert "The dataset has 24 examples, over the limit of 20" in _messages(inspect_dataset(many, "caption"))


def _zip_folder(folder, out, extra=()):
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"dataset/{p.relative_to(folder).as_posix()}")
        for info, payload in extra:
            zf.writestr(info, payload)
    return out


def test_zip_with_a_folder_inside_and_zip_slip_and_symlink_entries(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "caption", per_class=1)
    link = zipfile.ZipInfo("dataset/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = _zip_folder(root, tmp_path / "up.zip", [(zipfile.ZipInfo("../../evil.png"), b"x"),
                                                      (link, "/etc/passwd")])
    report = inspect_dataset(archive, "caption", tmp_path / "work")
    text = _messages(report)
    assert "../../evil.png points outside the archive's folder (a zip-slip entry)" in text
    assert "link.png is a symbolic link" in text
    assert not (tmp_path / "evil.png").exists() and report.examples == 12
    clean = _zip_folder(root, tmp_path / "clean.zip")
    assert inspect_dataset(clean, "caption", tmp_path / "work2").ok


def test_zip_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.csv", "file_name,text\n")
        with zf.open("big.png", "w") as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(50):
                fh.write(chunk)
    report = inspect_dataset(bomb, "caption", tmp_path / "work")
    assert not report.ok and "zip bomb" in _messages(report)
    assert not any((tmp_path / "work").rglob("big.png"))


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_symlinks_in_a_folder_are_refused(tmp_path):
    root = make_shapes_dataset(tmp_path / "ds", "caption", per_class=1)
    secret = make_image(tmp_path / "secret.png")
    os.symlink(secret, root / "linked.png")
    with (root / "metadata.csv").open("a") as fh:
        fh.write("linked.png,a red circle\n")
    assert "linked.png (row 13 of metadata.csv) is a symbolic link" in _messages(inspect_dataset(root, "caption"))


def test_not_a_zip_and_missing_source(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    assert "x.txt is not a zip archive" in _messages(inspect_dataset(tmp_path / "x.txt", "caption"))
    assert "nope does not exist" in _messages(inspect_dataset(tmp_path / "nope", "caption"))
    fake = tmp_path / "fake.zip"
    fake.write_bytes(io.BytesIO(b"not a zip").getvalue())
    assert "is not a zip archive" in _messages(inspect_dataset(fake, "caption", tmp_path / "w"))


@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval"])
def test_example_datasets_are_small_and_valid(tmp_path, task):
    archive = data.example_zip(task, tmp_path)
    assert archive.name == f"{task}-example.zip" and archive.stat().st_size < 400_000
    assert data.example_zip(task, tmp_path) == archive  # made once
    report = inspect_dataset(archive, task, tmp_path / "work")
    assert report.ok, report.summary()
    assert report.examples >= 18 and len(report.test) >= 2
    with zipfile.ZipFile(archive) as zf:
        assert f"{task}-example/README.txt" in zf.namelist()
