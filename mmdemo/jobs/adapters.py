"""Finished adapters under ``MMDEMO_HOME/adapters``: listing per user, names, zip download, publishing, deleting.

An adapter is private to its owner (``mmdemo.json`` ``owner``) until it is published; adapters without an
owner (made by the CLI, or copied in by hand by whoever runs the app) are visible to everyone. Every use of an
adapter by name (inference in any tab, download, publish, rename, delete) goes through :func:`resolve_adapter`,
which checks that the caller may use it. The Hub token is an argument only: it is never written to disk, the
database or a log.

Names: the folder on disk keeps a safe, unique name made from the job (``caption-<job id>``); the name people
choose (``mmdemo.json`` ``name``: letters, digits, ``-``, ``_`` and ``.``, unique among one owner's adapters)
is what the Model lists show and what :func:`resolve_adapter` takes, as well as the folder's own name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from mmdemo.config import get_settings
from mmdemo.errors import InputError, JobError
from mmdemo.models.loading import ADAPTER_META

if TYPE_CHECKING:
    from mmdemo.jobs.queue import JobQueue

_META_CACHE: dict[str, tuple[tuple, dict]] = {}  # folder -> (file identity, meta): listing reads no JSON twice
_CACHE_LOCK = threading.Lock()


def _meta(folder: Path) -> dict | None:
    path = folder / ADAPTER_META
    try:
        if not (folder / "adapter_config.json").is_file():
            return None
        st = path.stat()
    except OSError:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite replaces the file: a new inode
    with _CACHE_LOCK:
        hit = _META_CACHE.get(str(folder))
    if hit is not None and hit[0] == key:
        return dict(hit[1])
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    with _CACHE_LOCK:
        _META_CACHE[str(folder)] = (key, meta)
    return dict(meta)


def display_name(meta: dict, folder: Path | str) -> str:
    """The name people see and pick: the one chosen at submit (or a rename), else the folder's."""
    name = meta.get("name")
    return name if isinstance(name, str) and NAME.fullmatch(name) else Path(folder).name


def _entries() -> list[tuple[Path, dict]]:
    root = get_settings().adapters_dir
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith("."):
            continue
        meta = _meta(folder)
        if meta is not None:
            found.append((folder, meta))
    return found


def visible(meta: dict, owner: str | None, anonymous_sees_all: bool = True) -> bool:
    """May ``owner`` use this adapter? ``None`` is the operator (CLI, listings) unless ``anonymous_sees_all``
    is False, when it is an anonymous web caller who sees only published and ownerless adapters."""
    if owner is None:
        return anonymous_sees_all or not meta.get("owner") or bool(meta.get("published"))
    return not meta.get("owner") or meta.get("owner") == owner or bool(meta.get("published"))


def list_adapters(task: str | None = None, owner: str | None = None) -> list[dict]:
    """Adapters (newest first) that ``owner`` may use; ``None`` owner sees all. Read from disk each call.

    Each is its ``mmdemo.json`` plus ``name`` (what to pick it by), ``folder`` and ``path``. ``name`` is the
    display name, unless another listed adapter has the same one: then the caller's own adapter keeps it and
    the others are listed by their folder name, so every listed name resolves to the adapter it stands for.
    """
    found = []
    for folder, meta in _entries():
        if (task and meta.get("task") != task) or not visible(meta, owner):
            continue
        found.append({**meta, "name": display_name(meta, folder), "folder": folder.name, "path": str(folder)})
    counts: dict[str, int] = {}
    for a in found:
        counts[a["name"]] = counts.get(a["name"], 0) + 1
    for a in found:
        if counts[a["name"]] > 1 and (owner is None or a.get("owner") != owner):
            a["name"] = a["folder"]
    return sorted(found, key=lambda m: m.get("created") or 0, reverse=True)


MAX_NAME = 120
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")
FOLDER_NAME = re.compile(r"[a-z_]+-\d{8}-\d{6}-[0-9a-f]{12}")  # the folders jobs make


