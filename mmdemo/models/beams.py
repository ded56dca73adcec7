"""BLIP decoding with the image's cross-attention keys/values computed once per image and shared by its beams.

``BlipForConditionalGeneration.generate`` (and the VQA one) hands the image (or question) embeddings to
``text_decoder.generate``, which repeats them once per beam; the decoder's cross-attention layers then
project the same rows to keys/values once per beam at the first step, and beam search reorders (copies) the
whole cache, cross-attention part included, at every step, although beams never move between images. At
full size that part of the cache is 12 layers x 2 x beams x 577 x 768 floats: read at every step and copied
at every reorder, it costs about as much memory traffic as the decoder's weights.

Here the cross-attention keys/values are computed once per image before decoding and kept at one row per
image (:class:`SharedCrossCache`); only the self-attention part is reordered. The decoder's cross-attention
modules get a forward that, when handed that cache, multiplies each beam's queries by its image's keys
(one matrix product per beam, of the same shapes as plain decoding, so the floats, and the tokens, are
exactly those of plain ``generate``); with any other cache they run the transformers forward unchanged.
The forward calls the module's own ``query`` / ``key`` / ``value`` layers, so a peft LoRA adapter on them,
or quantized layers, apply as usual.

On the CPU the large fp32 matrices (feed-forward, LM head) are also multiplied in slices while decoding
(:func:`sliced_wide_layers`), which streams them faster and gives the same floats.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

_MARK = "_mmdemo_shared_cross"  # set on a cross-attention module once its forward is wrapped

# Large layers on the CPU: a decoding step multiplies a few rows (beams x images) by each weight matrix, reading it
# from memory. MKL streams the feed-forward (3,072 x 768, 768 x 3,072) and LM head (30,524 x 768) matrices 1.3-1.9x
# faster in slices of about SLICE_ELEMENTS (3 MB) than whole; each output is the same sum in the same order, so the
# floats do not change (tests/test_beams.py checks it on the machine that runs it). Not for one row (MKL's
# matrix-vector path is fast already) nor for many (the product is then bound by arithmetic, not memory).
SLICE_ELEMENTS = 768 * 1024
SLICE_MIN_WEIGHT = 1 << 20  # elements: the 768 x 768 attention matrices gain nothing
SLICE_ROWS = (2, 256)
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
                past_key_values=None, **kwargs):
        if encoder_hidden_states is None or not getattr(past_key_values, _MARK, False):
            return original(hidden_states, attention_mask=attention_mask,
                            encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values, **kwargs)
        return _shared_forward(module, hidden_states, encoder_attention_mask, past_key_values)

    module.forward = forward
    setattr(module, _MARK, True)


def _shared_forward(module, hidden_states, encoder_attention_mask, cache):
    """``BlipTextSelfAttention.forward`` for cross-attention, keys/values from ``cache`` at one row per image.

    Same operations in the same order as transformers 5.23's; the two products run once per beam with the
    shapes plain decoding gives them (a [1 x d] by [d x L] product per row and head): a single product over all
    beams at once would use another kernel whose sums round differently.
    """
    import torch

    layer = cache.cross_attention_cache.layers[module.layer_idx]
    keys, values = layer.keys, layer.values  # [images, heads, L, d]
    images = keys.shape[0]
    rows, length = hidden_states.shape[:2]
    if rows % images:
        raise ValueError(f"{rows} decoder rows do not split evenly over {images} images.")
    beams = rows // images
    d = module.attention_head_size
    query = module.query(hidden_states).view(rows, length, -1, d).transpose(1, 2)  # [rows, heads, q, d]
    heads = query.shape[1]
    per_image = query.view(images, beams, heads, length, d)
    keys_t = keys.transpose(-1, -2)
    scores = torch.stack([torch.matmul(per_image[:, b], keys_t) for b in range(beams)], dim=1)
    scores = scores.view(rows, heads, length, keys.shape[-2])
    scores = scores / math.sqrt(d)
    # transformers 5.23 hands BLIP's cross-attention no mask (BlipTextAttention does not pass it on); the image
    # mask is all ones anyway. Kept for a caller that passes one.
    if encoder_attention_mask is not None:
        scores = scores + encoder_attention_mask.to(scores.device)
    probs = torch.nn.Softmax(dim=-1)(scores)
    dropped = module.dropout(probs).view(images, beams, heads, length, -1)
    context = torch.stack([torch.matmul(dropped[:, b], values) for b in range(beams)], dim=1)
    context = context.view(rows, heads, length, d).permute(0, 2, 1, 3).contiguous()
    context = context.view(*context.shape[:-2], module.all_head_size)
    return context, probs


def _slice_outputs(module) -> int:
    """Output features per slice for ``module`` (0: not sliced)."""
    if module.weight.numel() < SLICE_MIN_WEIGHT:
        return 0
    rows = 1 << max(0, round(math.log2(SLICE_ELEMENTS / module.in_features)))
    return rows if rows < module.out_features else 0


def _sliced_forward(module, original, step: int, x):
    import torch

    rows = x.numel() // max(1, x.shape[-1])
    if not SLICE_ROWS[0] <= rows <= SLICE_ROWS[1]:
        return original(x)
    weight, bias = module.weight, module.bias
    parts = [torch.nn.functional.linear(x, weight[i:i + step], None if bias is None else bias[i:i + step])
             for i in range(0, module.out_features, step)]
    return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def sliced_wide_layers(model) -> Iterator[None]:
    """While inside, ``model``'s large fp32 ``nn.Linear`` layers on the CPU multiply few rows in slices (same floats).

    Only plain ``nn.Linear`` layers are touched (not peft's LoRA layers, nor quantized ones, which keep their own
    kernels); their forward is put back on the way out.
    """
    import torch

    patched = []
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32 and "forward" not in module.__dict__
                and (step := _slice_outputs(module))):
            original = module.forward
            module.forward = lambda x, m=module, f=original, n=step: _sliced_forward(m, f, n, x)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


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


def decoder_generate(text_decoder, input_ids, encoder_hidden_states, encoder_attention_mask, **generate_kwargs: Any):
    """``text_decoder.generate(input_ids=..., encoder_hidden_states=..., ...)`` with shared cross-attention keys.

    Returns the same token ids as the plain call; ``generate_kwargs`` go to it unchanged.
    """
    cache = shared_cache(text_decoder, encoder_hidden_states)
    with sliced_wide_layers(text_decoder):
        return text_decoder.generate(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                     encoder_attention_mask=encoder_attention_mask, past_key_values=cache,
                                     **generate_kwargs)


def encode_images(model, pixel_values):
    """``model.vision_model(pixel_values)[0]``; on the CPU ``VISION_CHUNK`` images at a time (same floats)."""
    import torch

    if pixel_values.device.type != "cpu" or pixel_values.shape[0] <= VISION_CHUNK:
        return model.vision_model(pixel_values=pixel_values)[0]
    return torch.cat([model.vision_model(pixel_values=pixel_values[i:i + VISION_CHUNK])[0]
                      for i in range(0, pixel_values.shape[0], VISION_CHUNK)])


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
    with sliced_wide_layers(model.text_encoder):
        question_embeds = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                             return_dict=False)[0]
    question_mask = torch.ones(question_embeds.shape[:-1], dtype=torch.long, device=question_embeds.device)
    bos = torch.full((question_embeds.shape[0], 1), model.decoder_start_token_id, device=question_embeds.device)
    cfg = model.config.text_config
    return decoder_generate(model.text_decoder, bos, question_embeds, question_mask,
                            eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id, **generate_kwargs)
