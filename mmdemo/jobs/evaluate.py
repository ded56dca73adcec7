"""Held-out evaluation, before and after fine-tuning, through the same functions the tabs use.

Metrics (the registry's ``Task.metrics``):

- caption: corpus BLEU-4 (uniform weights, brevity penalty, +1 smoothing of the 2-4-gram counts, as in
  Lin & Och's smoothed BLEU so that short captions do not all score 0) and CIDEr-D (tf-idf n-gram cosine with
  clipping and a Gaussian length penalty, x10, idf from the held-out references), both written here in a
  few lines rather than pulling in pycocoevalcap and Java;
- vqa: normalised exact-match accuracy (lower case, no punctuation or articles, number words as digits);
- retrieval: recall@1 and @5 text->audio and audio->text (a hit is any clip/text with the same description).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mmdemo.data import Example
from mmdemo.models.generation import GenerationOptions

CAPTION_EVAL = GenerationOptions(num_beams=1, max_new_tokens=24, min_new_tokens=1)
VQA_EVAL = GenerationOptions(num_beams=1, max_new_tokens=8, min_new_tokens=1)

_PUNCT = re.compile(r"[^\w\s]")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]; ``references[i]`` are the reference texts of hypothesis ``i``."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = tokens(hyp)
        rs = [tokens(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, 5):
            counts = _ngrams(h, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_p = math.log(matches[0] / totals[0])
    log_p += sum(math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, 4))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return float(bp * math.exp(log_p / 4))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (x10) averaged over the hypotheses; document frequencies from the references."""
    refs_tok = [[tokens(r) for r in refs] for refs in references]
    df: list[Counter] = [Counter() for _ in range(4)]
    for rs in refs_tok:
        for n in range(4):
            df[n].update(set().union(*(_ngrams(r, n + 1).keys() for r in rs)) if rs else set())
    log_n = math.log(max(len(references), 1))

    def vec(words: list[str], n: int) -> tuple[dict, float]:
        counts = _ngrams(words, n + 1)
        v = {g: c * (log_n - math.log(max(df[n][g], 1.0))) for g, c in counts.items()}
        return v, math.sqrt(sum(x * x for x in v.values()))

    scores = []
    for hyp, rs in zip(hypotheses, refs_tok):
        h = tokens(hyp)
        total = 0.0
        for n in range(4):
            hv, hnorm = vec(h, n)
            per_ref = []
            for r in rs:
                rv, rnorm = vec(r, n)
                dot = sum(min(hv[g], rv[g]) * rv[g] for g in hv if g in rv)
                sim = dot / (hnorm * rnorm) if hnorm and rnorm else 0.0
                per_ref.append(sim * math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma**2)))
            total += sum(per_ref) / max(len(per_ref), 1) / 4
        scores.append(total * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def normalize_answer(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in tokens(text) if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    hits = [normalize_answer(p) in {normalize_answer(a) for a in refs} for p, refs in zip(predictions, answers)]
    return float(np.mean(hits)) if hits else 0.0


def recall_at_k(text_emb: np.ndarray, audio_emb: np.ndarray, texts: Sequence[str], ks=(1, 5)) -> dict:
    """R@k both ways for clips ``i`` described by ``texts[i]``; identical descriptions count as one text."""
    unique = list(dict.fromkeys(texts))
    t_index = {t: i for i, t in enumerate(unique)}
    t_emb = np.stack([text_emb[texts.index(t)] for t in unique])
    sims = t_emb @ audio_emb.T  # unique texts x clips
    clip_text = np.array([t_index[t] for t in texts])
    out = {}
    for k in ks:
        top_a = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # clips for each text
        t2a = [np.any(clip_text[row] == ti) for ti, row in enumerate(top_a)]
        top_t = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]  # texts for each clip
        a2t = [clip_text[ci] in row for ci, row in enumerate(top_t)]
        out[f"text_to_audio_r{k}"] = float(np.mean(t2a))
        out[f"audio_to_text_r{k}"] = float(np.mean(a2t))
    return out


def evaluate(task: str, loaded, examples: Sequence[Example], adapter=None, show: int = 4) -> tuple[dict, list[dict]]:
    """Metrics on ``examples`` and the first ``show`` outputs, through the tabs' own inference functions."""
    if task == "caption":
        from mmdemo.models.caption import caption

        files = list(dict.fromkeys(e.file for e in examples))
        path = {e.file: e.path for e in examples}
        refs = {f: [e.text for e in examples if e.file == f] for f in files}
        outputs = caption([path[f] for f in files], options=CAPTION_EVAL, adapter=adapter, model=loaded)
        metrics = {"bleu4": round(bleu4(outputs, [refs[f] for f in files]), 4),
                   "cider": round(cider(outputs, [refs[f] for f in files]), 4)}
        samples = [{"file": f, "reference": refs[f][0], "output": o} for f, o in zip(files, outputs)]
    elif task == "vqa":
        from mmdemo.media import load_image
        from mmdemo.models.vqa import answer_pairs

        images = {e.file: load_image(e.path) for e in examples}  # one object per file: encoded once
        outputs = answer_pairs([(images[e.file], e.question) for e in examples], options=VQA_EVAL,
                               adapter=adapter, model=loaded)
        metrics = {"accuracy": round(vqa_accuracy(outputs, [[e.answer] for e in examples]), 4)}
        samples = [{"file": e.file, "question": e.question, "reference": e.answer, "output": o}
                   for e, o in zip(examples, outputs)]
    elif task == "retrieval":
        from mmdemo.models.retrieval import Embedder

        emb = Embedder(loaded, adapter=adapter)
        texts = [e.text for e in examples]
        audio = emb.files([e.path for e in examples])
        text = emb.texts(texts)
        metrics = {k: round(v, 4) for k, v in recall_at_k(text, audio, texts).items()}
        unique = list(dict.fromkeys(texts))
        best = (np.stack([text[texts.index(t)] for t in unique]) @ audio.T).argmax(axis=0)
        samples = [{"file": e.file, "reference": e.text, "output": unique[b]} for e, b in zip(examples, best)]
    else:  # pragma: no cover - the registry refuses unknown tasks first
        raise ValueError(task)
    return metrics, samples[:show]
