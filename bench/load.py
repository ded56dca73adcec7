"""Many visitors at once: concurrent clients mixing caption, VQA and audio search against ``python app.py``
while a fine-tuning job trains, some of them sending bad requests. Not a speed claim: it checks that every
request is answered or refused with a sentence (none lost, no bare "Error") and reports p50/p95 latency.

    python bench/load.py                          # 32 clients for 60 s, tiny models, a job training meanwhile
    python bench/load.py --clients 8 --seconds 10 # shorter
    python bench/load.py --model-args "--caption-model ./blip ..."   # real checkpoints instead of tiny ones

Prints one line per endpoint and a final JSON record (counts, p50/p95 per endpoint, the job's state).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.common import percentile  # noqa: E402

# What a refusal must look like: one of the project's sentences, or Gradio's own queue-full message.
SENTENCE_HINTS = ("Upload", "is a text file", "prefix is", "tokens", "at most", "labels", "Type some text",
                  "no adapter", "Queue is full", "too many", "wait", "characters long")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--bad-share", type=float, default=0.15, help="share of deliberately bad requests")
    p.add_argument("--model-args", default="--tiny-models", help="arguments for app.py choosing the models")
    p.add_argument("--no-job", action="store_true", help="do not train a job meanwhile")
    args = p.parse_args(argv)

    from gradio_client import Client, handle_file

    from conftest import make_image, make_shapes_dataset, start_app

    work = Path(tempfile.mkdtemp(prefix="mmdemo-load-"))
    home = work / "home"
    images = [make_image(work / f"img{i}.png", c, s) for i, (c, s) in
              enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"), ("black", "circle")])]
    junk = work / "junk.png"
    junk.write_text("not an image")
    clip = str(ROOT / "assets" / "sounds" / "beep.wav")
    owner = "load-test-owner-0"
    job_id = None
    app_env = {"MMDEMO_JOB_SLOTS": "1", "OMP_NUM_THREADS": "1", "MMDEMO_DEVICE": os.environ.get("MMDEMO_DEVICE", "")}
    with start_app(home, None, tuple(shlex.split(args.model_args)), env=app_env, timeout=180, log_dir=work) as url:
        if not args.no_job:
            data = make_shapes_dataset(work / "data", "caption", per_class=3)
            archive = shutil.make_archive(str(work / "shapes"), "zip", root_dir=data)
            job_id = Client(url, verbose=False).predict(handle_file(archive), "caption", "quick", 200, None, None,
                                                        None, None, owner, api_name="/finetune_submit")
            print(f"job {job_id} submitted", file=sys.stderr)

        def request(rng: random.Random, client: Client, kind: str, bad: bool) -> object:
            img = handle_file(str(junk if bad and kind in ("caption", "vqa") and rng.random() < 0.5
                                  else rng.choice(images)))
            if kind == "caption":
                prefix = "red " * 5000 if bad else rng.choice(["", "a picture of"])
                return client.predict([img], prefix, 3, 20, "base", None, api_name="/caption")
            if kind == "vqa":
                q = "what " * 200 if bad else rng.choice(["what color is it?", "what shape is it?"])
                return client.predict(img, q, 3, 10, "base", None, api_name="/vqa")
            if kind == "search_audio":
                text = "   " if bad else rng.choice(["a high beep", "rain", "a siren"])
                return client.predict(text, 5, "base", None, api_name="/search_audio")
            labels = ", ".join(f"l{i}" for i in range(200)) if bad else "beep, rain, siren"
            return client.predict(handle_file(clip), labels, 3, "base", None, api_name="/classify_audio")

        stats: dict[str, list] = defaultdict(list)
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def visitor(seed: int) -> None:
            rng = random.Random(seed)
            client = Client(url, verbose=False)
            while time.monotonic() < stop_at:
                bad = rng.random() < args.bad_share
                kind = rng.choice(["caption", "vqa", "search_audio", "classify_audio"])
                t0 = time.monotonic()
                try:
                    answer = request(rng, client, kind, bad)
                    # batched with other users' requests, a refused one gets its sentence as its row
                    refused = "Refused: " in json.dumps(answer, ensure_ascii=False)
                    outcome = "refused" if refused else "answered"
                except Exception as err:  # noqa: BLE001 - classified below
                    text = str(err)
                    outcome = "refused" if any(h in text for h in SENTENCE_HINTS) else f"lost: {text[:120]}"
                with lock:
                    stats[kind].append((outcome, bad, time.monotonic() - t0))

        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(args.clients)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t_start
        job_state = None
        if job_id:
            client = Client(url, verbose=False)
            status = client.predict(job_id, owner, api_name="/job_status")
            job_state = f"{status['state']} ({status['phase']} step {status['step']}/{status['total']})"
            if status["state"] not in ("succeeded", "failed", "cancelled"):  # it trained all along: stop it
                client.predict(job_id, owner, api_name="/job_cancel")

    rows = {}
    lost_examples = []
    for kind, results in sorted(stats.items()):
        good = [r for r in results if not r[1]]
        bad = [r for r in results if r[1]]
        lat = [r[2] for r in good if r[0] == "answered"]
        lost = [r[0] for r in results if r[0].startswith("lost")]
        lost_examples += lost[:3]
        rows[kind] = {
            "requests": len(results),
            "good answered": sum(r[0] == "answered" for r in good), "good refused": sum(r[0] == "refused" for r in good),
            "bad refused": sum(r[0] == "refused" for r in bad), "bad answered": sum(r[0] == "answered" for r in bad),
            "lost": len(lost),
            "p50 s": round(percentile(lat, 50), 2) if lat else None,
            "p95 s": round(percentile(lat, 95), 2) if lat else None,
        }
        print(f"{kind:15s} {json.dumps(rows[kind])}", file=sys.stderr)
    for example in lost_examples:
        print(f"  {example}", file=sys.stderr)
    record = {"bench": "load", "clients": args.clients, "seconds": round(wall, 1), "job": job_state,
              "lost": sum(r["lost"] for r in rows.values()), "endpoints": rows}
    print(json.dumps(record))
    if record["lost"]:
        print(f"the app's log is in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if record["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
