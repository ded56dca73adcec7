"""Dataset uploads for fine-tuning: a zip or a folder in the ImageFolder/AudioFolder convention, checked whole.

Layout (Hugging Face ImageFolder/AudioFolder)::

    metadata.csv | metadata.jsonl     file_name,text              (caption; audio retrieval; image search)
                                      file_name,question,answer   (VQA; several rows per image allowed)
    <media files, in any sub-folders, named by file_name relative to the metadata file>
    optional train/ and test/ folders, each with its own metadata file

``caption`` is accepted for ``text``. Without ``train/``+``test/`` a fixed-seed held-out split is made
(about 10% of the media files, at least 2 examples), by file so that no image is in both halves.

:func:`inspect_dataset` never raises for a data problem: every file is decoded and every row checked,
and each problem becomes a :class:`Problem` (file, row, sentence) in the :class:`DatasetReport`, which the
UI shows before the user submits. :func:`load_dataset` is the raising variant for the CLI and the worker.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mmdemo.archive import extract_zip
from mmdemo.config import get_settings
from mmdemo.errors import InputError, LimitError, MMDemoError
from mmdemo.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, audio_info, load_audio, load_image
from mmdemo.models.registry import get_task

MIN_EXAMPLES = 10  # below this the held-out split says nothing and LoRA has nothing to learn from
MAX_EXAMPLES = 5000
MAX_TEXT_CHARS = 500
SPLIT_SEED = 1234
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
IGNORED_SUFFIXES = {".csv", ".jsonl", ".json", ".txt", ".md"}

@dataclass(frozen=True)
class Problem:
    file: str  # path relative to the dataset root ("" for the dataset as a whole, or the archive's name)
    row: int | None  # 1-based data row in the metadata file, when the problem is a row's
    message: str  # one whole sentence that names the file (and row) and says what to do

    def __str__(self) -> str:
        return self.message


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 example``, ``2 examples`` (``many`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def _and(words: list[str] | tuple[str, ...], last: str = "and") -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" {last} " + words[-1]


@dataclass(frozen=True)
class Example:
    file: str  # relative to the dataset root
    path: Path
    text: str = ""  # caption or audio description
    question: str = ""
    answer: str = ""

    def target(self) -> str:
        return self.answer if self.question else self.text

    def record(self) -> dict:
        rec = {"file": self.file}
        rec.update({"question": self.question, "answer": self.answer} if self.question else {"text": self.text})
        return rec


@dataclass
class DatasetReport:
    task: str
    root: Path | None
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    split: str = "held-out"  # "folders" when train/ and test/ were given
    files: int = 0  # media files checked

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.train) and bool(self.test)

    @property
    def examples(self) -> int:
        return len(self.train) + len(self.test)

    def counts(self) -> dict:
        return {"files": self.files, "examples": self.examples, "train": len(self.train), "test": len(self.test),
                "problems": len(self.problems)}

    def preview(self, n: int = 5) -> list[dict]:
        return [e.record() for e in (self.train + self.test)[:n]]

    def summary(self) -> str:
        c = self.counts()
        split = "from the train/ and test/ folders" if self.split == "folders" else "a fixed 10% split"
        head = (f"{plural(c['examples'], 'example')} in {plural(c['files'], 'file')}: {c['train']:,} to train on, "
                f"{c['test']:,} held out to measure the result ({split}).") if c["examples"] else \
            "No usable examples were found."
        if not self.problems:
            return head + " No problems found."
        lines = [head, f"{plural(len(self.problems), 'problem')} to fix before training:"]
        lines += [f"- {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"- ... and {len(self.problems) - 50:,} more.")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise ``InputError`` naming the first problems, each its own sentence."""
        if self.ok:
            return
        if not self.problems:
            raise InputError("The dataset has no usable examples; add media files and a metadata.csv.")
        n = len(self.problems)
        first = " ".join(str(p) for p in self.problems[:3])
        more = f" There {'is' if n - 3 == 1 else 'are'} {plural(n - 3, 'more problem')}." if n > 3 else ""
        raise InputError(f"The dataset cannot be used yet ({plural(n, 'problem')}): {first}{more}")


def _read_rows(meta: Path, rel: str, problems: list[Problem]) -> list[tuple[int, dict]]:
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        problems.append(Problem(rel, None, f"{rel} cannot be read as UTF-8 text; save it again as UTF-8."))
        return []
    rows: list[tuple[int, dict]] = []
    if meta.suffix == ".csv":
        try:
            reader = csv.DictReader(text.splitlines())
            for i, row in enumerate(reader, start=1):
                rows.append((i, {(k or "").strip().lower(): (v or "") for k, v in row.items() if k is not None}))
        except csv.Error as err:
            problems.append(Problem(rel, None, f"{rel} is not valid CSV ({err}); export it again."))
    else:
        for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                problems.append(Problem(rel, i + 1, f"Line {i + 1} of {rel} is not a JSON object; write one "
                                                    f"{{...}} per line."))
                continue
            rows.append((i + 1, {str(k).strip().lower(): ("" if v is None else str(v)) for k, v in obj.items()}))
    return rows


