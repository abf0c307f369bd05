"""Report-text metrics, per sample, ×100 (SPEC §7), from well-kept offline packages.

- Tokens: lower-cased words and numbers (`tokenize`); the same tokens feed BLEU, METEOR and CIDEr.
- BLEU-1..4: nltk `sentence_bleu`, cumulative uniform weights, smoothing method 1 (ε = 0.1 added to zero n-gram
  counts) so a short report without a 4-gram match is not scored exactly 0.
- ROUGE-1 / ROUGE-L: Google's `rouge-score` F-measure, no stemming.
- METEOR: pycocoevalcap's METEOR 1.5 (Java; its paraphrase table ships with the package). nltk's METEOR would need
  WordNet, which is not available offline.
- CIDEr (extra): pycocoevalcap's CIDEr-D (raw scale 0..10, ×100 as usual); IDF from the references of the scored
  set, so a sample's value depends on the set it is scored with.
- BERTScore-F1, RaTEScore, RadGraph-F1: need model weights; loaded lazily from the local cache (`bert_score`,
  `RaTEScore`, `radgraph` packages, when installed). When they cannot be loaded the value is None and
  `TextScorer.unavailable` says why; never 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

OFFLINE_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor", "cider")
MODEL_METRICS = ("bertscore", "ratescore", "radgraph")
TEXT_METRICS = OFFLINE_METRICS + MODEL_METRICS
_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_SMOOTH = SmoothingFunction().method1


def tokenize(text: str) -> list[str]:
    """"Findings: 2.5 cm Cyst." → ["findings", "2.5", "cm", "cyst"]: lower case, punctuation dropped."""
    return _TOKEN.findall(text.lower())


def bleu(reference: str, candidate: str) -> dict[str, float]:
    """BLEU-1..4 ×100 of one candidate against one reference."""
    ref, hyp = tokenize(reference), tokenize(candidate)
    if not ref or not hyp:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    return {f"bleu{n}": 100.0 * sentence_bleu([ref], hyp, weights=tuple([1.0 / n] * n), smoothing_function=_SMOOTH)
            for n in range(1, 5)}


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False, tokenizer=None)


def rouge(reference: str, candidate: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measure ×100 (on `tokenize`'s tokens, so punctuation and case agree with BLEU)."""
    scores = _ROUGE.score(" ".join(tokenize(reference)), " ".join(tokenize(candidate)))
    return {"rouge1": 100.0 * scores["rouge1"].fmeasure, "rougeL": 100.0 * scores["rougeL"].fmeasure}


class TextScorer:
    """Scores (reference, candidate) pairs in one batch: METEOR runs one Java process, CIDEr needs the whole set.

    `model_metrics`: which of MODEL_METRICS to try; each that cannot load is None with its reason in `unavailable`.
    """

    def __init__(self, model_metrics: Sequence[str] = MODEL_METRICS):
        self.model_metrics = tuple(model_metrics)
        self.unavailable: dict[str, str] = {}

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, float | None]]:
        """[(reference, candidate)] → one dict per pair with every key of TEXT_METRICS (×100, None = unavailable)."""
        rows: list[dict[str, float | None]] = [{**bleu(r, c), **rouge(r, c)} for r, c in pairs]
        refs = {i: [" ".join(tokenize(r)) or "."] for i, (r, _) in enumerate(pairs)}
        hyps = {i: [" ".join(tokenize(c)) or "."] for i, (_, c) in enumerate(pairs)}
        try:
            meteor = _meteor(refs, hyps)
        except OSError as err:  # no Java runtime: METEOR 1.5 is a Java program
            self.unavailable["meteor"] = f"needs a Java runtime (java on PATH): {err}"
            meteor = [None] * len(pairs)
        for name, values in (("meteor", meteor), ("cider", _cider(refs, hyps))):
            for row, value in zip(rows, values):
                row[name] = None if value is None else 100.0 * value
        for name in MODEL_METRICS:
            values = self._model_metric(name, pairs) if name in self.model_metrics else None
            if name not in self.model_metrics:
                self.unavailable[name] = "not requested"
            for i, row in enumerate(rows):
                row[name] = None if values is None else 100.0 * values[i]
        return rows

    def _model_metric(self, name: str, pairs: Sequence[tuple[str, str]]) -> list[float] | None:
        if not pairs:
            return []
        # Weights come from the local cache only: a hub miss must not become a download at evaluation time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        refs, cands = [r for r, _ in pairs], [c for _, c in pairs]
        try:
            if name == "bertscore":
                from bert_score import score as bert_score  # optional dependency

                return [float(v) for v in bert_score(cands, refs, lang="en", verbose=False)[2]]
            if name == "ratescore":
                from RaTEScore import RaTEScore  # optional dependency

                return [float(v) for v in RaTEScore().compute_score(cands, refs)]
            from radgraph import F1RadGraph  # optional dependency

            # mean of the simple, partial and complete reward levels, as SPEC §7 defines RadGraph-F1
            per_level = [F1RadGraph(reward_level=level)(hyps=cands, refs=refs)[1]
                         for level in ("simple", "partial", "complete")]
            return [sum(level[i] for level in per_level) / 3 for i in range(len(pairs))]
        except ImportError as err:
            self.unavailable[name] = f"package not installed ({err.name}); install it and cache its weights"
        except Exception as err:  # noqa: BLE001 — any load failure (missing weights offline) becomes a stated reason
            self.unavailable[name] = f"could not load its model from the local cache: {type(err).__name__}: {err}"
        return None


def _meteor(refs: dict[int, list[str]], hyps: dict[int, list[str]]) -> list[float | None]:
    if not refs:
        return []
    from pycocoevalcap.meteor.meteor import Meteor  # starts a Java process

    meteor = Meteor()
    try:
        return [float(v) for v in meteor.compute_score(refs, hyps)[1]]
    finally:
        del meteor  # its __del__ ends the Java process


def _cider(refs: dict[int, list[str]], hyps: dict[int, list[str]]) -> list[float | None]:
    if not refs:
        return []
    from pycocoevalcap.cider.cider import Cider

    return [float(v) for v in Cider().compute_score(refs, hyps)[1]]
