"""LoRA fine-tuning of a task's model: the one function both the job worker and ``python -m mmdemo finetune`` run.

:func:`finetune` goes through the phases validating -> loading model -> preprocessing -> evaluating (base)
-> training -> evaluating (adapter) -> saving, reporting each through ``progress`` (a callable taking a
:class:`Progress`). Training is the transformers ``Trainer`` on a ``peft`` LoRA model (targets from the
registry), with a ``TrainerCallback`` for progress, cancellation and checkpoints. Nothing here is task- or
model-specific: the task module's ``prepare`` (``mmdemo.models.<task>``) turns the dataset rows into training
inputs, built by the model's family module (captions and answers: the model's own language-modelling loss on the
reference tokens; the search tasks: CLAP's and SigLIP's own contrastive losses, ``return_loss=True``), and its
``evaluate`` scores the held-out rows.

Media are decoded and turned into model inputs once per job (pixel values, log-mel features) and kept
as tensors, not decoded again each epoch. bf16 on a CUDA GPU that has it (base weights in bf16, LoRA weights
in fp32 under autocast), fp32 elsewhere; a fixed seed. Checkpoints go to ``workdir/checkpoints`` every ~10%
of the run, so an interrupted job resumes from the last one; the adapter is written to a temporary folder
and renamed into place, with ``mmdemo.json`` and a model card.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mmdemo.data import DatasetReport, Example, load_dataset
from mmdemo.errors import InputError, JobError
from mmdemo.models.loading import ADAPTER_META, checkpoint_name, resolve_checkpoint
from mmdemo.models.registry import get_task, task_module

PHASES = ("validating", "loading model", "preprocessing", "evaluating", "training", "saving")


class JobCancelled(Exception):
    """Raised inside training when the user cancelled the job."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; presets are sized for 20-500 examples. Bad values are refused with a sentence."""

    preset: str = "quick"
    epochs: int = 5
    learning_rate: float = 3e-4
    rank: int = 8
    alpha: int = 16
    batch_size: int = 8
    min_steps: int = 60  # small datasets still get enough updates
    seed: int = 42
    save_steps: int | None = None  # default: about 10 checkpoints per run

    def __post_init__(self) -> None:
        whole = [("epochs", "Epochs", 1, 200), ("rank", "The LoRA rank", 1, 256), ("alpha", "The LoRA alpha", 1, 1024),
                 ("batch_size", "The batch size", 1, 256), ("min_steps", "The minimum number of steps", 0, 100_000)]
        for name, what, low, high in whole:
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))  # 5.0 from a number field is 5
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InputError(f"{what} must be a whole number from {low} to {high:,}, not {_shown(value)}.")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 0.1:
            raise InputError(f"The learning rate must be more than 0 and at most 0.1 (the presets use 0.0001 to "
                             f"0.0003), not {_shown(lr)}.")

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides: Any) -> TrainConfig:
        """A preset with some fields replaced; ``None`` overrides are ignored (empty advanced fields).

        A rank given without an alpha keeps the preset's alpha/rank ratio (quick: 16/8, so rank 16 gets alpha
        32): LoRA scales its update by alpha/rank, so changing the rank alone would change how fast it learns.
        """
        key = (preset or "quick").lower()
        if key not in PRESETS:
            raise InputError(f"Unknown preset {preset!r}; choose quick, balanced or thorough.")
        names = {f.name for f in fields(cls)}
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise InputError(f"Unknown training setting {unknown[0]!r}; use {', '.join(sorted(names - {'preset'}))}.")
        given = {k: v for k, v in overrides.items() if v is not None}
        base = PRESETS[key]
        if "rank" in given and "alpha" not in given and isinstance(given["rank"], (int, float)) \
                and not isinstance(given["rank"], bool):
            given["alpha"] = min(1024, max(1, round(given["rank"] * base.alpha / base.rank)))
        return cls(**{**asdict(base), **given})


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


PRESETS: dict[str, TrainConfig] = {
    "quick": TrainConfig("quick", epochs=5, learning_rate=3e-4, rank=8, alpha=16, batch_size=8, min_steps=60),
    "balanced": TrainConfig("balanced", epochs=10, learning_rate=2e-4, rank=16, alpha=32, batch_size=8, min_steps=150),
    "thorough": TrainConfig("thorough", epochs=20, learning_rate=1e-4, rank=32, alpha=64, batch_size=8,
                            min_steps=300),
}


