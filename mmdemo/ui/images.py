"""Image search tab: a persistent image library (bundled pictures + uploads), searched by text or by an image.

The library lives in the model layer (:mod:`mmdemo.models.image_search`): uploaded images are stored under
``MMDEMO_HOME/library-images/`` (the only part of it the web server serves) and their embeddings in an
index under ``MMDEMO_HOME/indexes/``, so the library survives a restart. A text ranks the library's images;
an image ranks an editable list of labels and finds similar images. Handlers are plain functions of paths
and strings; the page shows images by name and score, never a server path.
"""

from __future__ import annotations

import time

import gradio as gr

from mmdemo.errors import InputError
from mmdemo.media import IMAGE_EXTENSIONS
from mmdemo.models import image_search as search
from mmdemo.models.image_search import ImageEmbedder
from mmdemo.models.retrieval import Hit
from mmdemo.ui import gpu
from mmdemo.ui.common import (
    BASE,
    adapter_path,
    device_label,
    empty_table,
    file_path,
    image_input,
    model_selector,
    optional_owner,
    plural,
    run_info,
    run_info_box,
    show_run_info,
    user_errors,
)
from mmdemo.ui.context import CHECK_CONCURRENCY, GPU_QUEUE, UIContext

TITLE = "Image search"
TASK = search.TASK
MCP_TOOLS = ["search_images", "classify_image", "similar_images"]  # api_names offered to MCP clients (--mcp)
DEFAULT_LABELS = "a red circle, a blue square, a house, the sea at night, a star, stripes"
EXAMPLE_QUERIES = ["a red circle", "a house", "stripes", "the sea at night"]
RESULT_HEADERS = ["rank", "image", "score"]
LABEL_HEADERS = ["rank", "label", "score"]
LIBRARY_HEADERS = ["image", "size"]
SCORE_NOTE = ("Score: how alike the two are for the model (cosine similarity, from -1 to 1; 0 means unrelated). "
              "Higher is a closer match.")
TOP_K_INFO = "How many of the best matches to show."


bundled_images = search.bundled_images  # the pictures every new library starts with


def _embedder(checkpoint: str | None, adapter: str | None = None) -> ImageEmbedder:
    return ImageEmbedder(gpu.loaded(TASK, checkpoint), adapter)


def _checkpoint(checkpoint: str | None) -> str:
    return checkpoint or gpu.loaded(TASK, None).checkpoint


def library_rows(checkpoint: str) -> list[list]:
    """The images in the library, newest first (read from disk; needs no model)."""
    try:
        images = search.library_images(checkpoint, bundled_images())
    except InputError:
        return []
    return [[i.name, f"{i.width} x {i.height}" if i.width else ""] for i in images]


@gpu.task(duration=120)
def add_images(files, checkpoint: str | None = None) -> tuple[str, list[list]]:
    """Add uploaded images (and the images inside uploaded zips) to the library; say what happened."""
    paths = [p for p in (file_path(f) for f in (files or [])) if p]
    if not paths:
        raise InputError("Upload images (JPEG, PNG, WebP, BMP, GIF or TIFF) or a zip of them to add.")
    checkpoint = _checkpoint(checkpoint)
    report, index = search.add_images(paths, _embedder(checkpoint), seed=bundled_images())
    return _report(len(report.added), len(report.duplicates), report.problems, len(index)), library_rows(checkpoint)


def _report(added: int, duplicates: int, problems: list[str], total: int) -> str:
    """What an upload did, in sentences: ``**Added 2 images.** 1 image was already in the library. ...``."""
    text = f"**Added {plural(added, 'image')}.**"
    if duplicates:
        text += f" {plural(duplicates, 'image')} {'was' if duplicates == 1 else 'were'} already in the library."
    text += f" The library holds {plural(total, 'image')}."
    if not problems:
        return text
    return "\n".join([f"{text} {plural(len(problems), 'file')} could not be used:", *(f"- {why}" for why in problems)])


def _image_rows(hits: list[Hit]) -> tuple[list[list], list[tuple[str, str]]]:
    rows = [[h.rank, h.name, round(h.score, 4)] for h in hits]
    gallery = [(h.path, f"{h.rank}. {h.name} — {h.score:.3f}") for h in hits]
    return rows, gallery


def _info(emb: ImageEmbedder, model: str | None, start: float) -> str:
    return run_info(device_label(emb.loaded.device, emb.loaded.dtype), emb.checkpoint, model,
                    time.monotonic() - start)


def _image_path(image) -> str:
    path = file_path(image)
    if not path:
        raise InputError("Upload an image (JPEG, PNG, WebP, BMP, GIF or TIFF) to search with.")
    return path


def check_search(text, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                 checkpoint: str | None = None) -> None:
    """The page's first step for a text search: a refused query shows its sentence, results stay."""
    search.check_query(text, gpu.loaded(TASK, checkpoint))
    search.check_top_k(top_k)
    adapter_path(TASK, model, optional_owner(browser_id, profile))


