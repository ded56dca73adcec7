"""Helpers shared by the tabs: project errors as ``gr.Error``, who the visitor is, which adapters they may use."""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from mmdemo.errors import InputError, MMDemoError
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import check_adapter, checkpoint_name
from mmdemo.ui.context import BaseModels

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
BASE = "base"


def user_errors(fn: F) -> F:
    """Show a project error to the user as ``gr.Error`` with its sentence (no traceback in the page)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMDemoError as err:
            raise gr.Error(str(err), print_exception=False) from err

    return wrapper  # type: ignore[return-value]


def image_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` (``type="filepath"``) whose upload reaches the handler even when Pillow cannot open it.

    Gradio's own preprocessing opens every upload and fails on a text file named ``.png`` (or a 0-byte or
    oversized file) with a bare "Error"; here the file goes on to the handler, whose check
    (:func:`mmdemo.media.load_image`) says in a sentence what is wrong with it. (Wrapped on the instance: a
    subclass of a Gradio component makes Gradio write a ``.pyi`` file beside this module.)
    """
    image = gr.Image(type="filepath", **kwargs)
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except Exception:  # noqa: BLE001 - the handler's check reports it properly
            if payload is not None and getattr(payload, "path", None):
                return str(payload.path)
            raise

    image.preprocess = preprocess
    return image


# ----------------------------------------------------------------------------------------------- identity
BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")
SECRET_FILE = ".browser-secret"


def owner_of(browser_id: str | None, profile: Any = None) -> str:
    """Who is asking: the signed-in Hugging Face user, else the anonymous id this browser keeps.

    The anonymous id is a random 128-bit value in the browser's local storage (``gr.BrowserState``), so
    a reload or a second tab is the same user; API clients pass the id they chose. A missing, blank or
    malformed id is refused with the same sentence wherever it is used (submit, status, cancel, adapters).
    """
    username = getattr(profile, "username", None) if profile is not None else None
    if username:
        return f"hf:{username}"
    if _blank(browser_id):
        raise InputError("Your browser has no session id yet; reload the page (API clients: pass the same "
                         "random id of 8 to 128 letters, digits, '-' or '_' with every call).")
    bid = browser_id.strip() if isinstance(browser_id, str) else ""
    if not BROWSER_ID.fullmatch(bid):
        raise InputError("That browser session id is not valid; reload the page (API clients: use 8 to 128 "
                         "letters, digits, '-' or '_').")
    return f"anon:{bid}"


def optional_owner(browser_id: str | None, profile: Any = None) -> str | None:
    """The owner for the model tabs, where no id is needed for the base model or published adapters."""
    if getattr(profile, "username", None) or not _blank(browser_id):
        return owner_of(browser_id, profile)
    return None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def profile_of(request: Any) -> gr.OAuthProfile | None:
    """The signed-in user of one request (for batched handlers, which Gradio gives a list of requests)."""
    from gradio.helpers import _session_from_request
    from gradio.oauth import _get_valid_oauth_info_from_session

    info = _get_valid_oauth_info_from_session(_session_from_request(request)) if request is not None else None
    return gr.OAuthProfile(info["userinfo"]) if info and info.get("userinfo") else None


def new_browser_id(current: str | None) -> str:
    return current if isinstance(current, str) and BROWSER_ID.fullmatch(current) else uuid.uuid4().hex


def browser_secret(home: Path) -> str | None:
    """The key ``gr.BrowserState`` stores the browser id with, kept under ``home`` so it survives restarts.

    Generated once, written owner-only (0600). ``None`` when ``home`` cannot be written: Gradio then picks
    a random key and anonymous users lose their jobs at the next restart (the start-up message says so).
    """
    path = home / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError:
        return None
    secret = secrets.token_urlsafe(32)
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it a moment ago
        return path.read_text().strip()
    except OSError:
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


