"""Audio search tab: a persistent library (bundled clips + uploads), searched by text or by a sound.

The library is an ``AudioIndex`` under ``MMDEMO_HOME/indexes/library-<checkpoint>/``; uploaded clips are
copied to ``MMDEMO_HOME/library-clips/<content hash>/`` first (Gradio's upload folder is temporary),
so the same clip is stored once. A text query ranks clips; a sound (upload or microphone) ranks an
editable list of labels and finds similar clips. Handlers are plain functions of paths and strings.

Searching with a fine-tuned retrieval adapter needs the clips embedded by that adapter, so each adapter
gets its own index in a sibling folder (``library-<checkpoint>--<adapter>-<hash of its folder>``). The base
library stays the list of clips; an adapter's library is filled on first use and topped up on each
use with the base clips it lacks (only those are embedded), so it persists across restarts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from mmdemo.archive import extract_zip
from mmdemo.config import folder_problem, get_settings
from mmdemo.errors import InputError, MMDemoError
from mmdemo.media import AUDIO_EXTENSIONS, audio_info, file_sha256
from mmdemo.models.generation import check_text
from mmdemo.models.loading import Loaded
from mmdemo.models.retrieval import (
    AudioIndex,
    Embedder,
    Hit,
    embed_query_audio,
    find_audio_files,
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
from mmdemo.ui.context import ASSETS, CHECK_CONCURRENCY, GPU_QUEUE, UIContext

TITLE = "Audio search"
TASK = "retrieval"
PLAYERS = 5
MAX_UPLOADS = 500
MAX_LABELS = 50  # each label is one text-tower pass; 10,000 would hold the shared model for a minute
MAX_TEXT_CHARS = 300  # a query or a label; the model's token limit is checked too
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
_INDEXES: dict[str, AudioIndex] = {}
_INDEX_LOCK = threading.Lock()
_FILL_LOCKS: dict[str, threading.Lock] = {}  # adapter library folder -> lock held while it is topped up
_EMBEDDERS: dict[tuple, Embedder] = {}  # (model key, adapter folder) -> its Embedder, reused by every request
_EMBEDDER_LOCK = threading.Lock()


def bundled_clips() -> list[Path]:
    return sorted(p for p in (ASSETS / "sounds").glob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:40]


def index_dir(checkpoint: str, adapter: str | None = None) -> Path:
    """The library folder for ``checkpoint`` (the base library), or for ``adapter`` on it (a sibling)."""
    digest = hashlib.sha1(checkpoint.encode()).hexdigest()[:8]
    base = get_settings().indexes_dir / f"library-{_slug(Path(checkpoint).name)}-{digest}"
    if adapter is None:
        return base
    folder = Path(adapter).expanduser().resolve()
    key = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return base.with_name(f"{base.name}--{_slug(folder.name)}-{key}")


def _open(path: Path, emb: Embedder) -> AudioIndex:
    """The index at ``path`` from this process's cache (opened or created on first use); hold _INDEX_LOCK."""
    index = None if gpu.ZERO_GPU else _INDEXES.get(str(path))  # ZeroGPU workers change it on disk
    if index is None:
        index = AudioIndex.open_or_create(path, emb.checkpoint, emb.dim)
        _INDEXES[str(path)] = index
    return index


def library(checkpoint: str, adapter: str | None = None) -> tuple[AudioIndex, Embedder]:
    """The library index and embedder for ``checkpoint``, or for ``adapter`` (a folder) on it.

    The base library gets the bundled clips on first use. An adapter's library holds the same clips
    embedded with the adapter: the base clips whose content it lacks are embedded now, nothing else.
    """
    try:
        return _library(checkpoint, adapter)
    except OSError as err:  # a read-only or full MMDEMO_HOME: one sentence, not a traceback
        problem = folder_problem(err, "The audio library's folder (under MMDEMO_HOME)")
        if problem is None:
            raise
        raise InputError(problem) from None


def embedder(loaded: Loaded, adapter: str | None = None) -> Embedder:
    """The ``Embedder`` for ``loaded`` (and ``adapter``), made once (it builds the audio feature transform)."""
    key = (loaded.task, loaded.checkpoint, loaded.device, str(loaded.dtype), adapter)
    with _EMBEDDER_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None or emb.loaded is not loaded:  # a model loaded again (tests clear the cache) gets a new one
            emb = _EMBEDDERS[key] = Embedder(loaded, adapter=adapter)
    return emb


def _library(checkpoint: str, adapter: str | None) -> tuple[AudioIndex, Embedder]:
    loaded = gpu.loaded(TASK, checkpoint)
    emb = embedder(loaded)
    path = index_dir(emb.checkpoint)
    with _INDEX_LOCK:
        index = _open(path, emb)
        if not AudioIndex.exists(path):
            index.add_files(bundled_clips(), emb)
        if adapter is None:
            return index, emb
        emb = embedder(loaded, adapter)
        own = _open(index_dir(emb.checkpoint, adapter), emb)
        fill_lock = _FILL_LOCKS.setdefault(str(own.path), threading.Lock())
    # Filled outside _INDEX_LOCK (embedding a big library takes a while; the base library stays usable),
    # but one filler per adapter library, so two requests never embed the same clip twice.
    with fill_lock:
        have = {c.sha256 for c in own.clips}
        missing = [c.path for c in list(index.clips) if c.sha256 not in have]
        if missing or not AudioIndex.exists(own.path):
            report = own.add_files(missing, emb)
            for _path, why in report.failed:  # e.g. a clip deleted by hand since it joined the base library
                log.warning("a clip is missing from the %s library: %s", Path(adapter).name, why)
    return own, emb


