"""Decoding with the image's cross-attention keys/values once per image gives plain ``generate``'s tokens exactly.

mmdemo.models.beams computes the decoder's cross-attention keys/values once per image (not once per beam), never
copies them when beam search reorders its beams and multiplies all of an image's beams by them in one product;
the loader runs the BLIP text side's Linear layers through oneDNN on the CPU (mmdemo.models.kernels). Every test
here compares token ids with plain transformers ``generate`` on the same weights (std-0.1 checkpoints, whose
outputs depend on every float): 1, 3 and 5 beams, several images in one batch, a caption prefix, a VQA batch of
questions, and a peft LoRA adapter switched in.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from mmdemo.media import load_image
from mmdemo.models import beams
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.kernels import onednn_forward, onednn_usable
from mmdemo.models.loading import load
from mmdemo.models.registry import ARCHITECTURES
from mmdemo.models.vqa import answer_pairs

BEAMS = (1, 3, 5)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam-img")
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("red", "square")]
    return [load_image(make_image(d / f"{c}-{s}.png", c, s, size=40 + 8 * i)) for i, (c, s) in enumerate(specs)]


pytestmark = pytest.mark.usefixtures("onednn_for_tiny")


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
def test_caption_token_ids_match_plain_generate(sensitive, images, num_beams, prompt):
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
def test_vqa_answers_match_plain_generate(sensitive, images, num_beams):
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


@pytest.mark.parametrize("num_beams", BEAMS)
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_one_request_decodes_through_the_small_rows_kernel(sensitive, images, small_rows_calls, task, num_beams):
    """One image's decode (1, 3 or 5 rows a step) runs the text side's Linear layers through the compiled small-rows
    kernel (mmdemo.models.kernels), and the tokens are still plain ``generate``'s."""
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2)
    question = "what color?" if task == "vqa" else None
    model, processor = _plain(task, sensitive[task])
    for img in images[:3]:
        if task == "vqa":
            ours = answer_pairs([(img, question)], options=options, model=sensitive[task])[0]
            inputs = processor(images=img, text=question, return_tensors="pt")
        else:
            ours = caption([img], options=options, model=sensitive[task])[0]
            inputs = processor(images=img, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **options.kwargs())
        assert ours == processor.decode(out[0], skip_special_tokens=True).strip()
    assert num_beams in small_rows_calls  # a step's layers (one row per beam) went through the kernel


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_lora_adapter_active_matches_plain_peft(sensitive, images, tmp_path, task):
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
    if onednn_usable():  # the loader's model ran its text side through oneDNN, LoRA layers on top of it
        lora = [m for name, m in loaded.model.named_modules() if name.endswith("text_decoder.bert.encoder.layer.0"
                                                                                ".attention.self.query")][0]
        assert lora.base_layer.forward.__func__ is onednn_forward and hasattr(lora, "lora_A")
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


def test_vision_fused_attention_inside_encode_images_only(sensitive, images, monkeypatch):
    """encode_images runs the vision encoder's attention as one fused kernel (same features to float rounding);
    a direct call of the vision model, asking for attention weights, still gets transformers' forward."""
    model, processor = _plain("vqa", sensitive["vqa"])
    pixel_values = processor(images=images[:3], return_tensors="pt")["pixel_values"]
    calls: list[tuple] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        plain = model.vision_model(pixel_values=pixel_values)[0]
        assert not calls
        ours = beams.encode_images(model, pixel_values)
        assert len(calls) == model.config.vision_config.num_hidden_layers * 2  # VISION_CHUNK=2: 2 + 1 images
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
        calls.clear()
        out = model.vision_model(pixel_values=pixel_values, output_attentions=True)
    assert not calls and out.attentions is not None and all(a is not None for a in out.attentions)


def test_few_rows_decode_on_one_thread_and_the_count_comes_back(sensitive, images, monkeypatch):
    """A decode of a few rows (one image, 3 beams) runs on DECODE_THREADS threads; a batch keeps them all; the
    count is restored afterwards (also after an error) and nested users share one setting."""
    model, processor = _plain("vqa", sensitive["vqa"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    generate = model.text_decoder.generate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model.text_decoder, "generate", spy)
    try:
        for n in (1, 4):
            inputs = processor(images=images[:n], text=["what color?"] * n, return_tensors="pt")
            kwargs = GenerationOptions(num_beams=3, max_new_tokens=4, min_new_tokens=1).kwargs()
            with torch.inference_mode():
                beams.answer_generate(model, beams.encode_images(model, inputs["pixel_values"]), inputs["input_ids"],
                                      inputs["attention_mask"], **kwargs)
            assert torch.get_num_threads() == 2
        assert seen == [beams.DECODE_THREADS, 2]  # 3 rows: one thread; 12 rows (> DECODE_FEW_ROWS): both
        with beams._decode_threads("cpu", 3):
            with beams._decode_threads("cpu", 3):
                assert torch.get_num_threads() == beams.DECODE_THREADS
            assert torch.get_num_threads() == beams.DECODE_THREADS
        with pytest.raises(RuntimeError), beams._decode_threads("cpu", 3):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_onednn_keeps_torch_kernel_for_many_rows():
    """Inputs of ONEDNN_MAX_ROWS rows or more (577 image tokens) take F.linear itself: bit-identical to it."""
    from mmdemo.models import kernels

    layer = torch.nn.Linear(768, 512).eval()  # 393k elements: above ONEDNN_MIN_WEIGHT
    many = torch.randn(1, kernels.ONEDNN_MAX_ROWS + 65, 768)
    with torch.inference_mode():
        assert torch.equal(onednn_forward(layer, many), torch.nn.functional.linear(many, layer.weight, layer.bias))
        few = many[:, :8]
        torch.testing.assert_close(onednn_forward(layer, few), layer(few), rtol=1e-5, atol=1e-5)
