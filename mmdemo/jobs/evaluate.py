"""Held-out evaluation, before and after fine-tuning, through the same functions the tabs use.

Metrics (the registry's ``Task.metrics``):

- caption: corpus BLEU-4 (uniform weights, brevity penalty, +1 smoothing of the 2-4-gram counts, as in
  Lin & Och's smoothed BLEU so that short captions do not all score 0) and CIDEr-D (tf-idf n-gram cosine with
  clipping and a Gaussian length penalty, x10, idf from the held-out references), both written here in a
  few lines rather than pulling in pycocoevalcap and Java;
- vqa: normalised exact-match accuracy (lower case, no punctuation or articles, number words as digits);
- retrieval: recall@1 and @5 text->audio and audio->text (a hit is any clip/text with the same description).

Captions and answers are decoded with the tabs' own defaults (``CAPTION_DEFAULTS``, ``VQA_DEFAULTS``), one image
at a time as a visitor sends it, so the held-out table shows what the Caption and Visual QA tabs give with the
adapter. Each held-out example also gets its own score, so :func:`compare` can say on how many examples the
adapter came closer to the reference than the base model; :data:`METRICS` and :func:`verdict` say it in words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmdemo.data import Example
from mmdemo.models.generation import CAPTION_DEFAULTS, VQA_DEFAULTS

CAPTION_EVAL = CAPTION_DEFAULTS  # the Caption tab's defaults: the table shows what the tab gives
VQA_EVAL = VQA_DEFAULTS


@dataclass(frozen=True)
class Metric:
    label: str  # how the page and the model card name it
    meaning: str  # one line for people who do not program
    percent: bool = False  # a share from 0 to 1, shown as a percentage


METRICS: dict[str, Metric] = {
    "bleu4": Metric("BLEU-4", "how many runs of 1 to 4 words the captions share with the reference captions, "
                              "from 0 to 1; higher is better."),
    "cider": Metric("CIDEr", "how closely the captions match the references, counting words that are specific to "
                             "each image more than common ones, from 0 to 10; higher is better."),
    "accuracy": Metric("Accuracy", "the share of held-out questions answered exactly right (ignoring case, "
                                   "punctuation and a/an/the); higher is better.", percent=True),
    "text_to_audio_r1": Metric("Recall@1, text to audio", "for each description, how often its own clip comes "
                                                          "first in the search; higher is better.", percent=True),
    "text_to_audio_r5": Metric("Recall@5, text to audio", "for each description, how often its own clip is "
                                                          "among the top 5; higher is better.", percent=True),
    "audio_to_text_r1": Metric("Recall@1, audio to text", "for each clip, how often its own description comes "
                                                          "first; higher is better.", percent=True),
    "audio_to_text_r5": Metric("Recall@5, audio to text", "for each clip, how often its own description is among "
                                                          "the top 5; higher is better.", percent=True),
}

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


def evaluate(task: str, loaded, examples: Sequence[Example], adapter=None,
             show: int | None = 4) -> tuple[dict, list[dict]]:
    """Metrics on ``examples`` and the first ``show`` outputs (all with ``None``), through the tabs' functions.

    Each sample is ``{"file", ["question"], "reference", "output", "score"}``; ``score`` is that example's own
    closeness to its reference (sentence BLEU-4 for captions, 1 or 0 for an answer or a retrieved text).
    """
    if task == "caption":
        from mmdemo.models.caption import caption

        files = list(dict.fromkeys(e.file for e in examples))
        path = {e.file: e.path for e in examples}
        refs = {f: [e.text for e in examples if e.file == f] for f in files}
        # one image per call, as the Caption tab sends one: batching may change the last digits of the logits
        outputs = [caption([path[f]], options=CAPTION_EVAL, adapter=adapter, model=loaded)[0] for f in files]
        metrics = {"bleu4": round(bleu4(outputs, [refs[f] for f in files]), 4),
                   "cider": round(cider(outputs, [refs[f] for f in files]), 4)}
        samples = [{"file": f, "reference": refs[f][0], "output": o, "score": round(bleu4([o], [refs[f]]), 4)}
                   for f, o in zip(files, outputs)]
    elif task == "vqa":
        from mmdemo.media import load_image
        from mmdemo.models.vqa import answer_pairs

        images = {e.file: load_image(e.path) for e in examples}  # one object per file: encoded once
        outputs = [answer_pairs([(images[e.file], e.question)], options=VQA_EVAL, adapter=adapter, model=loaded)[0]
                   for e in examples]
        metrics = {"accuracy": round(vqa_accuracy(outputs, [[e.answer] for e in examples]), 4)}
        samples = [{"file": e.file, "question": e.question, "reference": e.answer, "output": o,
                    "score": float(normalize_answer(o) == normalize_answer(e.answer))}
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
        samples = [{"file": e.file, "reference": e.text, "output": unique[b], "score": float(unique[b] == e.text)}
                   for e, b in zip(examples, best)]
    else:  # pragma: no cover - the registry refuses unknown tasks first
        raise ValueError(task)
    return metrics, samples if show is None else samples[:show]


def compare(task: str, before: Sequence[dict], after: Sequence[dict]) -> dict:
    """How the adapter did against the base model, example by example (samples from :func:`evaluate`).

    ``better``/``worse``/``same``: examples whose own score rose, fell or stayed; ``base_right``/``adapter_right``:
    examples scored 1 (an exact answer, the right description) by each model.
    """
    pairs = [(b.get("score") or 0.0, a.get("score") or 0.0) for b, a in zip(before, after)]
    return {"task": task, "total": len(pairs), "better": sum(a > b for b, a in pairs),
            "worse": sum(a < b for b, a in pairs), "same": sum(a == b for b, a in pairs),
            "base_right": sum(b >= 1.0 for b, _ in pairs), "adapter_right": sum(a >= 1.0 for _, a in pairs)}


def verdict(task: str, c: dict | None) -> str:
    """One sentence for people who do not program: did fine-tuning help on the held-out examples?"""
    if not c or not c.get("total"):
        return "There were no held-out examples to compare the two models on."
    n = c["total"]
    if task == "vqa":
        return (f"The fine-tuned model answers {c['adapter_right']} of {n} held-out questions exactly right; the "
                f"base model answered {c['base_right']}.")
    if task == "retrieval":
        return (f"The fine-tuned model finds the right description for {c['adapter_right']} of {n} held-out clips; "
                f"the base model for {c['base_right']}.")
    if not c["better"] and not c["worse"]:
        return (f"The fine-tuned model writes the same captions as the base model for all {n} held-out examples: it "
                f"has not learned enough to change them (try more examples, more epochs or a higher learning rate).")
    rest = [f"worse on {c['worse']}" if c["worse"] else "", f"the same on {c['same']}" if c["same"] else ""]
    rest = [r for r in rest if r]
    tail = f" ({' and '.join(rest)})" if rest else ""
    return (f"The fine-tuned model matches the held-out captions better than the base model on {c['better']} of "
            f"{n} examples{tail}.")
