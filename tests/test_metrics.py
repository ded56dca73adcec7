"""The held-out metrics against their reference implementations and published rules.

- BLEU-4 and CIDEr: values of coco-caption's own pipeline (pycocoevalcap 1.2: Java PTBTokenizer, ``Bleu(4)``,
  ``Cider()``) embedded below, a direct comparison with pycocoevalcap's scorers on random corpora (pycocoevalcap is in
  requirements-dev.txt; the comparison is skipped without it), and cases computed by hand.
- VQA accuracy: the normalisation rules and the leave-one-out formula of the official vqaEval.py (VQA API).
- R@k: hand-computed rankings, with ties and repeated descriptions.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mmdemo.jobs.evaluate import (
    METRICS,
    bleu4,
    cider,
    normalize_answer,
    recall_at_k,
    sentence_bleu,
    tokens,
    vqa_accuracy,
)

# --- captions -------------------------------------------------------------------------------------------------------

# What coco-caption's tokenization (Stanford PTBTokenizer 3.4.1 -lowerCase, then its punctuation filter) gives,
# obtained by running pycocoevalcap's PTBTokenizer once (Java needed):
#   from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
#   PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
PTB = [
    ("A man's black-and-white dog, running.", "a man 's black-and-white dog running"),
    ("Two people don't sit on a bench!", "two people do n't sit on a bench"),
    ("A T-shirt (red) costs $5.50 at 3:30pm...", "a t-shirt -lrb- red -rrb- costs $ 5.50 at 3:30 pm"),
    ('"Hello," she said; it\'s 10% off & more', "hello she said it 's 10 % off & more"),
    ("a cat/dog on a mat -- sleeping", "a cat/dog on a mat sleeping"),
    ("e-mail me @ home 1,000 times", "e-mail me @ home 1,000 times"),
    ("It's 5 o'clock", "it 's 5 o'clock"),
    ("A group of people standing around a kitchen.", "a group of people standing around a kitchen"),
    ("There's a giraffe that isn't eating; it can't reach.", "there 's a giraffe that is n't eating it ca n't reach"),
    ("Kids' toys: blocks, cars and a 2-year-old's teddy bear?", "kids toys blocks cars and a 2-year-old 's teddy bear"),
    ("A close-up of a pizza with pepperoni ... yum", "a close-up of a pizza with pepperoni yum"),
    ("They're playing frisbee, aren't they?", "they 're playing frisbee are n't they"),
    ("We'll see a man riding a skateboard down a ramp.", "we 'll see a man riding a skateboard down a ramp"),
    ("A plate with broccoli, rice & chicken.", "a plate with broccoli rice & chicken"),
    ("Someone cannot find the remote", "someone can not find the remote"),
    ("A 'vintage' car parked near a fire hydrant.", "a vintage car parked near a fire hydrant"),
    ("I'm on a 747 at Gate B12.", "i 'm on a 747 at gate b12"),
    ("A zebra (or two) grazing", "a zebra -lrb- or two -rrb- grazing"),
    ("Wow!! Look at that!?", "wow !! look at that !?"),
]


@pytest.mark.parametrize(("text", "expected"), PTB)
def test_tokens_match_coco_captions_ptb_tokenizer(text, expected):
    assert " ".join(tokens(text)) == expected


CORPORA = {
    "coco-like": (
        ["A man riding a wave on top of a surfboard.", "Two dogs playing with a frisbee in the park.",
         "A plate of food with broccoli and rice.", "A red double-decker bus driving down the street."],
        [["A man riding a wave on a surfboard in the ocean.", "A surfer rides a large wave.",
          "A person on a surfboard riding a wave."],
         ["Two dogs play with a red frisbee on the grass.", "A couple of dogs that are playing in a park.",
          "Dogs chasing a frisbee in a grassy field.", "Two brown dogs running after a frisbee."],
         ["A white plate topped with rice, chicken and broccoli.", "A meal of rice and vegetables on a plate."],
         ["A double-decker bus is driving down a city street.", "A red bus on the road near buildings.",
          "The big red bus isn't empty.", "A tour bus drives down the street."]],
    ),
    "shapes": (  # this project's synthetic captioning task
        ["a picture of a red circle", "a picture of a blue circle", "a picture of a green square",
         "a picture of a red triangle", "a picture of a picture"],
        [["a picture of a red circle"], ["a picture of a blue square"], ["a picture of a green square"],
         ["a picture of a yellow triangle"], ["a picture of a blue circle"]],
    ),
    "short": (
        ["red circle", "blue", "green square", "circle red"],
        [["red circle"], ["blue square"], ["green square"], ["red square"]],
    ),
}
# coco-caption's (BLEU-4, CIDEr) for CORPORA, computed once with pycocoevalcap 1.2 as its COCOEvalCap does it:
#   tok = PTBTokenizer()
#   res = tok.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
#   gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
#   Bleu(4).compute_score(gts, res)[0][3], Cider().compute_score(gts, res)[0]
COCO = {
    "coco-like": (0.3323509068568043, 2.0483061539116565),
    "shapes": (0.7783505914948199, 4.867180014664427),
    # no hypothesis has 4 words: BLEU-4 is 0 (coco prints 0.00075, the trace of its 1e-15/1e-9 guards against 0/0)
    "short": (0.0, 3.3616783001865835),
}


@pytest.mark.parametrize("name", COCO)
def test_bleu4_and_cider_equal_coco_captions_values(name):
    hyps, refs = CORPORA[name]
    expected_bleu, expected_cider = COCO[name]
    assert bleu4(hyps, refs) == pytest.approx(expected_bleu, rel=1e-6, abs=1e-12)
    assert cider(hyps, refs) == pytest.approx(expected_cider, rel=1e-9)


def test_bleu4_and_cider_equal_pycocoevalcaps_scorers_on_random_corpora():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(0)
    vocab = "a the dog cat man red blue on of sits runs grass ball picture".split()

    def sentence(lo=1):
        return " ".join(rng.choices(vocab, k=rng.randint(lo, 10)))

    for trial in range(150):
        n = rng.randint(1, 8)
        hyps = [sentence(4 if i == 0 else 1) for i in range(n)]  # at least one 4-gram: see "short" above
        refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(n)]
        if trial % 2:  # some hypotheses equal to a reference, so that the scores are far from 0
            refs = [[h, *rs[1:]] for h, rs in zip(hyps, refs)]
        gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
        coco_bleu = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)[0][3]
        coco_cider = cider_mod.Cider().compute_score(gts, res)[0]
        ours = bleu4(hyps, refs)
        if ours:
            assert ours == pytest.approx(coco_bleu, rel=1e-6), (hyps, refs)
        else:  # no 4-gram in common: coco's guards leave at most (1e-15 / 4-grams)^(1/4)
            assert coco_bleu < 1e-3, (hyps, refs)
        assert cider(hyps, refs) == pytest.approx(coco_cider, rel=1e-9, abs=1e-12), (hyps, refs)


def test_bleu4_by_hand():
    assert bleu4(["a man rides a horse"], [["a man rides a horse"]]) == pytest.approx(1.0)
    # every n-gram right, 4 words against 6: brevity penalty exp(1 - 6/4)
    assert bleu4(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(-0.5))
    # the closest reference length (6, not 3 or 10) sets the penalty; ties go to the shorter reference
    assert bleu4(["a b c d e"], [["a b c", "a b c d e f", "x " * 10]]) == pytest.approx(math.exp(1 - 6 / 5))
    assert bleu4(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)  # 3, not 5: no brevity penalty
    # corpus-level: counts are summed over the examples before the precisions are taken
    p = [9 / 10, 7 / 8, 5 / 6, 3 / 4]  # the second caption misses one word: 4 of its n-grams of each order
    expected = math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu4(["a b c d e", "f g h i x"], [["a b c d e"], ["f g h i j"]]) == pytest.approx(expected)
    # unsmoothed, as in the papers: captions under 4 words score 0 however right they are
    assert bleu4(["red circle", "blue square"], [["red circle"], ["blue square"]]) == 0.0
    assert bleu4(["Red circle."], [["red circle"]]) == bleu4(["red circle"], [["red circle"]])  # tokenized first
    assert bleu4([], []) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        bleu4(["a"], [[]])


def test_the_per_example_sentence_bleu_tells_short_captions_apart():
    assert sentence_bleu("red circle", ["red circle"]) == pytest.approx(1.0)
    assert sentence_bleu("a picture of a red circle", ["a picture of a red circle"]) == pytest.approx(1.0)
    near = sentence_bleu("a picture of a blue circle", ["a picture of a red circle"])
    far = sentence_bleu("a blue square", ["a picture of a red circle"])
    assert 0 < far < near < 1
    assert sentence_bleu("green", ["red circle"]) == 0.0


def test_cider_by_hand():
    # two images, each caption equal to its only reference: the unigram and bigram cosines are 1 and there are no
    # 3- or 4-grams, so each image scores 10 * (1 + 1 + 0 + 0) / 4
    assert cider(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # a word in the references of every image has idf log(2) - log(2) = 0: matching only it counts for nothing
    assert cider(["a c", "a b"], [["a b"], ["a c"]]) == pytest.approx(0.0)
    # clipping (the doubled "b" counts once against the reference) and the length penalty exp(-1 / (2 * 6^2))
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2) + 0 + 0) / 4
    assert cider(["a b b", "c d"], [["a b"], ["c d"]]) == pytest.approx((first + 5.0) / 2)
    # several references: the mean over them
    assert cider(["a b", "c d"], [["a b", "x y"], ["c d"]]) == pytest.approx((2.5 + 5.0) / 2)
    # idf comes from the evaluated references: a single image has log(1) = 0 everywhere
    assert cider(["a b"], [["a b"]]) == 0.0
    assert cider([], []) == 0.0


# --- VQA ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "normalized"), [
    ("Yes", "yes"),
    ("  yes\n", "yes"),
    ("Two", "2"),  # manualMap: number words up to ten become digits
    ("ten", "10"),
    ("eleven", "eleven"),
    ("none", "0"),  # manualMap reads "none" as 0
    ("The dog", "dog"),  # articles dropped
    ("a red and white bus", "red and white bus"),
    ("dont", "don't"),  # contractions map
    ("isnt", "isn't"),
    ("yes.", "yes"),  # periodStrip: a period not followed by a digit goes
    ("3.5", "3.5"),  # ...one followed by a digit stays
    ("1,000", "1000"),  # commaStrip: with digit,digit in the answer every mark is deleted, not spaced
    ("red,white", "red white"),  # otherwise a mark with no space beside it separates words
    ("red, white", "red white"),  # and one next to a space is deleted
    ("t-shirt", "t shirt"),
    ("Yes!", "yes"),
    ("man's", "man's"),  # apostrophes are kept
    ("left/right", "left right"),
    ("(cat)", "cat"),
])
def test_normalize_answer_follows_the_official_vqa_rules(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_with_one_reference_is_normalised_exact_match():
    predictions = ["Two", "the dog", "yes", "blue"]
    answers = [["2"], ["Dog."], ["no"], ["light blue"]]
    assert vqa_accuracy(predictions, answers) == pytest.approx(0.5)
    assert vqa_accuracy([], []) == 0.0


def test_vqa_accuracy_with_ten_human_answers_follows_the_leave_one_out_formula():
    # min(#matches among the other 9 / 3, 1), averaged over the 10 answers left out
    assert vqa_accuracy(["yes"], [["yes"] * 4 + ["no"] * 6]) == pytest.approx(1.0)
    assert vqa_accuracy(["yes"], [["yes"] * 3 + ["no"] * 7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy(["yes"], [["yes"] * 2 + ["no"] * 8]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy(["yes"], [["yes"] + ["no"] * 9]) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy(["maybe"], [["yes"] * 10]) == 0.0
    assert vqa_accuracy(["Two"], [["2"] * 3 + ["two"] + ["3"] * 6]) == pytest.approx(1.0)  # answers normalised too


# --- retrieval ------------------------------------------------------------------------------------------------------

def test_recall_at_k_by_hand_with_ties_and_a_repeated_description():
    # texts T0 = "dog barks" (clips 0 and 2) and T1 = "cat meows" (clip 1); similarities, texts x clips:
    #   T0: 0.2 0.5 0.8      T1: 0.9 0.5 0.1
    texts = ["dog barks", "cat meows", "dog barks"]
    text_emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    audio_emb = np.array([[0.2, 0.9], [0.5, 0.5], [0.8, 0.1]])
    r = recall_at_k(text_emb, audio_emb, texts, ks=(1, 2))
    # text-to-audio, per distinct text: T0's best clip (2) is first; T1's clip (0.5) is behind clip 0 (0.9)
    assert r["text_to_audio_r1"] == pytest.approx(1 / 2) and r["text_to_audio_r2"] == 1.0
    # audio-to-text, per clip: clip 0 prefers T1 (miss), clip 1 ties T0 and T1 (a tie counts as a miss), clip 2 hits
    assert r["audio_to_text_r1"] == pytest.approx(1 / 3) and r["audio_to_text_r2"] == 1.0
    # the same in any order of the examples
    order = [2, 0, 1]
    assert recall_at_k(text_emb[order], audio_emb[order], [texts[i] for i in order], ks=(1, 2)) == r
    assert list(r) == ["text_to_audio_r1", "audio_to_text_r1", "text_to_audio_r2", "audio_to_text_r2"]


def test_recall_at_k_gives_no_credit_for_ties_of_a_model_that_embeds_everything_alike():
    texts = ["a", "b", "c", "d"]
    same = np.ones((4, 3))
    r = recall_at_k(same, same, texts, ks=(1, 3, 4))
    assert r["text_to_audio_r1"] == r["audio_to_text_r1"] == 0.0
    assert r["text_to_audio_r3"] == r["audio_to_text_r3"] == 0.0  # 3 wrong items tied with the right one
    assert r["text_to_audio_r4"] == r["audio_to_text_r4"] == 1.0


# --- names and display ----------------------------------------------------------------------------------------------

def test_metrics_carry_the_papers_names_and_are_shown_x100():
    assert [m.label for m in METRICS.values()] == [
        "BLEU-4", "CIDEr", "VQA accuracy", "R@1 text-to-audio", "R@5 text-to-audio", "R@1 audio-to-text",
        "R@5 audio-to-text", "R@1 text-to-image", "R@5 text-to-image", "R@1 image-to-text", "R@5 image-to-text"]
    assert METRICS["bleu4"].show(0.3976) == "39.8" and METRICS["cider"].show(1.333) == "133.3"
    assert METRICS["accuracy"].show(0.5) == "50%" and METRICS["text_to_audio_r1"].show(1.0) == "100%"
    assert METRICS["bleu4"].show(None) == "—"
    assert METRICS["cider"].show_change(0.25) == "+25.0" and METRICS["accuracy"].show_change(-0.1) == "-10 points"
    assert all("higher is better" in m.meaning for m in METRICS.values())
    assert "0 to 100" in METRICS["bleu4"].meaning and "1000" in METRICS["cider"].meaning
