"""Audio search tab: the shared audio library (:mod:`mmdemo.models.audio_library`, which the CLI's
``python -m mmdemo library`` calls too), searched by text or by a sound.

A text query ranks clips; a sound (upload or microphone) ranks an editable list of labels and finds similar
clips. Handlers are plain functions of paths and strings; this module adds the page, the tab's model (loaded on
the CPU under ZeroGPU) and the sentences and charts a visitor reads.
"""

from __future__ import annotations

import logging
import time

import gradio as gr
import pandas as pd

from mmdemo.config import get_settings
from mmdemo.errors import InputError
from mmdemo.media import AUDIO_EXTENSIONS, audio_info
from mmdemo.models import audio_library as lib
from mmdemo.models.retrieval import (
    AudioIndex,
    Embedder,
    Hit,
    embed_query_audio,
    rank_labels,
)
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    BASE,
    adapter_path,
    device_label,
    empty_table,
    file_path,
    model_selector,
    optional_owner,
    plural,
    run_info,
    run_info_box,
    show_run_info,
    user_errors,
)
from mmdemo.ui.context import CHECK_CONCURRENCY, GPU_QUEUE, UIContext

TITLE = "Audio search"
TASK = "retrieval"
# api_names offered to MCP clients (python app.py --mcp; see mmdemo.ui.app.mcp_tool_names)
MCP_TOOLS = ["search_audio", "classify_audio", "similar_audio"]
PLAYERS = 5
MAX_UPLOADS, MAX_LABELS, MAX_TEXT_CHARS = lib.MAX_UPLOADS, lib.MAX_LABELS, lib.MAX_TEXT_CHARS
DEFAULT_LABELS = "beep, siren, rain, bird, whistle, drum, hum, speech, bell, chord"
EXAMPLE_QUERIES = ["a high beep", "rain", "a siren", "a rising chirp"]
RESULT_HEADERS = ["rank", "clip", "score"]
LABEL_HEADERS = ["rank", "label", "score"]
LIBRARY_HEADERS = ["clip", "seconds"]
SCORE_RANGE = [-1.0, 1.0]  # scores are cosine similarities: the chart's y axis is fixed, with 0 in the middle
SCORE_NOTE = ("Score: how alike the two are for the model (cosine similarity, from -1 to 1; 0 means unrelated). "
              "Higher is a closer match.")
TOP_K_INFO = "How many of the best matches to show."
PLOT_LABEL_CHARS = 22  # longer clip names are shortened under the chart's bars

log = logging.getLogger(__name__)
_INDEXES = lib._INDEXES  # this process's open libraries (tests clear it to read them back from disk)
bundled_clips = lib.bundled_clips
index_dir = lib.index_dir
embedder = lib.embedder
library_rows = lib.library_rows
library_clips_dir = lib.clips_dir


def library(checkpoint: str, adapter: str | None = None) -> tuple[AudioIndex, Embedder]:
    """The library index and embedder for ``checkpoint`` (or ``adapter`` on it): :func:`lib.library` on the
    tab's model (on the CPU under ZeroGPU, where GPU workers change the index on disk: never cached here)."""
    return lib.library(gpu.loaded(TASK, checkpoint), adapter, cached=not gpu.ZERO_GPU)


@gpu.task(duration=120)
def add_clips(files, checkpoint: str | None = None) -> tuple[str, list[list]]:
    """Add uploaded clips (and the clips inside uploaded zips) to the library; report what happened."""
    paths = [p for p in (file_path(f) for f in (files or [])) if p]
    loaded = gpu.loaded(TASK, checkpoint)
    added = lib.add_uploads(paths, loaded, cached=not gpu.ZERO_GPU)
    return _report(added.added, added.duplicates, added.problems, added.total), library_rows(loaded.checkpoint)


def _report(added: int, duplicates: int, problems: list[str], total: int) -> str:
    """What an upload did, in sentences: ``**Added 2 clips.** 1 clip was already in the library. ...``."""
    text = f"**Added {plural(added, 'clip')}.**"
    if duplicates:
        text += f" {plural(duplicates, 'clip')} {'was' if duplicates == 1 else 'were'} already in the library."
    text += f" The library holds {plural(total, 'clip')}."
    if not problems:
        return text
    return "\n".join([f"{text} {plural(len(problems), 'file')} could not be used:", *(f"- {why}" for why in problems)])


def _clip_rows(hits: list[Hit]) -> tuple[list[list], list[str]]:
    return [[h.rank, h.name, round(h.score, 4)] for h in hits], [h.path for h in hits]


