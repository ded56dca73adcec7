"""CLAP log-mel features computed with torch (on the model's device), matching ``ClapFeatureExtractor``.

The feature extractor runs in NumPy on the CPU at about 27 ten-second clips/s a core, far below what a
GPU embeds; indexing is bound by it. This computes the same features ("repeatpad" padding, Hann-window
STFT, power spectrum, Slaney mel filters, dB) as one batched torch op, on the GPU when there is one.
Only clips up to the model's window are accepted: longer ones are cut into windows by the caller, as
``rand_trunc`` would otherwise take a random crop. Agreement with the NumPy extractor is tested: in
float32, within 1e-3 dB for mel bins within 70 dB of the clip's loudest and 0.2 dB below that (float32
rounding of the STFT); in float64, within 1e-3 dB everywhere (tests/test_features.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TorchClapFeatures:
    def __init__(self, feature_extractor, device: str = "cpu", dtype=None):
        import torch

        # float32 runs about 2x faster than NumPy even on one CPU core, and far faster on a GPU.
        self.dtype = dtype or torch.float32
        fe = feature_extractor
        if getattr(fe, "truncation", "rand_trunc") == "fusion":
            raise ValueError("fused CLAP checkpoints need the fusion features; use the NumPy extractor")
        self.device = device
        self.max_length = int(fe.nb_max_samples)
        self.n_fft = int(fe.fft_window_size)
        self.hop = int(fe.hop_length)
        self.padding = fe.padding
        self.window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).to(device, self.dtype)
        self.mel = torch.from_numpy(np.asarray(fe.mel_filters_slaney, dtype=np.float64)).to(device, self.dtype)

    def pad(self, wave: np.ndarray) -> np.ndarray:
        """The extractor's padding: repeat the clip whole as often as it fits, then zeros."""
        wave = np.asarray(wave, dtype=np.float64)
        if len(wave) > self.max_length:
            raise ValueError(f"clip of {len(wave)} samples is longer than the window of {self.max_length}")
        if len(wave) < self.max_length:
            if self.padding == "repeatpad":
                wave = np.tile(wave, self.max_length // len(wave))
            elif self.padding == "repeat":
                wave = np.tile(wave, self.max_length // len(wave) + 1)[: self.max_length]
            wave = np.pad(wave, (0, self.max_length - len(wave)))
        return wave

    def __call__(self, waves: Sequence[np.ndarray]):
        """(batch, 1, frames, mels) float32 features, as ``input_features`` of the extractor."""
        import torch

        batch = torch.from_numpy(np.stack([self.pad(w) for w in waves])).to(self.device, self.dtype)
        spec = torch.stft(batch, n_fft=self.n_fft, hop_length=self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (batch, freq, frames)
        mel = torch.clamp(torch.matmul(power.transpose(1, 2), self.mel), min=1e-10)
        return (10.0 * torch.log10(mel)).to(torch.float32).unsqueeze(1)
