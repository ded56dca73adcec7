"""``python -m mmdemo``: the model layer from a shell. JSON lines on stdout, progress on stderr.

A bad input or a missing checkpoint prints one sentence on stderr and exits 2, never a traceback.

    python -m mmdemo caption IMAGE... [--model M] [--adapter DIR] [--prompt TEXT] [--num-beams N] [--max-new-tokens N]
    python -m mmdemo vqa IMAGE --question Q [--question Q2 ...] [--model M] [--adapter DIR]
    python -m mmdemo index AUDIO_DIR_OR_ZIP --out INDEX_DIR [--model M]
    python -m mmdemo search --index INDEX_DIR (--text T | --audio FILE [--labels L1,L2,...]) [--top-k K]
    python -m mmdemo finetune --task caption|vqa|retrieval --data ZIP_OR_DIR --out DIR [--preset quick] ...
    python -m mmdemo tiny-models DIR
    python -m mmdemo download [--task T ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from mmdemo.errors import InputError, MMDemoError


def _emit(record: dict) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def _warn(sentence: str) -> None:
    print(f"warning: {sentence}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Keep stderr for our own progress and sentences; libraries' notices are noise to a CLI user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _generation(args, defaults):
    from mmdemo.models.generation import GenerationOptions

    return GenerationOptions(
        num_beams=args.num_beams if args.num_beams is not None else defaults.num_beams,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_tokens,
        min_new_tokens=min(args.min_new_tokens if args.min_new_tokens is not None else defaults.min_new_tokens,
                           args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_tokens),
    )


def cmd_caption(args) -> int:
    from tqdm import tqdm

    from mmdemo.config import get_settings
    from mmdemo.media import load_image
    from mmdemo.models.caption import caption
    from mmdemo.models.generation import CAPTION_DEFAULTS, for_adapter
    from mmdemo.models.loading import load

    options = _generation(args, for_adapter(CAPTION_DEFAULTS, args.adapter))
    limits = get_settings().limits
    images = [load_image(p, limits) for p in args.images]  # all checked before the model loads
    loaded = load("caption", args.model, device=args.device)
    bar = tqdm(total=len(images), desc="captioning", unit="img", disable=len(images) < 2, file=sys.stderr)
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        texts = caption(chunk, prompt=args.prompt, options=options, adapter=args.adapter, model=loaded,
                        batch_size=args.batch_size, detail=args.detail)
        for path, text in zip(args.images[start:start + args.batch_size], texts):
            _emit({"image": path, "caption": text})
        bar.update(len(chunk))
    bar.close()
    return 0


def cmd_vqa(args) -> int:
    from mmdemo.models.generation import VQA_DEFAULTS, for_adapter
    from mmdemo.models.loading import load
    from mmdemo.models.vqa import answer, clean_questions

    options = _generation(args, for_adapter(VQA_DEFAULTS, args.adapter))
    questions = clean_questions(args.question)
    from mmdemo.config import get_settings
    from mmdemo.media import load_image

    image = load_image(args.image, get_settings().limits)
    loaded = load("vqa", args.model, device=args.device)
    for q, a in zip(questions, answer(image, questions, options=options, adapter=args.adapter, model=loaded)):
        _emit({"image": args.image, "question": q, "answer": a})
    return 0


def cmd_index(args) -> int:
    from tqdm import tqdm

    from mmdemo.archive import extract_zip
    from mmdemo.models.retrieval import AudioIndex, embedder, find_audio_files

    source, out = Path(args.source), Path(args.out)
    problems: list[tuple[str, str]] = []
    if source.is_file() and source.suffix.lower() == ".zip":
        extracted = extract_zip(source, out / "clips" / source.stem)
        problems += [(source.name, p) for p in extracted.problems]
        files, other = find_audio_files(extracted.root)
    else:
        files, other = find_audio_files(source)
    problems += other
    # Growing an existing index: keep the model it was built with unless told otherwise.
    model = args.model or (AudioIndex.open(out).model if AudioIndex.exists(out) else None)
    emb = embedder(model, adapter=args.adapter)
    index = AudioIndex.open_or_create(out, emb.checkpoint, dim=emb.dim)
    with tqdm(total=len(files), desc="indexing", unit="clip", file=sys.stderr) as bar:
        report = index.add_files(files, emb, progress=bar.update)
    problems += report.failed
    for clip in report.added:
        _emit({"path": clip.path, "status": "added", "duration": clip.duration})
    for path in report.duplicates:
        _emit({"path": path, "status": "duplicate"})
    for path, why in problems:
        _emit({"path": path, "status": "failed", "error": why})
        _warn(why)
    _emit({"index": str(out), "added": len(report.added), "duplicates": len(report.duplicates),
           "failed": len(problems), "total": len(index)})
    if not report.added and not report.duplicates and len(index) == 0:
        raise InputError(f"No audio could be indexed from {source}; see the problems above.")
    if problems and args.strict:
        return 2
    return 0


def cmd_search(args) -> int:
    from mmdemo.models.retrieval import AudioIndex, embed_query_audio, embedder, rank_labels

    index = AudioIndex.open(args.index)
    if args.model and args.model != index.model:
        raise InputError(f"The index was built with {index.model}, not {args.model}; drop --model or re-index.")
    emb = embedder(index.model, adapter=args.adapter)
    if args.text is not None:
        for hit in index.search_text(args.text, emb, args.top_k):
            _emit(hit.record())
        return 0
    query = embed_query_audio(emb, path=args.audio)
    if args.labels:
        for hit in rank_labels(query, args.labels.split(","), emb, args.top_k):
            _emit(hit.record())
    for hit in index.search_vector(query, args.top_k):
        _emit(hit.record())
    return 0


def cmd_library(args) -> int:
    """The app's shared audio library (under MMDEMO_HOME), through the same service as the Audio search tab."""
    from mmdemo.models import audio_library as lib
    from mmdemo.models.loading import load
    from mmdemo.models.retrieval import embed_query_audio, rank_labels

    loaded = load("retrieval", args.model, device=args.device)
    if args.action == "add":
        added = lib.add_uploads(args.files, loaded)
        for why in added.problems:
            _emit({"status": "failed", "reason": why})
        _emit({"added": added.added, "duplicates": added.duplicates, "failed": len(added.problems),
               "total": added.total})
        return 2 if args.strict and added.problems else 0
    if args.action == "list":
        for name, seconds in lib.library_rows(loaded.checkpoint):
            _emit({"clip": name, "seconds": seconds})
        return 0
    k = lib.check_top_k(args.top_k)
    if args.text is not None:
        index, emb = lib.library(loaded, args.adapter)
        for hit in index.search_text(lib.check_query(args.text, loaded), emb, k):
            _emit(hit.record())
        return 0
    labels = lib.split_labels(args.labels, loaded) if args.labels else []
    index, emb = lib.library(loaded, args.adapter)
    query = embed_query_audio(emb, path=args.audio)
    for hit in rank_labels(query, labels, emb, k) if labels else []:
        _emit(hit.record())
    for hit in index.search_vector(query, k):
        _emit(hit.record())
    return 0