def _plot(rows: list[list]) -> pd.DataFrame:
    """The chart's frame: ``item`` (rank and a shortened name, the bar's label) and ``score``."""
    def short(name: str) -> str:
        name = str(name)
        return name if len(name) <= PLOT_LABEL_CHARS else name[:PLOT_LABEL_CHARS - 1] + "…"

    return pd.DataFrame({"item": [f"{r[0]}. {short(r[1])}" for r in rows], "score": [r[2] for r in rows]})


def _info(emb: Embedder, model: str | None, start: float) -> str:
    return run_info(device_label(emb.loaded.device, emb.loaded.dtype), emb.checkpoint, model,
                    time.monotonic() - start)


_top_k = lib.check_top_k


def _checkpoint(checkpoint: str | None) -> str:
    return checkpoint or gpu.loaded(TASK, None).checkpoint


def _query_text(text: str | None, checkpoint: str | None) -> str:
    return lib.check_query(text, gpu.loaded(TASK, checkpoint))


def split_labels(labels: str | None, checkpoint: str | None) -> list[str]:
    """The comma- or line-separated labels, each within the model's text limit, at most ``MAX_LABELS``."""
    return lib.split_labels(labels, gpu.loaded(TASK, checkpoint))


def _audio_path(audio) -> str:
    path = file_path(audio)
    if not path:
        raise InputError("Upload or record a sound to search with.")
    return path


def check_search(text, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                 checkpoint: str | None = None) -> None:
    """The page's first step for a text search: a refused query shows its sentence, results stay."""
    _query_text(text, checkpoint)
    _top_k(top_k)
    adapter_path(TASK, model, optional_owner(browser_id, profile))


def check_sound(audio, labels, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                checkpoint: str | None = None) -> None:
    """The page's first step for a search by sound (labels and similar clips)."""
    audio_info(_audio_path(audio), get_settings().limits)
    split_labels(labels, checkpoint)
    _top_k(top_k)
    adapter_path(TASK, model, optional_owner(browser_id, profile))


@gpu.task(duration=120)  # the first search with an adapter embeds the library with it
def search_audio(text: str, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                 checkpoint: str | None = None):
    """Text -> clips: a table of (rank, clip, score), a plot frame, the clips' paths (for the players) and the
    small print (device, model, adapter, time).

    ``model`` is ``"base"`` or the name of a retrieval adapter the caller (``browser_id``/``profile``) may use.
    """
    start = time.monotonic()
    text = _query_text(text, checkpoint)
    k = _top_k(top_k)
    index, emb = library(_checkpoint(checkpoint), adapter_path(TASK, model, optional_owner(browser_id, profile)))
    rows, paths = _clip_rows(index.search_text(text, emb, k))
    return rows, _plot(rows), paths, _info(emb, model, start)


@gpu.task(duration=60)
def classify_audio(audio, labels: str, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                   checkpoint: str | None = None):
    """Sound -> labels: the best labels from the comma- or line-separated list, a plot frame and the small print.

    The sound and the labels are both embedded by ``model`` (``"base"`` or a retrieval adapter's name);
    no library is needed.
    """
    start = time.monotonic()
    path = _audio_path(audio)
    candidates = split_labels(labels, checkpoint)
    k = _top_k(top_k)
    adapter = adapter_path(TASK, model, optional_owner(browser_id, profile))
    emb = embedder(gpu.loaded(TASK, _checkpoint(checkpoint)), adapter)
    hits = rank_labels(embed_query_audio(emb, path=path), candidates, emb, k)
    rows = [[h.rank, h.label, round(h.score, 4)] for h in hits]
    return rows, _plot(rows), _info(emb, model, start)


@gpu.task(duration=120)  # the first search with an adapter embeds the library with it
def similar_audio(audio, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                  checkpoint: str | None = None):
    """Sound -> clips: the most similar clips in the library (embedded by ``model``), their paths and the small
    print."""
    start = time.monotonic()
    path = _audio_path(audio)
    k = _top_k(top_k)
    index, emb = library(_checkpoint(checkpoint), adapter_path(TASK, model, optional_owner(browser_id, profile)))
    rows, paths = _clip_rows(index.search_vector(embed_query_audio(emb, path=path), k))
    return rows, paths, _info(emb, model, start)