def check_image(image, labels, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                checkpoint: str | None = None) -> None:
    """The page's first step for a search by image (labels and similar images)."""
    search.query_image(_image_path(image))
    search.split_labels(labels, gpu.loaded(TASK, checkpoint))
    search.check_top_k(top_k)
    adapter_path(TASK, model, optional_owner(browser_id, profile))


@gpu.task(duration=120)  # the first search with an adapter embeds the library with it
def search_images(text: str, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                  checkpoint: str | None = None):
    """Text -> images: a table of (rank, image, score), the gallery (image, caption) and the small print.

    ``model`` is ``"base"`` or the name of an image-search adapter the caller (``browser_id``/``profile``) may use.
    """
    start = time.monotonic()
    adapter = adapter_path(TASK, model, optional_owner(browser_id, profile))
    emb = _embedder(_checkpoint(checkpoint), adapter)
    rows, gallery = _image_rows(search.search_text(text, emb, top_k, seed=bundled_images()))
    return rows, gallery, _info(emb, model, start)


@gpu.task(duration=120)
def similar_images(image, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                   checkpoint: str | None = None):
    """Image -> the most similar images in the library: table, gallery and the small print."""
    start = time.monotonic()
    path = _image_path(image)
    adapter = adapter_path(TASK, model, optional_owner(browser_id, profile))
    emb = _embedder(_checkpoint(checkpoint), adapter)
    rows, gallery = _image_rows(search.similar_images(path, emb, top_k, seed=bundled_images()))
    return rows, gallery, _info(emb, model, start)


@gpu.task(duration=60)
def classify_image(image, labels: str, top_k=5, model: str | None = BASE, browser_id=None, profile=None, *,
                   checkpoint: str | None = None):
    """Image -> the best labels from the comma- or line-separated list, and the small print (no library needed)."""
    start = time.monotonic()
    path = _image_path(image)
    adapter = adapter_path(TASK, model, optional_owner(browser_id, profile))
    emb = _embedder(_checkpoint(checkpoint), adapter)
    hits = search.classify_image(path, labels, emb, top_k)
    return [[h.rank, h.label, round(h.score, 4)] for h in hits], _info(emb, model, start)


def warm_up(ctx: UIContext) -> None:
    """Embed the bundled images into the library in the background, and the example queries and default labels
    (the text cache then answers a click on them at once)."""
    emb = _embedder(ctx.checkpoint(TASK))
    search.library(emb, bundled_images())
    emb.texts([*EXAMPLE_QUERIES, *search.split_labels(DEFAULT_LABELS, emb.loaded)])


def _results(label: str, elem_id: str) -> gr.Dataframe:
    return gr.Dataframe(empty_table(RESULT_HEADERS), headers=RESULT_HEADERS, label=label, interactive=False,
                        wrap=True, column_widths=["15%", "60%", "25%"], elem_id=elem_id)


def _gallery(label: str, elem_id: str) -> gr.Gallery:
    # read-only: visitors add images through the library's upload box, where each is checked
    return gr.Gallery(label=label, columns=5, height=260, object_fit="contain", allow_preview=True,
                      interactive=False, elem_id=elem_id)


