"""The project's outputs are exactly those of plain transformers code on the same tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_image, make_tone
from mmdemo.media import load_audio, load_image
from mmdemo.models.caption import caption
from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS, GenerationOptions
from mmdemo.models.loading import load
from mmdemo.models.retrieval import AudioIndex, embedder, rank_labels
from mmdemo.models.vqa import answer, answer_pairs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    return [load_image(make_image(d / f"{c}-{s}.png", c, s, size=48 + 8 * i)) for i, (c, s) in enumerate(specs)]


def _direct_captions(checkpoint, images, prompt, kwargs):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = BlipProcessor.from_pretrained(checkpoint)
    texts = []
    for img in images:  # one at a time, as a user's loop would
        inputs = processor(images=img, text=prompt, return_tensors="pt") if prompt else processor(images=img, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
        texts.append(processor.decode(out[0], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("prompt,options", [
    (None, CAPTION_DEFAULTS),
    ("a picture of", CAPTION_DEFAULTS),
    (None, GenerationOptions(num_beams=1, max_new_tokens=12, min_new_tokens=0)),
])
def test_caption_matches_plain_generate(sensitive, images, prompt, options):
    ours = caption(images, prompt=prompt, options=options, model=sensitive["caption"], batch_size=3)
    direct = _direct_captions(sensitive["caption"], images, prompt, options.kwargs())
    assert ours == direct
    assert all(ours) and len(set(ours)) >= 3  # outputs really depend on the image


def test_vqa_matches_plain_generate_one_question_at_a_time(sensitive, images):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    questions = ["what color is it?", "what shape?", "is the shape on the left or on the right", "how many?"]
    ours = answer(images[0], questions, model=sensitive["vqa"])
    model = BlipForQuestionAnswering.from_pretrained(sensitive["vqa"]).eval()
    processor = BlipProcessor.from_pretrained(sensitive["vqa"])
    direct = []
    for q in questions:
        with torch.no_grad():
            out = model.generate(**processor(images=images[0], text=q, return_tensors="pt"), **VQA_DEFAULTS.kwargs())
        direct.append(processor.decode(out[0], skip_special_tokens=True).strip())
    assert ours == direct and len(ours) == 4 and len(set(ours)) >= 2


def test_vqa_pairs_from_several_users_match_plain_generate(sensitive, images):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    pairs = [(images[0], "what color?"), (images[1], "what color?"), (images[2], "what shape is this"),
             (images[0], "is it round"), (images[3], "what color?")]
    ours = answer_pairs(pairs, model=sensitive["vqa"])
    model = BlipForQuestionAnswering.from_pretrained(sensitive["vqa"]).eval()
    processor = BlipProcessor.from_pretrained(sensitive["vqa"])
    direct = []
    for img, q in pairs:
        with torch.no_grad():
            out = model.generate(**processor(images=img, text=q, return_tensors="pt"), **VQA_DEFAULTS.kwargs())
        direct.append(processor.decode(out[0], skip_special_tokens=True).strip())
    assert ours == direct and len(set(ours)) >= 3


def test_retrieval_ranks_as_plain_clap_cosine(tiny_models, tmp_path):
    from transformers import ClapModel, ClapProcessor

    files = [make_tone(tmp_path / f"c{i}.wav", freq=f, seconds=s, kind=k, sr=48000)
             for i, (f, s, k) in enumerate([(220, 1.0, "sine"), (880, 2.0, "sine"), (300, 1.5, "noise"),
                                            (500, 3.0, "chirp"), (660, 0.7, "pulses")])]
    emb = embedder(tiny_models["retrieval"])
    index = AudioIndex.open_or_create(tmp_path / "idx", emb.checkpoint, dim=32)
    report = index.add_files(files, emb, batch_size=2)
    assert len(report.added) == 5 and not report.failed

    model = ClapModel.from_pretrained(tiny_models["retrieval"]).eval()
    processor = ClapProcessor.from_pretrained(tiny_models["retrieval"])
    waves = [load_audio(f, 48000) for f in files]
    query = "a high pitched tone"
    with torch.no_grad():
        a = model.get_audio_features(**processor.feature_extractor(waves, sampling_rate=48000, return_tensors="pt")).pooler_output
        t = model.get_text_features(**processor.tokenizer([query], return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity(t, a).numpy()
    hits = index.search_text(query, emb, top_k=5)
    assert [h.path for h in hits] == [str(files[i].resolve()) for i in np.argsort(-cos, kind="stable")]
    np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1], atol=1e-5)

    # audio -> labels and audio -> clips, also against plain cosine similarity
    labels = ["a dog", "rain falling", "a beep", "a bird singing"]
    with torch.no_grad():
        lt = model.get_text_features(**processor.tokenizer(labels, return_tensors="pt", padding=True)).pooler_output
    label_cos = torch.nn.functional.cosine_similarity(lt, a[1:2]).numpy()
    ranked = rank_labels(index.embeddings[1], labels, emb, top_k=4)
    assert [h.label for h in ranked] == [labels[i] for i in np.argsort(-label_cos, kind="stable")]
    similar = index.search_vector(index.embeddings[3], top_k=5)
    assert similar[0].path == str(files[3].resolve()) and similar[0].score == pytest.approx(1.0, abs=1e-5)


def test_long_clips_embed_deterministically(tiny_models, tmp_path):
    """CLAP's rand_trunc would crop a 25 s clip at random; the project's windows do not."""
    path = make_tone(tmp_path / "long.wav", freq=330, seconds=25, kind="chirp", sr=48000)
    emb = embedder(tiny_models["retrieval"])
    first, second = emb.files([path]), emb.files([path])
    np.testing.assert_array_equal(first, second)
    assert len(emb.windows(load_audio(path, 48000))) == 3
    assert np.linalg.norm(first[0]) == pytest.approx(1.0, abs=1e-5)


def test_loader_caches_one_copy(tiny_models):
    a = load("caption", tiny_models["caption"])
    b = load("caption", tiny_models["caption"])
    assert a is b and a.device == "cpu" and a.dtype == torch.float32