# ----------------------------------------------------------------------------------------------- adapters
def adapter_choices(task: str, owner: str | None, bases: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``base``, the tab's other base models (``bases``: :meth:`~mmdemo.ui.context.BaseModels.names`), then the
    finished adapters for ``task`` that ``owner`` may use (theirs, or published)."""
    from mmdemo.jobs.adapters import list_adapters, visible

    found = list_adapters(task, owner)  # owner None lists every adapter: keep what an anonymous caller may use
    adapters = [a["name"] for a in found if visible(a, owner, anonymous_sees_all=False)]
    return [BASE, *bases, *(name for name in adapters if name not in bases)]


@dataclass(frozen=True)
class Chosen:
    """What a Model list value means for one request: the checkpoint, the adapter folder (or none), the detail."""

    checkpoint: str
    adapter: str | None = None
    detail: str = "short"


def tab_bases(task: str, checkpoint: str | None = None, bases: BaseModels | None = None) -> BaseModels:
    """A tab handler's base models: ``bases`` as the page built them; a caller that names only a ``checkpoint``
    (tests, scripts) gets that one alone, and one that names neither the task's main checkpoint alone."""
    from mmdemo.ui.context import UIContext

    return bases or BaseModels(task, checkpoint or UIContext().checkpoint(task))


def resolve_model(bases: BaseModels, choice: str | None, owner: str | None) -> Chosen:
    """A Model list value for one request: a base model by its name, else an adapter ``owner`` may use (the owner
    check of :func:`adapter_path`), run on the base model it was trained on."""
    entries = bases.entries()
    if choice is None or choice == "" or choice in entries:
        checkpoint, detail = entries[choice or BASE]
        return Chosen(checkpoint, None, detail)
    folder = adapter_path(bases.task, choice, owner)
    meta = check_adapter(Path(folder), bases.task)
    return Chosen(bases.checkpoint_for(meta.get("base_model")), folder)


def adapter_path(task: str, choice: str | None, owner: str | None) -> str | None:
    """The adapter folder for a selector value if ``owner`` may use it; ``None`` for the base model.

    Every tab's endpoint resolves its model choice here (and downloads/publishing in the jobs layer use the
    same :func:`mmdemo.jobs.adapters.resolve_adapter`): a name is not a key, the owner check is.
    """
    from mmdemo.jobs.adapters import resolve_adapter

    if choice is None or choice == "" or choice == BASE:
        return None
    folder = resolve_adapter(choice, owner, task)
    check_adapter(folder, task)
    return str(folder)


def adapter_dropdown(task: str, bases: list[str] | tuple[str, ...] = ()) -> gr.Dropdown:
    # The base models at build time: the page fills in the visitor's own adapters on load (refresh_adapters).
    info = ("the base model, another base model, or one of your fine-tuned adapters for this task" if bases else
            "the base model, or one of your fine-tuned adapters for this task")
    return gr.Dropdown(choices=[BASE, *bases], value=BASE, label="Model", allow_custom_value=True,
                       elem_id=f"{task}-adapter", info=info)


def refresh_adapters(task: str, current: str | None, browser_id: str | None, profile: Any = None,
                     bases: list[str] | tuple[str, ...] = ()) -> dict:
    try:
        owner = optional_owner(browser_id, profile)
    except InputError:
        owner = None
    choices = adapter_choices(task, owner, bases)
    return gr.update(choices=choices, value=current if current in choices else BASE)


def model_selector(ctx, task: str) -> gr.Dropdown:
    """The "Model" row of a tab: base, the tab's other base models, or one of the visitor's adapters, with a
    refresh button."""
    bases = ctx.base_models(task).names()
    with gr.Row():
        dropdown = adapter_dropdown(task, bases)
        button = gr.Button("↻", scale=0, min_width=40)
    wire_adapter_refresh(ctx, task, dropdown, button)
    return dropdown


def wire_adapter_refresh(ctx, task: str, dropdown, button) -> None:
    """Refill ``dropdown`` with the visitor's adapters on page load, on tab select and on ``button``."""
    bases = ctx.base_models(task).names()

    def refresh(current, browser_id, profile: gr.OAuthProfile | None = None):
        return refresh_adapters(task, current, browser_id, profile, bases)

    for trigger in (button.click, ctx.tab.select, ctx.ready):
        trigger(refresh, [dropdown, ctx.browser_id], dropdown, api_visibility="private", queue=False)


def serve_isolated(call: Callable[[dict[int, Any]], dict[int, Any]], work: dict[int, Any],
                   what: str) -> dict[int, Any]:
    """Serve several users' requests with one ``call``; if it fails, serve each request alone.

    ``call`` takes ``{request index: prepared work}`` and returns ``{request index: result}``. A request that
    fails on its own gets an ``MMDemoError`` (its sentence) as its result, so one bad request never fails the
    others (Gradio's batching gives a whole batch one outcome; this gives each request its own).
    """
    if not work:
        return {}
    if len(work) > 1:
        try:
            return call(work)
        except Exception:  # noqa: BLE001 - narrowed down request by request below
            log.warning("a batch of %d %s requests failed; serving them one by one", len(work), what,
                        exc_info=True)
    out: dict[int, Any] = {}
    for i, w in work.items():
        try:
            out[i] = call({i: w})[i]
        except MMDemoError as err:
            out[i] = err
        except Exception as err:  # noqa: BLE001 - the traceback goes to the log, a sentence to the user
            log.exception("a %s request failed", what)
            out[i] = MMDemoError(f"The model could not {what} this request ({type(err).__name__}); try again "
                                 f"with fewer or smaller inputs.")
    return out


REFUSED = "Refused: "  # starts the row of a request refused while batched with other users' requests


def serve_batch(n: int, prepare: Callable[[int, str | None], Any],
                call: Callable[[dict[int, Any]], tuple[dict[int, Any], str, str]], what: str,
                adapters: list, browser_ids: list | None = None, requests: Any = None) -> tuple[list, list[str]]:
    """The shared skeleton of a batched tab handler (Caption, Visual QA): ``n`` users' requests in one go.

    ``prepare(i, owner)`` checks request ``i`` and returns its work (raising ``MMDemoError``);
    ``call({i: work})`` runs the model on several requests and returns ``({i: rows}, device, checkpoint)``, where
    ``checkpoint`` may be ``{i: checkpoint}`` when the requests chose different base models.
    Returns one list of rows per request and one line of small print per request (blank when refused).
    A refused request gets its sentence as its only row when it was batched with others; alone, it raises
    (the user sees ``gr.Error``). Model failures are narrowed to the failing request (:func:`serve_isolated`).
    """
    start = time.monotonic()
    browser_ids = browser_ids or [None] * n
    requests = requests if isinstance(requests, list) else [requests] * n
    rows: list = [None] * n
    work = {}
    for i in range(n):
        try:
            work[i] = prepare(i, optional_owner(browser_ids[i], profile_of(requests[i])))
        except MMDemoError as err:
            rows[i] = _refused_row(err, n)
    ran: dict[str, str] = {}  # where the model ran, for the small print
    ran_on: dict[int, str] = {}  # request -> the checkpoint that served it

    def counted(part: dict[int, Any]) -> dict[int, Any]:
        out, device, checkpoint = call(part)
        ran.update(device=device)
        ran_on.update(checkpoint if isinstance(checkpoint, dict) else dict.fromkeys(part, checkpoint))
        return out

    served = set()
    for i, result in serve_isolated(counted, work, what).items():
        if isinstance(result, MMDemoError):
            rows[i] = _refused_row(result, n)
        else:
            rows[i] = result
            served.add(i)
    seconds = time.monotonic() - start
    infos = [run_info(ran["device"], ran_on.get(i), adapters[i], seconds, n) if i in served else ""
             for i in range(n)]
    return rows, infos


def _refused_row(err: MMDemoError, n: int) -> list[list[str]]:
    if n == 1:
        raise err
    return [["—", f"{REFUSED}{err}"]]


def generation_options(num_beams: Any, max_new_tokens: Any, defaults: GenerationOptions) -> GenerationOptions:
    """Decoding options from two UI numbers (``None``/blank means the task's default)."""
    try:
        beams = defaults.num_beams if num_beams in (None, "") else int(num_beams)
        max_new = defaults.max_new_tokens if max_new_tokens in (None, "") else int(max_new_tokens)
    except (TypeError, ValueError):
        raise InputError("Beams and max new tokens must be whole numbers.") from None
    return GenerationOptions(num_beams=beams, max_new_tokens=max_new,
                             min_new_tokens=min(defaults.min_new_tokens, max_new))


def file_path(value: Any) -> str | None:
    """A path from what Gradio hands a handler for a file (a str, a dict from the API, or a FileData)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "path", None) or getattr(value, "name", None)


# ----------------------------------------------------------------------------------------------- plain words
def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 clip``, ``2 clips``, ``0 clips`` (``many`` for irregular words: ``plural(2, "entry", "entries")``)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def empty_table(headers: list[str]):
    """An empty table that still shows its column names (a bare ``gr.Dataframe`` may show ``1 | 2 | 3``)."""
    import pandas as pd

    return pd.DataFrame(columns=list(headers))


model_name = checkpoint_name  # how the page names a checkpoint: a Hub id, or a local folder's own name


def device_label(device: str, dtype: Any = None) -> str:
    """``CPU (float32)``, ``GPU, NVIDIA H100 (bfloat16)``: where a loaded model runs, in words."""
    kind = device.split(":")[0]
    if kind == "cuda":
        where = "GPU"
        try:
            import torch

            where = f"GPU, {torch.cuda.get_device_name(device)}"
        except Exception:  # noqa: BLE001 - the name is a nicety; "GPU" is still true
            pass
    elif kind == "mps":
        where = "Apple GPU"
    else:
        where = kind.upper()
    precision = str(dtype).removeprefix("torch.") if dtype is not None else ""
    return f"{where} ({precision})" if precision else where


def seconds_text(seconds: float) -> str:
    """``8 ms``, ``2.41 s``, ``12.3 s``, ``1 min 15 s``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def run_info(device: str, checkpoint: str | None, adapter: str | None, seconds: float, together: int = 1) -> str:
    """The small print under a tab's results: where it ran, on which model and adapter, and how long it took.

    ``device`` comes from :func:`device_label`; ``adapter`` is the name the visitor chose (``base`` or none:
    the base model); ``together`` is how many requests shared this call (the time is the whole call's).
    """
    adapter_text = "no adapter" if adapter in (None, "", BASE) else f"adapter {adapter}"
    took = f"took {seconds_text(seconds)}"
    if together > 1:
        took += f" for {plural(together, 'request')} served together"
    return f"Ran on {device} · model {model_name(checkpoint)} · {adapter_text} · {took}"


def run_info_box(elem_id: str) -> tuple[gr.State, gr.Markdown]:
    """A small-print line under a tab's results, and the State a model event fills it from.

    The model event writes the line into the State (a State is not part of the public API's answer, so the
    API's results keep their shape); :func:`show_run_info` then copies it into the page.
    """
    return gr.State(""), gr.Markdown("", elem_id=elem_id, elem_classes=["run-info"])


def show_run_info(event, state: gr.State, box: gr.Markdown) -> None:
    """After ``event``, show the line it left in ``state`` (the old line stays if it failed)."""
    event.then(lambda line: line, state, box, api_visibility="private", queue=False)