def build(ctx: UIContext) -> None:
    checkpoint = ctx.checkpoint(TASK)
    gpu_kw = dict(concurrency_id=GPU_QUEUE, concurrency_limit=ctx.gpu_concurrency)
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### Library\nThe bundled example pictures plus yours. Uploads are kept; bad files are "
                        "reported and skipped.")
            uploads = gr.File(label="Add images (image files or a zip)", file_count="multiple",
                              file_types=[*sorted(IMAGE_EXTENSIONS), ".zip"], elem_id="images-uploads")
            add = gr.Button("Add to library", elem_id="images-add")
            report = gr.Markdown(elem_id="images-report")
            table = gr.Dataframe(empty_table(LIBRARY_HEADERS), headers=LIBRARY_HEADERS,
                                 label="Images in the library", interactive=False, max_height=300, wrap=True,
                                 column_widths=["70%", "30%"], elem_id="images-library")
        with gr.Column(scale=3):
            model = model_selector(ctx, TASK)
            with gr.Tab("Search by text"):
                query = gr.Textbox(label="Describe a picture", placeholder="a red circle", elem_id="images-query")
                with gr.Row():
                    top_k = gr.Slider(1, 20, value=5, step=1, label="Top-k", info=TOP_K_INFO)
                    run = gr.Button("Search", variant="primary", elem_id="images-search")
                results = _results("Ranked images", "images-results")
                gallery = _gallery("Best matches", "images-gallery")
                gr.Markdown(SCORE_NOTE, elem_classes=["run-info"])
                text_info, text_info_box = run_info_box("images-text-info")
                gr.Examples([[q] for q in EXAMPLE_QUERIES], inputs=[query],
                            label="Examples: click one to fill in the description")
            with gr.Tab("Search by image"):
                picture = image_input(label="An image", sources=["upload", "clipboard"], elem_id="images-picture")
                labels = gr.Textbox(label="Labels to rank (edit freely; commas or lines)", value=DEFAULT_LABELS,
                                    lines=2, elem_id="images-labels")
                with gr.Row():
                    top_k2 = gr.Slider(1, 20, value=5, step=1, label="Top-k", info=TOP_K_INFO)
                    match = gr.Button("Search with this image", variant="primary", elem_id="images-match")
                label_table = gr.Dataframe(empty_table(LABEL_HEADERS), headers=LABEL_HEADERS, label="Best labels",
                                           interactive=False, wrap=True, column_widths=["15%", "60%", "25%"],
                                           elem_id="images-labels-out")
                label_info, label_info_box = run_info_box("images-labels-info")
                similar = _results("Similar images", "images-similar")
                similar_gallery = _gallery("Similar images", "images-similar-gallery")
                similar_info, similar_info_box = run_info_box("images-similar-info")
                pictures = bundled_images()
                if pictures:
                    gr.Examples([[str(p)] for p in pictures[:4]], inputs=[picture],
                                label="Examples: click one to use that image")

    browser_id = ctx.browser_id

    def _ck(fn):
        def handler(*args, profile: gr.OAuthProfile | None = None):
            return fn(*args, profile=profile, checkpoint=checkpoint)

        return user_errors(handler)

    # The public endpoints' functions: their names, defaults and docstrings are what the API page and MCP clients
    # show (a wrapper taking *args, as _ck makes, would show param_0, param_1...); one line per Args entry.
    def search_text(text, top_k=5, model=None, browser_id=None, profile: gr.OAuthProfile | None = None):
        """Rank the pictures of the app's image library by how well they match a text description (SigLIP by default).

        Args:
            text: What the picture shows, in a few words, e.g. "a red circle" or "a house by the sea".
            top_k: How many of the best-matching pictures to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned image search adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the best pictures (rank, picture file name, score from -1 to 1, higher is closer) and the pictures themselves.
        """
        return search_images(text, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def classify_picture(image, labels, top_k=5, model=None, browser_id=None, profile: gr.OAuthProfile | None = None):
        """Rank text labels by how well each describes a picture (zero-shot image classification, SigLIP by default).

        Args:
            image: The picture to describe (PNG, JPEG, WebP, ...).
            labels: The candidate labels, separated by commas or lines, at most 50, e.g. "a dog, a cat, a car".
            top_k: How many of the best labels to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned image search adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the best labels (rank, label, score from -1 to 1, higher is closer).
        """
        return classify_image(image, labels, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def similar_pictures(image, top_k=5, model=None, browser_id=None, profile: gr.OAuthProfile | None = None):
        """Find the pictures of the app's image library that look most like a given picture (SigLIP by default).

        Args:
            image: The picture to match (PNG, JPEG, WebP, ...).
            top_k: How many of the most similar pictures to return, 1 to 50.
            model: "base" for the base model (the usual choice), or the name of a fine-tuned image search adapter you may use.
            browser_id: Leave empty. The id an API client chose for its own fine-tuning jobs, to use its unpublished adapters.

        Returns:
            A table of the most similar pictures (rank, picture file name, score from -1 to 1, higher is closer) and the pictures themselves.
        """
        return similar_images(image, top_k, model, browser_id, profile, checkpoint=checkpoint)

    def add_and_clear(files):
        # the upload box is emptied once its files are in the library (a second click would add them again)
        return *add_images(files, checkpoint=checkpoint), None

    # As in the other tabs: a queued check without outputs first (a refused query shows its sentence and the
    # results on screen stay), then the model event; its small print goes through a State (the API's answer
    # keeps its shape).
    check_kw = dict(api_visibility="private", concurrency_id="check", concurrency_limit=CHECK_CONCURRENCY)
    text_in = [query, top_k, model, browser_id]
    image_in = [picture, labels, top_k2, model, browser_id]
    add.click(user_errors(add_and_clear), uploads, [report, table, uploads], api_visibility="private", **gpu_kw)
    for trigger, api_name in ((run.click, "search_images"), (query.submit, None)):
        searched = trigger(_ck(check_search), text_in, None, **check_kw).success(
            user_errors(search_text), text_in, [results, gallery, text_info],
            **(dict(api_name=api_name) if api_name else dict(api_visibility="private")), **gpu_kw,
        )
        show_run_info(searched, text_info, text_info_box)
    checked = match.click(_ck(check_image), image_in, None, **check_kw)
    labelled = checked.success(user_errors(classify_picture), image_in, [label_table, label_info],
                               api_name="classify_image", **gpu_kw)
    show_run_info(labelled, label_info, label_info_box)
    found = checked.success(user_errors(similar_pictures), [picture, top_k2, model, browser_id],
                            [similar, similar_gallery, similar_info], api_name="similar_images", **gpu_kw)
    show_run_info(found, similar_info, similar_info_box)
    refresh = lambda: library_rows(checkpoint)  # noqa: E731
    ctx.tab.select(refresh, None, table, api_visibility="private", queue=False)
    ctx.demo.load(refresh, None, table, api_visibility="private", queue=False)
