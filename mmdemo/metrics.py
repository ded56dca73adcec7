"""The scores a fine-tune is judged by, computed as the papers' reference implementations compute them.

Metrics (the registry's ``Task.metrics``) carry the names the papers use and are computed as the papers' reference
implementations compute them; ``tests/test_metrics.py`` checks them against those implementations. Values are stored
(CLI record, adapter metadata) on the scale those implementations return; :meth:`Metric.show` prints them x100, as the
papers print them (BLIP's COCO table: "B@4 39.7, CIDEr 133.3"; VQA accuracy and R@k as percentages).

- caption, ``BLEU-4`` and ``CIDEr``: coco-caption's metrics (pycocoevalcap), which the captioning papers report.
  Text is tokenized as coco-caption does with Stanford's PTBTokenizer and its punctuation list; :func:`tokens` does it
  without Java (lower case, ``n't``/``'s``-style clitics split, hyphenated words and numbers kept, punctuation dropped).
  BLEU-4 is sacrebleu's corpus BLEU on those tokens with no smoothing and the closest reference length, the same
  statistics as pycocoevalcap's ``Bleu(4)``: unsmoothed, because a smoothed corpus BLEU is no longer the number papers
  print. So BLEU-4 is 0 when no caption shares a run of 4 words with its references (all captions of 1 to 3 words,
  say); CIDEr still scores such sets. The per-example score :func:`compare` uses is sacrebleu's sentence BLEU
  (exponential smoothing, effective order; :func:`sentence_bleu`) so that short captions are still told apart there.
  CIDEr is CIDEr-D (coco-caption's "CIDEr"): a line-for-line port of pycocoevalcap's ``cider_scorer.py``, whose only
  Java dependency is the tokenizer; the 104 MB pycocoevalcap wheel (Java jars, pycocotools) is a test dependency only.
- vqa, ``VQA accuracy``: the official VQA evaluation (``vqaEval.py`` of the VQA API): answers normalised by its rules
  (:func:`normalize_answer`), and ``min(#humans who gave the answer / 3, 1)`` averaged over the leave-one-out subsets
  of the human answers. Uploads here have one reference answer per question, taken as the humans' consensus, so the
  score is normalised exact match.
- retrieval, ``R@1``/``R@5`` text-to-audio and audio-to-text (CLAP's wording): the share of queries whose own item is
  among the top k. image_search: the same, text-to-image and image-to-text. Identical descriptions are one text (a hit is any clip with that description); a wrong item tied
  with the right one counts as ranked above it, so the score does not depend on the order of the examples.

Each task module's ``evaluate`` (``mmdemo.models.<task>``) produces the outputs these score, through the same
inference its tab uses; :mod:`mmdemo.jobs.evaluate` compares the base model and the adapter example by example.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    label: str  # how the papers, the page and the model card name it
    meaning: str  # one line for people who do not program, about the number as shown (x100)
    percent: bool = False  # a share from 0 to 1, shown as a percentage

    def show(self, value) -> str:
        """The value as the page and the model card print it: x100, as the papers do."""
        if not isinstance(value, (int, float)):
            return "—"
        return f"{value * 100:.0f}%" if self.percent else f"{value * 100:.1f}"

    def show_change(self, diff: float) -> str:
        return f"{diff * 100:+.0f} points" if self.percent else f"{diff * 100:+.1f}"


METRICS: dict[str, Metric] = {
    "bleu4": Metric("BLEU-4", "how many runs of 1 to 4 words the captions share with the reference captions, from 0 "
                              "to 100, computed as captioning papers do; it is 0 when no caption shares 4 words in a "
                              "row with its reference (for example when all captions are shorter than 4 words); "
                              "higher is better."),
    "cider": Metric("CIDEr", "how closely the captions match the references, counting words that are specific to "
                             "each image more than words found in many of them, computed as captioning papers do: 0 "
                             "when nothing matches, about 130 for strong models on the COCO benchmark, at most 1000; "
                             "higher is better."),
    "accuracy": Metric("VQA accuracy", "the share of held-out questions answered exactly right, ignoring case, "
                                       "punctuation and a/an/the and reading number words as digits, as the VQA "
                                       "benchmark does; higher is better.", percent=True),
    "text_to_audio_r1": Metric("R@1 text-to-audio", "for each description, how often one of its own clips comes "
                                                    "first in the search; higher is better.", percent=True),
    "text_to_audio_r5": Metric("R@5 text-to-audio", "for each description, how often one of its own clips is "
                                                    "among the top 5; higher is better.", percent=True),
    "audio_to_text_r1": Metric("R@1 audio-to-text", "for each clip, how often its own description comes first; "
                                                    "higher is better.", percent=True),
    "audio_to_text_r5": Metric("R@5 audio-to-text", "for each clip, how often its own description is among the "
                                                    "top 5; higher is better.", percent=True),
    "text_to_image_r1": Metric("R@1 text-to-image", "for each description, how often one of its own images comes "
                                                    "first in the search; higher is better.", percent=True),
    "text_to_image_r5": Metric("R@5 text-to-image", "for each description, how often one of its own images is "
                                                    "among the top 5; higher is better.", percent=True),
    "image_to_text_r1": Metric("R@1 image-to-text", "for each image, how often its own description comes first; "
                                                    "higher is better.", percent=True),
    "image_to_text_r5": Metric("R@5 image-to-text", "for each image, how often its own description is among the "
                                                    "top 5; higher is better.", percent=True),
}


# --- caption: coco-caption's tokenization, BLEU-4 (sacrebleu) and CIDEr-D -------------------------------------------

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b|(?<=\bcan)(not)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,:]\d+)+|\w+(?:[-'/&]\w+)*|\.\.\.|--|[!?]+|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# coco-caption's PUNCTUATIONS, after PTBTokenizer turned quotes into `` and '' (its -LRB- entries never match the
# lower-cased -lrb-, so brackets stay as tokens there, and here)
_DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def tokens(text: str) -> list[str]:
    """Words as coco-caption's tokenization gives them: ``"A man's black-and-white dog."`` ->
    ``["a", "man", "'s", "black-and-white", "dog"]``.

    A Java-free stand-in for Stanford's ``PTBTokenizer -lowerCase`` followed by coco-caption's punctuation filter;
    it agrees on ordinary captions (tests/test_metrics.py) and differs on rarities such as abbreviations ("u.s.").
    """
    words = _TOKEN.findall(_CLITIC.sub(lambda m: " " + (m[1] or m[2]), text.lower()))
    return [_BRACKETS.get(w, w) for w in words if w not in _DROPPED]


def _tokenized(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} lists of references")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    return [" ".join(tokens(h)) for h in hypotheses], [[" ".join(tokens(r)) for r in refs] for refs in references]


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] as coco-caption computes it (unsmoothed, closest reference length), via sacrebleu.

    ``references[i]`` are the reference texts of hypothesis ``i``; their number may differ from one to the next.
    """
    from sacrebleu.metrics import BLEU

    hyps, refs = _tokenized(hypotheses, references)
    if not hyps:
        return 0.0
    # sacrebleu takes reference streams (the j-th reference of every hypothesis); None pads the shorter lists
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(max(map(len, refs)))]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)  # our tokens already; no smoothing, as coco
    return bleu.corpus_score(hyps, streams).score / 100


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """One caption's BLEU in [0, 1], for telling examples apart: sacrebleu's sentence BLEU (exponential smoothing,
    n-gram orders up to the caption's length), so a 2-word caption equal to its reference scores 1, not 0."""
    from sacrebleu.metrics import BLEU

    (hyp,), (refs,) = _tokenized([hypothesis], [references])
    return BLEU(tokenize="none", smooth_method="exp", effective_order=True).sentence_score(hyp, refs).score / 100


