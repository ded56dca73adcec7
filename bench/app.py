"""The app around the models: per-request overhead of ``python app.py``, and its start with models on disk.

    python bench/app.py                      # overhead on the tiny models, start with full-size checkpoints
    python bench/app.py --tiny --quick       # smoke run: tiny models everywhere, few repetitions
    python bench/app.py --device cuda        # the same with the models on the GPU

Overhead: the app is served in this process as tests/test_api.py serves it (``build_app`` on the tiny
checkpoints, queued, ``launch``), so the model is a small part of each request and the model function can
be called directly on the very models the server uses. Each repetition sends one request over the app's
HTTP API as the page does (upload the image, call the endpoint, read the answer from the event stream)
and calls the same model function on the same, already decoded input with the same options, the order
alternating; overhead = wall time of the request - time of the direct call. So the overhead counts
everything the app adds: the upload, the queue, Gradio's pre- and postprocessing, validation, decoding the
image (once) and the answer's way back. Inputs: a
1280x960 JPEG photo-like image, two questions for VQA, greedy decoding of 5 tokens (the model's share, and
its noise on a busy machine, stay small), a text query new to the query cache each time (audio search over the
audio library, image search over the image library). A reference row times the same HTTP calls against an echo
endpoint in a bare Gradio app.

Start: ``python app.py --caption-model ... --vqa-model ... --retrieval-model ... --image-search-model ...`` with
full-size random-weight checkpoints (BLIP caption, BLIP VQA, CLAP, SigLIP base, built by bench/common.py; already
on disk and in the page cache after the first start). Measured: launch to the first HTTP 200 of the page, launch
to every model ready (the app's own "ready" lines), and the peak RSS (VmHWM) once the models are loaded and each
tab answered one request. Baseline for loading: the four plain ``from_pretrained`` calls in a fresh process. The
app's log must show each model ready once (nothing loaded twice; tests/test_app_start.py checks it in-process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import build_checkpoint, cache_dir, environment, fmt, percentile, report  # noqa: E402

WORDS = ["beep", "rain", "bell", "engine", "bird", "siren", "crowd", "wind", "piano", "drum"]
QUESTIONS = "what color is it?\nhow many shapes are there?"


def photo(path: Path, size: tuple[int, int] = (1280, 960)) -> Path:
    """A photo-like JPEG (smooth colour fields, shapes and noise): decodes like a camera picture would."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 97), 128 + 100 * np.cos(yy / 61), 128 + 60 * np.sin((xx + yy) / 150)], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy)
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 4, h // 4, w // 2, h // 2), fill="red")
    draw.rectangle((w // 2, h // 2, w * 3 // 4, h * 4 // 5), fill="blue")
    img.save(path, quality=90)
    return path


def _spread(xs: list[float]) -> str:
    return f"{fmt(percentile(xs, 50), 's')} ({fmt(percentile(xs, 25), 's')}-{fmt(percentile(xs, 75), 's')})"


class Http:
    """The app's HTTP API as the page uses it: upload a file, then call an endpoint and read its event stream.

    One session for all calls, as one open page has (without one, Gradio builds a new session's state, about
    20 ms here, for every call). ``gradio_client`` adds about 70 ms of its own per call here, client side.
    """

    def __init__(self, url: str):
        import uuid

        import httpx

        self.base = url.rstrip("/") + "/gradio_api"
        self.http = httpx.Client(timeout=600)
        self.session = uuid.uuid4().hex[:11]

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as fh:
            resp = self.http.post(f"{self.base}/upload", files=[("files", (path.name, fh.read()))])
        resp.raise_for_status()
        return {"path": resp.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, api_name: str, *data) -> list:
        resp = self.http.post(f"{self.base}/call/{api_name}", json={"data": list(data), "session_hash": self.session})
        resp.raise_for_status()
        event = None
        with self.http.stream("GET", f"{self.base}/call/{api_name}/{resp.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event in ("complete", "error"):
                    if event == "error":
                        raise RuntimeError(f"{api_name} failed: {line}")
                    return json.loads(line.removeprefix("data: "))
        raise RuntimeError(f"{api_name}: no answer")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gradio_floor(args, image: Path) -> list[dict]:
    """The same HTTP calls against an echo endpoint in a bare Gradio app: what Gradio alone costs here."""
    import gradio as gr

    from conftest import free_port

    with gr.Blocks() as demo:
        text, out, files = gr.Textbox(), gr.Textbox(), gr.File(file_count="multiple")
        button = gr.Button()
        button.click(lambda x: x, text, out, api_name="echo")
        button.click(lambda f: str(len(f or [])), files, out, api_name="echo_file")
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=port)
    try:
        http = Http(f"http://127.0.0.1:{port}/")
        text = lambda: http.call("echo", "hi")  # noqa: E731
        file = lambda: http.call("echo_file", [http.upload(image)])  # noqa: E731
        for fn in (text, file):
            fn()
        texts = [_timed(text) for _ in range(args.requests)]
        files = [_timed(file) for _ in range(args.requests)]
    finally:
        demo.close()
    return [{"measure": "for reference: Gradio alone (an echo endpoint in a bare app, same HTTP calls), text / "
                        "with the image uploaded, p50 (p25-p75)", "baseline": "-",
             "ours": f"{_spread(texts)} / {_spread(files)}", "ratio": "-", "target": ""}]


def overhead_rows(args, work: Path, device: str) -> list[dict]:
    from conftest import serve_app
    from mmdemo.media import load_image
    from mmdemo.models import caption as caption_model
    from mmdemo.models import image_search
    from mmdemo.models import vqa as vqa_model
    from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS
    from mmdemo.models.loading import load
    from mmdemo.models.retrieval import AudioIndex, Embedder
    from mmdemo.models.tiny import TINY_FOR_TASK, write_tiny_models
    from mmdemo.ui.common import generation_options

    image = photo(work / "photo.jpg")
    os.environ["MMDEMO_DEVICE"] = device
    folders = write_tiny_models(work / "tiny-models")
    checkpoints = {task: str(folders[name].resolve()) for task, name in TINY_FOR_TASK.items()}
    with serve_app(checkpoints, work / "home-overhead") as url:
        http = Http(url)
        models = {task: load(task, folder, device=device) for task, folder in checkpoints.items()}  # the app's own
        decoded = load_image(image)
        cap_opts = generation_options(1, 5, CAPTION_DEFAULTS)
        vqa_opts = generation_options(1, 5, VQA_DEFAULTS)
        questions = QUESTIONS.splitlines()
        http.call("search_audio", "warm-up", 5, "base", None)  # builds the library
        library = next((work / "home-overhead" / "indexes").glob("library-*"))
        index, emb = AudioIndex.open(library), Embedder(models["retrieval"])
        http.call("search_images", "warm-up", 5, "base", None)  # builds the image library (the bundled pictures)
        pictures = image_search.embedder(models["image_search"])

        def text(i: int) -> str:
            return f"a {WORDS[i % 10]} and a {WORDS[(i * 3 + 1) % 10]}, take {i}"

        endpoints = {
            "caption": (lambda i: http.call("caption", [http.upload(image)], "", 1, 5, "base", None),
                        lambda i: caption_model.caption([decoded], None, cap_opts, model=models["caption"])),
            "vqa": (lambda i: http.call("vqa", http.upload(image), QUESTIONS, 1, 5, "base", None),
                    lambda i: vqa_model.answer_pairs([(decoded, q) for q in questions], vqa_opts,
                                                     model=models["vqa"])),
            "search_audio": (lambda i: http.call("search_audio", text(i), 5, "base", None),
                             lambda i: index.search_text(text(i) + " (direct)", emb, top_k=5)),
            "search_images": (lambda i: http.call("search_images", text(i), 5, "base", None),
                              lambda i: image_search.search_text(text(i) + " (direct)", pictures, k=5,
                                                             seed=image_search.bundled_images())),
        }
        rows = []
        for name, (request, direct) in endpoints.items():
            for i in range(2):  # warm-up, with texts never timed
                request(-1 - i)
                direct(-1 - i)
            walls, models_s, overheads = [], [], []
            for i in range(args.requests):  # interleaved, the order alternating: the request and the direct call
                if i % 2:
                    model_s = _timed(lambda: direct(i))  # noqa: B023
                    wall = _timed(lambda: request(i))  # noqa: B023
                else:
                    wall = _timed(lambda: request(i))  # noqa: B023
                    model_s = _timed(lambda: direct(i))  # noqa: B023
                walls.append(wall)
                models_s.append(model_s)
                overheads.append(wall - model_s)
            rows.append({"measure": f"{name}: app overhead per request (wall - model call alone), p50 (p25-p75); "
                                    f"wall {_spread(walls)}",
                         "baseline": f"model call alone {_spread(models_s)}",
                         "ours": _spread(overheads),
                         "ratio": "-", "target": "<= 50 ms"})
    return rows + gradio_floor(args, image)


def _rss_peak(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


def _start_once(args, checkpoints: dict[str, str], work: Path, device: str, run: int) -> dict:
    from gradio_client import Client, handle_file

    from conftest import free_port

    port = free_port()
    home = work / f"home-start-{run}"
    log_path = work / f"app-start-{run}.log"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "MMDEMO_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "MMDEMO_DEVICE": device, "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    flags = [x for task, folder in checkpoints.items() for x in (f"--{task.replace('_', '-')}-model", folder)]
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", *flags], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            page = ready = None
            while ready is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                if page is None:
                    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            page = time.perf_counter() - t0
                lines = re.findall(r"mmdemo: (.+?): ready", log_path.read_text())
                if page is not None and len(lines) >= len(checkpoints):
                    ready = time.perf_counter() - t0
                if time.perf_counter() - t0 > args.start_timeout:
                    raise RuntimeError(f"app.py was not ready in {args.start_timeout} s: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)
            client = Client(url, verbose=False)
            image = handle_file(str(photo(work / "start.jpg", (640, 480))))
            client.predict([image], "", 1, 5, "base", None, api_name="/caption")
            client.predict(image, "what is it?", 1, 5, "base", None, api_name="/vqa")
            client.predict("a high beep", 5, "base", None, api_name="/search_audio")
            client.predict("a red circle", 5, "base", None, api_name="/search_images")
            peak = _rss_peak(proc.pid)
            loads = re.findall(r"mmdemo: (.+?): ready", log_path.read_text())
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"page": page, "ready": ready, "peak": peak, "loads": loads}


def _plain_load(checkpoints: dict[str, str], device: str) -> float:
    """Seconds for the four plain ``from_pretrained`` calls (and processors) in a fresh process."""
    code = (
        "import sys, time, json\n"
        "t0 = time.perf_counter()\n"
        "import torch, transformers as T\n"
        "c = json.loads(sys.argv[1])\n"
        "for cls, proc, task in [('BlipForConditionalGeneration', 'BlipProcessor', 'caption'),"
        " ('BlipForQuestionAnswering', 'BlipProcessor', 'vqa'), ('ClapModel', 'ClapProcessor', 'retrieval'),"
        " ('SiglipModel', 'SiglipProcessor', 'image_search')]:\n"
        "    getattr(T, cls).from_pretrained(c[task], dtype=torch.float32).to(sys.argv[2]).eval()\n"
        "    getattr(T, proc).from_pretrained(c[task])\n"
        "print(time.perf_counter() - t0)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(checkpoints), device], capture_output=True,
                         text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    float(out.stdout.strip().splitlines()[-1])
    return time.perf_counter() - t0


def start_rows(args, work: Path, device: str) -> list[dict]:
    names = {"caption": "blip-caption-base", "vqa": "blip-vqa-base", "retrieval": "clap-htsat-unfused",
             "image_search": "siglip-base-patch16-224"}
    checkpoints = {task: str(build_checkpoint(task, cache_dir() / ("tiny-" + task if args.tiny else name),
                                              tiny=args.tiny)) for task, name in names.items()}
    weights = sum(f.stat().st_size for folder in checkpoints.values() for f in Path(folder).glob("*.safetensors"))
    if not args.quick:  # the first start reads the weights into the page cache (a smoke run times a cold start)
        _start_once(args, checkpoints, work, device, -1)
    starts, plain = [], []
    for run in range(args.starts):  # interleaved with the plain loads
        starts.append(_start_once(args, checkpoints, work, device, run))
        plain.append(_plain_load(checkpoints, device))
    pages = [s["page"] for s in starts]
    readies = [s["ready"] for s in starts]
    peaks = [s["peak"] / 2**30 for s in starts]
    loads = starts[-1]["loads"]
    kind = "tiny" if args.tiny else "full-size"
    return [
        {"measure": f"app start ({kind} BLIP caption + BLIP VQA + CLAP + SigLIP on disk): launch to page answering, "
                    f"median (min-max) of {len(starts)}",
         "baseline": "-", "ours": f"{fmt(percentile(pages, 50), 's')} ({fmt(min(pages), 's')}-{fmt(max(pages), 's')})",
         "ratio": "-", "target": "<= 10 s"},
        {"measure": f"app start: launch to every model ready (baseline: the {len(checkpoints)} plain "
                    "from_pretrained in a fresh process, imports included)",
         "baseline": f"{fmt(percentile(plain, 50), 's')} ({fmt(min(plain), 's')}-{fmt(max(plain), 's')})",
         "ours": f"{fmt(percentile(readies, 50), 's')} ({fmt(min(readies), 's')}-{fmt(max(readies), 's')})",
         "ratio": f"{percentile(plain, 50) / percentile(readies, 50):.2f}x", "target": ""},
        {"measure": f"peak RSS, all models loaded and each tab answered once (weights on disk "
                    f"{weights / 2**30:.2f} GiB)",
         "baseline": "-", "ours": f"{percentile(peaks, 50):.2f} GiB ({min(peaks):.2f}-{max(peaks):.2f})",
         "ratio": "-", "target": "reported"},
        {"measure": "models loaded per start (the app's ready lines)", "baseline": "-",
         "ours": f"{len(loads)}: " + "; ".join(loads), "ratio": "-", "target": "each once"},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints for the start rows too")
    p.add_argument("--quick", action="store_true", help="few repetitions")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=None, help="timed requests per endpoint")
    p.add_argument("--starts", type=int, default=None, help="timed app starts")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--skip-start", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    args.requests = args.requests or (3 if args.quick else 30)
    args.starts = args.starts or (1 if args.quick else 3)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mmdemo.models.loading import pick_device

    device = pick_device(args.device)
    load_start = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-app-") as tmp:
        work = Path(tmp)
        if not args.skip_overhead:
            rows += overhead_rows(args, work, device)
        if not args.skip_start:
            rows += start_rows(args, work, device)
    env = environment(device) | {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                                 "load average (1 min) at start": round(load_start, 2),
                                 "at end": round(os.getloadavg()[0], 2)}
    cmd = "python bench/app.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report("app" + (" (tiny smoke)" if args.tiny else ""), cmd, env, rows, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
