"""Faster CPU kernels for inference on the same fp32 weights: the matrix products of ``nn.Linear`` through oneDNN,
and those of a few rows through a small compiled kernel.

The CPU ``addmm`` that ``nn.Linear`` calls (MKL in the torch CPU wheel) multiplies the few rows of a decoding step
or a short text query slowly on the 2-vCPU AMD EPYC machines here: the 96 matrices of one BLIP decoding step
(3 beams) took 110 ms through ``addmm`` and 65 ms through oneDNN's ``_linear_pointwise`` on the very same weight
tensors (no copy, no prepacking). For the hundreds of rows of a vision encoder it gains nothing, so only the parts
named in the registry (``Architecture.onednn_parts``) use it. oneDNN sums in another order, so results differ
from ``addmm`` by float rounding (about 1e-6 relative); the parity tests check that captions and answers stay
token-identical to plain ``generate`` and text embeddings within 1e-4 cosine.

A product of at most ``SMALL_ROWS`` input rows (a decoding step's beams) is memory-bound: each weight is read
once per step for a handful of dot products. oneDNN's and MKL's kernels stream the weights at 4-6 GB/s there on
these machines (one thread, 3 rows; a plain sum over the same bytes runs at 15 GB/s). :func:`small_rows_linear`,
compiled by numba (which librosa already brings), reads each weight row once and multiplies it with every input
row while the row is in the cache: 9-13 GB/s on one thread for 1-8 rows (``bench/caption.py`` measures the BLIP
decoder's layers both ways). It sums each dot product in vector lanes, so it too differs from ``addmm`` by float
rounding only. Without numba the oneDNN path stays.

Only plain ``nn.Linear`` modules are touched, never peft's LoRA layers (they call the base layer, which then runs
here) nor quantized ones (other types, other kernels). Anything not inference in fp32 on the CPU (a GPU, another
dtype, training with gradients) takes ``torch.nn.functional.linear`` as before.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

_MARK = "_mmdemo_onednn"  # set on a model once its linears are patched (True) or found unusable (False)
# Smaller weights keep torch's kernel: oneDNN's fixed cost per call is larger (a tiny test BLIP, 32 x 64 matrices,
# decodes 26% slower through it), and there is no memory traffic to save.
ONEDNN_MIN_WEIGHT = 1 << 18
# Inputs of this many rows or more keep torch's kernel too: for the 577 image tokens that BLIP's text encoder (VQA)
# and the decoder's cross-attention keys/values project, MKL's addmm is faster than oneDNN (18 linears of 577 rows:
# 330 ms against 434 ms here; the VQA question encoder 1.11x faster); oneDNN wins up to a few hundred rows.
ONEDNN_MAX_ROWS = 512


# Inputs of at most this many rows (all leading dimensions together) take the compiled small-rows kernel: above it,
# each weight row is reused for so many dot products that oneDNN's blocked kernel is as fast or faster.
SMALL_ROWS = 8


def _small_rows_loop(x, w, b, out):  # pragma: no cover - compiled by numba (small_rows_kernel); plain Python is slow
    """``out[r, j] = x[r] . w[j] + b[j]`` reading each row of ``w`` once, for four input rows at a time."""
    rows, inner = x.shape
    for j in range(w.shape[0]):
        wj = w[j]
        bj = b[j] if b.shape[0] else np.float32(0.0)
        r = 0
        while r + 4 <= rows:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            for k in range(inner):
                wk = wj[k]
                a0 += x0[k] * wk
                a1 += x1[k] * wk
                a2 += x2[k] * wk
                a3 += x3[k] * wk
            out[r, j] = a0 + bj
            out[r + 1, j] = a1 + bj
            out[r + 2, j] = a2 + bj
            out[r + 3, j] = a3 + bj
            r += 4
        left = rows - r
        if left == 3:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            x0, x1, x2 = x[r], x[r + 1], x[r + 2]
            for k in range(inner):
                wk = wj[k]
                a0 += x0[k] * wk
                a1 += x1[k] * wk
                a2 += x2[k] * wk
            out[r, j] = a0 + bj
            out[r + 1, j] = a1 + bj
            out[r + 2, j] = a2 + bj
        elif left == 2:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            x0, x1 = x[r], x[r + 1]
            for k in range(inner):
                wk = wj[k]
                a0 += x0[k] * wk
                a1 += x1[k] * wk
            out[r, j] = a0 + bj
            out[r + 1, j] = a1 + bj
        elif left == 1:
            a0 = np.float32(0.0)
            x0 = x[r]
            for k in range(inner):
                a0 += x0[k] * wj[k]
            out[r, j] = a0 + bj


_NO_BIAS = np.zeros(0, dtype=np.float32)


# The one signature the kernel is compiled for (C-contiguous float32 arrays), when the model loads: no other is ever
# compiled, so no request waits for numba.
_SIGNATURE = "void(float32[:, ::1], float32[:, ::1], float32[::1], float32[:, ::1])"


@functools.cache
def small_rows_kernel():
    """:func:`_small_rows_loop` compiled by numba (cached on disk by numba), or None without a working numba."""
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: few-row products keep oneDNN's kernel.")
        return None
    try:
        # reassoc: each dot product sums in vector lanes; contract: fused multiply-adds. No other fast-math flag:
        # NaN and infinity behave as in torch.
        kernel = numba.njit(_SIGNATURE, fastmath={"reassoc", "contract"}, nogil=True, cache=True,
                            boundscheck=False)(_small_rows_loop)
        out = np.empty((5, 2), dtype=np.float32)
        kernel(np.ones((5, 3), dtype=np.float32), np.ones((2, 3), dtype=np.float32), np.ones(2, dtype=np.float32), out)
        if not np.all(out == 4.0):
            raise RuntimeError(f"it computed {out.tolist()}, not 4.0 everywhere")
    except Exception as err:  # a numba that cannot compile here: keep oneDNN
        log.warning("The small-rows kernel is unavailable (%s): few-row products keep oneDNN's kernel.", err)
        return None
    return kernel


def small_rows_linear(x, weight, bias):
    """``F.linear(x, weight, bias)`` by the compiled kernel for float32 CPU tensors (meant for at most ``SMALL_ROWS``
    rows); None when it cannot run (no numba, shapes or layouts it does not take), so the caller takes another kernel."""
    import torch

    kernel = small_rows_kernel()
    if (kernel is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous()
            or x.shape[-1] != weight.shape[1]
            or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                                      or bias.shape != (weight.shape[0],) or not bias.is_contiguous()))):
        return None
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty((flat.shape[0], weight.shape[0]), dtype=torch.float32)
    kernel(flat.detach().numpy(), weight.detach().numpy(), _NO_BIAS if bias is None else bias.detach().numpy(),
           out.numpy())
    return out.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def onednn_usable() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_forward(self, x):
    """``nn.Linear.forward`` for fp32 CPU inference with a weight of at least ``ONEDNN_MIN_WEIGHT`` elements: at most
    ``SMALL_ROWS`` input rows through :func:`small_rows_linear`, fewer than ``ONEDNN_MAX_ROWS`` through oneDNN; else
    (and for anything else) the usual ``F.linear``."""
    import torch

    if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu" and not torch.is_grad_enabled()
            and self.weight.numel() >= ONEDNN_MIN_WEIGHT and x.numel() < ONEDNN_MAX_ROWS * x.shape[-1]):
        if x.numel() <= SMALL_ROWS * x.shape[-1]:
            out = small_rows_linear(x, self.weight, self.bias)
            if out is not None:
                return out
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
    return torch.nn.functional.linear(x, self.weight, self.bias)


def onednn_linears(model, parts: tuple[str, ...] = ()) -> bool:
    """Run ``model``'s plain ``nn.Linear`` layers (only those under the submodules named in ``parts``, when given)
    through :func:`onednn_forward`. Once per model and ``parts``; returns whether the oneDNN path is in place."""
    import torch

    key = f"{_MARK}:{','.join(parts)}"
    if getattr(model, key, None) is not None:
        return getattr(model, key)
    first = next(model.parameters(), None)
    usable = onednn_usable() and first is not None and first.dtype == torch.float32 and first.device.type == "cpu"
    if usable:
        roots = [getattr(model, name, None) for name in parts] if parts else [model]
        for root in filter(None, roots):
            for module in root.modules():
                if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                    module.forward = onednn_forward.__get__(module)
        small_rows_kernel()  # compiled (or loaded from numba's cache) while the model loads, not in a request
    setattr(model, key, usable)
    return usable
