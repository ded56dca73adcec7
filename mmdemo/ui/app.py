"""Assemble the tabs into one ``gr.Blocks`` and serve it; ``python app.py --help`` for the options.

Adding a tab is one line in ``TABS`` (see the convention in ``mmdemo/ui/__init__.py``). :func:`main` builds the
:class:`~mmdemo.config.Settings` once, from the environment with the flags over it (:func:`app_settings`), installs
them as the process's and hands them to the tabs in the :class:`UIContext`; job workers get the same settings
through their own environment (see :mod:`mmdemo.jobs.dispatcher`). Nothing is written to ``os.environ``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import gradio as gr

from mmdemo.config import Settings, ensure_writable, get_settings, install, model_var, parse_checkpoints
from mmdemo.errors import InputError
from mmdemo.models.audio_library import clips_dir as library_clips_dir
from mmdemo.models.image_search import images_dir
from mmdemo.models.loading import check_task_names
from mmdemo.models.registry import TASKS
from mmdemo.ui.common import browser_secret, new_browser_id
from mmdemo.ui.context import ASSETS, UIContext
from mmdemo.ui.status import STATUS

# One module per tab, in display order: each has TITLE and build(ctx), optionally warm_up(ctx).
TABS: list[str] = [
    "mmdemo.ui.caption",
    "mmdemo.ui.vqa",
    "mmdemo.ui.compare",
    "mmdemo.ui.audio",
    "mmdemo.ui.images",
    "mmdemo.ui.finetune",
]

# Words, not emoji: a machine without a colour-emoji font shows an empty box for them.
TINY_BANNER = ("**Warning: tiny test models.** This app runs on tiny random-weight checkpoints "
               "(`--tiny-models`). Every caption, answer and score is meaningless; it only shows that the "
               "app works.")
DELETE_CACHE = (300, 900)  # seconds: how often Gradio's cache is swept, and the age of what it deletes
CSS = "#home-banner {background: #f8d7da; border: 2px solid #dc3545; border-radius: 8px; padding: 4px 12px;} "\
      "#tiny-banner {background: #fff3cd; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px;} "\
      ".run-info, .run-info * {font-size: var(--text-sm) !important; color: var(--body-text-color-subdued);}"


def tab_modules() -> list:
    return [importlib.import_module(name) for name in TABS]


def build_app(ctx: UIContext | None = None, warm_up: bool = True) -> gr.Blocks:
    """The whole app. With ``warm_up``, models load in a background thread (the page shows progress)."""
    ctx = ctx or UIContext()
    checkpoints = {task: ctx.checkpoint(task) for task in TASKS}
    ctx = replace(ctx, checkpoints=checkpoints)
    # the tabs' other base models (Caption, Visual QA): not loaded at start; the status box says so
    more = {task: list(ctx.base_models(task).more) for task in TASKS if ctx.base_models(task).more}
    modules = tab_modules()
    home = ctx.settings.home
    home_problem = ensure_writable(home)
    if home_problem:  # said once here, in the page's banner, and by each action that needs the folder
        print(f"mmdemo: {home_problem} (MMDEMO_HOME is {home.absolute()})", file=sys.stderr, flush=True)
    # Uploads and results Gradio copies to its cache are deleted after DELETE_CACHE[1] seconds (checked every
    # DELETE_CACHE[0]): adapter download links are short-lived, and the cache does not fill the disk.
    with gr.Blocks(title="mmdemo", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# mmdemo\nCaption images, ask questions about them and search sounds and pictures by text or "
                    "by example.")
        if ctx.tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        if home_problem:
            gr.Markdown(f"**Warning:** {home_problem} Captions and answers still work; fine-tuning, the audio "
                        f"and image libraries and your adapters need it.", elem_id="home-banner")
        status = gr.Markdown(STATUS.markdown(checkpoints, more), elem_id="model-status")
        if os.environ.get("SPACE_ID"):
            gr.LoginButton()  # on a Space: jobs and adapters belong to the signed-in user
        # The anonymous id is stored with a key kept under MMDEMO_HOME, so the same browser is the same user
        # after a restart or an upgrade (with no stable key, Gradio makes a new one at every start).
        browser_id = gr.BrowserState(None, storage_key="mmdemo-owner", secret=None if home_problem else
                                     browser_secret(home))
        identified = demo.load(new_browser_id, browser_id, browser_id, api_visibility="private", queue=False)
        for module in modules:
            with gr.Tab(module.TITLE, elem_id=f"tab-{module.__name__.rsplit('.', 1)[-1]}") as tab:
                module.build(replace(ctx, demo=demo, tab=tab, browser_id=browser_id, ready=identified.then))
        timer = gr.Timer(2.0, active=warm_up)

        def poll():
            return STATUS.markdown(checkpoints, more), gr.Timer(active=not STATUS.done())

        timer.tick(poll, None, [status, timer], api_visibility="private", queue=False)
        demo.load(poll, None, [status, timer], api_visibility="private", queue=False)
    if warm_up:
        # the tabs' warm-up steps (audio library, job dispatcher) need the data folder; models do not
        hooks = [m.warm_up for m in modules if hasattr(m, "warm_up") and not home_problem]
        STATUS.warm_up(checkpoints, then=[lambda h=h: h(ctx) for h in hooks])
    return demo


def launch_kwargs(port: int | None = None, mcp: bool = False, settings: Settings | None = None) -> dict:
    """What ``launch`` needs: the port (default: the settings', ``GRADIO_SERVER_PORT`` or 7860), and the only
    folders whose files anyone may fetch by path.

    Those are the bundled assets, the shared audio library's clips (the page plays them) and the shared image
    library's images (the page shows them; not its index). Nothing else
    under ``MMDEMO_HOME`` is served: not the job database, logs, datasets, runs or adapters. Results a
    handler returns (an adapter zip, a clip to play) are copied by Gradio to its own cache, under an
    unguessable folder name, and deleted after ``DELETE_CACHE[1]`` seconds.

    With ``mcp``, the tabs' ``MCP_TOOLS`` are also served as MCP tools at ``MCP_PATH`` (see
    :func:`restrict_mcp_tools`). Without it MCP stays off even if ``GRADIO_MCP_SERVER`` is set: Gradio alone
    would make every public endpoint a tool, the fine-tuning and job endpoints included.
    """
    kwargs = dict(
        server_port=port or (settings or get_settings()).port,
        allowed_paths=[str(ASSETS), str(library_clips_dir().resolve()), str(images_dir().resolve())],
        css=CSS,
        theme=gr.themes.Soft(),
        mcp_server=mcp,
    )
    if mcp:
        kwargs["app_kwargs"] = {"lifespan": _mcp_tools_only}
    return kwargs


# ----------------------------------------------------------------------------------------------------- MCP
MCP_PATH = "/gradio_api/mcp/"  # Gradio's streamable HTTP endpoint (its SSE transport is at .../mcp/sse)
MCP_REQUIREMENT = ">=1.21,<2"  # what gradio 6's mcp extra accepts (as in requirements.txt)


def mcp_tool_names(modules: list | None = None) -> list[str]:
    """The api_names served as MCP tools: each tab module's ``MCP_TOOLS``, in tab order.

    A tab offers an endpoint to strangers' agents by listing its api_name in ``MCP_TOOLS``; an endpoint that
    is not listed (fine-tuning, jobs, helpers) is no MCP tool, however public it is for ``gradio_client``.
    """
    return [name for module in (modules or tab_modules()) for name in getattr(module, "MCP_TOOLS", ())]


def restrict_mcp_tools(server, names: list[str]) -> None:
    """Make Gradio's MCP server (``demo.mcp_server_obj``) serve exactly ``names``, each named by its api_name.

    Gradio 6 turns every public endpoint into a tool named after its Python function (``handler``,
    ``handler_1``...) and has no per-event switch for it, so the tool table is replaced here, before the
    server takes its first request. Also worked around here (gradio 6.31, mcp 1.x), each checked by
    tests/test_mcp.py:

    - the tool schemas, for the JSON-schema check the mcp package runs on every call: an "any value" input
      (``gr.BrowserState``) is ``{"type": {}}``, which is no schema; a multiple-file input keeps a ``$ref`` to
      ``#/$defs/FileData`` that the schema's root lacks, so every caption call was refused; a model dropdown
      lists only "base" at build time although any adapter name the caller may use is accepted;
    - the files of a multiple-file input (a list of URLs or ``data:`` URIs) were passed on as bare strings;
    - an endpoint with ``gr.State`` outputs (the tabs' small print) failed every call ("pop index out of range").
    """
    endpoints = server.api_info["named_endpoints"]  # the server's own copy, read once at start-up
    missing = [name for name in names if f"/{name}" not in endpoints]
    if missing:
        raise RuntimeError(f"MCP_TOOLS names {', '.join(missing)}, which no public endpoint has as its api_name.")
    server.tool_to_endpoint = {server.tool_prefix + name: f"/{name}" for name in names}
    for name in names:
        block_fn = server.get_block_fn_from_endpoint_name(f"/{name}")
        inputs = [block for block in block_fn.inputs if not getattr(block, "skip_api", False)]
        for param, block in zip(endpoints[f"/{name}"]["parameters"], inputs):
            schema = dict(param["type"])  # a copy: the original is shared with the page's config
            if schema.get("type") == {}:
                del schema["type"]
            if isinstance(block, gr.Dropdown) and block.allow_custom_value:
                schema.pop("enum", None)
            param["type"] = schema
    input_schema, to_filedata = server.get_input_schema, server.convert_strings_to_filedata

    def get_input_schema(tool_name: str, parameters: dict | None = None):
        schema, positions = input_schema(tool_name, parameters)
        return {**schema, "properties": _without_nested_refs(schema["properties"])}, positions

    def convert_strings_to_filedata(value, positions: list[list]):
        return to_filedata(value, [p for position in positions for p in _item_positions(value, position)])

    server.get_input_schema = get_input_schema
    server.convert_strings_to_filedata = convert_strings_to_filedata
    server.pop_returned_state = _api_outputs


def _without_nested_refs(node):
    """``node`` without ``$defs`` and ``$ref``: Gradio's refs point at the root's ``$defs``, which a tool schema
    lacks, and the file inputs they described are plain strings (URLs) in it by now."""
    if isinstance(node, dict):
        return {key: _without_nested_refs(value) for key, value in node.items() if key not in ("$defs", "$ref")}
    if isinstance(node, list):
        return [_without_nested_refs(value) for value in node]
    return node


def _item_positions(value, position: list) -> list[list]:
    """A schema position (``["files", "items"]``) as the positions of the values there (``["files", 0]``...)."""
    if not position:
        return [[]]
    head, *rest = position
    if head == "items" and isinstance(value, list):
        return [[i, *p] for i, item in enumerate(value) for p in _item_positions(item, rest)]
    if isinstance(value, dict) and head in value:
        return [[head, *p] for p in _item_positions(value[head], rest)]
    return [position]


def _api_outputs(components, data: list) -> list:
    """A tool call's outputs without the ``gr.State`` ones. Gradio hands over either the list of every output
    or a one-item list holding what its ``gradio_client`` returned: a tuple of every output (State ones as
    None) when there are several."""
    if len(data) == 1 and len(components) > 1 and isinstance(data[0], tuple):
        data = list(data[0])
    if len(data) == len(components):
        return [value for value, component in zip(data, components) if not isinstance(component, gr.State)]
    return data


@contextlib.asynccontextmanager
async def _mcp_tools_only(app):
    """Starts with the web server, before its first request (Gradio enters a launch's ``lifespan`` then)."""
    server = app.get_blocks().mcp_server_obj
    if server is not None:
        restrict_mcp_tools(server, mcp_tool_names())
    yield


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a flag that is not given is ``None``, so the environment's setting applies
    (see :func:`app_settings`)."""
    p = argparse.ArgumentParser(prog="app.py", description="Serve the mmdemo Gradio app.")
    p.add_argument("--tiny-models", action="store_true",
                   help="run on tiny random checkpoints written to MMDEMO_HOME/tiny-models (outputs are meaningless)")
    for task in TASKS:
        p.add_argument(f"--{task.replace('_', '-')}-model", dest=f"{task}_model", metavar="CHECKPOINT",
                       help=f"Hub id or local folder for {task} (default: ${model_var(task)} or "
                            f"{TASKS[task].default_checkpoint})")
        if TASKS[task].more_checkpoints:
            p.add_argument(f"--{task.replace('_', '-')}-more-models", dest=f"{task}_more_models", metavar="CHECKPOINTS",
                           help=f"other {task} base models the tab's Model list offers, comma-separated, or none "
                                f"(default: ${model_var(task, more=True)} or "
                                f"{','.join(TASKS[task].more_checkpoints)})")
    p.add_argument("--home", help="data folder for adapters, indexes and jobs (default: $MMDEMO_HOME or checkpoints)")
    p.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", help="address to listen on (default: $GRADIO_SERVER_NAME or Gradio's, 127.0.0.1)")
    p.add_argument("--gpu-concurrency", type=int,
                   help="model calls running at once, all tabs together (default: $MMDEMO_GPU_CONCURRENCY or 1)")
    p.add_argument("--max-batch-size", type=int, default=16, help="caption/VQA requests served by one call")
    p.add_argument("--no-warm-up", action="store_true", help="load models on first use instead of at startup")
    p.add_argument("--mcp", action="store_true", default=None,
                   help=f"also serve the model tools (caption, VQA, audio search) to MCP clients at {MCP_PATH} "
                        f"(MMDEMO_MCP=1; needs the mcp package)")
    p.add_argument("--fast", action="store_true", default=None, help="CPU fast mode (MMDEMO_FAST=1): int8 layers "
                   "and an exported audio encoder; faster, outputs close to but not exactly the models' own")
    return p.parse_args(argv)


def app_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """The app's settings: the environment's (``environ``, default ``os.environ``), with the flags over them.

    With ``--tiny-models`` the tiny checkpoints are written (under the data folder, or a temporary folder when it
    cannot be written) and become every task's model and other base models; a ``--<task>-model`` flag still wins.
    Raises :class:`~mmdemo.errors.InputError` for a bad value, in one sentence.
    """
    settings = Settings.from_env(environ).with_flags(
        home=args.home, fast=args.fast, gpu_concurrency=args.gpu_concurrency, mcp=args.mcp, host=args.host,
        port=args.port)
    if args.tiny_models:
        from mmdemo.models.tiny import TINY_FOR_TASK, tiny_more_for_task, write_tiny_models

        target = (settings.home / "tiny-models" if not ensure_writable(settings.home)
                  else Path(tempfile.mkdtemp(prefix="mmdemo-tiny-")))
        folders = write_tiny_models(target)
        settings = settings.with_flags(
            models={task: str(folders[name].resolve()) for task, name in TINY_FOR_TASK.items()},
            more_models={task: tuple(str(folders[name].resolve()) for name in names)
                         for task, names in tiny_more_for_task().items()})
    models = {task: getattr(args, f"{task}_model") for task in TASKS if getattr(args, f"{task}_model")}
    more = {task: parse_checkpoints(f"--{task.replace('_', '-')}-more-models",
                                    getattr(args, f"{task}_more_models", None)) for task in TASKS}
    settings = settings.with_flags(models=models, more_models={t: c for t, c in more.items() if c is not None})
    check_task_names(settings)
    return settings


def configure(args: argparse.Namespace, environ: dict[str, str] | None = None) -> UIContext:
    """The UI context for these flags: :func:`app_settings` and the UI's own options. Changes no environment and
    installs nothing (:func:`main` does)."""
    settings = app_settings(args, environ)
    return UIContext(settings=settings, tiny=args.tiny_models, gpu_concurrency=settings.gpu_concurrency,
                     max_batch_size=max(1, args.max_batch_size))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ctx = configure(args)
    except InputError as err:
        sys.exit(f"mmdemo: {err}")
    settings = ctx.settings
    if settings.mcp and importlib.util.find_spec("mcp") is None:
        sys.exit(f"mmdemo: --mcp needs the mcp package: pip install 'mcp{MCP_REQUIREMENT}'.")
    install(settings)  # what every get_settings() of this process returns from now on; workers get it too
    demo = build_app(ctx, warm_up=not args.no_warm_up)
    if settings.mcp:  # said here, not as a web server that fails to start (restrict_mcp_tools checks it too)
        public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
        if missing := [name for name in mcp_tool_names() if name not in public]:
            raise RuntimeError(f"MCP_TOOLS names {', '.join(missing)}, which no public endpoint has as its api_name.")
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=ctx.gpu_concurrency)
    demo.launch(server_name=settings.host, **launch_kwargs(mcp=settings.mcp, settings=settings))


__all__ = ["MCP_PATH", "TABS", "app_settings", "build_app", "configure", "launch_kwargs", "main", "mcp_tool_names",
           "parse_args", "restrict_mcp_tools"]
