"""Assemble the tabs into one ``gr.Blocks`` and serve it; ``python app.py --help`` for the options.

Adding a tab is one line in ``TABS`` (see the convention in ``mmdemo/ui/__init__.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import gradio as gr

from mmdemo.config import ensure_writable, get_settings
from mmdemo.models.registry import TASKS
from mmdemo.ui.audio import library_clips_dir
from mmdemo.ui.common import browser_secret, new_browser_id
from mmdemo.ui.context import ASSETS, UIContext
from mmdemo.ui.status import STATUS

# One module per tab, in display order: each has TITLE and build(ctx), optionally warm_up(ctx).
TABS: list[str] = [
    "mmdemo.ui.caption",
    "mmdemo.ui.vqa",
    "mmdemo.ui.audio",
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
    modules = tab_modules()
    home = get_settings().home
    home_problem = ensure_writable(home)
    if home_problem:  # said once here, in the page's banner, and by each action that needs the folder
        print(f"mmdemo: {home_problem} (MMDEMO_HOME is {home.absolute()})", file=sys.stderr, flush=True)
    # Uploads and results Gradio copies to its cache are deleted after DELETE_CACHE[1] seconds (checked every
    # DELETE_CACHE[0]): adapter download links are short-lived, and the cache does not fill the disk.
    with gr.Blocks(title="mmdemo", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# mmdemo\nCaption images, ask questions about them and search sounds by text or by sound.")
        if ctx.tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        if home_problem:
            gr.Markdown(f"**Warning:** {home_problem} Captions and answers still work; fine-tuning, the audio "
                        f"library and your adapters need it.", elem_id="home-banner")
        status = gr.Markdown(STATUS.markdown(checkpoints), elem_id="model-status")
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
            return STATUS.markdown(checkpoints), gr.Timer(active=not STATUS.done())

        timer.tick(poll, None, [status, timer], api_visibility="private", queue=False)
        demo.load(poll, None, [status, timer], api_visibility="private", queue=False)
    if warm_up:
        # the tabs' warm-up steps (audio library, job dispatcher) need the data folder; models do not
        hooks = [m.warm_up for m in modules if hasattr(m, "warm_up") and not home_problem]
        STATUS.warm_up(checkpoints, then=[lambda h=h: h(ctx) for h in hooks])
    return demo


def launch_kwargs(port: int | None = None) -> dict:
    """What ``launch`` needs: the port, and the only folders whose files anyone may fetch by path.

    Those are the bundled assets and the shared audio library's clips (the page plays them). Nothing else
    under ``MMDEMO_HOME`` is served: not the job database, logs, datasets, runs or adapters. Results a
    handler returns (an adapter zip, a clip to play) are copied by Gradio to its own cache, under an
    unguessable folder name, and deleted after ``DELETE_CACHE[1]`` seconds.
    """
    return dict(
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        allowed_paths=[str(ASSETS), str(library_clips_dir().resolve())],
        css=CSS,
        theme=gr.themes.Soft(),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="Serve the mmdemo Gradio app.")
    p.add_argument("--tiny-models", action="store_true",
                   help="run on tiny random checkpoints written to MMDEMO_HOME/tiny-models (outputs are meaningless)")
    for task in TASKS:
        p.add_argument(f"--{task}-model", metavar="CHECKPOINT",
                       help=f"Hub id or local folder for {task} (default: ${TASKS[task].env_var} or "
                            f"{TASKS[task].default_checkpoint})")
    p.add_argument("--home", help="data folder for adapters, indexes and jobs (default: $MMDEMO_HOME or checkpoints)")
    p.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="address to listen on")
    p.add_argument("--gpu-concurrency", type=int, default=int(os.environ.get("MMDEMO_GPU_CONCURRENCY", "1")),
                   help="model calls running at once, all tabs together (default 1)")
    p.add_argument("--max-batch-size", type=int, default=16, help="caption/VQA requests served by one call")
    p.add_argument("--no-warm-up", action="store_true", help="load models on first use instead of at startup")
    p.add_argument("--fast", action="store_true", help="CPU fast mode (MMDEMO_FAST=1): int8 layers and an exported "
                   "audio encoder; faster, outputs close to but not exactly the models' own")
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> UIContext:
    """Apply the flags to the environment (which the model layer reads) and return the UI context."""
    if args.home:
        os.environ["MMDEMO_HOME"] = args.home
    if args.fast:
        os.environ["MMDEMO_FAST"] = "1"
    checkpoints: dict[str, str] = {}
    home = get_settings().home
    problem = ensure_writable(home)
    if args.tiny_models:
        from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models

        target = home / "tiny-models" if not problem else Path(tempfile.mkdtemp(prefix="mmdemo-tiny-"))
        folders = write_tiny_models(target)
        checkpoints = {task: str(folders[name].resolve()) for task, name in TINY_FOR_TASK.items()}
    for task in TASKS:
        flag = getattr(args, f"{task}_model")
        if flag:
            checkpoints[task] = flag
    for task, checkpoint in checkpoints.items():
        os.environ[TASKS[task].env_var] = checkpoint  # so the CLI and jobs started from here agree
    return UIContext(checkpoints=checkpoints, tiny=args.tiny_models,
                     gpu_concurrency=max(1, args.gpu_concurrency), max_batch_size=max(1, args.max_batch_size))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = configure(args)
    demo = build_app(ctx, warm_up=not args.no_warm_up)
    demo.queue(max_size=int(os.environ.get("MMDEMO_QUEUE_SIZE", "64")),
               default_concurrency_limit=ctx.gpu_concurrency)
    demo.launch(server_name=args.host, **launch_kwargs(args.port))


__all__ = ["TABS", "build_app", "configure", "launch_kwargs", "main", "parse_args"]
