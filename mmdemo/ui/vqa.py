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
    adapter_path,
    device_label,
    empty_table,
    file_path,
    generation_options,
    image_input,
    model_selector,
    optional_owner,
    run_info_box,
    serve_batch,
    show_run_info,
    user_errors,
)
from mmdemo.ui.context import ASSETS, CHECK_CONCURRENCY, GPU_QUEUE, UIContext

TITLE = "Visual QA"
TASK = "vqa"
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


def _prepare(image, questions, num_beams, max_new_tokens, adapter, owner: str | None, checkpoint: str | None):
    """Everything about one request that can be wrong, checked before it joins a batch; returns its work.

    Bounds: one image within the size/pixel limits, at most ``MAX_QUESTIONS`` questions each within the
    model's text positions, max new tokens within the answer decoder's, an adapter ``owner`` may use.
    """
    path = file_path(image)
    if not path:
        raise InputError("Upload an image to ask about.")
    image = decoded_image(path, get_settings().limits)  # decoded once per request (see caption._prepare)
    asked = split_questions(questions)
    adapter_dir = adapter_path(TASK, adapter, owner)
    options = generation_options(num_beams, max_new_tokens, for_adapter(VQA_DEFAULTS, adapter_dir))
    vqa_model.check_questions(gpu.loaded(TASK, checkpoint), asked, options)
    return image, asked, options, adapter_dir


def check_request(image, questions, num_beams, max_new_tokens, adapter, browser_id,
                  profile: gr.OAuthProfile | None = None, *, checkpoint: str | None = None) -> None:
    """The page's first step: a bad request gets its sentence at once, and the answers on screen stay."""
    _prepare(image, questions, num_beams, max_new_tokens, adapter, optional_owner(browser_id, profile), checkpoint)


@gpu.task(duration=60)
def _run(groups: list[tuple[list[tuple[Image.Image, str]], tuple[int, int], str | None]],
         checkpoint: str) -> tuple[list[list[str]], str, str]:
    """The answers per group, where they were computed (in words) and the checkpoint (see caption._run)."""
    model = gpu.loaded(TASK, checkpoint)
    out = []
    for pairs, (beams, max_new), adapter in groups:
        options = generation_options(beams, max_new, for_adapter(VQA_DEFAULTS, adapter))
        out.append(vqa_model.answer_pairs(pairs, options, adapter=adapter, model=model))
    return out, device_label(model.device, model.dtype), model.checkpoint


def vqa_batch(images, questions_list, beams_list, max_list, adapters, browser_ids=None, requests=None, *,
              checkpoint: str | None = None):
    """Batched handler: one list of [question, answer] rows and one line of small print per request (see
    ``caption_batch``)."""
    def prepare(i: int, owner: str | None):
        return _prepare(images[i], questions_list[i], beams_list[i], max_list[i], adapters[i], owner, checkpoint)

    def call(part: dict) -> tuple[dict, str, str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_image, _asked, opts, adapter) in part.items():
            groups[(opts.num_beams, opts.max_new_tokens, adapter)].append(i)
        # the same decoded image object for every question of a request: answer_pairs encodes that image once
        jobs = [([(part[i][0], q) for i in members for q in part[i][1]], (beams, max_new), adapter)
                for (beams, max_new, adapter), members in groups.items()]
        results, device, ran_on = _run(jobs, checkpoint)
        out = {}
        for members, answers in zip(groups.values(), results):
            it = iter(answers)
            for i in members:
                out[i] = [[q, next(it)] for q in part[i][1]]
        return out, device, ran_on

    return serve_batch(len(images), prepare, call, "answer", adapters, browser_ids, requests)


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
    checkpoint = ctx.checkpoint(TASK)
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
        check_request(image, questions, beams, max_new, adapter, browser_id, profile, checkpoint=checkpoint)

    def handler(images, questions, beams, max_new, adapters, browser_ids, request: gr.Request):
        return vqa_batch(images, questions, beams, max_new, adapters, browser_ids, request, checkpoint=checkpoint)

    # A queued check with no outputs: a refused request shows its sentence, the answers on screen stay.
    # The small print goes through a State: the API's answer stays the table alone.
    ran = run.click(user_errors(check), inputs, None, api_visibility="private", concurrency_limit=CHECK_CONCURRENCY,
                    concurrency_id="check").success(
        user_errors(handler), inputs, [table, info], api_name="vqa",
        batch=True, max_batch_size=ctx.max_batch_size, concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
    show_run_info(ran, info, info_box)
