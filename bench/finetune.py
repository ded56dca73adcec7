"""Fine-tuning benchmark: mmdemo's LoRA ``finetune`` path against the plain peft + Trainer code a user writes.

    python bench/finetune.py                   # full-size random-weight BLIP-base and CLAP on the best device
    python bench/finetune.py --tiny --quick    # tiny checkpoints, CPU smoke run (the test suite runs this)
    python bench/finetune.py --device cpu --write   # full size on the CPU: few steps, Quick job projected

Per task (caption: BLIP-base at 384 px; retrieval: CLAP HTSAT-unfused with 10 s clips), on one device, with
LoRA rank 16 (alpha 32) on the registry's target modules and batch size 8:

- mmdemo: ``mmdemo.jobs.train.finetune`` on a synthetic dataset in the upload layout (``train/`` and ``test/``
  folders with ``metadata.csv``), timed phase by phase through its ``progress`` callback: validating, loading,
  preprocessing, evaluation of the base model, training, evaluation with the adapter, saving. Each run trains
  one slice of a Quick job (``--steps`` steps, its checkpoint interval);
- baseline: what a user writes: ``from_pretrained`` (fp32), ``get_peft_model(LoraConfig(r, lora_alpha,
  target_modules))`` (peft's defaults otherwise), a torch
  ``Dataset`` that opens the file and runs the processor in ``__getitem__``, and ``transformers.Trainer``
  (bf16 autocast on CUDA) for the same number of steps; then ``save_pretrained``.

Runs alternate mmdemo / baseline ``--reps`` times, each in a fresh child process (forked on the CPU,
spawned on CUDA) so that its peak memory is its own: peak RSS on the CPU, ``torch.cuda.max_memory_allocated``
on a GPU. Training samples/s = steps x batch / the Trainer's ``train_runtime`` on both sides (median, min-max).

Then one Quick job goes through the real job queue (``mmdemo.jobs.submit``, the dispatcher, a worker process)
and is timed from submit to done. With ``--job-steps`` it trains only that many steps (a full-size BLIP Quick job
is 60 steps of ~45 s each on a 2-core CPU) and the Quick job's wall time is projected: its measured fixed parts
plus the Quick plan's steps at the median step time of the runs above. Fixed overhead = everything but the
training steps (submit, queue, worker start, validating, loading, preprocessing, both evaluations, saving).

The bench sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) for both sides and the worker: on a
CPU shared with other work, spinning OpenMP threads made a full-size BLIP caption 8x and a training step 2x slower
here, and timings swing several-fold from run to run. ``--profile`` instead times what BLIP training steps and
held-out captions cost under other settings than the project's (the evidence for the proposals in RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import build_checkpoint, cache_dir, environment, fmt, report, write_section

TASKS = ("caption", "retrieval")
FULL_NAMES = {"caption": "blip-caption-base", "retrieval": "clap-htsat-unfused"}
COLORS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
SOUNDS = (("sine", 440.0, "a steady high tone"), ("noise", 0.0, "white noise hissing"),
          ("sweep", 200.0, "a rising sweep"), ("pulse", 880.0, "a beeping alarm"))
EVAL_NAMES = {1: "evaluating (base)", 2: "evaluating (adapter)"}


# ------------------------------------------------------------------------------------------------- datasets
def write_images(folder: Path, n: int, size: int, offset: int = 0) -> None:
    """``n`` coloured shapes on white with captions, in the ImageFolder layout (one metadata.csv)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(offset)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(offset, offset + n):
        color, shape = COLORS[i % 4], SHAPES[(i // 4) % 3]
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        s = rng.randint(size // 3, size * 3 // 4)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        if shape == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=color)
        elif shape == "square":
            draw.rectangle((x, y, x + s, y + s), fill=color)
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=color)
        img.save(folder / f"img{i:04d}.png")
        rows.append({"file_name": f"img{i:04d}.png", "text": f"a picture of a {color} {shape}"})
    _write_metadata(folder, rows)


def write_clips(folder: Path, n: int, seconds: float, sr: int, offset: int = 0) -> None:
    """``n`` synthetic WAV clips (tones, noise, sweeps, beeps) with descriptions."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    rows = []
    for i in range(offset, offset + n):
        kind, freq, text = SOUNDS[i % len(SOUNDS)]
        f = freq * (1 + 0.03 * (i // len(SOUNDS)))
        if kind == "sine":
            wave = 0.3 * np.sin(2 * np.pi * f * t)
        elif kind == "noise":
            wave = 0.2 * np.random.default_rng(i).standard_normal(len(t))
        elif kind == "sweep":
            wave = 0.3 * np.sin(2 * np.pi * (f + 800 * t / seconds) * t)
        else:
            wave = 0.3 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * 4 * t) > 0)
        sf.write(str(folder / f"clip{i:04d}.wav"), wave.astype(np.float32), sr, subtype="PCM_16")
        rows.append({"file_name": f"clip{i:04d}.wav", "text": text})
    _write_metadata(folder, rows)


def _write_metadata(folder: Path, rows: list[dict]) -> None:
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)


def write_dataset(task: str, root: Path, train: int, test: int, tiny: bool) -> Path:
    for sub, n, offset in (("train", train, 0), ("test", test, train)):
        if task == "caption":
            write_images(root / sub, n, 64 if tiny else 384, offset)
        else:
            write_clips(root / sub, n, 2.0 if tiny else 10.0, 16000 if tiny else 44100, offset)
    return root


# ------------------------------------------------------------------------------------------- child processes
def _config(spec: dict, steps: int | None):
    """The Quick preset at the bench's rank/alpha/batch; ``steps`` cuts it to that many steps (one slice)."""
    from mmdemo.jobs.train import TrainConfig, training_plan

    base = dict(rank=spec["rank"], alpha=spec["alpha"], batch_size=spec["batch"])
    quick = TrainConfig.from_preset("quick", **base)
    if steps is None:
        return quick
    interval = max(1, training_plan(quick, spec["train"])["steps"] // 10)  # the Quick job's checkpoint interval
    return TrainConfig.from_preset("quick", **base, epochs=1, min_steps=steps, save_steps=interval)


def phase_times(records: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per phase from ``(time, phase)`` progress records; the two evaluations are told apart."""
    marks: list[tuple[str, float]] = []
    seen: dict[str, int] = {}
    for t, phase in records:
        if marks and marks[-1][0].startswith(phase):
            continue
        seen[phase] = seen.get(phase, 0) + 1
        name = EVAL_NAMES.get(seen[phase], phase) if phase == "evaluating" else \
            phase if seen[phase] == 1 else f"{phase} ({seen[phase]})"
        marks.append((name, t))
    out: dict[str, float] = {}
    for (name, t), nxt in zip(marks, [m[1] for m in marks[1:]] + [end]):
        out[name] = out.get(name, 0.0) + nxt - t
    return out


def _peak(device: str) -> dict:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"peak_rss_gib": round(rss, 3), "peak_gpu_gib": None if gpu is None else round(gpu, 3)}


def _imports(task: str) -> None:
    """What a script imports at its top, before any clock starts (a worker pays it inside the job)."""
    import peft  # noqa: F401
    import transformers
    from transformers import Trainer  # noqa: F401

    from mmdemo.models.registry import ARCHITECTURES

    arch = ARCHITECTURES[(task, "blip" if task == "caption" else "clap")]
    getattr(transformers, arch.model_class), getattr(transformers, arch.processor_class)
    if task == "retrieval":
        import librosa  # noqa: F401


def run_project(spec: dict) -> dict:
    from mmdemo.jobs.train import finetune

    _imports(spec["task"])
    records: list[tuple[float, str]] = []
    work = Path(spec["work"])
    t0 = time.perf_counter()
    result = finetune(spec["task"], spec["data"], work / "adapter", model=spec["model"],
                      config=_config(spec, spec["steps"]), workdir=work / "job", device=spec["device"],
                      progress=lambda p: records.append((time.perf_counter(), p.phase)))
    end = time.perf_counter()
    metrics = result.get("trainer_metrics") or {}
    steps = int(metrics.get("global_step") or result["training"]["steps_done"])
    phases = phase_times(records, end)
    runtime = float(metrics.get("train_runtime") or phases["training"])
    return {"side": "project", "steps": steps, "train_runtime": runtime, "phases": phases,
            "wall": end - t0, "load": phases.get("loading model"), "save": phases.get("saving"), **_peak(spec["device"])}


def run_plain(spec: dict) -> dict:
    """The baseline: the peft + Trainer script a user writes after the transformers/peft tutorials."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.nn.utils.rnn import pad_sequence
    from transformers import Trainer, TrainingArguments

    from mmdemo.models.registry import ARCHITECTURES

    task, folder, device = spec["task"], spec["model"], spec["device"]
    arch = ARCHITECTURES[(task, "blip" if task == "caption" else "clap")]
    rows = list(csv.DictReader((Path(spec["data"]) / "train" / "metadata.csv").open(encoding="utf-8")))
    root = Path(spec["data"]) / "train"
    _imports(task)

    t0 = time.perf_counter()
    processor = getattr(transformers, arch.processor_class).from_pretrained(folder)
    model = getattr(transformers, arch.model_class).from_pretrained(folder).to(device)
    load = time.perf_counter() - t0
    pad_id = processor.tokenizer.pad_token_id

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            if task == "caption":
                from PIL import Image

                image = Image.open(root / row["file_name"]).convert("RGB")
                enc = processor(images=image, text=row["text"], return_tensors="pt")
            else:
                import librosa

                wave, sr = librosa.load(root / row["file_name"], sr=processor.feature_extractor.sampling_rate)
                enc = processor(text=row["text"], audio=wave, sampling_rate=sr, return_tensors="pt")
            return {k: v[0] for k, v in enc.items()}

    def collate(batch):
        ids = pad_sequence([b["input_ids"] for b in batch], batch_first=True, padding_value=pad_id)
        mask = pad_sequence([b["attention_mask"] for b in batch], batch_first=True, padding_value=0)
        out = {"input_ids": ids, "attention_mask": mask}
        if task == "caption":
            out |= {"pixel_values": torch.stack([b["pixel_values"] for b in batch]),
                    "labels": ids.masked_fill(mask == 0, -100)}
        else:
            out |= {"input_features": torch.stack([b["input_features"] for b in batch]), "return_loss": True}
        return out

    Examples()[0]  # one-time costs (librosa's first call, lazy imports) stay out of the training clock
    t1 = time.perf_counter()
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"],
                                             target_modules=list(arch.lora_targets)))
    args = TrainingArguments(output_dir=str(Path(spec["work"]) / "out"), per_device_train_batch_size=spec["batch"],
                             max_steps=spec["steps"], learning_rate=3e-4, remove_unused_columns=False,
                             report_to="none", save_strategy="no", disable_tqdm=True,
                             bf16=device.startswith("cuda"), use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=args, train_dataset=Examples(), data_collator=collate)
    output = trainer.train()
    t2 = time.perf_counter()
    model.save_pretrained(str(Path(spec["work"]) / "adapter"))
    t3 = time.perf_counter()
    return {"side": "plain", "steps": trainer.state.global_step, "train_runtime": output.metrics["train_runtime"],
            "phases": {"loading model": load, "training": t2 - t1, "saving": t3 - t2},
            "wall": t3 - t0, "load": load, "save": t3 - t2, **_peak(device)}


def run_profile(spec: dict) -> dict:
    """BLIP captioning costs behind the proposals: what each training step and each held-out caption costs under
    other settings than the project's (compute only, a plain torch loop; median of ``reps`` after a warm-up)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from mmdemo.jobs import train as train_module
    from mmdemo.jobs.evaluate import CAPTION_EVAL
    from mmdemo.models.caption import caption
    from mmdemo.models.loading import load

    _imports("caption")
    reps, batch, device = spec["reps"], spec["batch"], spec["device"]
    loaded = load("caption", spec["model"], device=device)
    files = sorted((Path(spec["data"]) / "train").glob("*.png"))[:batch]
    held_out = files[: spec["test"]]
    out: dict[str, object] = {}

    def timed(fn, n: int = reps) -> float:
        fn()  # warm-up
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    # held-out captions as evaluate() makes them (one image per call) against one call for all of them
    one = [caption([f], options=CAPTION_EVAL, model=loaded)[0] for f in held_out]
    out["same_captions_batched"] = one == caption(held_out, options=CAPTION_EVAL, model=loaded,
                                                  batch_size=len(held_out))
    out["eval_one_per_call_s"] = timed(lambda: [caption([f], options=CAPTION_EVAL, model=loaded) for f in held_out])
    out["eval_batched_s"] = timed(lambda: caption(held_out, options=CAPTION_EVAL, model=loaded,
                                                  batch_size=len(held_out)))

    targets = list(loaded.arch.lora_targets)
    dropout = getattr(train_module, "LORA_DROPOUT", 0.0)  # the project's LoRA dropout
    model = get_peft_model(loaded.model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=dropout,
                                                    target_modules=targets))
    model.eval()
    out["eval_lora_unmerged_s"] = timed(lambda: [caption([f], options=CAPTION_EVAL, model=loaded) for f in held_out])
    model.merge_adapter()
    out["eval_lora_merged_s"] = timed(lambda: [caption([f], options=CAPTION_EVAL, model=loaded) for f in held_out])
    model.unmerge_adapter()

    tok = loaded.processor.tokenizer
    pixels = loaded.processor(images=[Image.open(f).convert("RGB") for f in files],
                              return_tensors="pt")["pixel_values"].to(device, loaded.dtype)
    ids = tok(["a picture of a red circle"] * len(files), return_tensors="pt")["input_ids"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu",
                                                                                                           enabled=False)

    def trainer_step(m, step_inputs, forward):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with autocast:
                loss = forward(**step_inputs)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step, opt

    model.train()
    step, opt = trainer_step(model, {"pixel_values": pixels, "input_ids": ids, "labels": ids},
                             lambda **kw: model(**kw).loss)
    out["step_current_targets_s"] = timed(step)
    folder = Path(spec["work"]) / "checkpoint"

    def save():
        model.save_pretrained(str(folder))
        torch.save(opt.state_dict(), folder / "optimizer.pt")
    out["checkpoint_save_s"] = timed(save)
    out["checkpoint_mib"] = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    base = model.unload()  # the plain model again, for text-only targets
    text_only = [t for t in targets if t != "qkv"]
    model = get_peft_model(base, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=dropout,
                                            target_modules=text_only))
    model.train()
    step, _ = trainer_step(model, {"pixel_values": pixels, "input_ids": ids, "labels": ids},
                           lambda **kw: model(**kw).loss)
    out["step_text_only_targets_s"] = timed(step)
    blip = model.base_model.model
    with torch.no_grad(), autocast:
        t = time.perf_counter()
        embeds = blip.vision_model(pixel_values=pixels)[0]
        out["vision_forward_per_image_s"] = (time.perf_counter() - t) / len(files)
    step, _ = trainer_step(model, {"input_ids": ids, "encoder_hidden_states": embeds, "labels": ids},
                           lambda **kw: blip.text_decoder(**kw, reduction="mean").loss)
    out["step_text_only_cached_vision_s"] = timed(step)
    out["text_only_targets"] = text_only
    out["peak_rss_gib"] = _peak(device)["peak_rss_gib"]
    return {"side": "profile", **out}


def run_build(spec: dict) -> dict:
    out = build_checkpoint(spec["task"], Path(spec["model"]), tiny=spec["tiny"])
    return {"side": "build", "model": str(out)}


def _child(spec: dict, conn) -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore")
        if spec["device"] == "cpu":
            os.environ["MMDEMO_DEVICE"] = "cpu"
        run = {"project": run_project, "plain": run_plain, "build": run_build, "profile": run_profile}[spec["side"]]
        conn.send({"ok": run(spec)})
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def in_child(spec: dict) -> dict:
    """Run ``spec`` in a fresh process: forked on the CPU (the parent ran no torch op), spawned elsewhere."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if spec["device"] == "cpu" else "spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, child))
    proc.start()
    child.close()
    try:
        answer = parent.recv()
    except EOFError:
        answer = {"error": "the child process died without an answer (killed for memory?)"}
    proc.join()
    if "error" in answer:
        raise RuntimeError(f"{spec['side']} run of {spec['task']} failed: {answer['error']}\n"
                           f"{answer.get('traceback', '')}")
    return answer["ok"]


