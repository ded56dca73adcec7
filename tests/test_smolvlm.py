"""SmolVLM (an Idefics3 chat model) for captions and free-form VQA: the tiny checkpoint (the family's special
tokens, chat template and image tiles) loads through the Hub code path, and the app's captions and answers are
plain ``generate``'s tokens, batched with left padding as the model card batches them, with and without a LoRA
adapter made by plain peft."""

from __future__ import annotations

import pytest

from mmdemo.errors import InputError
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.loading import load
from mmdemo.models.vqa import answer_pairs
from tests.conftest import make_image

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = GenerationOptions(num_beams=3, max_new_tokens=8, min_new_tokens=1)


@pytest.fixture(scope="module")
def smolvlm(tiny_dir) -> str:
    return str(tiny_dir / "smolvlm")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("smolvlm-pictures")
    # a small square and a wide picture: different numbers of tiles, so the rows are padded
    paths = [make_image(folder / "red.png", "red", "circle", 30), make_image(folder / "blue.png", "blue", "square", 90)]
    return paths, [Image.open(p).convert("RGB") for p in paths]


def plain_replies(folder: str, images, texts: list[str], options: GenerationOptions, adapter: str | None = None,
                  reply_start: str = "") -> list[str]:
    """The model card's code: chat template, processor (left padding), ``generate``, the new tokens decoded."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": t}]}],
                                             add_generation_prompt=True) + reply_start for t in texts]
    inputs = processor(text=prompts, images=[[img] for img in images], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**inputs, **options.kwargs())
    return [" ".join(t.split()) for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True)]


def test_the_tiny_checkpoint_is_smolvlm_in_the_hub_layout(smolvlm):
    for task in ("caption", "vqa"):
        loaded = load(task, smolvlm)
        assert type(loaded.model).__name__ == "Idefics3ForConditionalGeneration"
        assert loaded.arch.family == "smolvlm"
    tokenizer = load("caption", smolvlm).processor.tokenizer
    assert {"<image>", "<fake_token_around_image>", "<end_of_utterance>", "<row_1_col_1>"} <= set(tokenizer.get_vocab())


@pytest.mark.parametrize("detail", ["short", "detailed"])
def test_captions_are_plain_generates_tokens(smolvlm, pictures, detail):
    from mmdemo.models.smolvlm import DETAIL_INSTRUCTIONS

    paths, images = pictures
    ours = caption(paths, None, OPTIONS, model=smolvlm, detail=detail)
    assert ours == plain_replies(smolvlm, images, [DETAIL_INSTRUCTIONS[detail]] * 2, OPTIONS)
    assert all(ours), ours


def test_a_caption_prefix_is_where_the_reply_starts(smolvlm, pictures):
    from mmdemo.models.smolvlm import DETAIL_INSTRUCTIONS

    paths, images = pictures
    ours = caption(paths[:1], "a picture of", OPTIONS, model=smolvlm)
    plain = plain_replies(smolvlm, images[:1], [DETAIL_INSTRUCTIONS["short"]], OPTIONS, reply_start=" a picture of")
    assert ours == [f"a picture of {plain[0]}"]


def test_answers_are_plain_generates_tokens_with_and_without_an_adapter(smolvlm, pictures, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics3ForConditionalGeneration

    paths, images = pictures
    questions = ["what color is the shape?", "is there a circle?"]
    pairs = list(zip(paths, questions))
    base_answers = answer_pairs(pairs, OPTIONS, model=smolvlm)
    assert base_answers == plain_replies(smolvlm, images, questions, OPTIONS)

    torch.manual_seed(1)
    peft_model = get_peft_model(Idefics3ForConditionalGeneration.from_pretrained(smolvlm),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    adapted = answer_pairs(pairs, OPTIONS, adapter=adapter, model=smolvlm)
    assert adapted == plain_replies(smolvlm, images, questions, OPTIONS, adapter=str(adapter))
    assert adapted != base_answers
    assert answer_pairs(pairs, OPTIONS, model=smolvlm) == base_answers  # the base is back without it


def test_bad_requests_get_sentences(smolvlm, pictures):
    paths, _ = pictures
    with pytest.raises(InputError, match="must be one of short, detailed, paragraph"):
        caption(paths, None, model=smolvlm, detail="huge")
    with pytest.raises(InputError, match="Ask at least one question"):
        answer_pairs([(paths[0], "  ")], model=smolvlm)
