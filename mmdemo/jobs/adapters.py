"""Finished adapters under ``MMDEMO_HOME/adapters``: listing per user, zip download, publishing to the Hub.

An adapter is private to its owner (``mmdemo.json`` ``owner``) until it is published; adapters without an
owner (made by the CLI, or copied in by hand) are visible to everyone. The Hub token is an argument only: it
is never written to disk, the database or a log.
"""

from __future__ import annotations

import json
import shutil
import tempfile
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


def visible(meta: dict, owner: str | None) -> bool:
    return owner is None or not meta.get("owner") or meta.get("owner") == owner or bool(meta.get("published"))


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


def adapter_folder(name: str, owner: str | None = None) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"{name!r} is not an adapter name; pick one from the list.")
    folder = get_settings().adapters_dir / name
    meta = _meta(folder)
    if meta is None or not visible(meta, owner):
        raise JobError(f"There is no adapter {name!r} of yours; pick one from the list.")
    return folder


def zip_adapter(name: str, owner: str | None = None, dest_dir: str | Path | None = None) -> Path:
    """A zip of the adapter folder (for download); written atomically next to the other downloads."""
    folder = adapter_folder(name, owner)
    dest_dir = Path(dest_dir) if dest_dir else get_settings().home / "downloads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        made = shutil.make_archive(str(Path(tmp) / name), "zip", root_dir=folder.parent, base_dir=folder.name)
        target = dest_dir / f"{name}.zip"
        Path(made).replace(target)
    return target


def publish_adapter(name: str, repo_id: str, token: str | None, owner: str | None = None,
                    private: bool = False) -> str:
    """Upload the adapter folder to the Hub as a model repo; returns its URL. The token is used, never stored."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = adapter_folder(name, owner)
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