# ----------------------------------------------------------------------------------------------- queue job
def _vm_hwm_gib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, TypeError):
        return None
    return None


def queue_job(spec: dict, steps: int | None, timeout: float) -> dict:
    """One job through ``mmdemo.jobs.submit``, the dispatcher and a worker process, timed from submit to done."""
    from mmdemo import jobs
    from mmdemo.jobs.dispatcher import Dispatcher
    from mmdemo.jobs.queue import FINAL, get_queue

    home = Path(spec["work"]) / "home"
    os.environ["MMDEMO_HOME"] = str(home)
    os.environ["MMDEMO_DEVICE"] = spec["device"]
    queue = get_queue(home)
    dispatcher = Dispatcher(queue, slots=1).start()  # as in the app: a thread polling every 0.5 s
    config = _config(spec, steps)
    overrides = {k: getattr(config, k) for k in ("rank", "alpha", "batch_size", "epochs", "min_steps", "save_steps")}
    try:
        t0 = time.time()
        job = jobs.submit(spec["task"], spec["data"], owner="bench", preset="quick", model=spec["model"], queue=queue,
                          **overrides)
        submitted = time.time()
        peak = None
        deadline = time.monotonic() + timeout
        while job.state not in FINAL:
            if time.monotonic() > deadline:
                jobs.cancel(job.id, None, queue=queue)
                raise RuntimeError(f"the queued {spec['task']} job did not finish in {timeout:.0f} s")
            time.sleep(0.2)
            job = queue.get(job.id)
            peak = _vm_hwm_gib(job.pid) or peak
        done = time.time()
    finally:
        dispatcher.stop()
        for proc in dispatcher.children.values():  # the worker exits after recording the outcome
            proc.wait(timeout=120)
    if job.state != "succeeded":
        raise RuntimeError(f"the queued {spec['task']} job {job.state}: {job.error}\n{queue.log_tail(job.id)}")
    # the queue's own records (queued, starting) and the worker's progress, up to the recorded finish
    renamed = {"queued": "queue wait", "starting": "worker start"}
    events = [(e["time"], renamed.get(e["phase"], e["phase"])) for e in queue.events(job.id)
              if e.get("phase") and e["phase"] not in FINAL]
    phases = {"submit": submitted - t0, **phase_times(events, job.finished)}
    metrics = job.result.get("trainer_metrics") or {}
    return {"wall": job.finished - t0, "seen_done": done - t0, "phases": phases,
            "steps": int(metrics.get("global_step") or job.result["training"]["steps_done"]),
            "train_runtime": float(metrics.get("train_runtime") or phases["training"]), "worker_peak_rss_gib": peak}