def _find_root(root: Path) -> Path:
    """Descend into the single folder a zip of a folder usually holds."""
    while True:
        if any((root / n).is_file() for n in METADATA_NAMES) or (root / "train").is_dir():
            return root
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            root = entries[0]
        else:
            return root


def _metadata_file(folder: Path) -> Path | None:
    for name in METADATA_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _check_media(path: Path, modality: str) -> None:
    limits = get_settings().limits
    if modality == "image":
        load_image(path, limits)
    else:
        info = audio_info(path, limits)
        load_audio(path, info.sample_rate, limits)  # decode it all at its own rate: catches truncated files


def _read_split(folder: Path, root: Path, task: str, modality: str, report: DatasetReport) -> list[Example]:
    """Examples of one folder with a metadata file; every problem goes to the report."""
    problems = report.problems
    columns = get_task(task).columns
    exts = IMAGE_EXTENSIONS if modality == "image" else AUDIO_EXTENSIONS
    kind = "image" if modality == "image" else "audio"
    meta = _metadata_file(folder)
    folder_rel = folder.relative_to(root).as_posix()
    folder_rel = "" if folder_rel == "." else folder_rel + "/"
    needed = ("file_name", *columns)
    if meta is None:
        where = f"The {folder_rel} folder" if folder_rel else "The dataset"
        problems.append(Problem(folder_rel, None, f"{where} has no metadata.csv or metadata.jsonl; add one whose "
                                                  f"first line is {','.join(needed)}."))
        return []
    meta_rel = meta.relative_to(root).as_posix()
    rows = _read_rows(meta, meta_rel, problems)
    if rows:
        found = list(dict.fromkeys(k for _, r in rows for k in r if k))
        present = set(found)
        if "caption" in present and "text" not in present:
            rows = [(i, {**r, "text": r.get("caption", "")}) for i, r in rows]
            present.add("text")
        missing = [c for c in needed if c not in present]
        if missing:
            has = f"the {'column' if len(found) == 1 else 'columns'} {_and(found)}" if found else "no columns"
            problems.append(Problem(meta_rel, None, f"{meta_rel} has {has}, but the {task} task needs "
                                                    f"{_and(needed)} (missing: {_and(missing)}); rename the columns "
                                                    f"in its first line, or pick the task that fits the data."))
            return []
    examples: list[Example] = []
    checked: dict[Path, str | None] = {}  # file -> problem sentence (None: fine)
    named: set[Path] = set()  # files some row names, usable or not: none of them "has no row"
    base = folder.resolve()
    for row_no, row in rows:
        at = f"Row {row_no} of {meta_rel}"
        name = row.get("file_name", "").strip().replace("\\", "/")
        if not name:
            problems.append(Problem(meta_rel, row_no, f"{at} has an empty file_name; write the name of its media "
                                                      f"file, or remove the row."))
            continue
        path = folder / name
        named.add(path)
        values = {c: " ".join(row.get(c, "").split()) for c in columns}
        empty = [c for c, v in values.items() if not v]
        if empty:
            problems.append(Problem(meta_rel, row_no, f"{at} ({name}) has an empty {_and(empty)}; fill it in or "
                                                      f"remove the row."))
            continue
        long = [c for c, v in values.items() if len(v) > MAX_TEXT_CHARS]
        if long:
            problems.append(Problem(meta_rel, row_no, f"{at} ({name}) has a {long[0]} of {len(values[long[0]]):,} "
                                                      f"characters; shorten it to at most {MAX_TEXT_CHARS}."))
            continue
        rel = folder_rel + name
        if path.is_symlink():
            checked[path] = "link"
            problems.append(Problem(rel, row_no, f"{rel} (row {row_no} of {meta_rel}) is a symbolic link; copy "
                                                 f"the real file into the dataset."))
            continue
        if name.startswith("/") or ".." in Path(name).parts or not path.resolve().is_relative_to(base):
            problems.append(Problem(meta_rel, row_no, f"{at} names {name}, which is outside the dataset folder; "
                                                      f"use a path relative to {meta_rel}."))
            continue
        if not path.is_file():
            problems.append(Problem(meta_rel, row_no, f"{at} names {name}, which is not in the dataset; add the "
                                                      f"file or fix the name."))
            continue
        if path not in checked:
            if path.suffix.lower() not in exts:
                checked[path] = (f"{rel} (row {row_no} of {meta_rel}) has an unsupported type "
                                 f"({path.suffix or 'no extension'}); use "
                                 f"{_and(sorted(e.lstrip('.').upper() for e in exts), 'or')}.")
            else:
                try:
                    _check_media(path, modality)
                    checked[path] = None
                except MMDemoError as err:
                    sentence = str(err)
                    if sentence.startswith(path.name) and rel != path.name:
                        sentence = rel + sentence[len(path.name):]  # the path the user knows, not only its name
                    checked[path] = sentence
            if checked[path]:
                problems.append(Problem(rel, row_no, checked[path]))
        if checked[path]:
            continue
        examples.append(Example(file=rel, path=path, **values))
    # media files that no row mentions: probably a forgotten row, or the wrong file uploaded
    referenced = named | set(checked)
    for p in sorted(folder.rglob("*")):
        relp = p.relative_to(root).as_posix()
        if any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts):
            continue
        if folder == root and p.relative_to(folder).parts[0] in ("train", "test"):
            continue
        if p in referenced or p == meta:
            continue
        if p.is_symlink():
            problems.append(Problem(relp, None, f"{relp} is a symbolic link; links are not allowed, copy the real "
                                                f"file."))
            continue
        if not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS | AUDIO_EXTENSIONS:
            problems.append(Problem(relp, None, f"{relp} has no row in {meta_rel}; add a row for it or remove the "
                                                f"file."))
        elif p.suffix.lower() not in IGNORED_SUFFIXES:
            problems.append(Problem(relp, None, f"{relp} is not a supported {kind} file; remove it from the "
                                                f"dataset."))
    report.files += len(checked)
    return examples


