"""Finished adapters under ``MMDEMO_HOME/adapters``: listing per user, zip download, publishing to the Hub.

An adapter is private to its owner (``mmdemo.json`` ``owner``) until it is published; adapters without an
owner (made by the CLI, or copied in by hand by whoever runs the app) are visible to everyone. Every use of an
adapter by name (inference in any tab, download, publish) goes through :func:`resolve_adapter`, which checks
that the caller may use it. The Hub token is an argument only: it is never written to disk, the database or a log.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from mmdemo.config import get_settings
from mmdemo.errors import InputError, JobError
from mmdemo.models.loading import ADAPTER_META


def _meta(folder: Path) -> dict | None:
    if not (folder / "adapter_config.json").is_file() or not (folder / ADAPTER_META).is_file():
        return None
    try:
        return json.loads((folder / ADAPTER_META).read_text())
    except (OSError, ValueError):
        return None


def visible(meta: dict, owner: str | None, anonymous_sees_all: bool = True) -> bool:
    """May ``owner`` use this adapter? ``None`` is the operator (CLI, listings) unless ``anonymous_sees_all``
    is False, when it is an anonymous web caller who sees only published and ownerless adapters."""
    if owner is None:
        return anonymous_sees_all or not meta.get("owner") or bool(meta.get("published"))
    return not meta.get("owner") or meta.get("owner") == owner or bool(meta.get("published"))


def list_adapters(task: str | None = None, owner: str | None = None) -> list[dict]:
    """Adapters (newest first) that ``owner`` may use; ``None`` owner sees all. Read from disk each call."""
    root = get_settings().adapters_dir
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith("."):
                continue
            meta = _meta(folder)
            if meta is None or (task and meta.get("task") != task) or not visible(meta, owner):
                continue
            found.append({"name": folder.name, "path": str(folder), **meta})
    return sorted(found, key=lambda m: m.get("created") or 0, reverse=True)


MAX_NAME = 120


def resolve_adapter(name: str, owner: str | None, task: str | None = None) -> Path:
    """The folder of adapter ``name`` if ``owner`` may use it (theirs, published or ownerless), for ``task``.

    ``owner`` ``None`` is an anonymous caller: only published and ownerless adapters. Someone else's private
    adapter gets the same sentence as a missing one, so names reveal nothing.
    """
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME or "/" in name or "\\" in name
            or name.startswith(".") or "\0" in name):
        raise InputError(f"{str(name)[:60]!r} is not an adapter name; pick one from the Model list.")
    folder = get_settings().adapters_dir / name
    meta = _meta(folder)
    if meta is None or not visible(meta, owner, anonymous_sees_all=False):
        raise JobError(f"There is no adapter called {name!r} of yours; refresh the Model list and pick another.")
    if task and meta.get("task") and meta["task"] != task:
        raise InputError(f"Adapter {name} was trained for {meta['task']}, not {task}; pick a {task} adapter.")
    return folder


DOWNLOAD_PREFIX = "mmdemo-download-"
DOWNLOAD_SECONDS = 600  # a download zip lives this long; the web server copies it to its own cache at once


def zip_adapter(name: str, owner: str | None = None, dest_dir: str | Path | None = None) -> Path:
    """A zip of the adapter folder, for its owner only, in a fresh private temporary folder.

    The zip is not written under ``MMDEMO_HOME`` (nothing there is served); zips older than
    ``DOWNLOAD_SECONDS`` from earlier calls are deleted, so downloads do not pile up.
    """
    folder = resolve_adapter(name, owner)
    if dest_dir is None:
        _clean_downloads()
        dest_dir = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        made = shutil.make_archive(str(Path(tmp) / name), "zip", root_dir=folder.parent, base_dir=folder.name)
        target = dest_dir / f"{name}.zip"
        Path(made).replace(target)
    return target


def _clean_downloads(max_age: float = DOWNLOAD_SECONDS) -> None:
    now = time.time()
    for old in Path(tempfile.gettempdir()).glob(f"{DOWNLOAD_PREFIX}*"):
        try:
            if now - old.stat().st_mtime > max_age:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


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
    tmp = folder / f".{ADAPTER_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / ADAPTER_META)
    return getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}"
