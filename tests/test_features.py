"""Torch log-mel features agree with CLAP's NumPy feature extractor.

Stated tolerance: float64, 1e-3 dB everywhere; float32 (the default), 1e-3 dB for mel bins within 70 dB
of the clip's loudest bin and 0.2 dB below that, where float32 rounding of the STFT is the floor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdemo.models.features import TorchClapFeatures


@pytest.fixture(scope="module")
def extractor(tiny_models):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor.from_pretrained(tiny_models["retrieval"])


def clips():
    rng = np.random.default_rng(0)
    sr = 48000
    t = np.arange(sr * 10) / sr
    return {
        "noise 10 s": (0.1 * rng.standard_normal(sr * 10)).astype(np.float32),
        "tone 3 s": (0.5 * np.sin(2 * np.pi * 440 * t[: sr * 3])).astype(np.float32),
        "chirp 7.3 s": (0.3 * np.sin(2 * np.pi * (200 + 3000 * t[: int(sr * 7.3)]) * t[: int(sr * 7.3)])).astype(np.float32),
        "click 0.02 s": (0.01 * rng.standard_normal(960)).astype(np.float32),
        "silence 1 s": np.zeros(sr, np.float32),
        "full scale 10 s": np.sign(np.sin(2 * np.pi * 50 * t)).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_features_match_numpy(extractor, dtype):
    waves = clips()
    ref = extractor(list(waves.values()), sampling_rate=48000, return_tensors="pt")["input_features"]
    ours = TorchClapFeatures(extractor, dtype=dtype)(list(waves.values()))
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    for i, name in enumerate(waves):
        diff = (ours[i] - ref[i]).abs()
        loud = ref[i] > ref[i].max() - 70
        assert diff[loud].max().item() < 1e-3, f"{name}: {diff[loud].max().item()} dB"
        assert diff.max().item() < (1e-3 if dtype == torch.float64 else 0.2), f"{name}: {diff.max().item()} dB"


def test_longer_than_window_is_refused(extractor):
    with pytest.raises(ValueError, match="longer than the window"):
        TorchClapFeatures(extractor)([np.zeros(48000 * 11, np.float32)])