def resolve_adapter(name: str, owner: str | None, task: str | None = None) -> Path:
    """The folder of adapter ``name`` if ``owner`` may use it (theirs, published or ownerless), for ``task``.

    ``name`` is a display name or a folder name. The caller's own adapter of that name comes first, then the
    folder of that name, then a published or ownerless adapter of that display name (the newest). ``owner``
    ``None`` is an anonymous caller: only published and ownerless adapters. Someone else's private adapter
    gets the same sentence as a missing one, so names reveal nothing.
    """
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME or "/" in name or "\\" in name
            or name.startswith(".") or "\0" in name):
        raise InputError(f"{str(name)[:60]!r} is not an adapter name; pick one from the Model list.")
    usable = [(f, m) for f, m in _entries() if visible(m, owner, anonymous_sees_all=False)]
    named = sorted(((f, m) for f, m in usable if display_name(m, f) == name),
                   key=lambda fm: fm[1].get("created") or 0, reverse=True)
    own = [(f, m) for f, m in named if owner is not None and m.get("owner") == owner]
    by_folder = [(f, m) for f, m in usable if f.name == name]
    hits = own or by_folder or named
    if not hits:
        raise JobError(f"There is no adapter called {name!r} of yours; refresh the Model list and pick another.")
    folder, meta = hits[0]
    if task and meta.get("task") and meta["task"] != task:
        raise InputError(f"Adapter {name} was trained for {meta['task']}, not {task}; pick a {task} adapter.")
    return folder


def check_name(name: str | None, owner: str | None, queue: JobQueue | None = None, keep: Path | None = None) -> str:
    """``name`` stripped, if it can name a new adapter of ``owner``; else ``InputError`` with what to do.

    A name is 1 to 60 letters, digits, ``-``, ``_`` or ``.``, starts with a letter or digit, is not ``base``
    (the Model lists' word for no adapter), and no other adapter of the owner, nor a job of theirs still
    waiting or running, has it. ``keep``: the folder being renamed (its own name does not count).
    """
    name = (name or "").strip()
    if not NAME.fullmatch(name) or FOLDER_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InputError(f"“{shown}” cannot be an adapter name: use 1 to 60 letters, digits, '-', '_' or '.', "
                         f"starting with a letter or digit (for example shapes-v2).")
    if name.lower() == "base":
        raise InputError("“base” means the model without an adapter in the Model lists; choose another name.")
    for folder, meta in _entries():
        if folder != keep and meta.get("owner") == owner and display_name(meta, folder).lower() == name.lower():
            raise InputError(f"You already have an adapter called “{display_name(meta, folder)}”; choose "
                             f"another name, or rename or delete that one first.")
    if queue is not None and owner is not None:
        from mmdemo.jobs.queue import name_in_use

        for label, job_id in queue.labels(owner).items():
            if label.lower() == name.lower():
                raise InputError(name_in_use(label, job_id))
    return name


def default_name(hint: str, task: str, owner: str | None, queue: JobQueue | None = None) -> str:
    """A readable name that is free for ``owner``: from ``hint`` (the dataset's file name) and the task."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(hint or "").stem).strip("-._")[:40]
    base = f"{stem}-{task}" if stem and task not in stem else (stem or f"my-{task}")
    base = base if NAME.fullmatch(base) and not FOLDER_NAME.fullmatch(base) else f"my-{task}"
    for i in range(1, 1000):
        candidate = base if i == 1 else f"{base}-{i}"
        try:
            return check_name(candidate, owner, queue)
        except InputError:
            continue
    return f"{task}-{int(time.time())}"


def _own(name: str, owner: str | None, action: str) -> tuple[Path, dict]:
    """The adapter ``name`` if ``owner`` made it; someone else's (published or ownerless) is refused."""
    folder = resolve_adapter(name, owner)
    meta = _meta(folder) or {}
    if meta.get("owner") != owner:
        whose = "someone else" if meta.get("owner") else "whoever runs this app"
        raise JobError(f"Adapter “{name}” was made by {whose}; you can use it, but only its owner can {action} it.")
    return folder, meta


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / f".{ADAPTER_META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / ADAPTER_META)


def rename_adapter(name: str, new_name: str, owner: str | None, queue: JobQueue | None = None) -> str:
    """Give the owner's adapter ``name`` the display name ``new_name`` (checked like a name at submit).

    The folder keeps its name, so the adapter's files, its audio-search library and a published copy stay
    where they are. Returns the new name.
    """
    from mmdemo.jobs.queue import get_queue

    folder, meta = _own(name, owner, "rename")
    queue = queue or get_queue()
    new_name = check_name(new_name, owner, queue, keep=folder)
    meta["name"] = new_name
    _write_meta(folder, meta)
    if meta.get("job_id"):
        queue.set_label(meta["job_id"], new_name)  # the job list shows the adapter's new name too
    return new_name