def cmd_images(args) -> int:
    """The app's shared image library (under MMDEMO_HOME), through the same service as the Image search tab."""
    from mmdemo.models import image_search as lib
    from mmdemo.models.loading import load

    loaded = load("image_search", args.model, device=args.device)
    seed = lib.bundled_images()  # a new library starts with the bundled pictures, as the tab's does
    if args.action == "add":
        report, index = lib.add_images(args.files, lib.ImageEmbedder(loaded), seed=seed)
        for why in report.problems:
            _emit({"status": "failed", "reason": why})
        _emit({"added": len(report.added), "duplicates": len(report.duplicates), "failed": len(report.problems),
               "total": len(index.images)})
        return 2 if args.strict and report.problems else 0
    if args.action == "list":
        for image in lib.library_images(loaded.checkpoint, seed):
            _emit({"image": image.name, "width": image.width, "height": image.height})
        return 0
    emb = lib.ImageEmbedder(loaded, args.adapter)
    k = lib.check_top_k(args.top_k)
    if args.text is not None:
        hits = lib.search_text(args.text, emb, k, seed=seed)
    else:
        labels = [] if args.labels is None else lib.classify_image(args.image, args.labels, emb, k)
        hits = labels + lib.similar_images(args.image, emb, k, seed=seed)
    for hit in hits:
        _emit(hit.record())
    return 0


def cmd_tiny_models(args) -> int:
    from mmdemo.models.tiny import write_tiny_models

    for name, folder in write_tiny_models(args.dir).items():
        _emit({"name": name, "path": str(folder)})
    return 0


