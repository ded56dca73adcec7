"""Caption tab: one image or several, an optional prefix and decoding options, base model or an adapter.

``caption_batch`` is wired with ``batch=True``: Gradio hands it the pending requests of several users
at once, and requests with the same prefix, options and adapter share one forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gradio as gr
from PIL import Image

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import decoded_image
from mmdemo.models import caption as caption_model
from mmdemo.models.generation import CAPTION_DEFAULTS, for_adapter
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    BASE,
    device_label,
    empty_table,
    file_path,
    generation_options,
    model_selector,
    optional_owner,
    resolve_model,
    run_info_box,
    serve_batch,
    show_run_info,
    tab_bases,
    user_errors,
)
from mmdemo.ui.context import ASSETS, CHECK_CONCURRENCY, GPU_QUEUE, BaseModels, UIContext

TITLE = "Caption"
TASK = "caption"
MCP_TOOLS = ["caption"]  # api_names offered to MCP clients (python app.py --mcp; see mmdemo.ui.app.mcp_tool_names)
HEADERS = ["image", "caption"]
MAX_IMAGES = 16  # per request; several users' requests are batched on top of this
BEAMS_INFO = ("How many candidate captions are written side by side before the best is kept; more can read "
              "better but take longer (1 is fastest).")
MAX_NEW_INFO = "The longest caption allowed, in tokens (a token is a short word or a piece of a longer one)."


def _paths(files) -> list[str]:
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [p for p in (file_path(f) for f in files) if p]


def _prepare(files, prompt, num_beams, max_new_tokens, adapter, owner: str | None, bases: BaseModels):
    """Everything about one request that can be wrong, checked before it joins a batch; returns its work.

    Bounds: at most ``MAX_IMAGES`` images, each within the size/pixel limits; the prefix and max new tokens
    within the model's text positions; the adapter one that ``owner`` may use. Each image is decoded once
    per request: the decoded images are part of the work, and the check before the run decodes the same files
    (:func:`mmdemo.media.decoded_image` remembers them).
    """
    paths = _paths(files)
    if not paths:
        raise InputError("Upload at least one image to caption.")
    if len(paths) > MAX_IMAGES:
        raise InputError(f"{len(paths)} images were uploaded; caption at most {MAX_IMAGES} at a time.")
    limits = get_settings().limits
    images = [decoded_image(p, limits) for p in paths]  # the run reuses the check's decode (and passes it on)
    chosen = resolve_model(bases, adapter, owner)
    options = generation_options(num_beams, max_new_tokens, for_adapter(CAPTION_DEFAULTS, chosen.adapter))
    caption_model.check_prompt(gpu.loaded(TASK, chosen.checkpoint), prompt, options, chosen.detail)
    return paths, (prompt or "").strip() or None, options, chosen, images


def check_request(files, prompt, num_beams, max_new_tokens, adapter, browser_id,
                  profile: gr.OAuthProfile | None = None, *, checkpoint: str | None = None,
                  bases: BaseModels | None = None) -> None:
    """The page's first step: a bad request gets its sentence at once, and the results on screen stay."""
    _prepare(files, prompt, num_beams, max_new_tokens, adapter, optional_owner(browser_id, profile),
             tab_bases(TASK, checkpoint, bases))


@gpu.task(duration=60)
def _run(groups: list[tuple[list[Image.Image], str | None, tuple[int, int], str | None, str, str]]
         ) -> tuple[list[list[str]], str, list[str]]:
    """One ``caption`` call (one forward pass per 16 images) per group of requests that can share it: same base
    model (``checkpoint``), caption detail, prefix, options and adapter.

    Also returns where it ran (in words) and each group's checkpoint, read here: on ZeroGPU only this function
    runs on the GPU.
    """
    out, ran_on, device = [], [], ""
    for images, prompt, (beams, max_new), adapter, checkpoint, detail in groups:
        model = gpu.loaded(TASK, checkpoint)
        options = generation_options(beams, max_new, for_adapter(CAPTION_DEFAULTS, adapter))
        out.append(caption_model.caption(images, prompt, options, adapter=adapter, model=model, detail=detail))
        ran_on.append(model.checkpoint)
        device = device_label(model.device, model.dtype)
    return out, device, ran_on