def _held_out(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """About 10% of the files (at least 2 examples) held out, chosen with a fixed seed."""
    files = sorted({e.file for e in examples})
    random.Random(SPLIT_SEED).shuffle(files)
    want = max(2, round(0.1 * len(examples)))
    test_files: set[str] = set()
    count = 0
    for f in files:
        if count >= want or len(test_files) >= len(files) - 1:
            break
        test_files.add(f)
        count += sum(1 for e in examples if e.file == f)
    return [e for e in examples if e.file not in test_files], [e for e in examples if e.file in test_files]


def inspect_dataset(source: str | Path, task: str, workdir: str | Path | None = None) -> DatasetReport:
    """Check a dataset (zip or folder) for ``task``; a zip is unpacked under ``workdir``. Never raises for data.

    Raises ``InputError`` only for an unknown task.
    """
    modality = get_task(task).modality
    source = Path(source)
    report = DatasetReport(task=task, root=None)
    if not source.exists():
        report.problems.append(Problem(source.name, None, f"{source.name} does not exist; upload a zip or choose "
                                                          f"a folder."))
        return report
    if source.is_file():
        if source.suffix.lower() != ".zip":
            report.problems.append(Problem(source.name, None, f"{source.name} is not a zip archive; zip the dataset "
                                                              f"folder (media files plus metadata.csv) and upload "
                                                              f"that."))
            return report
        if workdir is None:
            raise InputError("A zip dataset needs a folder to be unpacked into (workdir).")
        dest = Path(workdir) / "data"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            extracted = extract_zip(source, dest)
        except (LimitError, InputError) as err:
            report.problems.append(Problem(source.name, None, str(err)))
            return report
        for sentence in extracted.problems:
            report.problems.append(Problem(source.name, None, sentence))
        root = extracted.root
    elif source.is_symlink():
        report.problems.append(Problem(source.name, None, f"{source.name} is a symbolic link; give the real "
                                                          f"folder."))
        return report
    else:
        root = source.resolve()
    root = _find_root(root)
    report.root = root
    if (root / "train").is_dir() and (root / "test").is_dir():
        report.split = "folders"
        report.train = _read_split(root / "train", root, task, modality, report)
        report.test = _read_split(root / "test", root, task, modality, report)
    else:
        examples = _read_split(root, root, task, modality, report)
        report.train, report.test = _held_out(examples) if len(examples) >= MIN_EXAMPLES else (examples, [])
    total = report.examples
    if total > MAX_EXAMPLES:
        report.problems.append(Problem("", None, f"The dataset has {total:,} examples, over the limit of "
                                                 f"{MAX_EXAMPLES:,}; keep the {MAX_EXAMPLES:,} most useful ones."))
    elif total < MIN_EXAMPLES and (total or not report.problems):  # with none, the problems above say why
        report.problems.append(Problem("", None, f"The dataset has {plural(total, 'usable example')}; at least "
                                                 f"{MIN_EXAMPLES} are needed (20 or more learn better), so add "
                                                 f"{MIN_EXAMPLES - total} more."))
    elif report.split == "folders" and (len(report.test) < 2 or not report.train):
        report.problems.append(Problem("test/", None, "The test/ folder needs at least 2 usable examples (and "
                                                      "train/ at least one) to measure the adapter; add more."))
    return report


def load_dataset(source: str | Path, task: str, workdir: str | Path | None = None) -> DatasetReport:
    """:func:`inspect_dataset` that raises ``InputError`` naming the first problems (CLI, worker)."""
    report = inspect_dataset(source, task, workdir)
    report.raise_for_problems()
    return report


# ------------------------------------------------------------------------------------------ example datasets
EXAMPLE_COLORS = ("red", "green", "blue", "yellow")
EXAMPLE_SHAPES = ("circle", "square", "triangle")
EXAMPLE_SOUNDS = (  # (kind, frequency in Hz, description)
    ("sine", 220.0, "a low hum"), ("sine", 1760.0, "a high beep"), ("noise", 0.0, "rushing noise"),
    ("sweep", 300.0, "a rising whistle"), ("pulses", 660.0, "short beeps"), ("sine", 660.0, "a steady tone"),
)
EXAMPLE_README = """An example dataset for mmdemo's Fine-tune tab ({task}).

metadata.csv has one row per example; its first line names the columns: {columns}.
file_name is the media file's name, relative to metadata.csv. Replace the files and rows with your own,
zip the folder and upload the zip. Optional: put examples in train/ and test/ folders, each with its own
metadata.csv, to choose which examples are held out to measure the result.
"""


def write_example_dataset(task: str, folder: str | Path) -> Path:
    """A small valid dataset for ``task`` in ``folder``: coloured shapes (caption, VQA, image search) or synthetic
    sounds.

    Small on purpose (24 images of 64x64 pixels, or 18 half-second clips): it shows the layout and trains in
    seconds; it is not meant to teach a model anything useful.
    """
    import numpy as np

    example_kind = get_task(task).examples
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if example_kind in ("shapes", "shape questions"):
        from PIL import Image, ImageDraw

        for color in EXAMPLE_COLORS:
            for shape in EXAMPLE_SHAPES:
                for k, (size, offset) in enumerate(((40, 8), (28, 20)) if example_kind == "shapes" else ((40, 8),)):
                    name = f"{color}_{shape}_{k}.png"
                    img = Image.new("RGB", (64, 64), "white")
                    draw = ImageDraw.Draw(img)
                    box = (offset, offset, offset + size, offset + size)
                    if shape == "circle":
                        draw.ellipse(box, fill=color)
                    elif shape == "square":
                        draw.rectangle(box, fill=color)
                    else:
                        draw.polygon([(offset + size // 2, offset), (offset, offset + size),
                                      (offset + size, offset + size)], fill=color)
                    img.save(folder / name)
                    if example_kind == "shape questions":
                        rows.append({"file_name": name, "question": "what color is the shape?", "answer": color})
                        rows.append({"file_name": name, "question": "what shape is it?", "answer": shape})
                    else:
                        rows.append({"file_name": name, "text": f"a {'big' if k == 0 else 'small'} {color} {shape}"})
    else:
        import soundfile as sf

        sr, seconds = 16000, 0.5
        t = np.arange(int(sr * seconds)) / sr
        for c, (kind, freq, text) in enumerate(EXAMPLE_SOUNDS):
            for k in range(3):
                f = freq * (1 + 0.04 * k)
                if kind == "sine":
                    wave = 0.3 * np.sin(2 * np.pi * f * t)
                elif kind == "noise":
                    wave = 0.2 * np.random.default_rng(c * 10 + k).standard_normal(len(t))
                elif kind == "sweep":
                    wave = 0.3 * np.sin(2 * np.pi * (f + 1500 * t / seconds) * t)
                else:
                    wave = 0.3 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * 8 * t) > 0)
                name = f"sound{c}_{k}.wav"
                sf.write(str(folder / name), wave.astype(np.float32), sr, subtype="PCM_16")
                rows.append({"file_name": name, "text": text})
    columns = list(rows[0])
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "README.txt").write_text(EXAMPLE_README.format(task=task, columns=",".join(columns)))
    return folder


def example_zip(task: str, dest_dir: str | Path) -> Path:
    """``dest_dir/<task>-example.zip``, written once: the example dataset as a user uploads it."""
    dest_dir = Path(dest_dir)
    target = dest_dir / f"{task}-example.zip"
    if target.is_file():
        return target
    import tempfile

    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        folder = write_example_dataset(task, Path(tmp) / f"{task}-example")
        made = shutil.make_archive(str(Path(tmp) / target.stem), "zip", root_dir=folder.parent, base_dir=folder.name)
        Path(made).replace(target)
    return target


__all__ = ["DatasetReport", "Example", "Problem", "MIN_EXAMPLES", "MAX_EXAMPLES", "example_zip", "inspect_dataset",
           "load_dataset", "plural", "write_example_dataset"]