def players(rows: list | pd.DataFrame | None, paths: list[str] | None) -> list[dict]:
    """Fill the audio players with the ranked clips; hide the unused ones."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.values.tolist()
    rows, paths = rows or [], paths or []
    updates = []
    for i in range(PLAYERS):
        if i < len(paths) and i < len(rows):
            rank, name, score = rows[i][:3]
            updates.append(gr.update(value=paths[i], label=f"{rank}. {name} — {float(score):.3f}", visible=True))
        else:
            updates.append(gr.update(value=None, visible=False))
    return updates


def warm_up(ctx: UIContext) -> None:
    """Build the library from the bundled clips in the background, so the first search is quick; embed the
    example queries and the default labels too (the query cache then answers a click on them at once)."""
    _index, emb = library(ctx.checkpoint(TASK))
    emb.texts([*EXAMPLE_QUERIES, *split_labels(DEFAULT_LABELS, ctx.checkpoint(TASK))])


def _score_chart(label: str, title: str, what: str) -> gr.BarPlot:
    """Bars from zero on a fixed -1..1 axis: a negative score points down, and small differences look small."""
    # no fixed height: with one, the angled labels, the axis title and the caption are cut off at the bottom
    return gr.BarPlot(None, x="item", y="score", label=label, sort="-y", y_lim=SCORE_RANGE,
                      title=title, x_title=f"{what}, best first", y_title="score (-1 to 1)", x_label_angle=-30,
                      caption=SCORE_NOTE)


def build(ctx: UIContext) -> None:
    checkpoint = ctx.checkpoint(TASK)
    gpu_kw = dict(concurrency_id=GPU_QUEUE, concurrency_limit=ctx.gpu_concurrency)
    clip_paths = gr.State([])
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### Library\nThe bundled example sounds plus yours. Uploads are kept; bad files are "
                        "reported and skipped.")
            uploads = gr.File(label="Add clips (audio files or a zip)", file_count="multiple",
                              file_types=[*sorted(AUDIO_EXTENSIONS), ".zip"], elem_id="audio-uploads")
            add = gr.Button("Add to library", elem_id="audio-add")
            report = gr.Markdown(elem_id="audio-report")
            table = gr.Dataframe(empty_table(LIBRARY_HEADERS), headers=LIBRARY_HEADERS, label="Clips in the library",
                                 interactive=False, max_height=300, wrap=True, column_widths=["75%", "25%"],
                                 elem_id="audio-library")
        with gr.Column(scale=3):
            model = model_selector(ctx, TASK)
            with gr.Tab("Search by text"):
                query = gr.Textbox(label="Describe a sound", placeholder="a high beep", elem_id="audio-query")
                with gr.Row():
                    top_k = gr.Slider(1, 20, value=5, step=1, label="Top-k", info=TOP_K_INFO)
                    search = gr.Button("Search", variant="primary", elem_id="audio-search")
                results = gr.Dataframe(empty_table(RESULT_HEADERS), headers=RESULT_HEADERS, label="Ranked clips",
                                       interactive=False, wrap=True, column_widths=["15%", "60%", "25%"],
                                       elem_id="audio-results")
                plot = _score_chart("Scores", "How well each clip matches your text", "clip")
                text_info, text_info_box = run_info_box("audio-text-info")
                gr.Examples([[q] for q in EXAMPLE_QUERIES], inputs=[query],
                            label="Examples: click one to fill in the description")
            with gr.Tab("Search by sound"):
                sound = gr.Audio(label="A sound (upload or record)", sources=["upload", "microphone"],
                                 type="filepath", elem_id="audio-sound")
                labels = gr.Textbox(label="Labels to rank (edit freely; commas or lines)", value=DEFAULT_LABELS,
                                    lines=2, elem_id="audio-labels")
                with gr.Row():
                    top_k2 = gr.Slider(1, 20, value=5, step=1, label="Top-k", info=TOP_K_INFO)
                    match = gr.Button("Search with this sound", variant="primary", elem_id="audio-match")
                label_table = gr.Dataframe(empty_table(LABEL_HEADERS), headers=LABEL_HEADERS, label="Best labels",
                                           interactive=False, wrap=True, column_widths=["15%", "60%", "25%"],
                                           elem_id="audio-labels-out")
                label_plot = _score_chart("Label scores", "How well each label matches the sound", "label")
                label_info, label_info_box = run_info_box("audio-labels-info")
                similar = gr.Dataframe(empty_table(RESULT_HEADERS), headers=RESULT_HEADERS, label="Similar clips",
                                       interactive=False, wrap=True, column_widths=["15%", "60%", "25%"],
                                       elem_id="audio-similar")
                similar_info, similar_info_box = run_info_box("audio-similar-info")
                clips = bundled_clips()
                if clips:
                    gr.Examples([[str(p)] for p in clips[:4]], inputs=[sound],
                                label="Examples: click one to use that sound")
            gr.Markdown("#### Listen")
            audio_players = [gr.Audio(visible=False, interactive=False, type="filepath") for _ in range(PLAYERS)]

    browser_id = ctx.browser_id

    def _ck(fn):
        def handler(*args, profile: gr.OAuthProfile | None = None):
            return fn(*args, profile=profile, checkpoint=checkpoint)

        return user_errors(handler)

    # The public endpoints' functions: their names, defaults and docstrings are what the API page and MCP clients
    # show (a wrapper taking *args, as _ck makes, would show param_0, param_1...); one line per Args entry.
    def search_text(text, top_k=5, model=None, browser_id=None, profile: gr.OAuthProfile | None = None):
        """Rank the clips of the app's sound library by how well they match a text description (CLAP by default).

        Args:
            text: What the sound is like, in a few words, e.g. "a high beep" or "rain on a roof".
            top_k: How many of the best-matching clips to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned retrieval adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the best clips (rank, clip file name, score from -1 to 1, higher is closer) and the same scores as a chart's data.
        """
        return search_audio(text, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def classify_sound(audio, labels=DEFAULT_LABELS, top_k=5, model=None, browser_id=None,
                       profile: gr.OAuthProfile | None = None):
        """Rank text labels by how well each describes a sound (zero-shot audio classification, CLAP by default).

        Args:
            audio: The sound to describe (WAV, FLAC, OGG or MP3).
            labels: The candidate labels, separated by commas or lines, at most 50, e.g. "beep, rain, siren".
            top_k: How many of the best labels to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned retrieval adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the best labels (rank, label, score from -1 to 1, higher is closer) and the same scores as a chart's data.
        """
        return classify_audio(audio, labels, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def similar_clips(audio, top_k=5, model=None, browser_id=None, profile: gr.OAuthProfile | None = None):
        """Find the clips of the app's sound library that sound most like a given sound (audio-to-audio search, CLAP by default).

        Args:
            audio: The sound to match (WAV, FLAC, OGG or MP3).
            top_k: How many of the most similar clips to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned retrieval adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the most similar clips (rank, clip file name, score from -1 to 1, higher is closer).
        """
        return similar_audio(audio, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def add_and_clear(files):
        # the upload box is emptied once its files are in the library (a second click would add them again)
        return *add_clips(files, checkpoint=checkpoint), None

    # Each search starts with a queued check that has no outputs: a refused query shows its sentence (a
    # queued event's gr.Error reaches the page) and the results already on screen stay as they are. The small
    # print under the results goes through a State, so the API's answers keep their shape.
    check_kw = dict(api_visibility="private", concurrency_id="check", concurrency_limit=CHECK_CONCURRENCY)
    text_in = [query, top_k, model, browser_id]
    sound_in = [sound, labels, top_k2, model, browser_id]
    add.click(user_errors(add_and_clear), uploads, [report, table, uploads], api_visibility="private", **gpu_kw)
    for trigger, api_name in ((search.click, "search_audio"), (query.submit, None)):
        searched = trigger(_ck(check_search), text_in, None, **check_kw).success(
            user_errors(search_text), text_in, [results, plot, clip_paths, text_info],
            **(dict(api_name=api_name) if api_name else dict(api_visibility="private")), **gpu_kw,
        )
        searched.then(players, [results, clip_paths], audio_players, api_visibility="private")
        show_run_info(searched, text_info, text_info_box)
    checked = match.click(_ck(check_sound), sound_in, None, **check_kw)
    labelled = checked.success(user_errors(classify_sound), sound_in, [label_table, label_plot, label_info],
                               api_name="classify_audio", **gpu_kw)
    show_run_info(labelled, label_info, label_info_box)
    found = checked.success(user_errors(similar_clips), [sound, top_k2, model, browser_id], [similar, clip_paths, similar_info],
                            api_name="similar_audio", **gpu_kw)
    found.then(players, [similar, clip_paths], audio_players, api_visibility="private")
    show_run_info(found, similar_info, similar_info_box)
    refresh = lambda: library_rows(checkpoint)  # noqa: E731
    ctx.tab.select(refresh, None, table, api_visibility="private", queue=False)
    ctx.demo.load(refresh, None, table, api_visibility="private", queue=False)