def library_rows(checkpoint: str) -> list[list]:
    """The clips in the library, newest first (read from disk; needs no model)."""
    path = index_dir(checkpoint)
    with _INDEX_LOCK:
        index = _INDEXES.get(str(path))
    if index is None:
        if not AudioIndex.exists(path):
            return [[p.name, None] for p in bundled_clips()]
        index = AudioIndex.open(path)
    return [[c.name, round(c.duration, 2)] for c in reversed(index.clips)]  # newest first


def library_clips_dir() -> Path:
    """Where uploaded library clips are kept: the one folder under MMDEMO_HOME the web server serves."""
    return get_settings().home / "library-clips"


def _store(src: Path, store: Path) -> Path:
    """Copy an upload into the library folder, in a folder named by its content hash (kept once).

    Written to a temporary name and renamed, so a full disk or a crash never leaves a partial clip that
    a later upload of the same content would take for complete.
    """
    target = store / file_sha256(src)[:16] / src.name
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        tmp.replace(target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # only if empty: another clip of the same content may live there
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or type(err).__name__).lower()
        raise InputError(f"{src.name} could not be stored in the library ({why}); free some space or ask the "
                         f"app's owner to, then add it again.") from None
    return target


@gpu.task(duration=120)
def add_clips(files, checkpoint: str | None = None) -> tuple[str, list[list]]:
    """Add uploaded clips (and the clips inside uploaded zips) to the library; report what happened."""
    paths = [p for p in (file_path(f) for f in (files or [])) if p]
    if not paths:
        raise InputError("Upload audio files (WAV, FLAC, OGG or MP3) or a zip of them to add.")
    checkpoint = checkpoint or gpu.loaded(TASK, None).checkpoint
    store = library_clips_dir()
    problems: list[tuple[str, str]] = []
    candidates: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="mmdemo-upload-") as tmp:
        for raw in map(Path, paths):
            if raw.suffix.lower() == ".zip":
                try:
                    extracted = extract_zip(raw, Path(tmp) / raw.stem)
                except MMDemoError as err:
                    problems.append((raw.name, str(err)))
                    continue
                problems += [(raw.name, p) for p in extracted.problems]
                found, other = find_audio_files(extracted.root)
                candidates += found
                problems += [(Path(p).name, why) for p, why in other]
            elif raw.suffix.lower() in AUDIO_EXTENSIONS:
                candidates.append(raw)
            else:
                problems.append((raw.name, f"{raw.name} is not an audio file (WAV, FLAC, OGG or MP3) or a zip, "
                                           f"so it was skipped."))
        if len(candidates) > MAX_UPLOADS:
            raise InputError(f"{len(candidates)} clips were uploaded; add at most {MAX_UPLOADS} at a time.")
        original = {}
        for p in candidates:
            try:
                original[str(_store(p, store))] = p.name
            except InputError as err:
                problems.append((p.name, str(err)))
        index, emb = library(checkpoint)
        report = index.add_files(list(original), emb)
    for path, why in report.failed:
        shutil.rmtree(Path(path).parent, ignore_errors=True)  # a bad file is reported, not kept
        problems.append((original.get(path, Path(path).name), why))
    said = _report(len(report.added), len(report.duplicates), [why for _name, why in problems], len(index))
    return said, library_rows(checkpoint)


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


def _top_k(value) -> int:
    try:
        k = int(value or 5)
    except (TypeError, ValueError):
        raise InputError("Top-k must be a whole number.") from None
    if not 1 <= k <= 50:
        raise InputError(f"Top-k must be between 1 and 50, not {k}.")
    return k


def _checkpoint(checkpoint: str | None) -> str:
    return checkpoint or gpu.loaded(TASK, None).checkpoint


def _query_text(text: str | None, checkpoint: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise InputError("Type some text to search for, such as 'a high beep'.")
    check_text(gpu.loaded(TASK, checkpoint), text, "search text", MAX_TEXT_CHARS)
    return text


def split_labels(labels: str | None, checkpoint: str | None) -> list[str]:
    """The comma- or line-separated labels, each within the model's text limit, at most ``MAX_LABELS``."""
    found = [lab.strip() for lab in re.split(r"[,\n]", labels or "") if lab.strip()]
    if not found:
        raise InputError("Write at least one label to rank, such as 'beep, rain, siren'.")
    if len(found) > MAX_LABELS:
        raise InputError(f"{len(found)} labels were given; rank at most {MAX_LABELS} at a time.")
    loaded = gpu.loaded(TASK, checkpoint)
    for label in found:
        check_text(loaded, label, "label", MAX_TEXT_CHARS)
    return list(dict.fromkeys(found))  # a label given twice is ranked once


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
            _ck(search_audio), text_in, [results, plot, clip_paths, text_info],
            **(dict(api_name=api_name) if api_name else dict(api_visibility="private")), **gpu_kw,
        )
        searched.then(players, [results, clip_paths], audio_players, api_visibility="private")
        show_run_info(searched, text_info, text_info_box)
    checked = match.click(_ck(check_sound), sound_in, None, **check_kw)
    labelled = checked.success(_ck(classify_audio), sound_in, [label_table, label_plot, label_info],
                               api_name="classify_audio", **gpu_kw)
    show_run_info(labelled, label_info, label_info_box)
    found = checked.success(_ck(similar_audio), [sound, top_k2, model, browser_id], [similar, clip_paths, similar_info],
                            api_name="similar_audio", **gpu_kw)
    found.then(players, [similar, clip_paths], audio_players, api_visibility="private")
    show_run_info(found, similar_info, similar_info_box)
    refresh = lambda: library_rows(checkpoint)  # noqa: E731
    ctx.tab.select(refresh, None, table, api_visibility="private", queue=False)
    ctx.demo.load(refresh, None, table, api_visibility="private", queue=False)
