"""Adapters: per-user visibility, zip download, and publishing with the user's token (Hub calls faked).

The token goes to ``HfApi`` and nowhere else: not into the adapter folder, the job database or a log.
"""

from __future__ import annotations

import json
import zipfile

import pytest

from mmdemo.errors import InputError, JobError
from mmdemo.jobs import adapters

TOKEN = "hf_secret_token_value_123"


@pytest.fixture
def adapter(home):
    folder = home / "adapters" / "caption-20261123-000000-0123456789ab"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("# card")
    (folder / "mmdemo.json").write_text(json.dumps({"task": "caption", "owner": "anon:alice", "created": 1}))
    return folder


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        FakeApi.calls.append(("upload_folder", folder_path, repo_id))

        class Info:
            repo_url = f"https://huggingface.co/{repo_id}"

        return Info()


def test_publish_uses_the_token_only_for_the_call(home, adapter, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    name = adapter.name
    with pytest.raises(JobError, match="no adapter"):
        adapters.publish_adapter(name, "bob/x", TOKEN, owner="anon:bob")
    with pytest.raises(InputError, match="needs a Hugging Face token"):
        adapters.publish_adapter(name, "alice/x", None, owner="anon:alice")
    with pytest.raises(InputError, match="not a Hub repository id"):
        adapters.publish_adapter(name, "no slash", TOKEN, owner="anon:alice")
    assert adapters.list_adapters("caption", "anon:bob") == []

    url = adapters.publish_adapter(name, "alice/shapes-lora", TOKEN, owner="anon:alice")
    assert url == "https://huggingface.co/alice/shapes-lora"
    assert ("init", TOKEN) in FakeApi.calls
    assert ("upload_folder", str(adapter), "alice/shapes-lora") in FakeApi.calls
    # published: every user now sees it
    assert [a["name"] for a in adapters.list_adapters("caption", "anon:bob")] == [name]
    # the token is nowhere under MMDEMO_HOME
    for path in home.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_zip_download_is_a_peft_folder(home, adapter):
    with pytest.raises(JobError):
        adapters.zip_adapter(adapter.name, owner="anon:bob")
    archive = adapters.zip_adapter(adapter.name, owner="anon:alice")
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    assert {f"{adapter.name}/adapter_config.json", f"{adapter.name}/adapter_model.safetensors",
            f"{adapter.name}/README.md", f"{adapter.name}/mmdemo.json"} <= names
