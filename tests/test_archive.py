"""Uploaded zips: zip-slip entries and symlinks skipped and reported, zip bombs refused whole."""

from __future__ import annotations

import stat
import zipfile

import pytest

from mmdemo.archive import extract_zip
from mmdemo.errors import InputError, LimitError


def test_normal_archive(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("data/a.txt", "hello")
        zf.writestr("__MACOSX/data/._a.txt", "junk")
    out = extract_zip(tmp_path / "a.zip", tmp_path / "out")
    assert [p.name for p in out.files] == ["a.txt"] and not out.problems


def test_zip_slip_and_symlink_are_skipped(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../../escape.txt", "x")
        zf.writestr("/abs.txt", "x")
        link = zipfile.ZipInfo("link.txt")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("ok.txt", "fine")
    out = extract_zip(tmp_path / "evil.zip", tmp_path / "out")
    assert [p.name for p in out.files] == ["ok.txt"]
    assert len(out.problems) == 3
    assert sum("outside the archive" in p for p in out.problems) == 2
    assert any("symbolic link" in p for p in out.problems)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_zip_bomb_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (20 * 1024 * 1024))
    with pytest.raises(LimitError, match="zip bomb"):
        extract_zip(tmp_path / "bomb.zip", tmp_path / "out")
    with pytest.raises(LimitError, match="limit"):
        extract_zip(tmp_path / "bomb.zip", tmp_path / "out2", max_bytes=1024)


def test_not_a_zip(tmp_path):
    (tmp_path / "x.zip").write_text("nope")
    with pytest.raises(InputError, match="not a zip"):
        extract_zip(tmp_path / "x.zip", tmp_path / "out")