def _ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption's "CIDEr" (x10, about 0 to 10; papers print it x100), averaged over the hypotheses.

    A port of pycocoevalcap's ``cider/cider_scorer.py`` (Ramakrishna Vedantam and Tsung-Yi Lin, BSD licence): tf-idf
    vectors of 1- to 4-grams with document frequencies from the evaluated references (so a set of one image scores
    0), ``idf = log(#images) - log(max(1, df))``, the hypothesis' counts clipped by the reference's, a Gaussian penalty
    ``exp(-delta^2 / (2 sigma^2))`` on the length difference, the mean over n-gram orders and references, x10.
    """
    hyps, refs = _tokenized(hypotheses, references)
    if not hyps:
        return 0.0
    crefs = [[_ngram_counts(r.split()) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in crefs:
        df.update({g for r in rs for g in r})
    log_images = math.log(len(crefs))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(4)]
        for g, tf in counts.items():
            v[len(g) - 1][g] = tf * (log_images - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in d.values())) for d in v]
        # the length is the number of bigrams, as in coco: the same difference as in words whenever the
        # cosines can be non-zero (a caption with no words has none)
        return v, norms, sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for h, rs in zip(hyps, crefs):
        hv, hnorm, hlen = vec(_ngram_counts(h.split()))
        total = [0.0] * 4
        for r in rs:
            rv, rnorm, rlen = vec(r)
            penalty = math.exp(-((hlen - rlen) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                if hnorm[n] and rnorm[n]:
                    dot /= hnorm[n] * rnorm[n]
                total[n] += dot * penalty
        scores.append(sum(total) / 4 / len(rs) * 10.0)
    return sum(scores) / len(scores)


# --- vqa: the official VQA evaluation ---------------------------------------------------------------------------------
# From vqaEval.py of the VQA API (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools), kept as written there,
# quirks included: "none" reads as 0, and the capitalised keys ("Im") never match the lower-cased words.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: in effect, a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _VQA_PUNCT:
        # as written there: a mark next to a space, or any digit,digit in the answer, is deleted; else it splits words
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=32)  # sic: vqaEval.py passes re.UNICODE (32) as sub's count


def _process_digit_article(text: str) -> str:
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (``processPunctuation`` then ``processDigitArticle``):
    ``"Two dogs!"`` -> ``"2 dogs"``, ``"The T-shirt."`` -> ``"t shirt"``, ``"dont"`` -> ``"don't"``."""
    return _process_digit_article(_process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """VQA accuracy in [0, 1]; ``answers[i]`` are the human answers to question ``i``.

    With several human answers (the VQA datasets have 10) each question scores ``min(#matching answers / 3, 1)``
    averaged over the subsets that leave one answer out, as vqaEval.py does; a single reference answer stands for
    the humans' consensus, so with one the score is 1 for a normalised exact match and 0 otherwise. Unlike vqaEval.py,
    which trusts the datasets' answers to be normalised already, the references are normalised like the predictions.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} lists of answers")
    scores = []
    for prediction, refs in zip(predictions, answers):
        if not refs:
            raise ValueError("every question needs at least one reference answer")
        p = normalize_answer(prediction)
        humans = [normalize_answer(a) for a in refs]
        if len(humans) == 1:
            scores.append(float(p == humans[0]))
            continue
        hits = sum(h == p for h in humans)
        # leaving out answer i leaves hits - 1 matches if answer i matched, else hits
        scores.append(sum(min(1.0, (hits - (h == p)) / 3) for h in humans) / len(humans))
    return float(np.mean(scores)) if scores else 0.0


# --- retrieval ------------------------------------------------------------------------------------------------------

def recall_at_k(text_emb: np.ndarray, audio_emb: np.ndarray, texts: Sequence[str], ks=(1, 5),
                media: str = "audio") -> dict:
    """R@k both ways, in [0, 1], for clips ``i`` described by ``texts[i]`` (embeddings in the same order).

    Identical descriptions are one text: text-to-audio asks, for each distinct text, whether one of its clips is
    among the top k clips; audio-to-text asks, for each clip, whether its text is among the top k distinct texts.
    The rank of the right item counts every wrong one scoring at least as high, so ties count against the model.
    ``media`` names the keys (``text_to_audio_r1``..., or ``text_to_image_r1``... for images).
    """
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    first = {t: i for i, t in reversed(list(enumerate(texts)))}  # each text's first clip
    position = {t: i for i, t in enumerate(unique)}
    sims = np.stack([text_emb[first[t]] for t in unique]) @ np.asarray(audio_emb).T  # distinct texts x clips
    clip_text = np.array([position[t] for t in texts])
    own = clip_text[None, :] == np.arange(len(unique))[:, None]  # text u describes clip c
    best_own_clip = np.where(own, sims, -np.inf).max(axis=1)
    wrong_clips_ahead = ((sims >= best_own_clip[:, None]) & ~own).sum(axis=1)  # per text
    own_text = sims[clip_text, np.arange(len(texts))]
    wrong_texts_ahead = ((sims >= own_text[None, :]) & ~own).sum(axis=0)  # per clip
    out = {}
    for k in ks:
        out[f"text_to_{media}_r{k}"] = float(np.mean(wrong_clips_ahead < k))
        out[f"{media}_to_text_r{k}"] = float(np.mean(wrong_texts_ahead < k))
    return out


def search_scores(text_emb: np.ndarray, item_emb: np.ndarray, examples: Sequence, media: str) -> tuple[dict, list[dict]]:
    """A search task's held-out metrics (:func:`recall_at_k`) and per-example samples: for each item (clip or
    image), the description that scores best, 1 when it is the item's own."""
    texts = [e.text for e in examples]
    metrics = {k: round(v, 4) for k, v in recall_at_k(text_emb, item_emb, texts, media=media).items()}
    unique = list(dict.fromkeys(texts))
    best = (np.stack([text_emb[texts.index(t)] for t in unique]) @ np.asarray(item_emb).T).argmax(axis=0)
    samples = [{"file": e.file, "reference": e.text, "output": unique[b], "score": float(unique[b] == e.text)}
               for e, b in zip(examples, best)]
    return metrics, samples
