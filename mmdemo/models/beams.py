"""BLIP decoding with the image's cross-attention keys/values computed once per image and shared by its beams.

``BlipForConditionalGeneration.generate`` (and the VQA one) hands the image (or question) embeddings to
``text_decoder.generate``, which repeats them once per beam; the decoder's cross-attention layers then
project the same rows to keys/values once per beam at the first step, and beam search reorders (copies) the
whole cache, cross-attention part included, at every step, although beams never move between images. At
full size that part of the cache is 12 layers x 2 x beams x 577 x 768 floats: read at every step and copied
at every reorder, it costs about as much memory traffic as the decoder's weights.

Here the cross-attention keys/values are computed once per image before decoding and kept at one row per
image (:class:`SharedCrossCache`); only the self-attention part is reordered. The decoder's cross-attention
modules get a forward that, when handed that cache, multiplies all the beams' queries of an image by its
keys in one product (the keys are read once per step, not once per beam); with any other cache they run the
transformers forward unchanged. The forward calls the module's own ``query`` / ``key`` / ``value`` layers, so
a peft LoRA adapter on them, or quantized layers, apply as usual. Sums may round differently from plain
decoding's; the tokens are plain ``generate``'s (tests/test_beams.py: 1, 3 and 5 beams, prefixes, batches,
adapters; bench/caption.py on the full-size model).

Two more pieces on the same terms (same tokens, floats to rounding): :func:`encode_images` runs the vision
encoder's attention as one fused ``scaled_dot_product_attention`` (1.25x faster vision encoder on the CPU), and
a decode of a few rows on the CPU runs on one thread (``DECODE_FEW_ROWS``, ``DECODE_THREADS``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading
from typing import Any

_MARK = "_mmdemo_shared_cross"  # set on a cross-attention module once its forward is wrapped


@functools.cache
def _cache_arg() -> str:
    """The keyword BLIP's text modules and ``generate`` take the cache by: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there and goes in 5.40), ``past_key_values`` before."""
    import inspect

    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    return "cache" if "cache" in inspect.signature(BlipTextSelfAttention.forward).parameters else "past_key_values"


# The vision encoder on the CPU runs VISION_CHUNK images at a time: for a batch of 16 its attention temporaries
# (16 x 12 x 577 x 577 floats) are above glibc's mmap threshold, so each is fresh memory faulted in page by page
# (~3 million page faults per batch); two at a time reuse the heap (same floats per image, ~13% faster).
VISION_CHUNK = 2