def delete_adapter(name: str, owner: str | None) -> str:
    """Delete the owner's adapter ``name`` from this app's data folder; returns what happened, in a sentence.

    A published adapter's Hub repository is not touched: deleting removes only the copy here.
    """
    folder, meta = _own(name, owner, "delete")
    shown = display_name(meta, folder)
    trash = folder.parent / f".deleting-{folder.name}-{os.getpid()}"
    folder.rename(trash)  # one rename: the adapter is gone for every listing at once
    shutil.rmtree(trash, ignore_errors=True)
    with _CACHE_LOCK:
        _META_CACHE.pop(str(folder), None)
    if meta.get("published"):
        repo = meta.get("hub_repo") or "the Hub"
        return (f"Deleted “{shown}” from this app. Its published copy on the Hub ({repo}) is not deleted; delete "
                f"that repository on huggingface.co if you want it gone too.")
    return f"Deleted “{shown}”."


DOWNLOAD_PREFIX = "mmdemo-download-"
DOWNLOAD_SECONDS = 600  # a download zip lives this long; the web server copies it to its own cache at once


def zip_adapter(name: str, owner: str | None = None, dest_dir: str | Path | None = None) -> Path:
    """A zip of the adapter folder (``<display name>.zip`` holding ``<display name>/``), for those who may use
    it, in a fresh private temporary folder.

    The zip is not written under ``MMDEMO_HOME`` (nothing there is served); zips older than
    ``DOWNLOAD_SECONDS`` from earlier calls are deleted, so downloads do not pile up.
    """
    folder = resolve_adapter(name, owner)
    shown = display_name(_meta(folder) or {}, folder)
    if dest_dir is None:
        dest_dir = private_download_dir()
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{shown}.zip"
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        made = Path(tmp) / target.name
        with zipfile.ZipFile(made, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                    zf.write(path, f"{shown}/{path.relative_to(folder).as_posix()}")
        made.replace(target)
    return target


def private_download_dir() -> Path:
    """A fresh private temporary folder for one download (old ones are swept first); never under MMDEMO_HOME."""
    _clean_downloads()
    return Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))


def stale_downloads(max_age: float = DOWNLOAD_SECONDS) -> list[Path]:
    """This app's download folders (adapter zips, log copies) in the system's temporary folder older than
    ``max_age`` seconds: the web server copied their file to its own cache long ago."""
    now = time.time()
    found = []
    for old in Path(tempfile.gettempdir()).glob(f"{DOWNLOAD_PREFIX}*"):
        try:
            if old.is_dir() and not old.is_symlink() and now - old.stat().st_mtime > max_age:
                found.append(old)
        except OSError:
            continue
    return found


def _clean_downloads(max_age: float = DOWNLOAD_SECONDS) -> None:
    for old in stale_downloads(max_age):
        shutil.rmtree(old, ignore_errors=True)


def publish_adapter(name: str, repo_id: str, token: str | None, owner: str | None = None,
                    private: bool = False) -> str:
    """Upload the adapter folder to the Hub as a model repo; returns its URL. The token is used, never stored."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = resolve_adapter(name, owner)
    if not token:
        raise InputError("Publishing needs a Hugging Face token: sign in with the Login button on a Space, "
                         "or set HF_TOKEN.")
    if not repo_id or repo_id.count("/") != 1 or " " in repo_id:
        raise InputError(f"{repo_id!r} is not a Hub repository id; write it as user-name/adapter-name.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=f"Upload {name} from mmdemo")
    except HfHubHTTPError as err:
        code = getattr(getattr(err, "response", None), "status_code", None)
        if code in (401, 403):
            raise InputError(f"The Hub refused the token for {repo_id} ({code}); sign in again or use a token "
                             f"with write access.") from None
        raise InputError(f"Publishing to {repo_id} failed ({str(err).splitlines()[0]}); try again later.") from None
    except OSError as err:
        raise InputError(f"The Hub cannot be reached ({err}); check the internet connection and try again.") from None
    meta = json.loads((folder / ADAPTER_META).read_text())
    meta.update(published=True, hub_repo=repo_id)  # published adapters are visible to every user
    _write_meta(folder, meta)
    return getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}"
