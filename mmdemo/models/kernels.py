"""Faster CPU kernels for inference on the same fp32 weights: the matrix products of ``nn.Linear`` through oneDNN.

The CPU ``addmm`` that ``nn.Linear`` calls (MKL in the torch CPU wheel) multiplies the few rows of a decoding step
or a short text query slowly on the 2-vCPU AMD EPYC machines here: the 96 matrices of one BLIP decoding step
(3 beams) took 110 ms through ``addmm`` and 65 ms through oneDNN's ``_linear_pointwise`` on the very same weight
tensors (no copy, no prepacking). For the hundreds of rows of a vision encoder it gains nothing, so only the parts
named in the registry (``Architecture.onednn_parts``) use it. oneDNN sums in another order, so results differ
from ``addmm`` by float rounding (about 1e-6 relative); the parity tests check that captions and answers stay
token-identical to plain ``generate`` and text embeddings within 1e-4 cosine.

Only plain ``nn.Linear`` modules are touched, never peft's LoRA layers (they call the base layer, which then runs
here) nor quantized ones (other types, other kernels). Anything not inference in fp32 on the CPU (a GPU, another
dtype, training with gradients) takes ``torch.nn.functional.linear`` as before.
"""

from __future__ import annotations

import functools

_MARK = "_mmdemo_onednn"  # set on a model once its linears are patched (True) or found unusable (False)
# Smaller weights keep torch's kernel: oneDNN's fixed cost per call is larger (a tiny test BLIP, 32 x 64 matrices,
# decodes 26% slower through it), and there is no memory traffic to save.
ONEDNN_MIN_WEIGHT = 1 << 18
# Inputs of this many rows or more keep torch's kernel too: for the 577 image tokens that BLIP's text encoder (VQA)
# and the decoder's cross-attention keys/values project, MKL's addmm is faster than oneDNN (18 linears of 577 rows:
# 330 ms against 434 ms here; the VQA question encoder 1.11x faster); oneDNN wins up to a few hundred rows.
ONEDNN_MAX_ROWS = 512


@functools.cache
def onednn_usable() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_forward(self, x):
    """``nn.Linear.forward`` through oneDNN for fp32 CPU inference with a weight of at least ``ONEDNN_MIN_WEIGHT``
    elements and fewer than ``ONEDNN_MAX_ROWS`` input rows, else the usual ``F.linear``."""
    import torch

    if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu" and not torch.is_grad_enabled()
            and self.weight.numel() >= ONEDNN_MIN_WEIGHT and x.numel() < ONEDNN_MAX_ROWS * x.shape[-1]):
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
    setattr(model, key, usable)
    return usable