@functools.cache
def _cache_classes():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class SharedCrossCache(EncoderDecoderCache):
        """Self-attention keys/values per beam (reordered as usual); cross-attention ones per image (never copied)."""

        def reorder_cache(self, beam_idx) -> None:
            # A beam is only ever replaced by a beam of the same image: the per-image rows stay as they are.
            self.self_attention_cache.reorder_cache(beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("SharedCrossCache keeps one cross-attention row per image; no repeating.")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("SharedCrossCache keeps one cross-attention row per image; no selecting.")

    return DynamicCache, SharedCrossCache


def _cross_attentions(text_decoder) -> list:
    """The ``BlipTextSelfAttention`` modules of the decoder's cross-attention blocks, in layer order."""
    return [layer.crossattention.self for layer in text_decoder.bert.encoder.layer]


def _wrap(module) -> None:
    """Give ``module`` (a cross-attention ``BlipTextSelfAttention``) the shared-keys forward; idempotent."""
    if getattr(module, _MARK, False):
        return
    original = module.forward

    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        cache = kwargs.get(_cache_arg())
        if cache is None and _cache_arg() != "past_key_values":
            cache = kwargs.get("past_key_values")  # a caller still using the old name
        if encoder_hidden_states is None or not getattr(cache, _MARK, False):
            return original(hidden_states, attention_mask=attention_mask,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, **kwargs)
        return _shared_forward(module, hidden_states, encoder_attention_mask, cache)

    module.forward = forward
    setattr(module, _MARK, True)


def _shared_forward(module, hidden_states, encoder_attention_mask, cache):
    """``BlipTextSelfAttention.forward`` for cross-attention, keys/values from ``cache`` at one row per image.

    The operations of transformers 5.23-5.24's forward, except that each image's keys and values are multiplied
    by all its beams' queries in one product ([beams x d] by [d x L] per image and head) instead of one per beam
    row: each image's keys are read from memory once per step instead of once per beam. The sums may round
    differently from plain decoding's (float rounding, as oneDNN's do); tests/test_beams.py checks the tokens.
    """
    import torch

    layer = cache.cross_attention_cache.layers[module.layer_idx]
    keys, values = layer.keys, layer.values  # [images, heads, L, d]
    images, heads, keys_len, d = keys.shape
    rows, length = hidden_states.shape[:2]
    if rows % images:
        raise ValueError(f"{rows} decoder rows do not split evenly over {images} images.")
    beams = rows // images
    query = module.query(hidden_states).view(images, beams, length, heads, d)
    query = query.permute(0, 3, 1, 2, 4).reshape(images, heads, beams * length, d)  # each image's beams together
    scores = torch.matmul(query, keys.transpose(-1, -2))  # [images, heads, beams x q, L]
    scores = scores.view(images, heads, beams, length, keys_len).transpose(1, 2).reshape(rows, heads, length, -1)
    scores = scores / math.sqrt(d)
    # transformers 5.23 hands BLIP's cross-attention no mask (BlipTextAttention does not pass it on); the image
    # mask is all ones anyway. Kept for a caller that passes one.
    if encoder_attention_mask is not None:
        scores = scores + encoder_attention_mask.to(scores.device)
    probs = torch.nn.Softmax(dim=-1)(scores)
    dropped = module.dropout(probs).view(images, beams, heads, length, keys_len)
    dropped = dropped.transpose(1, 2).reshape(images, heads, beams * length, keys_len)
    context = torch.matmul(dropped, values)  # [images, heads, beams x q, d]
    context = context.view(images, heads, beams, length, d).permute(0, 2, 3, 1, 4)  # [images, beams, q, heads, d]
    context = context.reshape(rows, length, module.all_head_size)
    return context, probs


def shared_cache(text_decoder, encoder_hidden_states):
    """A cache holding each cross-attention layer's keys/values of ``encoder_hidden_states`` (one row per image)."""
    DynamicCache, SharedCrossCache = _cache_classes()
    cross = DynamicCache()
    rows, length = encoder_hidden_states.shape[:2]
    for module in _cross_attentions(text_decoder):
        _wrap(module)
        d = module.attention_head_size
        k = module.key(encoder_hidden_states).view(rows, length, -1, d).transpose(1, 2)
        v = module.value(encoder_hidden_states).view(rows, length, -1, d).transpose(1, 2)
        cross.update(k, v, module.layer_idx)
    cache = SharedCrossCache(DynamicCache(config=text_decoder.config), cross)
    setattr(cache, _MARK, True)
    return cache


# Decoding at most this many rows (images x beams) on the CPU runs on DECODE_THREADS torch threads. A step of a
# few rows is ~100 small matrix products, each a parallel region whose threads meet at its end: on the shared
# 2-vCPU machines here, where another process often holds one core, the second thread is the straggler of every
# region. One thread ran the decoding of a VQA answer (3 beams, 20 tokens) 1.05x faster at load 2.5 and 1.22x at
# load 3.8, the whole answer 1.05x (load 3.3) and 1.14x (load 4-10); the vision encoder and a batch's many rows
# keep every thread. DECODE_THREADS = 0 turns it off. With the small-rows kernel (mmdemo.models.kernels, one thread
# by itself) and on a quiet machine, one thread and two were even: 1.02x (bench/caption.py, the VQA rows).
DECODE_FEW_ROWS = 8
DECODE_THREADS = 1
_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 0


@contextlib.contextmanager
def _decode_threads(device_type: str, rows: int):
    """torch's thread count at ``DECODE_THREADS`` while decoding ``rows`` rows on the CPU (few rows only).

    The count is process-wide (MKL's is; OpenMP's per thread): nested and concurrent users share one setting,
    the first saves the count and the last puts it back."""
    global _threads_users, _threads_before
    import torch

    if device_type != "cpu" or rows > DECODE_FEW_ROWS or not DECODE_THREADS:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        _threads_users += 1
        if _threads_before > DECODE_THREADS:
            torch.set_num_threads(DECODE_THREADS)
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_before > DECODE_THREADS:
                torch.set_num_threads(_threads_before)


def decoder_generate(text_decoder, input_ids, encoder_hidden_states, encoder_attention_mask, **generate_kwargs: Any):
    """``text_decoder.generate(input_ids=..., encoder_hidden_states=..., ...)`` with shared cross-attention keys.

    Returns the same token ids as the plain call; ``generate_kwargs`` go to it unchanged.
    """
    cache = shared_cache(text_decoder, encoder_hidden_states)
    rows = input_ids.shape[0] * int(generate_kwargs.get("num_beams") or text_decoder.generation_config.num_beams or 1)
    with _decode_threads(input_ids.device.type, rows):
        return text_decoder.generate(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                     encoder_attention_mask=encoder_attention_mask, **{_cache_arg(): cache},
                                     **generate_kwargs)


_FUSED_ATTENTION = contextvars.ContextVar("mmdemo_vision_fused_attention", default=False)
_VISION_MARK = "_mmdemo_fused_attention"  # set on a vision attention module once its forward is wrapped


def _wrap_vision(model) -> None:
    """Give the vision encoder's attention modules (``BlipAttention``) a fused-attention forward; idempotent.

    It applies only while :func:`encode_images` runs (a context flag), never to attention weights asked for, nor
    to training with dropout: every other call (fine-tuning, ``output_attentions``) runs transformers' forward.
    """
    for layer in model.vision_model.encoder.layers:
        module = layer.self_attn
        if getattr(module, _VISION_MARK, False) or not hasattr(module, "qkv"):
            continue
        module.forward = functools.partial(_vision_forward, module, module.forward)
        setattr(module, _VISION_MARK, True)


def _vision_forward(module, original, hidden_states, *args, **kwargs):
    if (args or not _FUSED_ATTENTION.get() or kwargs.get("output_attentions")
            or (module.training and module.dropout.p > 0)):
        return original(hidden_states, *args, **kwargs)
    return _fused_attention(module, hidden_states), None


def _fused_attention(module, hidden_states):
    """``BlipAttention.forward`` (transformers 5.23-5.24) with softmax(q k^T * scale) v in one fused kernel.

    ``scaled_dot_product_attention`` instead of two matrix products, a scaling and a softmax over a materialised
    [heads x 577 x 577] matrix per image: 1.25x faster for the whole vision encoder on the CPU here (its flash
    kernel works in tiles that stay in cache). No attention probabilities (the caller only takes the hidden
    states). Sums round differently (2.7e-6 at most on the full-size BLIP-base's features); the tokens are
    plain ``generate``'s (tests/test_beams.py).
    """
    import torch

    bsz, length, dim = hidden_states.shape
    heads = module.num_heads
    qkv = module.qkv(hidden_states).reshape(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    context = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=module.scale)
    return module.projection(context.permute(0, 2, 1, 3).reshape(bsz, length, dim))


def encode_images(model, pixel_values):
    """``model.vision_model(pixel_values)[0]`` with fused attention (:func:`_fused_attention`, not for gradients);
    on the CPU ``VISION_CHUNK`` images at a time (same floats)."""
    import torch

    _wrap_vision(model)
    token = _FUSED_ATTENTION.set(not torch.is_grad_enabled())
    try:
        if pixel_values.device.type != "cpu" or pixel_values.shape[0] <= VISION_CHUNK:
            return model.vision_model(pixel_values=pixel_values)[0]
        return torch.cat([model.vision_model(pixel_values=pixel_values[i:i + VISION_CHUNK])[0]
                          for i in range(0, pixel_values.shape[0], VISION_CHUNK)])
    finally:
        _FUSED_ATTENTION.reset(token)


def caption_generate(model, pixel_values, input_ids=None, attention_mask=None, **generate_kwargs: Any):
    """``BlipForConditionalGeneration.generate`` (transformers 5.23) with shared cross-attention keys/values."""
    import torch

    image_embeds = encode_images(model, pixel_values)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    cfg = model.config.text_config
    if input_ids is None:
        input_ids = torch.tensor([[model.decoder_input_ids, cfg.eos_token_id]], device=image_embeds.device)
        input_ids = input_ids.repeat(image_embeds.shape[0], 1)
    else:
        input_ids = input_ids.clone()
    input_ids[:, 0] = cfg.bos_token_id
    attention_mask = attention_mask[:, :-1] if attention_mask is not None else None
    return decoder_generate(model.text_decoder, input_ids[:, :-1], image_embeds, image_mask,
                            eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
                            attention_mask=attention_mask, **generate_kwargs)


def answer_generate(model, image_embeds, input_ids, attention_mask, **generate_kwargs: Any):
    """``BlipForQuestionAnswering.generate`` from precomputed image embeddings, shared cross-attention keys."""
    import torch

    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    question_embeds = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                         encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                         return_dict=False)[0]
    question_mask = torch.ones(question_embeds.shape[:-1], dtype=torch.long, device=question_embeds.device)
    bos = torch.full((question_embeds.shape[0], 1), model.decoder_start_token_id, device=question_embeds.device)
    cfg = model.config.text_config
    return decoder_generate(model.text_decoder, bos, question_embeds, question_mask,
                            eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id, **generate_kwargs)
