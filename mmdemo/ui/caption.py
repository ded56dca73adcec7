"""Caption tab: one image or several, an optional prefix and decoding options, base model or an adapter.

``caption_batch`` is wired with ``batch=True``: Gradio hands it the pending requests of several users
at once, and requests with the same prefix, options and adapter share one forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gradio as gr

from mmdemo.config import get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import load_image
from mmdemo.models import caption as caption_model
from mmdemo.models.generation import CAPTION_DEFAULTS
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    adapter_path,
    file_path,
    generation_options,
    model_selector,
    user_errors,
)
from mmdemo.ui.context import ASSETS, GPU_QUEUE, UIContext

TITLE = "Caption"
TASK = "caption"
HEADERS = ["image", "caption"]
MAX_IMAGES = 16  # per request; several users' requests are batched on top of this


def _paths(files) -> list[str]:
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [p for p in (file_path(f) for f in files) if p]


def check_request(files, prompt, num_beams, max_new_tokens, adapter) -> None:
    """Everything about one request that can be wrong, checked before it joins a batch."""
    paths = _paths(files)
    if not paths:
        raise InputError("Upload at least one image to caption.")
    if len(paths) > MAX_IMAGES:
        raise InputError(f"{len(paths)} images were uploaded; caption at most {MAX_IMAGES} at a time.")
    limits = get_settings().limits
    for p in paths:
        load_image(p, limits)
    generation_options(num_beams, max_new_tokens, CAPTION_DEFAULTS)
    adapter_path(TASK, adapter)


@gpu.task(duration=60)
def _run(groups: list[tuple[list[str], str | None, tuple[int, int], str | None]], checkpoint: str) -> list[list[str]]:
    """One ``caption`` call (one forward pass per 16 images) per group of requests that can share it."""
    model = gpu.loaded(TASK, checkpoint)
    out = []
    for images, prompt, (beams, max_new), adapter in groups:
        options = generation_options(beams, max_new, CAPTION_DEFAULTS)
        out.append(caption_model.caption(images, prompt, options, adapter=adapter, model=model))
    return out


def caption_batch(files_list, prompts, beams_list, max_list, adapters, *, checkpoint: str | None = None):
    """Batched handler: lists of requests in, a tuple holding one list of [image, caption] rows per request.

    A request that cannot be served (a bad file) gets its error sentence as its caption when it was
    batched with others, so one user's bad upload never fails the other users' requests; alone, it
    raises and the user sees ``gr.Error``.
    """
    n = len(files_list)
    rows: list[list[list[str]] | None] = [None] * n
    groups: dict[tuple, list[int]] = defaultdict(list)
    prepared: dict[int, tuple[list[str], str | None]] = {}
    for i in range(n):
        try:
            check_request(files_list[i], prompts[i], beams_list[i], max_list[i], adapters[i])
            opts = generation_options(beams_list[i], max_list[i], CAPTION_DEFAULTS)
            adapter = adapter_path(TASK, adapters[i])
        except MMDemoError as err:
            if n == 1:
                raise
            rows[i] = [["—", f"⚠️ {err}"]]
            continue
        prompt = (prompts[i] or "").strip() or None
        prepared[i] = (_paths(files_list[i]), prompt)
        groups[(prompt, opts.num_beams, opts.max_new_tokens, adapter)].append(i)
    work = []
    for (prompt, beams, max_new, adapter), members in groups.items():
        images = [p for i in members for p in prepared[i][0]]
        work.append((images, prompt, (beams, max_new), adapter))
    results = _run(work, checkpoint) if work else []
    for (_key, members), captions in zip(groups.items(), results):
        it = iter(captions)
        for i in members:
            rows[i] = [[Path(p).name, next(it)] for p in prepared[i][0]]
    return (rows,)


def preview(files) -> list[str]:
    return _paths(files)


def examples() -> list[list]:
    images = sorted((ASSETS / "images").glob("*.png"))
    return [[[str(p)], ""] for p in images[:4]] + ([[[str(p) for p in images[:3]], "a picture of"]] if images else [])


def build(ctx: UIContext) -> None:
    checkpoint = ctx.checkpoint(TASK)
    gr.Markdown("Upload one image or several; each gets a caption. An optional prefix starts every caption.")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="caption-files")
            gallery = gr.Gallery(label="Preview", columns=4, height=180, interactive=False)
            prompt = gr.Textbox(label="Prefix (optional)", placeholder="a picture of", elem_id="caption-prompt")
            with gr.Accordion("Decoding options", open=False):
                beams = gr.Slider(1, 10, value=CAPTION_DEFAULTS.num_beams, step=1, label="Beams")
                max_new = gr.Slider(1, 100, value=CAPTION_DEFAULTS.max_new_tokens, step=1, label="Max new tokens")
            adapter = model_selector(ctx, TASK)
            run = gr.Button("Caption", variant="primary", elem_id="caption-run")
        with gr.Column():
            table = gr.Dataframe(headers=HEADERS, label="Captions", interactive=False, wrap=True,
                                 elem_id="caption-output")
    gr.Examples(examples(), inputs=[files, prompt], label="Examples (drawn by assets/make_assets.py)")

    inputs = [files, prompt, beams, max_new, adapter]
    files.change(preview, files, gallery, api_visibility="private")
    run.click(user_errors(check_request), inputs, None, api_visibility="private", queue=False).success(
        user_errors(lambda *a: caption_batch(*a, checkpoint=checkpoint)), inputs, table, api_name="caption",
        batch=True, max_batch_size=ctx.max_batch_size, concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
