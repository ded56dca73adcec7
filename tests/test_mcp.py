"""MCP tools: ``python app.py --tiny-models --mcp`` in a subprocess, reached with the ``mcp`` client package as an
agent reaches it. The model endpoints are documented tools, fine-tuning and jobs are not; a caption call with
a PNG (sent as a ``data:`` URI, as MCP clients send files) returns a caption; a corrupt image returns the app's
sentence, not a traceback."""

from __future__ import annotations

import ast
import asyncio
import base64

import pytest

from conftest import make_image, start_app

pytest.importorskip("mcp", reason="the mcp package is not installed (pip install -r requirements.txt)")
from mcp import ClientSession  # noqa: E402

try:
    from mcp.client.streamable_http import streamable_http_client as http_client
except ImportError:  # older mcp releases: the same transport under its former name
    from mcp.client.streamable_http import streamablehttp_client as http_client

pytestmark = pytest.mark.timeout(300)

MODEL_TOOLS = {"caption", "vqa", "search_audio", "classify_audio", "similar_audio", "search_images", "classify_image",
               "similar_images"}
NOT_TOOLS = {"finetune_submit", "job_status", "job_cancel"}  # public for gradio_client, no MCP tools


def test_mcp_is_off_unless_asked(monkeypatch):
    from mmdemo.ui.app import app_settings, launch_kwargs, parse_args

    monkeypatch.delenv("MMDEMO_MCP", raising=False)
    assert not app_settings(parse_args([])).mcp and app_settings(parse_args(["--mcp"])).mcp
    monkeypatch.setenv("MMDEMO_MCP", "1")
    assert app_settings(parse_args([])).mcp
    # explicit False: Gradio alone would read GRADIO_MCP_SERVER and make every public endpoint a tool
    assert launch_kwargs(7860)["mcp_server"] is False and launch_kwargs(7860, mcp=True)["mcp_server"] is True


@pytest.fixture(scope="module")
def mcp_url(tmp_path_factory) -> str:
    """The app's MCP endpoint (streamable HTTP), served on the tiny checkpoints on a free port."""
    home = tmp_path_factory.mktemp("mcp") / "home"
    with start_app(home, args=("--tiny-models", "--mcp")) as url:
        yield f"{url}gradio_api/mcp/"


def with_session(url: str, work):
    """Run ``await work(session)`` in an initialised MCP client session at ``url``; return its result."""

    async def go():
        async with http_client(url) as (read, write, _session_id):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(go())


def call(url: str, tool: str, arguments: dict):
    async def work(session):
        return await session.call_tool(tool, arguments)

    return with_session(url, work)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.mark.slow
def test_the_model_endpoints_are_documented_tools_and_the_jobs_are_not(mcp_url):
    from mmdemo.ui.app import mcp_tool_names

    async def work(session):
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in with_session(mcp_url, work)}
    assert set(tools) >= MODEL_TOOLS
    assert set(tools) == set(mcp_tool_names()), "only what the tabs list in MCP_TOOLS is a tool"
    assert not set(tools) & NOT_TOOLS and not [n for n in tools if "job" in n or "finetune" in n], sorted(tools)
    for name in MODEL_TOOLS:
        tool = tools[name]
        assert len(tool.description) > 40, (name, tool.description)
        props = tool.inputSchema["properties"]
        assert all(p.get("description") for p in props.values()), (name, props)
        assert props["model"].get("default") == "base" and "enum" not in props["model"], props["model"]
        assert "browser_id" in props and "browser_id" not in tool.inputSchema.get("required", [])
        assert "$ref" not in str(tool.inputSchema), tool.inputSchema  # the mcp server validates calls with it
    assert tools["caption"].inputSchema["required"] == ["files"]
    assert tools["vqa"].inputSchema["required"] == ["image", "questions"]


@pytest.mark.slow
def test_caption_over_mcp_returns_a_caption(mcp_url, tmp_path):
    png = make_image(tmp_path / "red.png", "red", "circle")
    result = call(mcp_url, "caption", {"files": [data_uri(png.read_bytes())]})
    assert not result.isError, result.content
    assert len(result.content) == 1  # the table alone: the small print (a gr.State) is no output of the tool
    table = ast.literal_eval(result.content[0].text)  # Gradio sends a Dataframe's value as its Python repr
    assert table["headers"] == ["image", "caption"] and len(table["data"]) == 1
    caption = table["data"][0][1]
    assert isinstance(caption, str) and caption.strip(), table  # tiny models: meaningless, but real, text


@pytest.mark.slow
def test_a_tool_with_several_outputs_returns_each(mcp_url):
    result = call(mcp_url, "search_audio", {"text": "a high beep", "top_k": 2})
    assert not result.isError, result.content
    table, plot = (ast.literal_eval(c.text) for c in result.content)
    assert table["headers"] == ["rank", "clip", "score"] and [r[0] for r in table["data"]] == [1, 2]
    assert plot["columns"] == ["item", "score"]


@pytest.mark.slow
def test_the_image_library_is_searched_by_text(mcp_url):
    result = call(mcp_url, "search_images", {"text": "a red circle", "top_k": 2})
    assert not result.isError, result.content
    table = ast.literal_eval(result.content[0].text)
    assert table["headers"][:2] == ["rank", "image"] and [r[0] for r in table["data"]] == [1, 2], table


@pytest.mark.slow
def test_a_corrupt_image_gets_the_apps_sentence(mcp_url):
    result = call(mcp_url, "caption", {"files": [data_uri(b"hello, I am text")]})
    assert result.isError
    text = result.content[0].text
    assert "is a text file, not an image" in text, text
    assert "Traceback" not in text and "\n" not in text.strip(), text
