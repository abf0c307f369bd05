"""Each metric against a hand-computed value (SPEC §7)."""

import math

import numpy as np
import pytest

from evaluation.seg_metrics import detected, dice, lesion_counts, nsd, per_finding_dice, seg_metrics
from evaluation.text_metrics import TextScorer, bleu, rouge, tokenize

REF, HYP = "The cat sat on the mat.", "the cat sat on a mat"


def test_tokenize_lowercases_drops_punctuation_keeps_decimals():
    assert tokenize("Findings: 2.5 cm Cyst, left.") == ["findings", "2.5", "cm", "cyst", "left"]


def test_bleu_by_hand():
    # unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3; equal lengths → brevity penalty 1
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = [100 * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)]
    assert list(bleu(REF, HYP).values()) == pytest.approx(expected)
    assert bleu(REF, "") == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}


def test_bleu_smoothing_keeps_short_partial_match_above_zero():
    # unigrams 4/5, bigrams 2/4, trigrams 1/3, 4-grams 0/2 → method 1 counts 0.1/2; brevity penalty 1
    score = bleu("a b c d x", "a b c y x")["bleu4"]
    assert score == pytest.approx(100 * (4 / 5 * 2 / 4 * 1 / 3 * 0.1 / 2) ** 0.25)


def test_rouge_by_hand():
    # ROUGE-1: 5 shared unigrams of 6 and 6 → F 5/6; LCS "the cat sat on mat" = 5 → F 5/6
    assert rouge(REF, HYP) == pytest.approx({"rouge1": 500 / 6, "rougeL": 500 / 6})
    # LCS of "a b c d" and "d c b a x" is 1 → P 1/5, R 1/4, F 2/9; all 4 unigrams shared → P 4/5 R 1 → F 8/9
    assert rouge("a b c d", "d c b a x") == pytest.approx({"rouge1": 800 / 9, "rougeL": 200 / 9})


@pytest.mark.slow  # starts METEOR's Java scorer
def test_scorer_identical_and_disjoint_and_model_metrics_null_with_reason():
    scorer = TextScorer(model_metrics=("bertscore",))
    same, disjoint = scorer.score([(REF, REF), ("liver cyst", "renal stone")])
    assert same["meteor"] == pytest.approx(100.0) and same["bleu4"] == pytest.approx(100.0)
    assert disjoint["meteor"] == 0.0 and disjoint["cider"] == 0.0 and disjoint["rougeL"] == 0.0
    assert same["cider"] > 0
    for row in (same, disjoint):  # absent → None, never 0
        assert row["bertscore"] is None and row["ratescore"] is None and row["radgraph"] is None
    assert scorer.unavailable["ratescore"] == "not requested"
    assert scorer.unavailable.get("bertscore")


def _mask(shape=(20, 20), *boxes):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def _px(*points):
    m = np.zeros((20, 20), bool)
    for y, x in points:
        m[y, x] = True
    return m


def test_dice_and_pixel_rates_by_hand():
    gt = _mask((20, 20), (5, 10, 5, 10))  # 25 px
    pred = _mask((20, 20), (5, 10, 7, 12))  # 25 px, 15 shared
    s = seg_metrics(pred, gt)
    assert s["dice"] == pytest.approx(100 * 30 / 50)
    assert s["pixel_sensitivity"] == pytest.approx(100 * 15 / 25)
    assert s["pixel_specificity"] == pytest.approx(100 * 365 / 375)  # 400 − 25 negatives, 10 false positives


def test_empty_conventions():
    empty, gt = np.zeros((20, 20), bool), _mask((20, 20), (0, 4, 0, 4))
    assert seg_metrics(empty, empty)["dice"] == 100.0 and seg_metrics(empty, empty)["nsd"] == 100.0
    assert seg_metrics(empty, empty)["pixel_sensitivity"] is None
    assert seg_metrics(gt, empty)["dice"] == 0.0 and seg_metrics(empty, gt)["nsd"] == 0.0
    # no <SEG> emitted → 0 even where an empty ground truth would have matched an empty mask
    assert seg_metrics(empty, empty, emitted_seg=False)["dice"] == 0.0
    assert seg_metrics(gt, gt, emitted_seg=False)["dice"] == 0.0
    assert dice(empty, empty) == 1.0


def test_nsd_by_hand():
    # single pixels: the surface is the pixel; 3 px apart is outside a 2 px tolerance, 2 px apart inside
    assert nsd(_px((5, 5)), _px((5, 8))) == 0.0
    assert nsd(_px((5, 5)), _px((5, 7))) == 1.0
    # 1 predicted surface pixel (within), 2 reference pixels (1 within) → (1 + 1) / (1 + 2)
    assert nsd(_px((5, 5)), _px((5, 5), (15, 15))) == pytest.approx(2 / 3, abs=1e-6)


def test_detection_counts_components_covered_at_each_threshold():
    gt = _mask((20, 20), (0, 2, 0, 5), (10, 12, 10, 15))  # two 10-px components
    pred = _mask((20, 20), (0, 2, 0, 3), (10, 11, 10, 11))  # covers 60 % of the first, 10 % of the second
    d = detected(pred, gt)
    assert d["gt_components"] == 2
    assert [d[f"detected@{t / 10:.1f}"] for t in range(1, 10)] == [2, 1, 1, 1, 1, 1, 0, 0, 0]


def test_lesion_counts_and_per_finding_dice():
    a, b = _mask((20, 20), (0, 4, 0, 4)), _mask((20, 20), (10, 14, 10, 14))
    near_a, far = _mask((20, 20), (0, 4, 1, 5)), _mask((20, 20), (16, 18, 0, 2))
    # near_a matches a (IoU 12/20), far matches nothing, b is missed
    assert lesion_counts([near_a, far], [a, b]) == {"lesion_tp": 1, "lesion_fp": 1, "lesion_fn": 1}
    # finding a: Dice 24/32; finding b: unmatched → 0; mean over the 2 ground-truth findings
    assert per_finding_dice([near_a, far], [a, b]) == pytest.approx((24 / 32 + 0) / 2)
    assert per_finding_dice([], [a]) == 0.0 and per_finding_dice([a], []) is None
