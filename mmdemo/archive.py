"""Safe extraction of uploaded zip archives: no path escapes, no symlinks, no zip bombs.

Bad entries are skipped and reported as sentences; an archive that is not a zip, or whose uncompressed
size or file count is over the limit, is refused whole with ``InputError``/``LimitError``.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mmdemo.errors import InputError, LimitError

MAX_UNCOMPRESSED_BYTES = 2 * 1024**3
MAX_FILES = 20_000
MAX_RATIO = 200  # uncompressed/compressed; text compresses ~10x, media ~1x


@dataclass
class Extracted:
    root: Path
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one sentence per skipped entry


def _is_junk(parts: tuple[str, ...]) -> bool:
    return any(p == "__MACOSX" or p.startswith("._") or p == ".DS_Store" for p in parts)


def extract_zip(
    archive: str | Path,
    dest: str | Path,
    max_bytes: int = MAX_UNCOMPRESSED_BYTES,
    max_files: int = MAX_FILES,
) -> Extracted:
    """Extract ``archive`` under ``dest``, streaming with a byte budget (headers can lie)."""
    archive, dest = Path(archive), Path(dest)
    if not zipfile.is_zipfile(archive):
        raise InputError(f"{archive.name} is not a zip archive (or it is damaged); zip the folder again.")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    out = Extracted(root=root)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > max_files:
                raise LimitError(
                    f"{archive.name} holds {len(infos):,} files, over the limit of {max_files:,}; split it."
                )
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise LimitError(
                    f"{archive.name} would unpack to {declared / 1024**2:,.0f} MB, over the "
                    f"{max_bytes / 1024**2:,.0f} MB limit; it may be a zip bomb, or split it into smaller archives."
                )
            budget = max_bytes
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if _is_junk(parts):
                    continue
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    out.problems.append(f"{name} is a symbolic link; links are not allowed in uploads, so it was skipped.")
                    continue
                target = (root / name).resolve()
                if name.startswith("/") or ".." in parts or not target.is_relative_to(root):
                    out.problems.append(
                        f"{name} points outside the archive's folder (a zip-slip entry), so it was skipped."
                    )
                    continue
                if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
                    raise LimitError(
                        f"{archive.name}: {name} compresses {info.file_size // max(info.compress_size, 1)}:1, "
                        f"which looks like a zip bomb; the archive was refused."
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise LimitError(
                                f"{archive.name} unpacks to more than {max_bytes / 1024**2:,.0f} MB; "
                                f"it may be a zip bomb, or split it into smaller archives."
                            )
                        dst.write(chunk)
                out.files.append(target)
    except LimitError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise InputError(f"{archive.name} is damaged and cannot be unpacked ({err}); zip the folder again.") from None
    return out
