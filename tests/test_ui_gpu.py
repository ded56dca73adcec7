"""ZeroGPU support: with a ``spaces`` package present, model functions are wrapped by ``spaces.GPU`` and
models load on the CPU in the main process; without it, functions are left as they are."""

from __future__ import annotations

import importlib
import sys
import types

import pytest


@pytest.fixture
def fake_spaces(monkeypatch):
    calls = []
    mod = types.ModuleType("spaces")

    def GPU(fn=None, duration=60):  # noqa: N802 - the real decorator's name
        def wrap(f):
            def inner(*a, **k):
                calls.append((f.__name__, duration))
                return f(*a, **k)

            return inner

        return wrap(fn) if fn is not None else wrap

    mod.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", mod)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    import mmdemo.ui.gpu as gpu

    yield importlib.reload(gpu), calls
    monkeypatch.delitem(sys.modules, "spaces")
    monkeypatch.delenv("SPACES_ZERO_GPU")
    importlib.reload(gpu)


def test_without_spaces_functions_are_unchanged():
    import mmdemo.ui.gpu as gpu

    if gpu.spaces is not None:
        pytest.skip("the spaces package is installed here")

    def f():
        return 1

    assert gpu.task(30)(f) is f and not gpu.ZERO_GPU


def test_with_spaces_model_functions_run_under_spaces_gpu(fake_spaces, tiny_models):
    gpu, calls = fake_spaces
    assert gpu.ZERO_GPU

    @gpu.task(duration=45)
    def work(checkpoint):
        return gpu.loaded("caption", checkpoint)

    loaded = work(tiny_models["caption"])
    assert calls == [("work", 45)]
    assert loaded.device == "cpu"  # no CUDA here; on a Space on_device moves it inside the GPU worker
    assert next(loaded.model.parameters()).device.type == "cpu"
