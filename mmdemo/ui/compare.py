"""Compare tab: one image through the base model and every adapter the visitor may use, side by side with times.

The visitor picks Caption or Visual QA (with a question), optionally the caption tab's prefix and decoding
options, and gets one row per model: its caption or answer and how long it took. The models are those the
tab's own "Model" list offers (:func:`mmdemo.ui.common.adapter_choices`), each resolved with the same owner
check on use (:func:`mmdemo.ui.common.adapter_path`), at most ``MAX_MODELS`` per comparison. The model calls
are the caption and VQA tabs' own (``caption_model.caption``, ``vqa_model.answer_pairs``) with options built
the same way, so a row is exactly what that tab would answer; they run in one :func:`mmdemo.ui.gpu.task` on the
shared GPU queue. The image is decoded once per request; one adapter that fails gets a sentence in its row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from mmdemo.config import get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import decoded_image
from mmdemo.models import caption as caption_model
from mmdemo.models import vqa as vqa_model
from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS, for_adapter
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    BASE,
    Chosen,
    adapter_choices,
    device_label,
    empty_table,
    file_path,
    generation_options,
    image_input,
    model_name,
    optional_owner,
    plural,
    resolve_model,
    seconds_text,
    tab_bases,
    user_errors,
)
from mmdemo.ui.context import ASSETS, CHECK_CONCURRENCY, GPU_QUEUE, BaseModels, UIContext
from mmdemo.ui.vqa import split_questions

log = logging.getLogger(__name__)

TITLE = "Compare"
TASKS = {"caption": "Caption", "vqa": "Visual QA"}  # value (API) -> label (page)
DEFAULTS = {"caption": CAPTION_DEFAULTS, "vqa": VQA_DEFAULTS}
NO_IMAGE = {"caption": "Upload an image to caption.", "vqa": "Upload an image to ask about."}
OUTPUT = {"caption": "caption", "vqa": "answer"}
HEADERS = ["model", "output", "time"]
MAX_MODELS = 10  # the base models, then the newest adapters: each row is one more model call on the GPU queue
SHOW_LEFT_OUT = 20  # names listed when more were left out
NO_TIME = "—"
MAX_NEW_LIMIT = 100


@dataclass
class Plan:
    """One comparison, checked: what to run and what is already known not to run."""

    task: str
    image: Image.Image
    text: str | None  # the caption prefix, or the question
    rows: list[tuple[str, Chosen | None, tuple[int, int] | str]] = field(default_factory=list)
    # (name shown, the base model/adapter/detail it means, (beams, max new tokens) or the sentence why it cannot run)
    left_out: list[str] = field(default_factory=list)


def _task(task: str | None) -> str:
    for value, label in TASKS.items():
        if task in (value, label):
            return value
    raise InputError("Choose Caption or Visual QA to compare.")


def _prepare(image, task, question, prompt, num_beams, max_new_tokens, owner: str | None,
             checkpoints: dict[str, str | None], bases: dict[str, BaseModels] | None = None) -> Plan:
    """Everything about the request that can be wrong, checked before any model runs; returns the plan.

    A bad image, an empty or too-long question, a bad prefix or bad options refuse the whole request with the
    sentence the Caption or Visual QA tab gives. An adapter that cannot be used (deleted meanwhile, options
    that do not fit it) only gets its sentence in its own row.
    """
    task = _task(task)
    path = file_path(image)
    if not path:
        raise InputError(NO_IMAGE[task])
    decoded = decoded_image(path, get_settings().limits)  # the one decode; every model gets this image
    if task == "vqa":
        asked = split_questions(question)
        if len(asked) > 1:
            raise InputError("Ask one question at a time here; the Visual QA tab answers several at once.")
        text = asked[0]
    else:
        text = (prompt or "").strip() or None
    models = (bases or {}).get(task) or tab_bases(task, checkpoints.get(task))
    choices = adapter_choices(task, owner, models.names())  # exactly what the tab's Model list offers this visitor
    plan = Plan(task, decoded, text, left_out=choices[MAX_MODELS:])
    for name in choices[:MAX_MODELS]:
        try:
            chosen = resolve_model(models, name, owner)  # the owner check on use, as in every tab
            options = generation_options(num_beams, max_new_tokens, for_adapter(DEFAULTS[task], chosen.adapter))
            loaded = gpu.loaded(task, chosen.checkpoint)
            if task == "caption":
                caption_model.check_prompt(loaded, text, options, chosen.detail)
            else:
                vqa_model.check_questions(loaded, [text], options)
        except MMDemoError as err:
            if name == BASE:
                raise  # bad input: the request is refused as the Caption or Visual QA tab refuses it
            plan.rows.append((name, None, _plain(err)))
            continue
        plan.rows.append((name, chosen, (options.num_beams, options.max_new_tokens)))
    return plan


def check_request(image, task, question, prompt, num_beams, max_new_tokens, browser_id,
                  profile: gr.OAuthProfile | None = None, *, checkpoints: dict[str, str | None],
                  bases: dict[str, BaseModels] | None = None) -> None:
    """The page's first step: a bad request gets its sentence at once, and the table on screen stays."""
    _prepare(image, task, question, prompt, num_beams, max_new_tokens, optional_owner(browser_id, profile),
             checkpoints, bases)


