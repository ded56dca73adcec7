"""The benchmarks still run: each one on its tiny checkpoint, on the CPU, with few iterations.

These are smoke runs, not timed tests: they check that each bench builds its models, times both
paths and prints a table with ratios; the speed claims come from GPU runs recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("bench", ["caption", "index", "search"])
def test_bench_smoke(bench, tmp_path):
    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "MMDEMO_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, f"bench/{bench}.py", "--tiny", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"].startswith(bench) and record["rows"]
    timed = [row for row in record["rows"] if row["ratio"] != "-"]  # "-": an agreement row, not a timing
    assert timed
    for row in timed:
        assert row["ratio"].endswith("x") and float(row["ratio"][:-1]) > 0


def test_vector_index_bench_smoke(tmp_path):
    """bench/vector_index.py --quick: 20,000 random and clustered rows, exact search and the FAISS IVF index."""
    pytest.importorskip("faiss")
    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "bench/vector_index.py", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "vector index (quick smoke)"
    by_kind = {(r["kind"], r["engine"].split()[0]): r for r in record["rows"]}
    assert by_kind[("random", "exact")]["recall"] == 1.0 and by_kind[("clustered", "FAISS")]["recall"] >= 0.9
    assert all(r["p50_s"] > 0 for r in record["rows"])


def test_app_bench_smoke(tmp_path):
    """bench/app.py on the tiny models: overhead per endpoint, the start, the peak RSS, each model loaded once."""
    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "MMDEMO_DEVICE": "cpu", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/app.py", "--tiny", "--quick", "--requests", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    measures = [row["measure"] for row in record["rows"]]
    for name in ("caption", "vqa", "search_audio", "search_images"):
        assert any(m.startswith(f"{name}: app overhead") for m in measures), measures
    assert any(m.startswith("app start") for m in measures) and any(m.startswith("peak RSS") for m in measures)
    assert record["rows"][-1]["ours"].startswith("4: ")  # four models, each loaded once


def test_gpu_check_smoke(tmp_path):
    """The GPU check script (model layer + a Quick job) runs end to end on the tiny models on the CPU."""
    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "MMDEMO_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--examples", "24"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = [r["step"] for r in records]
    assert steps == ["environment", "model layer (tiny)", "quick fine-tune (tiny BLIP caption)"]
    layer, job = records[1], records[2]
    assert len(layer["captions"]) == 3 and all(layer["captions"]) and layer["indexed"] >= 8
    assert layer["by_sound"][0]["score"] > 0.99 and len(layer["labels"]) == 3
    assert job["steps"] >= 60 and job["train_samples_per_s"] > 0 and "bleu4" in job["metrics_after"]


def test_load_bench_smoke(tmp_path):
    """bench/load.py on a few clients for a few seconds: every request answered or refused with a sentence."""
    env = {**os.environ, "MMDEMO_DEVICE": "cpu", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/load.py", "--clients", "4", "--seconds", "5", "--bad-share", "0.3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["lost"] == 0 and record["job"]
    endpoints = record["endpoints"]
    assert sum(e["requests"] for e in endpoints.values()) >= 4
    assert all(e["bad answered"] == 0 and e["good refused"] == 0 for e in endpoints.values()), endpoints


def test_finetune_bench_smoke(tmp_path):
    """bench/finetune.py on the tiny models: both sides train the same steps, finetune's phases are timed from its
    progress records, and a job goes through the real queue (submit, dispatcher, worker) to done."""
    env = {**os.environ, "MMDEMO_BENCH_CACHE": str(tmp_path), "MMDEMO_DEVICE": "cpu", "TMPDIR": str(tmp_path)}
    # captioning only: the retrieval side runs the same code with another PREPARE step, and each task costs ~40 s
    proc = subprocess.run([sys.executable, "bench/finetune.py", "--tiny", "--quick", "--tasks", "caption"], cwd=ROOT,
                          env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    detail = next(json.loads(line) for line in lines if line.startswith('{"detail"'))["detail"]
    assert record["bench"] == "finetune (tiny smoke)"
    for task in ("caption",):
        rows = [r for r in record["rows"] if r["measure"].startswith(f"{task}: ")]
        assert float(rows[0]["ratio"][:-1]) > 0 and "samples/s" in rows[0]["measure"]
        project, plain = detail[task]["runs"]["project"][0], detail[task]["runs"]["plain"][0]
        assert project["steps"] == plain["steps"] == 2 and project["peak_rss_gib"] > 0
        assert {"loading model", "preprocessing", "evaluating (base)", "training", "evaluating (adapter)",
                "saving"} <= set(project["phases"])
        job = detail[task]["job"]
        assert {"submit", "queue wait", "worker start", "training"} <= set(job["phases"]) and job["steps"] == 2
        assert 0 < detail[task]["fixed_share"] < 1 and detail[task]["quick_job_s"] > job["wall"]
