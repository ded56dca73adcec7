"""Visual QA tab: an image and one or more questions (one per line), base model or an adapter.

``vqa_batch`` is wired with ``batch=True``: the questions of several users' requests with the same
options and adapter go through ``answer_pairs`` together.
"""

from __future__ import annotations

from collections import defaultdict

import gradio as gr
from PIL import Image

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import decoded_image
from mmdemo.models import vqa as vqa_model
from mmdemo.models.generation import VQA_DEFAULTS, for_adapter
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    BASE,
    device_label,
    empty_table,
    file_path,
    generation_options,
    image_input,
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

TITLE = "Visual QA"
TASK = "vqa"
MCP_TOOLS = ["vqa"]  # api_names offered to MCP clients (python app.py --mcp; see mmdemo.ui.app.mcp_tool_names)
HEADERS = ["question", "answer"]
MAX_QUESTIONS = 20
BEAMS_INFO = ("How many candidate answers are written side by side before the best is kept; more can be "
              "better but take longer (1 is fastest).")
MAX_NEW_INFO = "The longest answer allowed, in tokens (a token is a short word or a piece of a longer one)."


def split_questions(text: str | None) -> list[str]:
    lines = [q.strip() for q in (text or "").splitlines()]
    questions = vqa_model.clean_questions([q for q in lines if q])
    if len(questions) > MAX_QUESTIONS:
        raise InputError(f"{len(questions)} questions were asked; ask at most {MAX_QUESTIONS} at a time.")
    return questions


def _prepare(image, questions, num_beams, max_new_tokens, adapter, owner: str | None, bases: BaseModels):
    """Everything about one request that can be wrong, checked before it joins a batch; returns its work.

    Bounds: one image within the size/pixel limits, at most ``MAX_QUESTIONS`` questions each within the
    model's text positions, max new tokens within the answer decoder's, an adapter ``owner`` may use.
    """
    path = file_path(image)
    if not path:
        raise InputError("Upload an image to ask about.")
    image = decoded_image(path, get_settings().limits)  # decoded once per request (see caption._prepare)
    asked = split_questions(questions)
    chosen = resolve_model(bases, adapter, owner)
    options = generation_options(num_beams, max_new_tokens, for_adapter(VQA_DEFAULTS, chosen.adapter))
    vqa_model.check_questions(gpu.loaded(TASK, chosen.checkpoint), asked, options)
    return image, asked, options, chosen


def check_request(image, questions, num_beams, max_new_tokens, adapter, browser_id,
                  profile: gr.OAuthProfile | None = None, *, checkpoint: str | None = None,
                  bases: BaseModels | None = None) -> None:
    """The page's first step: a bad request gets its sentence at once, and the answers on screen stay."""
    _prepare(image, questions, num_beams, max_new_tokens, adapter, optional_owner(browser_id, profile),
             tab_bases(TASK, checkpoint, bases))


@gpu.task(duration=60)
def _run(groups: list[tuple[list[tuple[Image.Image, str]], tuple[int, int], str | None, str]]
         ) -> tuple[list[list[str]], str, list[str]]:
    """The answers per group (same base model, options and adapter), where they were computed (in words) and each
    group's checkpoint (see caption._run)."""
    out, ran_on, device = [], [], ""
    for pairs, (beams, max_new), adapter, checkpoint in groups:
        model = gpu.loaded(TASK, checkpoint)
        options = generation_options(beams, max_new, for_adapter(VQA_DEFAULTS, adapter))
        out.append(vqa_model.answer_pairs(pairs, options, adapter=adapter, model=model))
        ran_on.append(model.checkpoint)
        device = device_label(model.device, model.dtype)
    return out, device, ran_on