def _deleted(name: str) -> str:
    return f"Adapter {name} was deleted meanwhile; compare again to leave it out."


def _plain(err: Exception, adapter: str | None = None, checkpoint: str | None = None) -> str:
    """The error's sentence without server paths (an adapter folder or a checkpoint named by its last part)."""
    text = str(err)
    root = get_settings().adapters_dir
    for long in (adapter, checkpoint, f"{root.resolve()}/", f"{root.absolute()}/"):
        if long and long in text:
            text = text.replace(long, model_name(long) if not long.endswith("/") else "")
    return text


@gpu.task(duration=120)
def _run(task: str, image: Image.Image, text: str | None,
         models: list[tuple[str, Chosen, tuple[int, int]]]) -> tuple[list[tuple[str, float | None]], str]:
    """Each model's output (or the sentence why it failed) and seconds, and where it ran (in words).

    One call per model, each as the Caption or Visual QA tab makes it for one image, one base model and adapter.
    """
    out: list[tuple[str, float | None]] = []
    device = ""
    for name, chosen, (beams, max_new) in models:
        adapter, checkpoint = chosen.adapter, chosen.checkpoint
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            out.append((_deleted(name), None))
            continue
        options = generation_options(beams, max_new, for_adapter(DEFAULTS[task], adapter))
        start = time.perf_counter()
        try:
            model = gpu.loaded(task, checkpoint)
            device = device_label(model.device, model.dtype)
            if task == "caption":
                result = caption_model.caption([image], text, options, adapter=adapter, model=model,
                                               detail=chosen.detail)[0]
            else:
                result = vqa_model.answer_pairs([(image, text)], options, adapter=adapter, model=model)[0]
        except MMDemoError as err:
            out.append((_plain(err, adapter, checkpoint), None))
            continue
        except Exception as err:  # noqa: BLE001 - one model failing leaves the other rows; the log has the trace
            log.exception("compare: model %s failed", name)
            if adapter and not (Path(adapter) / "adapter_config.json").is_file():
                out.append((_deleted(name), None))
            else:
                out.append((f"This model could not {'caption' if task == 'caption' else 'answer'} the image "
                            f"({type(err).__name__}); the other rows are not affected.", None))
            continue
        out.append((result, time.perf_counter() - start))
    return out, device


def compare(image, task, question, prompt, num_beams, max_new_tokens, browser_id,
            profile: gr.OAuthProfile | None = None, *, checkpoints: dict[str, str | None],
            bases: dict[str, BaseModels] | None = None):
    """The comparison: a table of [model, output, time] rows and a line saying where it ran and what was left out.

    Rows come in the Model list's order (base first, the tab's other base models, then the newest adapters). A
    row whose model could not run has the sentence why as its output and "—" as its time.
    """
    start = time.monotonic()
    plan = _prepare(image, task, question, prompt, num_beams, max_new_tokens,
                    optional_owner(browser_id, profile), checkpoints, bases)
    runnable = [(name, chosen, how) for name, chosen, how in plan.rows if not isinstance(how, str)]
    results, device = _run(plan.task, plan.image, plan.text, runnable)
    done = iter(results)  # in the order of ``runnable``
    rows = []
    for name, _adapter, how in plan.rows:
        output, seconds = (how, None) if isinstance(how, str) else next(done)
        rows.append([name, output, NO_TIME if seconds is None else seconds_text(seconds)])
    return _table(rows), _note(plan, device, time.monotonic() - start)


