"""The CLAP family (``ClapModel``, e.g. ``laion/clap-htsat-unfused``): one space for texts and sounds.

Quirks (handled by :class:`mmdemo.models.retrieval.Embedder`, the audio search's embedder): the feature extractor
crops clips longer than its 10 s window at random (``rand_trunc``), so search cuts a long clip into consecutive
windows and averages their embeddings instead; the log-mel features are computed in torch
(:mod:`mmdemo.models.features`) when the checkpoint does not fuse windows. LoRA adapts both towers (RoBERTa text,
HTSAT audio), whose attention projections are both named ``query``/``value``; training uses CLAP's own symmetric
contrastive loss (``return_loss=True``).
"""

from __future__ import annotations

from pathlib import Path

from mmdemo.models.registry import Architecture

ARCHITECTURES = (
    Architecture("retrieval", "clap", "ClapModel", "ClapProcessor", ("query", "value"), "clap", "clap",
                 onednn_parts=("text_model", "text_projection"), int8_parts=("text_model", "text_projection")),
)


def prepare_retrieval(loaded, examples, seed: int = 0):
    """CLAP inputs for every 10 s window of every clip, as search embeds them; each batch draws one window per
    clip at random, so over the epochs training hears all of a long clip, not only its start."""
    import random

    from mmdemo.media import load_audio
    from mmdemo.models.batches import pad_ids
    from mmdemo.models.retrieval import Embedder

    emb = Embedder(loaded)  # same windowing and features as search
    tok = loaded.processor.tokenizer
    fe = loaded.processor.feature_extractor
    windows: list = []
    owner: list[int] = []
    for i, e in enumerate(examples):
        for w in emb.windows(load_audio(e.path, emb.sample_rate)):
            windows.append(w)
            owner.append(i)
    feats: list = []
    for start in range(0, len(windows), 16):
        chunk = windows[start:start + 16]
        if emb._features is not None:
            feats += list(emb._features(chunk).cpu())
        else:
            feats += list(fe(chunk, sampling_rate=emb.sample_rate, return_tensors="pt")["input_features"])
    per_clip: list[list] = [[] for _ in examples]
    for i, f in zip(owner, feats):
        per_clip[i].append(f)
    pad_id = tok.pad_token_id
    items = [{"windows": clip_feats, "input_ids": tok(e.text, truncation=True, max_length=64,
                                                      return_tensors="pt")["input_ids"][0]}
             for clip_feats, e in zip(per_clip, examples)]
    rng = random.Random(seed)

    def collate(batch: list[dict]) -> dict:
        import torch

        ids, mask = pad_ids([b["input_ids"] for b in batch], pad_id)
        chosen = [b["windows"][rng.randrange(len(b["windows"]))] for b in batch]
        return {"input_features": torch.stack(chosen), "input_ids": ids, "attention_mask": mask, "return_loss": True}

    return items, collate


def build_tiny(out: Path, arch: Architecture | None = None) -> None:
    """A tiny random CLAP in the Hub layout: a byte-level BPE (RoBERTa) tokenizer, a 2-layer text tower and a
    2-stage HTSAT audio tower, with laion/clap-htsat-unfused's feature extractor settings."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from mmdemo.models.tiny import bpe_tokenizer

    torch.manual_seed(0)
    tok = bpe_tokenizer("RobertaTokenizer")
    config = ClapConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        # spec_size 256 with 64 mel bins is what the 10 s, 1001-frame features of the real feature
        # extractor fold into; patches of 8 keep the Swin grid small (32x32).
        audio_config=dict(window_size=4, num_mel_bins=64, spec_size=256, patch_size=8, patch_stride=(8, 8),
                          hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                          projection_dim=32, num_hidden_layers=2),
        projection_dim=32,
    )
    model = ClapModel(config).eval()
    model.save_pretrained(out)
    # Same feature extractor settings as laion/clap-htsat-unfused (48 kHz, 10 s, rand_trunc + repeatpad).
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, padding="repeatpad", truncation="rand_trunc")
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