def training_plan(config: TrainConfig, train_examples: int) -> dict:
    """How many steps and epochs a job trains: the one rule, used by training, the page and the model card.

    An epoch is one pass over the training examples in batches of ``batch_size``; a run trains
    ``epochs`` epochs but at least ``min_steps`` steps, so a small dataset gets more epochs than asked for.
    """
    per_epoch = max(1, math.ceil(train_examples / config.batch_size))
    asked = config.epochs * per_epoch
    steps = max(asked, config.min_steps)
    return {"steps": steps, "steps_per_epoch": per_epoch, "epochs": round(steps / per_epoch, 2),
            "epochs_requested": config.epochs, "min_steps": config.min_steps, "raised_by_min_steps": steps > asked,
            "train_examples": train_examples, "batch_size": config.batch_size}


@dataclass
class Progress:
    phase: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None  # seconds
    message: str = ""
    metrics: dict | None = None  # held-out scores, on the records that end an evaluation

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


ProgressFn = Callable[[Progress], None]


@dataclass
class Prepared:
    """Model inputs computed once per job, and the collator that batches them."""

    items: list[dict] = field(default_factory=list)
    collate: Callable[[list[dict]], dict] | None = None


# ----------------------------------------------------------------------------------------------- training
class _ListDataset:
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _callback(progress: ProgressFn, should_stop: Callable[[], bool] | None, first_step: list[int]):
    from transformers import TrainerCallback

    class JobCallback(TrainerCallback):
        """Progress with loss and ETA at every logged step; stops at once when the job is cancelled."""

        def __init__(self) -> None:
            self.start = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            first_step[0] = state.global_step
            self.start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            done = state.global_step - first_step[0]
            rate = (time.monotonic() - self.start) / max(done, 1)
            progress(Progress("training", state.global_step, state.max_steps, loss=round(float(logs["loss"]), 5),
                              eta=round(rate * (state.max_steps - state.global_step), 1)))

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop is not None and should_stop():
                raise JobCancelled()

    return JobCallback()


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was fully written; half-written ones (killed mid-save) are removed.

    The Trainer writes ``trainer_state.json`` last, so a folder without it was interrupted; resuming from
    it would fail, while the previous checkpoint (kept until the new one is complete) is intact.
    """
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
                   key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for p in found:
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)
    return str(complete[-1]) if complete else None


# The optimiser, weight decay and learning-rate schedule of a plain loop (``torch.optim.AdamW`` at its defaults and
# a constant rate): with the same seed the project's training computes the same loss at every step as
# bench/learning.py's hand-written loop (tests/test_learning.py), so it learns exactly as well.
OPTIMIZER = "adamw_torch"  # torch.optim.AdamW itself; the Trainer's default fused kernel rounds differently
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default
MAX_GRAD_NORM = 0.0  # no clipping, as the plain loop; the Trainer's 1.0 changed 3 of 720 steps of one bench seed
LORA_DROPOUT = 0.0  # peft's default; 0.05 cost a third of the held-out caption words in bench/learning.py
SCHEDULE_WORDS = "constant"


def schedule(steps: int) -> dict:
    """The learning-rate schedule as ``TrainingArguments`` fields: constant, as a plain loop trains.

    A linear decay from the first step (the Trainer's default) trains at half the learning rate on average; on
    the few hundred steps of a small dataset that learned markedly less than a plain constant-rate loop (0.36
    against 0.53 of the caption words in bench/learning.py). Warm-up then a decay over the last 20% of steps
    (warmup-stable-decay) did no better over 6 to 16 seeds; a constant rate makes the run the plain loop's.
    """
    return {"lr_scheduler_type": "constant"}


@contextlib.contextmanager
def frozen_batch_norm(model):
    """Batch-norm layers run as in inference while training (their stored statistics, which stay as they are).

    In training mode batch norm would update its running statistics (CLAP's audio tower normalises its
    spectrogram input so). Those are buffers, not LoRA weights: the saved adapter would not carry them, and the
    adapter loaded later would score differently from the model that was just trained and evaluated.
    """
    import torch

    def keep_eval(module, args):
        module.training = False

    hooks = [m.register_forward_pre_hook(keep_eval) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _train(loaded, prepared: Prepared, config: TrainConfig, workdir: Path, progress: ProgressFn,
           should_stop: Callable[[], bool] | None) -> tuple[Any, list[dict], int | None, dict]:
    """Train a LoRA on ``loaded.model`` in place.

    Returns the peft model, the loss log, the step it resumed from and the Trainer's metrics (runtime,
    samples/s).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=LORA_DROPOUT,
                      target_modules=list(loaded.arch.lora_targets))
    model = get_peft_model(loaded.model, lora)
    max_steps = training_plan(config, len(prepared.items))["steps"]
    save_steps = config.save_steps or max(1, max_steps // 10)
    out = workdir / "checkpoints"
    cuda = str(loaded.device).startswith("cuda")
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, **schedule(max_steps), weight_decay=WEIGHT_DECAY, optim=OPTIMIZER,
        max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="steps", save_steps=save_steps, save_total_limit=1,
        seed=config.seed, data_seed=config.seed, bf16=cuda and loaded.dtype == torch.bfloat16,
        use_cpu=not cuda and str(loaded.device) == "cpu", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, label_names=["labels"],
        save_only_model=False,
    )
    first_step = [0]
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(prepared.items),
                      data_collator=prepared.collate, callbacks=[_callback(progress, should_stop, first_step)])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout is the CLI's JSON lines; progress goes through JobCallback
    resume = _last_complete_checkpoint(out)
    resumed_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else None
    if resume:
        progress(Progress("training", resumed_step, max_steps, message=f"Resuming from the checkpoint at step "
                                                                          f"{resumed_step} of {max_steps}."))
    model.train()
    with frozen_batch_norm(model):
        output = trainer.train(resume_from_checkpoint=resume)
    model.eval()
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    metrics = {k: round(float(v), 4) for k, v in output.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = trainer.state.global_step
    return model, losses, resumed_step, metrics


# ------------------------------------------------------------------------------------------------ artifacts
SHOW_EXAMPLES = 20  # held-out examples kept with the adapter for the page's table (all are scored)


model_label = checkpoint_name  # a checkpoint as people read it: a Hub id, or a local folder's own name


def _card_metrics(meta: dict) -> str:
    from mmdemo.jobs.evaluate import METRICS

    rows = []
    for k, v in meta["metrics_after"].items():
        m = METRICS.get(k)  # shown x100, as on the page and in the papers
        before = meta["metrics_before"].get(k)
        rows.append(f"| {m.label} | {m.show(before)} | {m.show(v)} |" if m else f"| {k} | {before} | {v} |")
    return "\n".join(rows)


def model_card(meta: dict) -> str:
    """The adapter's README.md: what ran (steps and epochs actually trained), its scores, how to load it."""
    from mmdemo.jobs.evaluate import METRICS, verdict

    hp = meta["hyperparameters"]
    run = meta.get("training") or {}
    cls = meta["model_class"]  # from the registry entry the base model loaded through
    title = meta.get("name") or f"LoRA adapter for {meta['task']}"
    epochs = run.get("epochs", hp.get("epochs"))
    if run.get("raised_by_min_steps"):
        epochs_text = (f"{epochs:g} epochs ({hp['epochs']} were asked for; the {meta.get('preset') or 'chosen'} "
                       f"preset trains at least {hp['min_steps']} steps, so small datasets get more epochs)")
    else:
        epochs_text = f"{epochs:g} epochs"
    steps_text = f"{run['steps_done']} of {run['steps']} steps" if run.get("steps_done") is not None else \
        f"{run.get('steps', '?')} steps"
    comparison = meta.get("comparison")
    spec = get_task(meta["task"])
    in_mmdemo = (f"or in mmdemo: `python -m mmdemo {spec.cli_command} ... --adapter path/to/this/folder`."
                 if spec.cli_command else
                 f"or in mmdemo's {spec.title} tab (copy the folder into MMDEMO_HOME/adapters).")
    verdict_line = f"\n{verdict(meta['task'], comparison)}\n" if comparison else ""
    explained = "\n".join(f"- **{METRICS[k].label}**: {METRICS[k].meaning}" for k in meta["metrics_after"]
                          if k in METRICS)
    return f"""---
library_name: peft
base_model: {meta['base_model']}
tags: [lora, mmdemo, {meta['task']}]
---
# {title}

A LoRA adapter for {meta['task']} on {meta['base_model']}, fine-tuned with mmdemo on {meta['data']['train']} examples
({meta['data']['test']} held out for evaluation).

## Held-out metrics

| metric | base model | with this adapter |
| --- | --- | --- |
{_card_metrics(meta)}
{verdict_line}
{explained}

## What ran

- Trained {steps_text}: {epochs_text} over {run.get('train_examples', meta['data']['train'])} examples in batches of
  {hp['batch_size']} ({run.get('steps_per_epoch', '?')} steps per epoch).
- AdamW, learning rate {hp['learning_rate']:g} ({meta.get('schedule', SCHEDULE_WORDS)}), weight decay
  {meta.get('weight_decay', WEIGHT_DECAY):g}; LoRA rank {hp['rank']}, alpha
  {hp['alpha']}, dropout {meta.get('lora_dropout', LORA_DROPOUT):g}, seed {hp['seed']}; preset: {meta.get('preset') or 'none'}.
{_decoding_line(meta)}
- On {meta.get('device', '?')} ({meta.get('dtype', '?')}), in {meta.get('train_seconds', '?')} s in all.

## How to load it

```python
from peft import PeftModel
from transformers import {cls}

base = {cls}.from_pretrained("{meta['base_model']}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

{in_mmdemo}
"""


def _decoding_line(meta: dict) -> str:
    gen = meta.get("generation")
    if not gen:
        return ""
    return (f"- Held-out outputs decoded with {gen['num_beams']} beams and {gen['min_new_tokens']} to "
            f"{gen['max_new_tokens']} new tokens, fitted to the training texts' lengths (base model and adapter "
            f"alike); mmdemo decodes with the same lengths when this adapter is chosen.")


def _save(model, meta: dict, out: Path) -> None:
    """Write the adapter into ``out`` atomically: a temporary sibling folder, then one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    config_path = tmp / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    if adapter_config.get("base_model_name_or_path"):  # a local base folder is named, not located (no server path)
        adapter_config["base_model_name_or_path"] = model_label(adapter_config["base_model_name_or_path"])
        config_path.write_text(json.dumps(adapter_config, indent=2))
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    (tmp / "README.md").write_text(model_card(meta))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


RESULT_KEYS = ("metrics_before", "metrics_after", "examples", "training", "comparison", "name")


def finished_result(out: Path, job_id: str | None) -> dict | None:
    """The record of an adapter this job already wrote (a crash after saving loses nothing)."""
    meta_path = out / ADAPTER_META
    if job_id is None or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("job_id") != job_id:
        return None
    return {"adapter": str(out), **{k: meta.get(k) for k in RESULT_KEYS}, "examples": meta.get("examples", [])}


def finetune(
    task: str,
    data: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    config: TrainConfig | None = None,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    owner: str | None = None,
    job_id: str | None = None,
    name: str | None = None,
) -> dict:
    """Fine-tune a LoRA for ``task`` on the dataset ``data`` and write it to ``out``; return the final record.

    The record is ``{"adapter", "metrics_before", "metrics_after", "examples", "comparison", "training", "losses",
    "data", ...}``: ``training`` says what actually ran (steps, epochs after the minimum-steps rule), and
    ``comparison`` counts the held-out examples the adapter got closer to the reference than the base model.
    ``name`` is the adapter's display name (``mmdemo.json``; the folder keeps its own name). ``workdir``
    keeps the unpacked data, the base metrics and the checkpoints, so calling again with the same ``workdir``
    after an interruption resumes. Raises ``InputError`` for bad data, ``JobCancelled`` when ``should_stop``
    returns true, ``ModelLoadError`` for a missing checkpoint.
    """
    from mmdemo.jobs.evaluate import compare, evaluate
    from mmdemo.models.loading import _load_uncached, pick_device, pick_dtype

    progress = progress or (lambda p: None)
    config = config or TrainConfig.from_preset("quick")
    out = Path(out)
    done = finished_result(out, job_id)
    if done is not None:
        progress(Progress("saving", 1, 1, message="The adapter was already saved; nothing to redo."))
        return done
    workdir = Path(workdir) if workdir else out.parent / f".{out.name}.work"
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    progress(Progress("validating", message="Checking every file and row of the dataset."))
    report: DatasetReport = load_dataset(data, task, workdir)
    progress(Progress("validating", 1, 1, message=f"Dataset checked: {report.summary()}"))
    plan = training_plan(config, len(report.train))

    checkpoint = resolve_checkpoint(task, model)
    progress(Progress("loading model", message=f"Loading the base model {model_label(checkpoint)}."))
    device = pick_device(device)
    dtype = pick_dtype(device)
    import torch

    torch.manual_seed(config.seed)
    loaded = _load_uncached(task, checkpoint, device, dtype)  # a private copy: LoRA is injected into it

    progress(Progress("preprocessing", 0, report.examples,
                      message=f"Preparing {report.examples} examples for the model (decoding every file once)."))
    # the task module says what its batches are; the model's family module builds them
    prepared = Prepared(*task_module(task).prepare(loaded, report.train, seed=config.seed))
    progress(Progress("preprocessing", report.examples, report.examples))

    held_out = len(report.test)
    decoding = fitted_decoding(task, loaded, report.train)
    before_path = workdir / "metrics_before.json"
    if before_path.is_file():
        before, before_samples = json.loads(before_path.read_text()).values()
    else:
        progress(Progress("evaluating", 0, 2, message=f"Scoring the base model on the {held_out} held-out "
                                                      f"examples."))
        before, before_samples = evaluate(task, loaded, report.test, show=None, options=decoding)
        before_path.write_text(json.dumps({"metrics": before, "samples": before_samples}))
    progress(Progress("evaluating", 1, 2, message="Base model scored.", metrics=before))
    if should_stop is not None and should_stop():
        raise JobCancelled()

    progress(Progress("training", 0, plan["steps"], message=_plan_sentence(plan, config)))
    peft_model, losses, resumed, train_metrics = _train(loaded, prepared, config, workdir, progress, should_stop)
    steps_done = int(train_metrics.get("global_step", plan["steps"]))

    progress(Progress("evaluating", 1, 2, message=f"Scoring the fine-tuned model on the {held_out} held-out "
                                                  f"examples."))
    loaded.memo.clear()  # cached text embeddings belong to the base weights
    # the LoRA is active inside loaded.model
    after, after_samples = evaluate(task, loaded, report.test, show=None, options=decoding)
    progress(Progress("evaluating", 2, 2, message="Fine-tuned model scored.", metrics=after))

    label = name or out.name
    progress(Progress("saving", 0, 1, message=f"Saving the adapter “{label}”."))
    comparison = compare(task, before_samples, after_samples)
    examples = [{**{k: v for k, v in b.items() if k not in ("output", "score")}, "base": b["output"],
                 "adapter": a["output"]} for b, a in zip(before_samples, after_samples)][:SHOW_EXAMPLES]
    training = {**plan, "steps_done": steps_done, "resumed_from_step": resumed,
                "epochs_done": round(steps_done / plan["steps_per_epoch"], 2),
                "train_seconds": train_metrics.get("train_runtime")}
    meta = {
        "name": label, "task": task, "base_model": model_label(checkpoint), "model_class": loaded.arch.model_class,
        "owner": owner, "job_id": job_id, "preset": config.preset,
        "metrics_before": before, "metrics_after": after, "comparison": comparison, "examples": examples,
        "hyperparameters": {k: v for k, v in asdict(config).items() if k != "save_steps"},
        "training": training,
        "generation": asdict(decoding) if decoding is not None else None,
        "schedule": SCHEDULE_WORDS, "weight_decay": WEIGHT_DECAY, "lora_dropout": LORA_DROPOUT,
        "data": {"train": len(report.train), "test": len(report.test), "split": report.split},
        "device": device, "dtype": str(dtype).removeprefix("torch."), "created": time.time(),
        "train_seconds": round(time.monotonic() - t0, 1), "resumed_from_step": resumed,
        "trainer_metrics": train_metrics,
    }
    _save(peft_model, meta, out)
    progress(Progress("saving", 1, 1, message=f"Saved the adapter “{label}”."))
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # the adapter is safe; checkpoints are not needed
    return {"adapter": str(out), "name": label, "metrics_before": before, "metrics_after": after,
            "comparison": comparison, "examples": examples, "training": training, "losses": losses,
            "data": meta["data"], "resumed_from_step": resumed, "trainer_metrics": train_metrics}


def fitted_decoding(task: str, loaded, train: list[Example]):
    """Decoding options for the adapter, fitted to its training texts (the task module's ``fitted_decoding``).

    Written into ``mmdemo.json``; the held-out scores (base model and adapter alike), the tabs and the CLI use
    them for this adapter. ``None`` for the search tasks, which do not generate.
    """
    return task_module(task).fitted_decoding(loaded, train)


def _plan_sentence(plan: dict, config: TrainConfig) -> str:
    epochs = f"{plan['epochs']:g} {'epoch' if plan['epochs'] == 1 else 'epochs'}"
    why = (f"; {config.epochs} {'epoch was' if config.epochs == 1 else 'epochs were'} asked for, raised so that at "
           f"least {config.min_steps} steps run") if plan["raised_by_min_steps"] else ""
    return (f"Training {plan['steps']} steps: {epochs} over {plan['train_examples']} examples in batches of "
            f"{plan['batch_size']}{why}.")


def check_out_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not (out / "adapter_config.json").is_file() and any(out.iterdir()):
        raise JobError(f"{out} already exists and is not an adapter folder; choose an empty or new folder for --out.")
    return out