def _table(rows: list[list[str]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=HEADERS)


def _md(name: str) -> str:
    return name.replace("_", "\\_").replace("*", "\\*")


def _note(plan: Plan, device: str, seconds: float) -> str:
    where = f"Ran on {device} · " if device else ""
    line = f"{where}{plural(len(plan.rows), 'model')} compared · took {seconds_text(seconds)} in all"
    if plan.left_out:
        shown = ", ".join(_md(n) for n in plan.left_out[:SHOW_LEFT_OUT])
        more = len(plan.left_out) - SHOW_LEFT_OUT
        shown += f" and {more} more" if more > 0 else ""
        line += (f"\n\n**{plural(len(plan.left_out), 'older adapter')} left out:** a comparison runs at most "
                 f"{MAX_MODELS} models (the base models, then the newest adapters you may use). Left out: "
                 f"{shown}. Pick one of them in the {TASKS[plan.task]} tab's Model list to try it.")
    return line


def task_changed(task: str):
    """Show the question for Visual QA and the prefix for Caption; the decoding options take the task's defaults."""
    task = _task(task)
    defaults = DEFAULTS[task]
    return (gr.update(visible=task == "vqa"), gr.update(visible=task == "caption"),
            gr.update(value=defaults.num_beams), gr.update(value=defaults.max_new_tokens), empty_table(HEADERS), "")


def examples() -> list[list]:
    return [[str(p)] for p in sorted((ASSETS / "images").glob("*.png"))[:4]]


def build(ctx: UIContext) -> None:
    checkpoints = {task: ctx.checkpoint(task) for task in TASKS}
    bases = {task: ctx.base_models(task) for task in TASKS}
    gr.Markdown(f"Run one image through every base model of the task and each of your adapters, and see their captions (or "
                f"answers) side by side with the time each took. At most {MAX_MODELS} models per comparison; an "
                f"adapter's first run includes loading it, so compare twice for steady times.")
    with gr.Row():
        with gr.Column():
            image = image_input(label="Image", height=260, elem_id="compare-image")
            task = gr.Radio([(label, value) for value, label in TASKS.items()], value="caption", label="Task",
                            elem_id="compare-task")
            question = gr.Textbox(label="Question", placeholder="what color is the circle?", visible=False,
                                  elem_id="compare-question")
            prompt = gr.Textbox(label="Prefix (optional)", placeholder="a picture of", elem_id="compare-prompt")
            with gr.Accordion("Decoding options", open=False):
                beams = gr.Slider(1, 10, value=CAPTION_DEFAULTS.num_beams, step=1, label="Beams",
                                  info="Candidate outputs written side by side before the best is kept; more can "
                                       "be better but take longer (1 is fastest).")
                max_new = gr.Slider(1, MAX_NEW_LIMIT, value=CAPTION_DEFAULTS.max_new_tokens, step=1,
                                    label="Max new tokens", info="The longest output allowed, in tokens (a token "
                                                                 "is a short word or a piece of a longer one).")
            run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        with gr.Column():
            table = gr.Dataframe(empty_table(HEADERS), headers=HEADERS, label="Outputs, one row per model",
                                 interactive=False, wrap=True, column_widths=["25%", "55%", "20%"],
                                 elem_id="compare-output")
            note = gr.Markdown("", elem_id="compare-info", elem_classes=["run-info"])
    gr.Examples(examples(), inputs=[image], label="Examples: click one to use its image")

    inputs = [image, task, question, prompt, beams, max_new, ctx.browser_id]

    def check(image, task, question, prompt, beams, max_new, browser_id,
              profile: gr.OAuthProfile | None = None) -> None:
        check_request(image, task, question, prompt, beams, max_new, browser_id, profile, checkpoints=checkpoints,
                      bases=bases)

    def handler(image, task="caption", question="", prompt="", num_beams=None, max_new_tokens=None,
                browser_id=None, profile: gr.OAuthProfile | None = None):
        """Caption one image, or answer one question about it, with the base model and every adapter you may use.

        Args:
            image: The image (PNG, JPEG, WebP, ...).
            task: "caption" or "vqa".
            question: For "vqa": the one question to ask about the image.
            prompt: For "caption": optional text every caption starts with, e.g. "a picture of"; empty for none.
            num_beams: Candidate outputs written side by side before the best is kept, 1 to 10.
            max_new_tokens: The longest output allowed, in tokens.
            browser_id: The id an API client chose for its own fine-tuning jobs, to include its unpublished adapters.

        Returns:
            A table with one row per model (model, output, time), and a line saying where it ran and which adapters
            were left out (at most 8 models per comparison).
        """
        return compare(image, task, question, prompt, num_beams, max_new_tokens, browser_id, profile,
                       checkpoints=checkpoints, bases=bases)

    task.change(task_changed, task, [question, prompt, beams, max_new, table, note], api_visibility="private",
                queue=False)
    # A queued check with no outputs: a refused request shows its sentence, the table on screen stays.
    run.click(user_errors(check), inputs, None, api_visibility="private", concurrency_limit=CHECK_CONCURRENCY,
              concurrency_id="check").success(
        user_errors(handler), inputs, [table, note], api_name="compare", concurrency_id=GPU_QUEUE,
        concurrency_limit=ctx.gpu_concurrency,
    )