def caption_batch(files_list, prompts, beams_list, max_list, adapters, browser_ids=None, requests=None, *,
                  checkpoint: str | None = None, bases: BaseModels | None = None):
    """Batched handler: lists of requests in; out, one list of [image, caption] rows per request and one line
    of small print per request (device, model, adapter and the batch's wall time; blank for a refused one).

    Requests with the same prefix, options and adapter share one forward pass. A request that cannot be
    served (a bad file, a prefix too long, someone else's adapter, or a model call that fails on it alone)
    gets its error sentence as its caption when it was batched with others, so one user's bad request never
    fails the other users'; alone, it raises and the user sees ``gr.Error``.
    """

    bases = tab_bases(TASK, checkpoint, bases)

    def prepare(i: int, owner: str | None):
        return _prepare(files_list[i], prompts[i], beams_list[i], max_list[i], adapters[i], owner, bases)

    def call(part: dict) -> tuple[dict, str, dict]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_paths, prompt, opts, chosen, _images) in part.items():
            groups[(prompt, opts.num_beams, opts.max_new_tokens, chosen.adapter, chosen.checkpoint,
                    chosen.detail)].append(i)
        jobs = [([img for i in members for img in part[i][4]], prompt, (beams, max_new), adapter, ck, detail)
                for (prompt, beams, max_new, adapter, ck, detail), members in groups.items()]
        results, device, checkpoints = _run(jobs)
        out, ran_on = {}, {}
        for members, captions, ck in zip(groups.values(), results, checkpoints):
            it = iter(captions)
            for i in members:
                out[i] = [[Path(p).name, next(it)] for p in part[i][0]]
                ran_on[i] = ck
        return out, device, ran_on

    shown = [None if a in bases.entries() and a != BASE else a for a in adapters]  # a base model is no adapter
    return serve_batch(len(files_list), prepare, call, "caption", shown, browser_ids, requests)


def preview(files) -> list[str]:
    return _paths(files)


def examples() -> list[list]:
    images = sorted((ASSETS / "images").glob("*.png"))
    return [[[str(p)], ""] for p in images[:4]] + ([[[str(p) for p in images[:3]], "a picture of"]] if images else [])


def build(ctx: UIContext) -> None:
    bases = ctx.base_models(TASK)
    gr.Markdown("Upload one image or several; each gets a caption. An optional prefix starts every caption.")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="caption-files")
            # four columns even for one image (by default one image fills the width and is cut off at the
            # gallery's height), each image shown whole
            gallery = gr.Gallery(label="Preview", columns=4, fit_columns=False, height=180, interactive=False,
                                 object_fit="contain", elem_id="caption-preview")
            prompt = gr.Textbox(label="Prefix (optional)", placeholder="a picture of", elem_id="caption-prompt")
            with gr.Accordion("Decoding options", open=False):
                beams = gr.Slider(1, 10, value=CAPTION_DEFAULTS.num_beams, step=1, label="Beams", info=BEAMS_INFO)
                max_new = gr.Slider(1, 100, value=CAPTION_DEFAULTS.max_new_tokens, step=1, label="Max new tokens",
                                    info=MAX_NEW_INFO)
            adapter = model_selector(ctx, TASK)
            run = gr.Button("Caption", variant="primary", elem_id="caption-run")
        with gr.Column():
            # fixed column widths: with wrap alone, a long caption runs past the table's right edge
            table = gr.Dataframe(empty_table(HEADERS), headers=HEADERS, label="Captions", interactive=False,
                                 wrap=True, column_widths=["30%", "70%"], elem_id="caption-output")
            info, info_box = run_info_box("caption-info")
    gr.Examples(examples(), inputs=[files, prompt], label="Examples: click one to fill in the images and prefix")

    inputs = [files, prompt, beams, max_new, adapter, ctx.browser_id]

    def check(files, prompt, beams, max_new, adapter, browser_id, profile: gr.OAuthProfile | None = None) -> None:
        check_request(files, prompt, beams, max_new, adapter, browser_id, profile, bases=bases)

    # Gradio passes each argument as a list, one item per request (batch=True). The names, defaults and the
    # docstring describe one request, as the API page and MCP clients show it (Gradio reads one line per Args entry).
    def handler(files, prompt=None, num_beams=None, max_new_tokens=None, model=None, browser_id=None,
                request: gr.Request = None):
        """Write a short English caption for each image (an image captioning model, BLIP by default).

        Args:
            files: The images to caption (PNG, JPEG, WebP, ...), at most 16; each gets its own caption.
            prompt: Optional text every caption starts with and continues, e.g. "a picture of"; empty for none.
            num_beams: Candidate captions written side by side before the best is kept, 1 to 10; more can read better but take longer.
            max_new_tokens: The longest caption allowed, in tokens (a short word or a piece of a longer one), 1 to 100.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned caption adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table with one row per image: the image's file name and its caption.
        """
        return caption_batch(files, prompt, num_beams, max_new_tokens, model, browser_id, request, bases=bases)

    files.change(preview, files, gallery, api_visibility="private")
    # The check is queued (a queued event's gr.Error reaches the page) and has no outputs, so a refused
    # request shows its sentence and leaves the captions already on screen as they are.
    # The small print goes through a State: the API's answer stays the table alone.
    ran = run.click(user_errors(check), inputs, None, api_visibility="private", concurrency_limit=CHECK_CONCURRENCY,
                    concurrency_id="check").success(
        user_errors(handler), inputs, [table, info], api_name="caption",
        batch=True, max_batch_size=ctx.max_batch_size, concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
    show_run_info(ran, info, info_box)