# -------------------------------------------------------------------------------------------------- report
def _spread(xs: list[float], unit: str, digits: int = 2) -> str:
    med = statistics.median(xs)
    if len(xs) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _phase(runs: list[dict], name: str) -> float:
    return statistics.median(r["phases"].get(name, 0.0) for r in runs)


def task_rows(task: str, project: list[dict], plain: list[dict], job: dict | None, quick_steps: int,
              spec: dict) -> tuple[list[dict], dict]:
    batch = spec["batch"]
    ours_sps = [r["steps"] * batch / r["train_runtime"] for r in project]
    base_sps = [r["steps"] * batch / r["train_runtime"] for r in plain]
    gpu = spec["device"].startswith("cuda")
    mem_key, mem_name = ("peak_gpu_gib", "peak GPU memory allocated") if gpu else ("peak_rss_gib", "peak RSS")
    ours_mem, base_mem = _med(project, mem_key), _med(plain, mem_key)
    ratio = statistics.median(ours_sps) / statistics.median(base_sps)
    steps = project[0]["steps"]
    rows = [
        {"measure": f"{task}: training, samples/s ({steps} steps x {len(project)} runs, median (min-max))",
         "baseline": _spread(base_sps, "samples/s"), "ours": _spread(ours_sps, "samples/s"),
         "ratio": f"{ratio:.2f}x", "target": ">= 1.00x"},
        {"measure": f"{task}: {mem_name}, whole run", "baseline": f"{base_mem:.2f} GiB", "ours": f"{ours_mem:.2f} GiB",
         "ratio": f"{base_mem / ours_mem:.2f}x", "target": ""},
        {"measure": f"{task}: loading the model", "baseline": fmt(_med(plain, "load"), "s"),
         "ours": fmt(_med(project, "load"), "s"), "ratio": f"{_med(plain, 'load') / _med(project, 'load'):.2f}x",
         "target": ""},
        {"measure": f"{task}: validating {spec['train'] + spec['test']} + preprocessing {spec['train']} examples "
                    f"(baseline: in each step)", "baseline": "-", "ours": fmt(_phase(project, "validating"), "s") + " + "
         + fmt(_phase(project, "preprocessing"), "s"), "ratio": "-", "target": ""},
        {"measure": f"{task}: held-out evaluation, base + adapter, {spec['test']} examples", "baseline": "-",
         "ours": fmt(_phase(project, EVAL_NAMES[1]), "s") + " + " + fmt(_phase(project, EVAL_NAMES[2]), "s"),
         "ratio": "-", "target": ""},
        {"measure": f"{task}: saving the adapter", "baseline": fmt(_med(plain, "save"), "s"),
         "ours": fmt(_med(project, "save"), "s"), "ratio": f"{_med(plain, 'save') / _med(project, 'save'):.2f}x",
         "target": ""},
    ]
    summary = {"train_samples_per_s": {"ours": ours_sps, "baseline": base_sps}}
    if job is None:
        return rows, summary
    per_step = statistics.median(r["train_runtime"] / r["steps"] for r in project)
    fixed = job["wall"] - job["train_runtime"]
    measured = job["steps"] >= quick_steps
    quick_wall = job["wall"] if measured else fixed + quick_steps * per_step
    quick_fixed = quick_wall - (job["train_runtime"] if measured else quick_steps * per_step)
    share = quick_fixed / quick_wall
    p = job["phases"]
    detail = ", ".join(f"{k} {fmt(v, 's')}" for k, v in p.items())
    rows += [
        {"measure": f"{task}: queued job, {job['steps']} steps, submit to done", "baseline": "-",
         "ours": f"{fmt(job['wall'], 's')}: {detail}", "ratio": "-", "target": ""},
        {"measure": f"{task}: Quick job ({quick_steps} steps), end to end, "
                    + ("measured" if measured else f"projected at {fmt(per_step, 's')}/step"),
         "baseline": "-", "ours": fmt(quick_wall, "s"), "ratio": "-", "target": ""},
        {"measure": f"{task}: fixed overhead share of the Quick job", "baseline": "-",
         "ours": f"{share:.0%} ({fmt(quick_fixed, 's')})", "ratio": "-", "target": "< 20%"},
    ]
    summary |= {"quick_job_s": quick_wall, "quick_job_measured": measured, "fixed_s": quick_fixed,
                "fixed_share": share, "per_step_s": per_step}
    return rows, summary


