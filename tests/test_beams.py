"""Decoding with the image's cross-attention keys/values once per image gives plain ``generate``'s tokens exactly.

mmdemo.models.beams computes the decoder's cross-attention keys/values once per image (not once per beam), never
copies them when beam search reorders its beams, and multiplies the large matrices in slices on the CPU; every
test here compares token ids with plain transformers ``generate`` on the same weights: 1, 3 and 5 beams, several
images in one batch, a caption prefix, a VQA batch of questions, and a peft LoRA adapter switched in.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from mmdemo.media import load_image
from mmdemo.models import beams
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import load
from mmdemo.models.registry import ARCHITECTURES
from mmdemo.models.vqa import answer_pairs

BEAMS = (1, 3, 5)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam-img")
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("red", "square")]
    return [load_image(make_image(d / f"{c}-{s}.png", c, s, size=40 + 8 * i)) for i, (c, s) in enumerate(specs)]


@pytest.fixture
def sliced_small(monkeypatch):
    """Slice the tiny models' matrices too (the full-size thresholds would leave them whole)."""
    monkeypatch.setattr(beams, "SLICE_ELEMENTS", 32 * 16)
    monkeypatch.setattr(beams, "SLICE_MIN_WEIGHT", 0)


def _plain(task: str, checkpoint: str, adapter: str | None = None):
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering, BlipProcessor

    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    model = cls.from_pretrained(checkpoint).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, BlipProcessor.from_pretrained(checkpoint)


def _lora(checkpoint: str, task: str, folder, seed: int) -> str:
    """A random (non-zero) LoRA on the modules mmdemo's fine-tunes adapt (the registry's lora_targets)."""
    from peft import LoraConfig, get_peft_model

    model, _ = _plain(task, checkpoint)
    torch.manual_seed(seed)
    targets = list(ARCHITECTURES[(task, "blip")].lora_targets)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("num_beams", BEAMS)
@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_caption_token_ids_match_plain_generate(sensitive, images, sliced_small, num_beams, prompt):
    """Several images in one batch, with and without a prefix: the very same token ids as model.generate."""
    model, processor = _plain("caption", sensitive["caption"])
    kwargs = GenerationOptions(num_beams=num_beams, max_new_tokens=10, min_new_tokens=2).kwargs()
    text = {"text": [prompt] * len(images)} if prompt else {}
    inputs = processor(images=images, return_tensors="pt", **text)
    with torch.inference_mode():
        plain = model.generate(**inputs, **kwargs)
        ours = beams.caption_generate(model, **inputs, **kwargs)
    assert torch.equal(ours, plain)
    decoded = processor.batch_decode(ours, skip_special_tokens=True)
    assert len(set(decoded)) >= 3  # the captions really depend on the image


@pytest.mark.parametrize("num_beams", BEAMS)
def test_caption_through_the_project_matches_one_image_at_a_time(sensitive, images, num_beams):
    """``caption`` (batches of 3, the loader's model) against plain generate on one image at a time."""
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=10, min_new_tokens=2)
    ours = caption(images, prompt="a picture of", options=options, model=sensitive["caption"], batch_size=3)
    model, processor = _plain("caption", sensitive["caption"])
    plain = []
    for img in images:
        with torch.no_grad():
            out = model.generate(**processor(images=img, text="a picture of", return_tensors="pt"), **options.kwargs())
        plain.append(processor.decode(out[0], skip_special_tokens=True).strip())
    assert ours == plain and len(set(ours)) >= 3