def cmd_download(args) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from mmdemo.errors import ModelLoadError
    from mmdemo.models.loading import more_checkpoints, resolve_checkpoint
    from mmdemo.models.registry import TASKS

    done: set[str] = set()  # a checkpoint two tabs offer (SmolVLM) is fetched once
    for task, checkpoint in [(t, checkpoint) for t in args.task or list(TASKS)
                             for checkpoint in (resolve_checkpoint(t, None), *more_checkpoints(t))]:
        if checkpoint in done:
            continue
        done.add(checkpoint)
        if Path(checkpoint).is_dir():
            _emit({"task": task, "checkpoint": checkpoint, "path": checkpoint, "status": "local"})
            continue
        print(f"downloading {checkpoint} ...", file=sys.stderr, flush=True)
        try:
            path = snapshot_download(checkpoint)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
            raise ModelLoadError(
                f"Could not download {checkpoint} from the Hugging Face Hub; "
                f"check the internet connection, HF_HUB_OFFLINE and HF_TOKEN, then try again."
            ) from None
        _emit({"task": task, "checkpoint": checkpoint, "path": path, "status": "downloaded"})
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmdemo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p, task: str) -> None:
        p.add_argument("--model", help=f"checkpoint: Hub id or local folder (default: $MMDEMO_{task.upper()}_MODEL)")
        p.add_argument("--adapter", help="a LoRA adapter folder to apply")
        p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: best available)")

    def gen_flags(p) -> None:
        p.add_argument("--num-beams", type=_positive)
        p.add_argument("--max-new-tokens", type=_positive)
        p.add_argument("--min-new-tokens", type=int)

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", help="text the caption starts with, e.g. 'a picture of'")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--detail", choices=["short", "detailed", "paragraph"], default="short",
                   help="caption length, for models that write longer captions on request (Florence-2)")
    model_flags(p, "caption")
    gen_flags(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("vqa", help="answer questions about an image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--question", "-q", action="append", required=True)
    model_flags(p, "vqa")
    gen_flags(p)
    p.set_defaults(func=cmd_vqa)

    p = sub.add_parser("index", help="build or extend an audio index")
    p.add_argument("source", metavar="AUDIO_DIR_OR_ZIP")
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.add_argument("--strict", action="store_true", help="exit 2 if any file could not be indexed")
    model_flags(p, "retrieval")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an audio index by text or by a sound")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--audio", metavar="FILE")
    p.add_argument("--labels", help="comma-separated candidate texts to rank for an --audio query")
    p.add_argument("--top-k", type=_positive, default=5)
    model_flags(p, "retrieval")
    p.set_defaults(func=cmd_search)

    try:
        from mmdemo.jobs.cli import add_finetune_parser
    except ImportError:
        pass
    else:
        add_finetune_parser(sub)

    p = sub.add_parser("library", help="the app's shared audio library under MMDEMO_HOME (the Audio search tab's)")
    lib_sub = p.add_subparsers(dest="action", required=True)
    q = lib_sub.add_parser("add", help="add audio files or zips of them")
    q.add_argument("files", nargs="+", metavar="FILE_OR_ZIP")
    q.add_argument("--strict", action="store_true", help="exit 2 if any file could not be added")
    q = lib_sub.add_parser("list", help="the clips in the library, newest first")
    q = lib_sub.add_parser("search", help="rank the library's clips by a text, or by a sound (and labels)")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--text")
    how.add_argument("--audio", metavar="FILE")
    q.add_argument("--labels", help="comma-separated candidate texts to rank for an --audio query")
    q.add_argument("--top-k", type=_positive, default=5)
    for q in lib_sub.choices.values():
        model_flags(q, "retrieval")
    p.set_defaults(func=cmd_library)

    p = sub.add_parser("images", help="the app's shared image library under MMDEMO_HOME (the Image search tab's)")
    img_sub = p.add_subparsers(dest="action", required=True)
    q = img_sub.add_parser("add", help="add images or zips of them")
    q.add_argument("files", nargs="+", metavar="FILE_OR_ZIP")
    q.add_argument("--strict", action="store_true", help="exit 2 if any file could not be added")
    q = img_sub.add_parser("list", help="the images in the library, newest first")
    q = img_sub.add_parser("search", help="rank the library's images by a text, or by an image (and labels)")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--text")
    how.add_argument("--image", metavar="FILE")
    q.add_argument("--labels", help="comma-separated candidate texts to rank for an --image query")
    q.add_argument("--top-k", type=_positive, default=5)
    for q in img_sub.choices.values():
        model_flags(q, "image_search")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("tiny-models", help="write tiny random-weight checkpoints for tests and demos")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_tiny_models)

    from mmdemo.models.registry import TASKS  # light: dataclasses only

    p = sub.add_parser("download", help="fetch the default checkpoints (and the tabs' other base models) into the "
                                        "Hugging Face cache")
    p.add_argument("--task", action="append", choices=list(TASKS))
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command with the settings the environment gives, read once and installed for the command (a
    command's ``--model`` and ``--device`` are passed to it as arguments, not through the environment)."""
    from mmdemo.config import Settings, install
    from mmdemo.models.loading import check_task_names

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        settings = Settings.from_env()
        check_task_names(settings)
    except MMDemoError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    previous = install(settings)
    try:
        return args.func(args)
    except MMDemoError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    finally:
        install(previous)
