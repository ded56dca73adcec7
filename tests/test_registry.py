"""The code's shape: one module per task and one per model family, registered in one place, and one-way layers.

These are static checks (the modules are imported or parsed, no model is loaded), so they are fast; what the
modules do is tested elsewhere.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from mmdemo.models import registry
from mmdemo.models.registry import ARCHITECTURES, FAMILY_MODULES, TASK_MODULES, TASKS, family_module, task_module

ROOT = Path(__file__).resolve().parents[1] / "mmdemo"

# what a task asks of the family modules that serve it, beside prepare_<task> (every task here is fine-tunable)
FAMILY_HOOKS = {"caption": ("caption_batch", "check_prompt", "task_prompt"), "vqa": ("answer_batch",),
                "retrieval": (), "image_search": ("text_inputs", "image_inputs")}


def test_every_task_module_has_its_spec_inference_training_and_scoring():
    assert list(TASKS) == ["caption", "vqa", "retrieval", "image_search"]
    for name in TASK_MODULES:
        module = importlib.import_module(f"mmdemo.models.{name}")
        spec = module.SPEC
        assert TASKS[spec.name] is spec and task_module(spec.name) is module
        for part in ("prepare", "evaluate", "verdict", "fitted_decoding"):
            assert callable(getattr(module, part)), f"{name}.{part}"
        assert spec.columns and spec.data_help and spec.metrics and spec.modality in ("image", "audio")
        assert spec.examples in ("shapes", "shape questions", "sounds")
        assert any(a.tiny_name == spec.tiny for a in ARCHITECTURES.values() if a.task == spec.name)


def test_every_architecture_comes_from_its_family_module_which_serves_its_task():
    seen = set()
    for (task, _model_type), arch in ARCHITECTURES.items():
        module = family_module(arch)
        assert module.__name__ == f"mmdemo.models.{arch.family}" and arch.family in FAMILY_MODULES
        assert arch in module.ARCHITECTURES and task in TASKS
        for hook in (f"prepare_{task}", *FAMILY_HOOKS[task]):
            assert callable(getattr(module, hook, None)), f"{arch.family} lacks {hook} for {task}"
        assert callable(module.build_tiny)
        seen.add(arch.family)
    assert seen == set(FAMILY_MODULES)


def test_an_unknown_task_or_model_type_is_a_sentence():
    with pytest.raises(Exception, match="Unknown task 'ocr'; choose one of caption, vqa, retrieval, image_search"):
        task_module("ocr")
    with pytest.raises(Exception, match="'gpt2' model, which mmdemo does not support for caption; use a blip"):
        registry.get_architecture("caption", "gpt2")


def _modules(*parts: str) -> list[Path]:
    return [p for part in parts for p in sorted((ROOT / part).glob("*.py") if (ROOT / part).is_dir()
                                                 else [ROOT / part])]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_point_one_way():
    """ui -> jobs, models -> media, config: the model and job layers never import gradio or the UI, the model
    layer never imports the job layer, and the bottom layer imports neither."""
    for path in _modules("models", "jobs", "data.py", "metrics.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] == "gradio" or n.startswith("mmdemo.ui")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in _modules("models"):
        bad = {n for n in _imports(path) if n.startswith(("mmdemo.jobs", "mmdemo.data"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in _modules("config.py", "media.py", "archive.py", "errors.py", "metrics.py"):
        bad = {n for n in _imports(path) if n.startswith(("mmdemo.models", "mmdemo.jobs", "mmdemo.ui"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_what_is_task_specific_lives_in_the_task_modules():
    """The job runner, the evaluation, the dataset checks and the shared model code name no task: they ask the
    task's module. (A string literal equal to a task's name is how such code used to branch.)"""
    shared = _modules("jobs", "data.py", "metrics.py", "models/loading.py", "models/generation.py", "models/hub.py",
                      "models/kernels.py", "models/fast.py", "models/batches.py", "models/tiny.py",
                      "ui/finetune.py")  # (registry.py names the task modules: that is its job)
    for path in shared:
        literals = {node.value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and node.value in TASKS}
        # the Fine-tune tab opens on the caption task, as the page's first tab; a dataset's "caption" column is
        # read as its "text" column
        allowed = {"caption"} if path.name in ("finetune.py", "data.py") else set()
        assert literals <= allowed, f"{path.relative_to(ROOT)} branches on the task names {literals - allowed}"