@pytest.mark.parametrize("num_beams", BEAMS)
def test_vqa_answers_match_plain_generate(sensitive, images, sliced_small, num_beams):
    """Questions of one length about several images are batched together; same answers as one at a time."""
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=6, min_new_tokens=1)
    pairs = [(images[0], "what color?"), (images[1], "what color?"), (images[2], "what shape is this"),
             (images[0], "is it round"), (images[3], "what color?"), (images[4], "what shape?")]
    ours = answer_pairs(pairs, options=options, model=sensitive["vqa"])
    model, processor = _plain("vqa", sensitive["vqa"])
    plain = []
    for img, q in pairs:
        with torch.no_grad():
            out = model.generate(**processor(images=img, text=q, return_tensors="pt"), **options.kwargs())
        plain.append(processor.decode(out[0], skip_special_tokens=True).strip())
    assert ours == plain and len(set(ours)) >= 3


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_lora_adapter_active_matches_plain_peft(sensitive, images, tmp_path, sliced_small, task):
    """With an adapter switched in through the loader (peft), answers equal a plain PeftModel's generate."""
    checkpoint = sensitive[task]
    adapter = _lora(checkpoint, task, tmp_path / f"lora-{task}", seed=5)
    options = GenerationOptions(num_beams=3, max_new_tokens=8, min_new_tokens=2)
    loaded = load(task, checkpoint)
    if task == "caption":
        run = lambda a: caption(images, options=options, model=loaded, adapter=a, batch_size=5)  # noqa: E731
        requests = [(img, None) for img in images]
    else:
        requests = [(images[i], q) for i, q in enumerate(["what color?", "what shape?", "what color?"])]
        run = lambda a: answer_pairs(requests, options=options, model=loaded, adapter=a)  # noqa: E731
    with_adapter, without = run(adapter), run(None)
    model, processor = _plain(task, checkpoint, adapter)
    plain = []
    for img, q in requests:
        inputs = processor(images=img, text=q, return_tensors="pt") if q else processor(images=img, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **options.kwargs())
        plain.append(processor.decode(out[0], skip_special_tokens=True).strip())
    assert with_adapter == plain
    assert with_adapter != without  # the adapter really changed the outputs
    assert run(None) == without  # and switching it off again gives the base model's


def test_cross_attention_keys_once_per_image_and_never_copied(sensitive, images):
    """The decoder's cross-attention keys are projected from one row per image, once, and kept at that size."""
    model, processor = _plain("caption", sensitive["caption"])
    inputs = processor(images=images[:2], return_tensors="pt")
    kwargs = GenerationOptions(num_beams=5, max_new_tokens=6, min_new_tokens=6).kwargs()
    key = model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    rows: list[int] = []
    hook = key.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    caches = []
    original = beams.shared_cache

    def spy(*args):
        caches.append(original(*args))
        return caches[-1]

    try:
        with torch.inference_mode():
            plain = model.generate(**inputs, **kwargs)
            assert rows == [2 * 5]  # plain: every beam's copy of the image, at the first step
            rows.clear()
            beams.shared_cache = spy
            ours = beams.caption_generate(model, **inputs, **kwargs)
    finally:
        beams.shared_cache = original
        hook.remove()
    assert torch.equal(ours, plain)
    assert rows == [2]  # ours: each image once
    cross = caches[0].cross_attention_cache.layers[0]
    assert cross.keys.shape[0] == 2 and caches[0].self_attention_cache.layers[0].keys.shape[0] == 2 * 5
    before = cross.keys
    caches[0].reorder_cache(torch.tensor([1, 0, 2, 3, 4, 9, 8, 7, 6, 5]))
    assert cross.keys is before  # reordering beams leaves the per-image keys alone


def test_slicing_gives_the_same_floats_and_is_undone(sensitive, sliced_small):
    """The sliced products equal the whole ones bit for bit, and the layers get their own forward back."""
    model, _ = _plain("caption", sensitive["caption"])
    head = model.text_decoder.cls.predictions.decoder
    x = torch.randn(3, 1, head.in_features)
    with torch.inference_mode():
        whole, whole_row = head(x), head(x[:1])
        with beams.sliced_wide_layers(model.text_decoder):
            assert "forward" in head.__dict__  # sliced while inside
            sliced = head(x)
            one_row = head(x[:1])
        assert "forward" not in head.__dict__
    assert torch.equal(sliced, whole) and torch.equal(one_row, whole_row)  # one row: left whole
