"""The CPU kernels behind the inference Linear layers (mmdemo.models.kernels): the compiled small-rows kernel gives
``F.linear``'s numbers to float rounding, declines what it cannot take, and ``onednn_forward`` sends each input to
the kernel its row count calls for. Token parity of whole decodes through it: tests/test_beams.py."""

from __future__ import annotations

import pytest
import torch

from mmdemo.models import kernels
from mmdemo.models.kernels import onednn_forward, onednn_usable, small_rows_kernel, small_rows_linear


def test_small_rows_kernel_compiles_here():
    """numba comes with librosa (requirements.txt): the app's few-row products must not silently fall back."""
    assert small_rows_kernel() is not None


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_small_rows_linear_matches_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(301, 97, bias=bias)  # an inner size that is no multiple of the vector width
    x = torch.randn(rows, 301)
    with torch.inference_mode():
        got = small_rows_linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_small_rows_linear_keeps_leading_dimensions_and_reads_strided_inputs():
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(64, 3).t().unsqueeze(1)  # [3, 1, 64], not contiguous
    assert not x.is_contiguous()
    with torch.inference_mode():
        got = small_rows_linear(x, layer.weight, layer.bias)
        assert got.shape == (3, 1, 48)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


def test_small_rows_linear_declines_what_it_cannot_take():
    """None (so the caller takes another kernel, which raises torch's own errors) for anything but contiguous float32
    CPU weights whose inner size matches the input's: the compiled loop does no bounds checks."""
    layer = torch.nn.Linear(16, 8)
    with torch.inference_mode():
        assert small_rows_linear(torch.randn(2, 15), layer.weight, layer.bias) is None  # wrong inner size
        assert small_rows_linear(torch.randn(2, 8), layer.weight.t(), None) is None  # a strided weight
        assert small_rows_linear(torch.randn(2, 16, dtype=torch.float64), layer.weight, layer.bias) is None
        assert small_rows_linear(torch.randn(2, 16), layer.weight, torch.zeros(9)) is None  # wrong bias size
        assert small_rows_linear(torch.randn(2, 16), layer.weight, torch.zeros(16)[::2]) is None  # strided bias
        with pytest.raises(RuntimeError):  # and the layer itself still says what is wrong
            onednn_forward(layer, torch.randn(2, 15))


def test_without_numba_few_rows_take_onednn(monkeypatch):
    monkeypatch.setattr(kernels, "small_rows_kernel", lambda: None)
    layer = torch.nn.Linear(512, 512).eval()  # 262k elements: ONEDNN_MIN_WEIGHT
    x = torch.randn(3, 512)
    with torch.inference_mode():
        assert small_rows_linear(x, layer.weight, layer.bias) is None
        torch.testing.assert_close(onednn_forward(layer, x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_usable(), reason="this torch build has no oneDNN")
def test_onednn_forward_sends_each_input_to_its_kernel(small_rows_calls):
    """Up to SMALL_ROWS rows: the small-rows kernel; more, below ONEDNN_MAX_ROWS: oneDNN; with gradients on (training):
    torch's own F.linear, bit for bit, and the gradient flows."""
    layer = torch.nn.Linear(768, 512).eval()
    with torch.inference_mode():
        for rows in (1, 3, kernels.SMALL_ROWS, kernels.SMALL_ROWS + 1, 64):
            x = torch.randn(1, rows, 768)
            torch.testing.assert_close(onednn_forward(layer, x), layer(x), rtol=1e-5, atol=1e-5)
    assert small_rows_calls == [1, 3, kernels.SMALL_ROWS]
    x = torch.randn(3, 768, requires_grad=True)
    y = onednn_forward(layer, x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert x.grad is not None and small_rows_calls == [1, 3, kernels.SMALL_ROWS]
