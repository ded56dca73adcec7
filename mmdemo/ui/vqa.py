"""Visual QA tab: an image and one or more questions (one per line), base model or an adapter.

``vqa_batch`` is wired with ``batch=True``: the questions of several users' requests with the same
options and adapter go through ``answer_pairs`` together.
"""

from __future__ import annotations

from collections import defaultdict

import gradio as gr

from mmdemo.config import get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import load_image
from mmdemo.models import vqa as vqa_model
from mmdemo.models.generation import VQA_DEFAULTS
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    adapter_path,
    file_path,
    generation_options,
    model_selector,
    user_errors,
)
from mmdemo.ui.context import ASSETS, GPU_QUEUE, UIContext

TITLE = "Visual QA"
TASK = "vqa"
HEADERS = ["question", "answer"]
MAX_QUESTIONS = 20


def split_questions(text: str | None) -> list[str]:
    lines = [q.strip() for q in (text or "").splitlines()]
    questions = vqa_model.clean_questions([q for q in lines if q])
    if len(questions) > MAX_QUESTIONS:
        raise InputError(f"{len(questions)} questions were asked; ask at most {MAX_QUESTIONS} at a time.")
    return questions


def check_request(image, questions, num_beams, max_new_tokens, adapter) -> None:
    path = file_path(image)
    if not path:
        raise InputError("Upload an image to ask about.")
    load_image(path, get_settings().limits)
    split_questions(questions)
    generation_options(num_beams, max_new_tokens, VQA_DEFAULTS)
    adapter_path(TASK, adapter)


@gpu.task(duration=60)
def _run(groups: list[tuple[list[tuple[str, str]], tuple[int, int], str | None]], checkpoint: str) -> list[list[str]]:
    model = gpu.loaded(TASK, checkpoint)
    out = []
    for pairs, (beams, max_new), adapter in groups:
        options = generation_options(beams, max_new, VQA_DEFAULTS)
        out.append(vqa_model.answer_pairs(pairs, options, adapter=adapter, model=model))
    return out


def vqa_batch(images, questions_list, beams_list, max_list, adapters, *, checkpoint: str | None = None):
    """Batched handler: one list of [question, answer] rows per request (see ``caption_batch``)."""
    n = len(images)
    rows: list[list[list[str]] | None] = [None] * n
    groups: dict[tuple, list[int]] = defaultdict(list)
    asked: dict[int, tuple[str, list[str]]] = {}
    for i in range(n):
        try:
            check_request(images[i], questions_list[i], beams_list[i], max_list[i], adapters[i])
            opts = generation_options(beams_list[i], max_list[i], VQA_DEFAULTS)
            adapter = adapter_path(TASK, adapters[i])
        except MMDemoError as err:
            if n == 1:
                raise
            rows[i] = [["—", f"⚠️ {err}"]]
            continue
        asked[i] = (file_path(images[i]), split_questions(questions_list[i]))
        groups[(opts.num_beams, opts.max_new_tokens, adapter)].append(i)
    work = []
    for (beams, max_new, adapter), members in groups.items():
        # the same path object for every question of a request: answer_pairs encodes that image once
        pairs = [(asked[i][0], q) for i in members for q in asked[i][1]]
        work.append((pairs, (beams, max_new), adapter))
    results = _run(work, checkpoint) if work else []
    for (_key, members), answers in zip(groups.items(), results):
        it = iter(answers)
        for i in members:
            rows[i] = [[q, next(it)] for q in asked[i][1]]
    return (rows,)


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
            image = gr.Image(label="Image", type="filepath", height=260, elem_id="vqa-image")
            questions = gr.Textbox(label="Questions (one per line)", lines=3, elem_id="vqa-questions",
                                   placeholder="what color is the circle?\nhow many shapes are there?")
            with gr.Accordion("Decoding options", open=False):
                beams = gr.Slider(1, 10, value=VQA_DEFAULTS.num_beams, step=1, label="Beams")
                max_new = gr.Slider(1, 50, value=VQA_DEFAULTS.max_new_tokens, step=1, label="Max new tokens")
            adapter = model_selector(ctx, TASK)
            run = gr.Button("Answer", variant="primary", elem_id="vqa-run")
        with gr.Column():
            table = gr.Dataframe(headers=HEADERS, label="Answers", interactive=False, wrap=True,
                                 elem_id="vqa-output")
    gr.Examples(examples(), inputs=[image, questions], label="Examples (drawn by assets/make_assets.py)")

    inputs = [image, questions, beams, max_new, adapter]
    run.click(user_errors(check_request), inputs, None, api_visibility="private", queue=False).success(
        user_errors(lambda *a: vqa_batch(*a, checkpoint=checkpoint)), inputs, table, api_name="vqa",
        batch=True, max_batch_size=ctx.max_batch_size, concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