def profile_section(r: dict, spec: dict, env: dict, command: str) -> str:
    """The profile as a markdown section: the project's setting now against an alternative, per cost."""
    n, b = spec["test"], spec["batch"]
    vision = r["vision_forward_per_image_s"]
    rows = [
        (f"{n} held-out captions (3 beams)", f"one image per call: {fmt(r['eval_one_per_call_s'], 's')}",
         f"one call for all {n}: {fmt(r['eval_batched_s'], 's')}", r["eval_one_per_call_s"] / r["eval_batched_s"],
         "same captions" if r["same_captions_batched"] else "captions differ"),
        (f"{n} held-out captions with the LoRA", f"unmerged: {fmt(r['eval_lora_unmerged_s'], 's')}",
         f"merged: {fmt(r['eval_lora_merged_s'], 's')}", r["eval_lora_unmerged_s"] / r["eval_lora_merged_s"],
         "float rounding of W + BA"),
        (f"training step, batch {b}", f"targets query, value, qkv: {fmt(r['step_current_targets_s'], 's')}",
         f"targets {', '.join(r['text_only_targets'])}: {fmt(r['step_text_only_targets_s'], 's')}",
         r["step_current_targets_s"] / r["step_text_only_targets_s"], "no vision LoRA: trains something else"),
        (f"training step, batch {b}", f"targets query, value, qkv: {fmt(r['step_current_targets_s'], 's')}",
         f"text-only targets, vision outputs cached: {fmt(r['step_text_only_cached_vision_s'], 's')} "
         f"(+ {fmt(vision, 's')} per image, once)", r["step_current_targets_s"] / r["step_text_only_cached_vision_s"],
         "exact for text-only targets"),
        ("checkpoint (adapter + optimizer state)", f"{fmt(r['checkpoint_save_s'], 's')}, "
         f"{r['checkpoint_mib']:.1f} MiB; 10 per Quick job", "-", None, ""),
    ]
    lines = ["## finetune profile", "", f"Command: `{command}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "BLIP captioning, compute only (a plain torch loop, median after a warm-up): the project's setting "
             "now against an alternative.", "",
             "| cost | the project now | alternative | ratio | exact? |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {m} | {a} | {b_} | {'' if x is None else f'{x:.2f}x'} | {e} |" for m, a, b_, x, e in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="use the tiny checkpoints (smoke run)")
    p.add_argument("--quick", action="store_true", help="one run per side, two steps")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: MMDEMO_DEVICE, else the best)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: caption,retrieval")
    p.add_argument("--train", type=int, default=16, help="training examples in the synthetic dataset")
    p.add_argument("--test", type=int, default=None, help="held-out examples (default 4; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 20 on a GPU, else 2)")
    p.add_argument("--reps", type=int, default=None, help="runs per side (default: 5 on a GPU, else 2)")
    p.add_argument("--job-steps", type=int, default=None,
                   help="steps of the queued job (default: the whole Quick job on a GPU, else 2)")
    p.add_argument("--no-job", action="store_true", help="skip the job through the queue")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--profile", action="store_true",
                   help="instead: what BLIP training steps and held-out captions cost under other settings")
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in TASKS]:
        p.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    # Before torch loads OpenMP (children and the queue's worker inherit it): on a CPU shared with other work,
    # OpenMP threads spinning at every barrier make small ops 10-90x slower and timings meaningless (see
    # RESULTS.md). OMP_WAIT_POLICY=ACTIVE in the environment measures the library default instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from mmdemo.jobs.train import TrainConfig, training_plan
    from mmdemo.models.loading import pick_device

    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()

    device = pick_device(args.device)  # no CUDA context: children are spawned on CUDA, forked only on the CPU
    gpu = device.startswith("cuda")
    steps = args.steps or (2 if args.quick or not gpu else 20)
    reps = args.reps or (1 if args.quick else 5 if gpu else 2)
    job_steps = args.job_steps if args.job_steps else None if gpu and not args.quick else 2
    args.test = args.test or (2 if args.quick else 4)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cache = cache_dir()
    cmd = "python bench/finetune.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="mmdemo-bench-ft-") as tmp_name:
            tmp = Path(tmp_name)
            spec = {"task": "caption", "device": device, "tiny": args.tiny, "rank": args.rank, "alpha": args.alpha,
                    "batch": args.batch, "train": args.train, "test": args.test, "reps": reps, "work": str(tmp),
                    "data": str(write_dataset("caption", tmp / "data", max(args.train, args.batch), 2, args.tiny))}
            spec["model"] = in_child({**spec, "side": "build", "model": str(
                cache / ("tiny-caption" if args.tiny else FULL_NAMES["caption"]))})["model"]
            result = in_child({**spec, "side": "profile"})
        env = environment(device) | {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
                                     "load average (1/5/15 min) at start": load_start,
                                     "at end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        section = profile_section(result, spec, env, cmd)
        print(section)
        print(json.dumps({"bench": "finetune profile", "env": env, "profile": result}))
        if args.write:
            write_section("finetune profile", section)
        return 0
    all_rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="mmdemo-bench-ft-") as tmp_name:
        tmp = Path(tmp_name)
        for task in tasks:
            model = cache / (f"tiny-{task}" if args.tiny else FULL_NAMES[task])
            spec = {"task": task, "device": device, "tiny": args.tiny, "rank": args.rank, "alpha": args.alpha,
                    "batch": args.batch, "train": args.train, "test": args.test, "steps": steps,
                    "data": str(write_dataset(task, tmp / f"data-{task}", args.train, args.test, args.tiny))}
            # both sides train what finetune trains for this slice (at least one epoch)
            spec["steps"] = training_plan(_config(spec, steps), args.train)["steps"]
            spec["model"] = in_child({**spec, "side": "build", "model": str(model)})["model"]
            runs: dict[str, list[dict]] = {"project": [], "plain": []}
            for rep in range(reps):
                for side in ("project", "plain"):
                    work = tmp / f"{task}-{side}-{rep}"
                    result = in_child({**spec, "side": side, "work": str(work)})
                    shutil.rmtree(work, ignore_errors=True)
                    runs[side].append(result)
                    print(json.dumps({"task": task, "rep": rep, **result}, default=str), file=sys.stderr, flush=True)
            job = None
            if not args.no_job:
                job = queue_job({**spec, "work": str(tmp / f"{task}-queue")}, job_steps,
                                timeout=3600 if not args.tiny else 300)
                print(json.dumps({"task": task, "job": job}, default=str), file=sys.stderr, flush=True)
            quick = TrainConfig.from_preset("quick", rank=args.rank, alpha=args.alpha, batch_size=args.batch)
            rows, summary = task_rows(task, runs["project"], runs["plain"], job,
                                      training_plan(quick, args.train)["steps"], spec)
            all_rows += rows
            details[task] = {**summary, "runs": runs, "job": job}
    print(json.dumps({"detail": details}, default=str))
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env = environment(device) | {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
                                 "load average (1/5/15 min) at start": load_start, "at end": load_end,
                                 "bench wall time": fmt(time.perf_counter() - started, "s")}
    report("finetune" + (" (tiny smoke)" if args.tiny else ""), cmd, env, all_rows, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
