"""What fine-tuning keeps on disk and for how long: the retention policy, the clean-up of half-written files, and
how much space each user's jobs and adapters take. No gradio here.

- :func:`clean_expired`: a finished job (succeeded, failed or cancelled) that ended more than
  ``MMDEMO_KEEP_RUNS_DAYS`` ago loses its run folder (its copy of the dataset, checkpoints, log) and its per-step
  progress records, thinned to the milestones its timeline shows (:meth:`SQLiteQueue.clean`). Its row stays, so
  the job list, its status line, scores, verdict, held-out examples, timeline and loss chart still show; only the
  log download is gone. Adapters are never touched here: they are kept until their owner deletes them. Queued and
  running jobs are never touched.
- :func:`clean_leftovers`: files this app writes to a temporary name and renames when complete, left half-written
  by a process that was killed: adapter saves (``adapters/.<name>.tmp-<pid>``), adapters half-way through being
  deleted, adapter details files, library uploads (``.part``), dataset-check folders, checkpoints of jobs that
  are over, run folders whose job does not exist, write probes, and expired download folders. Each goes only
  when nothing can still be writing it: the process named in it is gone, or it is older than
  ``LEFTOVER_SECONDS``. Nothing outside ``MMDEMO_HOME`` is touched but this app's own download folders.
- :func:`disk_usage`: the bytes of one owner's run folders and adapters.

The dispatcher runs both when it starts and every ``CLEAN_SECONDS`` (:meth:`Dispatcher.clean_up`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmdemo.jobs.adapters import list_adapters, stale_downloads
from mmdemo.jobs.queue import FINAL, JobQueue, clean_owner, get_queue, pid_alive
from mmdemo.models.loading import ADAPTER_META

log = logging.getLogger(__name__)

CLEAN_SECONDS = 600.0  # how often the dispatcher looks for expired runs and leftovers
LEFTOVER_SECONDS = 3600.0  # a temporary file this old is abandoned even if its process id is alive (reused)

# kind -> (one, many): the words of the summary line
KINDS = {
    "expired_run": ("finished job's run folder", "finished jobs' run folders"),
    "adapter_save": ("unfinished adapter save", "unfinished adapter saves"),
    "adapter_delete": ("half-deleted adapter", "half-deleted adapters"),
    "adapter_meta": ("half-written adapter details file", "half-written adapter details files"),
    "clip_part": ("partial library upload", "partial library uploads"),
    "upload_check": ("abandoned dataset check", "abandoned dataset checks"),
    "checkpoint": ("half-written checkpoint of a job that is over", "half-written checkpoints of jobs that are over"),
    "orphan_run": ("run folder without a job", "run folders without a job"),
    "probe": ("write probe", "write probes"),
    "download": ("expired download folder", "expired download folders"),
}
_PID = re.compile(r"(?:\.tmp-|^\.mmdemo-probe-)(\d+)")


@dataclass
class Cleaned:
    """What a clean-up removed: how many of each kind, and their size."""

    counts: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    failed: list[str] = field(default_factory=list)  # job ids whose run folder could not be deleted

    def add(self, kind: str, size: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.bytes += size

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self) -> str:
        """``2 unfinished adapter saves and 1 partial library upload (12.3 MB)``."""
        parts = [f"{n:,} {KINDS[k][0] if n == 1 else KINDS[k][1]}" for k in KINDS if (n := self.counts.get(k))]
        words = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{words} ({size_words(self.bytes)})"


# ------------------------------------------------------------------------------------------------- sizes, words
def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; symbolic links are not followed; 0 if missing)."""
    total = 0
    stack = [str(path)]
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size if os.path.isfile(path) and not os.path.islink(path) else 0
    except OSError:
        return 0
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # removed while we looked
        except OSError:
            continue
    return total


def size_words(n: int) -> str:
    """``0 bytes``, ``812 KB``, ``12.3 MB``, ``1.2 GB`` (1 KB = 1,024 bytes)."""
    if n < 1024:
        return f"{n:,} {'byte' if n == 1 else 'bytes'}"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    raise AssertionError("unreachable")


def keep_words(days: float) -> str:
    """How long finished runs are kept, in words: ``7 days``, ``1 day``, ``12 hours``, ``30 minutes``."""
    if days >= 1:
        return f"{days:g} {'day' if days == 1 else 'days'}"
    hours = days * 24
    if hours >= 1:
        return f"{hours:.3g} {'hour' if hours == 1 else 'hours'}"
    minutes = max(1, round(hours * 60))
    return f"{minutes} {'minute' if minutes == 1 else 'minutes'}"