def vqa_batch(images, questions_list, beams_list, max_list, adapters, browser_ids=None, requests=None, *,
              checkpoint: str | None = None, bases: BaseModels | None = None):
    """Batched handler: one list of [question, answer] rows and one line of small print per request (see
    ``caption_batch``)."""
    bases = tab_bases(TASK, checkpoint, bases)

    def prepare(i: int, owner: str | None):
        return _prepare(images[i], questions_list[i], beams_list[i], max_list[i], adapters[i], owner, bases)

    def call(part: dict) -> tuple[dict, str, dict]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_image, _asked, opts, chosen) in part.items():
            groups[(opts.num_beams, opts.max_new_tokens, chosen.adapter, chosen.checkpoint)].append(i)
        # the same decoded image object for every question of a request: answer_pairs encodes that image once
        jobs = [([(part[i][0], q) for i in members for q in part[i][1]], (beams, max_new), adapter, ck)
                for (beams, max_new, adapter, ck), members in groups.items()]
        results, device, checkpoints = _run(jobs)
        out, ran_on = {}, {}
        for members, answers, ck in zip(groups.values(), results, checkpoints):
            it = iter(answers)
            for i in members:
                out[i] = [[q, next(it)] for q in part[i][1]]
                ran_on[i] = ck
        return out, device, ran_on

    shown = [None if a in bases.entries() and a != BASE else a for a in adapters]  # a base model is no adapter
    return serve_batch(len(images), prepare, call, "answer", shown, browser_ids, requests)


def examples() -> list[list]:
    asked = {
        "red_circle": "what color is the circle?\nwhat shape is this?",
        "shapes": "how many shapes are there?\nwhat color is the square?",
        "house_scene": "is there a tree?\nwhat color is the sky?",
        "night_sea": "what is on the sea?",
    }
    folder = ASSETS / "images"
    return [[str(folder / f"{name}.png"), q] for name, q in asked.items() if (folder / f"{name}.png").is_file()]


def build(ctx: UIContext) -> None:
    bases = ctx.base_models(TASK)
    gr.Markdown("Upload an image and ask one question per line; each question gets an answer.")
    with gr.Row():
        with gr.Column():
            image = image_input(label="Image", height=260, elem_id="vqa-image")
            questions = gr.Textbox(label="Questions (one per line)", lines=3, elem_id="vqa-questions",
                                   placeholder="what color is the circle?\nhow many shapes are there?")
            with gr.Accordion("Decoding options", open=False):
                beams = gr.Slider(1, 10, value=VQA_DEFAULTS.num_beams, step=1, label="Beams", info=BEAMS_INFO)
                max_new = gr.Slider(1, 50, value=VQA_DEFAULTS.max_new_tokens, step=1, label="Max new tokens",
                                    info=MAX_NEW_INFO)
            adapter = model_selector(ctx, TASK)
            run = gr.Button("Answer", variant="primary", elem_id="vqa-run")
        with gr.Column():
            table = gr.Dataframe(empty_table(HEADERS), headers=HEADERS, label="Answers", interactive=False,
                                 wrap=True, column_widths=["55%", "45%"], elem_id="vqa-output")
            info, info_box = run_info_box("vqa-info")
    gr.Examples(examples(), inputs=[image, questions], label="Examples: click one to fill in the image and questions")

    inputs = [image, questions, beams, max_new, adapter, ctx.browser_id]

    def check(image, questions, beams, max_new, adapter, browser_id, profile: gr.OAuthProfile | None = None) -> None:
        check_request(image, questions, beams, max_new, adapter, browser_id, profile, bases=bases)

    # Gradio passes each argument as a list, one item per request (batch=True). The names, defaults and the
    # docstring describe one request, as the API page and MCP clients show it (Gradio reads one line per Args entry).
    def handler(image, questions, num_beams=None, max_new_tokens=None, model=None, browser_id=None,
                request: gr.Request = None):
        """Answer questions about one image, each with a word or a few (a visual question answering model, BLIP by default).

        Args:
            image: The image the questions are about (PNG, JPEG, WebP, ...).
            questions: One question per line, at most 20, e.g. "what color is the circle?"; each gets its own answer.
            num_beams: Candidate answers written side by side before the best is kept, 1 to 10; more can be better but take longer.
            max_new_tokens: The longest answer allowed, in tokens (a short word or a piece of a longer one), 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned VQA adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table with one row per question: the question and its answer.
        """
        return vqa_batch(image, questions, num_beams, max_new_tokens, model, browser_id, request, bases=bases)

    # A queued check with no outputs: a refused request shows its sentence, the answers on screen stay.
    # The small print goes through a State: the API's answer stays the table alone.
    ran = run.click(user_errors(check), inputs, None, api_visibility="private", concurrency_limit=CHECK_CONCURRENCY,
                    concurrency_id="check").success(
        user_errors(handler), inputs, [table, info], api_name="vqa",
        batch=True, max_batch_size=ctx.max_batch_size, concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
    show_run_info(ran, info, info_box)
