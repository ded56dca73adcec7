"""The SmolVLM family (``HuggingFaceTB/SmolVLM-256M-Instruct``: ``Idefics3ForConditionalGeneration``): captions and
free-form answers from a small chat model that reads images.

A request is one chat turn: the image, then an instruction (for a caption) or the visitor's question, rendered
by the checkpoint's own chat template, then ``Assistant:``; an optional caption prefix is where the assistant's
reply starts, and is kept in the caption as BLIP keeps it. The processor splits a large image into tiles plus
a downscaled whole (the model's own behaviour). Requests are batched with left padding, as a decoder-only
model is batched, and decoded by the model's own ``generate``; only the new tokens are the answer, so the output
is plain ``generate``'s (tests/test_smolvlm.py). LoRA adapts the query and value projections (``q_proj``,
``v_proj``) of the language model and the vision tower.
"""

from __future__ import annotations

from pathlib import Path

from mmdemo.errors import InputError
from mmdemo.models.registry import Architecture

# SmolVLM-256M-Instruct is an Idefics3 model: a chat turn per request, free-form answers.
ARCHITECTURES = tuple(
    Architecture(task, "idefics3", "Idefics3ForConditionalGeneration", "AutoProcessor", ("q_proj", "v_proj"),
                 "smolvlm", "smolvlm")
    for task in ("caption", "vqa")
)

# What the model is asked for each caption length.
DETAIL_INSTRUCTIONS = {
    "short": "Describe this image in one short sentence.",
    "detailed": "Can you describe this image?",
    "paragraph": "Describe this image in detail, in a paragraph.",
}


def check_prompt(prompt: str | None) -> None:
    """Any prefix is fine (the reply starts with it); its length is checked against the positions as for BLIP."""


def task_prompt(detail: str) -> str:
    try:
        return DETAIL_INSTRUCTIONS[detail]
    except KeyError:
        raise InputError(f"Caption detail must be one of {', '.join(DETAIL_INSTRUCTIONS)}, not {detail!r}.") from None


def chat_prompt(processor, text: str, reply_start: str | None = None) -> str:
    """One user turn (an image, then ``text``) in the checkpoint's chat template, ready for the reply."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt + (" " + reply_start if reply_start else "")


def generate_replies(loaded, images, prompts: list[str], options, adapter) -> list[str]:
    """``model.generate`` for one image and one rendered prompt per row; the new tokens, decoded."""
    import torch

    processor = loaded.processor
    processor.tokenizer.padding_side = "left"  # a decoder-only model continues the last token of each row
    inputs = processor(text=prompts, images=[[img] for img in images], return_tensors="pt", padding=True)
    inputs = inputs.to(loaded.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    with loaded.using(adapter) as model, torch.inference_mode():
        out = model.generate(**inputs, **options.kwargs())
    new = out[:, inputs["input_ids"].shape[1]:]
    return [" ".join(text.split()) for text in processor.batch_decode(new, skip_special_tokens=True)]


def caption_batch(loaded, images, prompt, options, adapter, detail: str = "short") -> list[str]:
    """One caption per image; with ``prompt``, each caption starts with it."""
    replies = generate_replies(loaded, images, [chat_prompt(loaded.processor, task_prompt(detail), prompt)]
                               * len(images), options, adapter)
    return [" ".join(f"{prompt} {reply}".split()) if prompt else reply for reply in replies]


def answer_batch(loaded, images, questions: list[str], options, adapter, batch_size: int = 32) -> list[str]:
    """One free-form answer per (image, question) row, ``batch_size`` rows per ``generate``."""
    prompts = [chat_prompt(loaded.processor, q) for q in questions]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out += generate_replies(loaded, images[start:start + batch_size], prompts[start:start + batch_size],
                                options, adapter)
    return out


# ------------------------------------------------------------------------------------------- tiny builder
# SmolVLM-256M-Instruct's chat template: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny(out: Path, arch: Architecture | None = None) -> None:
    """A tiny random SmolVLM (Idefics3) in the Hub layout: a byte-level BPE tokenizer with the family's special
    tokens (image, tile positions, end of utterance), its chat template, image splitting into 32-pixel tiles plus
    the whole (4 tokens each after the pixel shuffle), a 2-layer vision tower and a 2-layer Llama."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    from mmdemo.models.tiny import bpe_tokenizer

    torch.manual_seed(0)
    tok = bpe_tokenizer("GPT2Tokenizer", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                          "<end_of_utterance>", "<global-img>", *tiles]})
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                             do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rms_norm_eps=1e-5, initializer_range=0.02),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False)
    Idefics3ForConditionalGeneration(config).eval().save_pretrained(out)
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------- fine-tuning
def _prepare(loaded, rows: list[tuple], seed: int = 0):
    """Training inputs for (image path, instruction, reply) rows, computed once per job, and their collator: the
    chat turn and the reply with its end of utterance in, loss on the reply only (the turn's tokens are -100).
    Pictures split into different numbers of tiles are padded with blank tiles, which the model skips."""
    from mmdemo.media import load_image
    from mmdemo.models.batches import pad_ids

    processor, tok = loaded.processor, loaded.processor.tokenizer
    end = getattr(processor, "end_of_utterance_token", "<end_of_utterance>")
    items = []
    for path, instruction, reply in rows:
        image = [[load_image(path)]]
        turn = chat_prompt(processor, instruction)
        asked = processor(text=[turn], images=image, return_tensors="pt")["input_ids"][0]
        full = processor(text=[f"{turn} {reply}{end}"], images=image, return_tensors="pt")
        ids = full["input_ids"][0][: len(asked) + 40]  # replies longer than 40 tokens are cut, as BLIP's are
        labels = ids.clone()
        labels[: len(asked)] = -100
        items.append({"input_ids": ids, "labels": labels, "pixel_values": full["pixel_values"][0],
                      "pixel_attention_mask": full["pixel_attention_mask"][0]})

    def collate(batch: list[dict]) -> dict:
        import torch

        ids, mask = pad_ids([b["input_ids"] for b in batch], tok.pad_token_id)
        labels, _ = pad_ids([b["labels"] for b in batch], -100)
        tiles = max(len(b["pixel_values"]) for b in batch)
        pixels = torch.zeros((len(batch), tiles, *batch[0]["pixel_values"].shape[1:]))
        pixel_mask = torch.zeros((len(batch), tiles, *batch[0]["pixel_attention_mask"].shape[1:]), dtype=torch.long)
        for i, b in enumerate(batch):
            pixels[i, : len(b["pixel_values"])] = b["pixel_values"]
            pixel_mask[i, : len(b["pixel_values"])] = b["pixel_attention_mask"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels,
                "pixel_attention_mask": pixel_mask}

    return items, collate


def prepare_caption(loaded, examples, seed: int = 0):
    return _prepare(loaded, [(e.path, task_prompt("short"), e.text) for e in examples], seed)


def prepare_vqa(loaded, examples, seed: int = 0):
    return _prepare(loaded, [(e.path, e.question, e.answer) for e in examples], seed)