def disk_usage(owner: str, queue: JobQueue | None = None) -> dict[str, int]:
    """Bytes of ``owner``'s jobs (their run folders) and of the adapters they made, and the ``total``.

    Only the owner's own: another user's jobs and adapters, and published or ownerless adapters made by
    others, do not count.
    """
    owner = clean_owner(owner)
    queue = queue or get_queue()
    jobs = sum(folder_size(queue.run_dir(job.id)) for job in queue.list(owner))
    adapters = sum(folder_size(Path(a["path"])) for a in list_adapters(None, owner) if a.get("owner") == owner)
    return {"jobs": jobs, "adapters": adapters, "total": jobs + adapters}


# --------------------------------------------------------------------------------------------------- clean-ups
def clean_expired(queue: JobQueue, keep_seconds: float | None, now: float | None = None) -> Cleaned:
    """Clean every finished job that ended more than ``keep_seconds`` ago (``None``: keep them forever)."""
    done = Cleaned()
    if keep_seconds is None:
        return done
    for job_id in queue.expired((now or time.time()) - keep_seconds):
        size = folder_size(queue.run_dir(job_id))
        if queue.clean(job_id):
            done.add("expired_run", size)
        else:
            done.failed.append(job_id)
    return done


def _age(path: Path, now: float) -> float:
    """Seconds since ``path`` or anything directly in it last changed (a folder being filled stays young)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                try:
                    newest = max(newest, child.lstat().st_mtime)
                except OSError:
                    continue
    except OSError:
        return 0.0
    return now - newest


def _abandoned(path: Path, now: float, min_age: float, shared: bool = False) -> bool:
    """Nothing writes ``path`` any more: the process named in it is gone, or it is older than ``min_age``.

    ``shared``: ``MMDEMO_HOME`` is shared by several machines (a shared job store), where the pid in a name may be
    another machine's process: only the age tells."""
    match = _PID.search(path.name)
    if match and not shared and not pid_alive(int(match.group(1))):
        return True
    return _age(path, now) > min_age


def _remove(path: Path) -> int:
    """Delete a file or folder; its size if it is gone, else -1."""
    size = folder_size(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return -1 if path.exists() or path.is_symlink() else size


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []


def clean_leftovers(queue: JobQueue, now: float | None = None, min_age: float = LEFTOVER_SECONDS) -> Cleaned:
    """Delete the half-written files interrupted processes left under the queue's ``MMDEMO_HOME`` (see the module
    docstring for the list); what a live process may still be writing stays."""
    now = now or time.time()
    home = queue.home
    shared = getattr(queue, "machine", None) is not None  # replicas share the folder (mmdemo.jobs.pg_queue)
    found: list[tuple[str, Path]] = []
    for entry in _children(home / "adapters"):
        if entry.name.startswith(".deleting-"):
            found.append(("adapter_delete", entry))  # already gone from every listing: the rename is the delete
        elif entry.name.startswith(".") and ".tmp-" in entry.name and entry.is_dir():
            if _abandoned(entry, now, min_age, shared):
                found.append(("adapter_save", entry))
        elif not entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
            found += [("adapter_meta", f) for f in entry.glob(f".{ADAPTER_META}.tmp-*") if _abandoned(f, now, min_age, shared)]
    for clip_dir in _children(home / "library-clips"):
        if clip_dir.is_dir() and not clip_dir.is_symlink():
            found += [("clip_part", f) for f in clip_dir.glob(".*.part") if _age(f, now) > min_age]
    found += [("upload_check", d) for d in _children(home / "uploads")
              if d.name.startswith("inspect-") and d.is_dir() and _age(d, now) > min_age]
    for folder in (home, home / "runs"):
        found += [("probe", f) for f in folder.glob(".mmdemo-probe-*") if _abandoned(f, now, min_age, shared)]
    states = {job.id: job.state for job in queue.list(None)}
    for run in _children(home / "runs"):
        if run.name.startswith(".") or not run.is_dir() or run.is_symlink():
            continue
        if run.name not in states:
            if _age(run, now) > min_age:  # a submit copies and checks the dataset before the job's row exists
                found.append(("orphan_run", run))
        elif states[run.name] in FINAL:  # queued jobs resume from their checkpoints: training sorts those out
            for cp in _children(run / "work" / "checkpoints"):
                name = cp.name.removeprefix("tmp-")
                if cp.is_dir() and name.startswith("checkpoint-") and (
                        cp.name.startswith("tmp-") or not (cp / "trainer_state.json").is_file()):
                    found.append(("checkpoint", cp))
    found += [("download", d) for d in stale_downloads()]
    done = Cleaned()
    for kind, path in found:
        size = _remove(path)
        if size >= 0:
            done.add(kind, size)
        if kind == "clip_part":
            try:
                path.parent.rmdir()  # only if empty: the clip itself may live there
            except OSError:
                pass
    return done


__all__ = ["CLEAN_SECONDS", "KINDS", "LEFTOVER_SECONDS", "Cleaned", "clean_expired", "clean_leftovers",
           "disk_usage", "folder_size", "keep_words", "size_words"]
