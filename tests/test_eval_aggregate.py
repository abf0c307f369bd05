"""Aggregation on a small fixture with known answers, and scoring rules of the text-guided task."""

import numpy as np
import pytest
from PIL import Image

from dataset.records import Abnormality, Record
from evaluation.aggregate import MAX_OVER_TYPES, aggregate, max_over_types, summarise
from evaluation.score import score_rows, strip_findings
from evaluation.text_metrics import TextScorer
from inference.report import mask_rle


def _row(key, task="grounded", categories=(), **values):
    return {"key": key, "task": task, "plane": "axial", "sample_id": key.split("/")[0], "abn_ids": [1],
            "categories": [list(c) for c in categories], "prompt_type": None, "flow": "union", **values}


def test_sample_and_macro_means():
    liver_cyst, kidney_stone = ("Abdomen", "Liver", "Cyst"), ("Abdomen", "Kidney", "Stone")
    rows = [_row("s1", categories=[liver_cyst], dice=90.0),
            _row("s2", categories=[liver_cyst], dice=70.0),
            _row("s3", categories=[liver_cyst, kidney_stone, liver_cyst], dice=30.0),  # counts once per category
            _row("s4", categories=[], dice=100.0)]  # normal: sample mean only
    s = summarise(rows)
    assert s["sample"]["dice"] == pytest.approx((90 + 70 + 30 + 100) / 4)
    assert s["macro"]["dice"] == pytest.approx(((90 + 70 + 30) / 3 + 30) / 2)
    assert s["categories"] == 2 and s["per_category"]["Cyst"]["n"] == 3
    by_structure = summarise(rows, level=1)  # structure level: Liver (90, 70, 30), Kidney (30)
    assert by_structure["macro"]["dice"] == pytest.approx(((90 + 70 + 30) / 3 + 30) / 2)
    assert summarise(rows, level=0)["macro"]["dice"] == pytest.approx((90 + 70 + 30) / 3)


def test_pooled_counts():
    rows = [_row("a", gt_components=2, **{"detected@0.5": 1}, lesion_tp=1, lesion_fp=1, lesion_fn=1),
            _row("b", gt_components=1, **{"detected@0.5": 1}, lesion_tp=1, lesion_fp=0, lesion_fn=0),
            _row("c", task="text_guided", outcome="TP"), _row("d", task="text_guided", outcome="FN"),
            _row("e", task="text_guided", outcome="TN"), _row("f", task="text_guided", outcome="FP"),
            _row("g", task="text_guided", outcome="TN")]
    s = summarise(rows)["sample"]
    assert s["detection@0.5"] == pytest.approx(100 * 2 / 3)
    assert s["lesion_precision"] == pytest.approx(100 * 2 / 3) and s["lesion_recall"] == pytest.approx(100 * 2 / 3)
    assert s["lesion_f1"] == pytest.approx(100 * 2 / 3)
    assert s["text_sensitivity"] == pytest.approx(50.0) and s["text_specificity"] == pytest.approx(100 * 2 / 3)


def test_max_over_types_is_per_finding_and_per_metric():
    rows = [_row(f"s1/1/{t}", task="visual_prompt", prompt_type=t, bleu1=b, rougeL=r)
            for t, b, r in (("bbox", 10.0, 40.0), ("ellipse", 30.0, 20.0), ("contour", 20.0, None))]
    rows.append(_row("s2/1/bbox", task="visual_prompt", prompt_type="bbox", bleu1=50.0, rougeL=50.0))
    merged = {r["sample_id"]: r for r in max_over_types(rows)}
    assert merged["s1"]["bleu1"] == 30.0 and merged["s1"]["rougeL"] == 40.0
    assert merged["s1"]["prompt_type"] == MAX_OVER_TYPES
    summary = aggregate(rows)
    assert list(summary) == [("visual_prompt", "bbox"), ("visual_prompt", "contour"), ("visual_prompt", "ellipse"),
                             ("visual_prompt", MAX_OVER_TYPES)]
    assert summary[("visual_prompt", "bbox")]["sample"]["bleu1"] == pytest.approx(30.0)
    assert summary[("visual_prompt", MAX_OVER_TYPES)]["sample"]["bleu1"] == pytest.approx(40.0)


@pytest.mark.slow  # starts METEOR's Java scorer
def test_text_guided_refusal_rules(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img" / "0.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask" / "1.png")
    record = Record("s", tmp_path / "img", tmp_path / "mask", [0], "axial", [Abnormality(1, 1, "cyst", "liver cyst")])
    refusal = "I don't see any relevant abnormalities on the image."
    base = {"plane": "axial", "sample_id": "s", "categories": [], "prompt_type": None, "question": "q",
            "flow": None, "task": "text_guided", "finding_masks_rle": []}
    full = mask_rle(np.ones((8, 8), bool))
    preds = [{**base, "key": "fn", "abn_ids": [1], "polarity": "positive", "reference": "liver cyst",
              "text": refusal, "refusal": True, "seg_tokens": 0, "mask_rle": None},
             {**base, "key": "tp", "abn_ids": [1], "polarity": "positive", "reference": "liver cyst",
              "text": "liver cyst", "refusal": False, "seg_tokens": 1, "mask_rle": full},
             {**base, "key": "tn", "abn_ids": [], "polarity": "negative", "reference": refusal, "text": refusal,
              "refusal": True, "seg_tokens": 1, "mask_rle": None},
             {**base, "key": "fp", "abn_ids": [], "polarity": "negative", "reference": refusal,
              "text": "liver cyst", "refusal": False, "seg_tokens": 1, "mask_rle": full}]
    rows = {r["key"]: r for r in score_rows(preds, {("axial", "s"): record}, TextScorer(model_metrics=()))}
    assert [rows[k]["outcome"] for k in ("fn", "tp", "tn", "fp")] == ["FN", "TP", "TN", "FP"]
    assert rows["fn"]["bleu1"] == 0.0 and rows["fn"]["meteor"] == 0.0 and rows["fn"]["dice"] == 0.0  # no <SEG>
    assert rows["tp"]["bleu1"] == pytest.approx(100.0) and rows["tp"]["dice"] == 100.0
    assert rows["tn"]["rougeL"] == 100.0 and rows["tn"]["cider"] == 100.0 and rows["tn"]["dice"] == 100.0
    assert rows["fp"]["bleu4"] == 0.0 and rows["fp"]["dice"] == 0.0 and rows["fp"]["pixel_specificity"] == 0.0
    assert rows["fn"]["bertscore"] is None  # unavailable stays None, never 0
    s = summarise(list(rows.values()))["sample"]
    assert s["text_sensitivity"] == 50.0 and s["text_specificity"] == 50.0


def test_strip_findings():
    assert strip_findings("Findings 1: a cyst.\nFindings 2: a stone.\n") == "a cyst.\na stone."
