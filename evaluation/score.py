"""Score a predictions file against the ground truth, and write the tables.

Masks are compared on the 512×512 grid of SPEC §7 by default (`grid="512"`): ground truth and prediction, both
stored on the key slice's own grid (the pipeline maps its masks back onto it), are zero-padded to a centred square and
resized to 512 with nearest-exact, exactly as the model input and the training masks are (`SquareGeometry`). For
OmniAbnorm-CT-14K, whose key slices are 512×512, that is the identity. `grid="native"` compares them on the key
slice's own grid. NSD's tolerance is in pixels of the grid compared on (the 8-bit slices carry no spacing).

Text: the `Findings k:` prefixes are removed from reference and answer before scoring (they are format, not
content). Text-guided: a refusal on a positive question is a FN (text metrics 0), on a negative a TN (100); an
answer to a negative question is a FP (0); an answer to a positive one a TP, scored against the group description.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.ct import InputError
from dataset.records import Record, load_records
from evaluation.aggregate import METRICS, aggregate
from evaluation.predict import annotation_files, read_done
from evaluation.seg_metrics import NSD_TOLERANCE_PX, components, lesion_counts, per_finding_dice, seg_metrics
from evaluation.text_metrics import MODEL_METRICS, TEXT_METRICS, TextScorer
from inference.report import rle_to_mask
from utils.atomic import write_text_atomic

SEG_GRIDS = ("512", "native")
_FINDINGS_PREFIX = re.compile(r"^\s*Findings\s*\d+\s*:\s*", re.MULTILINE)
TABLE_METRICS = ("bleu1", "bleu4", "rouge1", "rougeL", "meteor", "cider", "bertscore", "ratescore", "radgraph",
                 "dice", "nsd", "pixel_sensitivity", "pixel_specificity", "detection@0.5", "lesion_f1",
                 "per_finding_dice", "text_sensitivity", "text_specificity")


def strip_findings(text: str) -> str:
    return _FINDINGS_PREFIX.sub("", text).strip()


def _outcome(row: dict) -> str | None:
    if row["task"] != "text_guided":
        return None
    positive = row["polarity"] == "positive"
    return ("FN" if row["refusal"] else "TP") if positive else ("TN" if row["refusal"] else "FP")


def on_grid(masks: np.ndarray, grid: str = "512") -> np.ndarray:
    """(N, H, W) bool masks on a key slice's grid → (N, 512, 512) bool, zero-padded to a centred square and resized
    by nearest-exact as the model input is (`grid="512"`), or unchanged (`grid="native"`)."""
    if grid == "native":
        return masks
    if grid != "512":
        raise ValueError(f"segmentation grid must be one of {SEG_GRIDS}, got {grid!r}")
    from dataset.stack25d import SEG_SIZE, SquareGeometry  # imports torch: only when masks are scored

    return SquareGeometry(masks.shape[1], masks.shape[2], SEG_SIZE).to_model(masks, binary=True)


def _seg_scores(row: dict, record: Record, tolerance_px: float, grid: str) -> dict:
    shape = _key_shape(record)
    gt_each = record.read_masks(row["abn_ids"], shape) if row["abn_ids"] else np.zeros((0, *shape), bool)
    pred = rle_to_mask(row["mask_rle"]) if row["mask_rle"] else np.zeros(shape, bool)
    if pred.shape != shape:
        raise InputError(f"prediction {row['key']} has a {pred.shape} mask, its ground truth is {shape}: the "
                         f"predictions file does not belong to this data")
    gt_each, pred = on_grid(gt_each, grid), on_grid(pred[None], grid)[0]
    gt = gt_each.any(axis=0) if len(gt_each) else np.zeros_like(pred)
    emitted = row["seg_tokens"] > 0
    scores = seg_metrics(pred, gt, emitted, tolerance_px)
    scores.update(lesion_counts(components(pred) if emitted else [], list(gt_each)))
    if row["task"] == "grounded" and row.get("flow") == "per_finding":
        groups = [g for g in record.groups() if g.ids]
        gt_groups = [on_grid(record.read_masks(g.ids, shape).any(axis=0)[None], grid)[0] for g in groups]
        preds = [on_grid(rle_to_mask(m)[None], grid)[0] for m in row["finding_masks_rle"] if m] if emitted else []
        scores["per_finding_dice"] = None if not gt_groups else 100.0 * per_finding_dice(preds, gt_groups)
    return scores


def _key_shape(record: Record) -> tuple[int, int]:
    with Image.open(record.slice_path(0)) as image:
        return image.height, image.width


def score_rows(predictions: Sequence[dict], records: dict[tuple[str, str], Record],
               scorer: TextScorer, tolerance_px: float = NSD_TOLERANCE_PX, grid: str = "512") -> list[dict]:
    """Prediction lines → per-sample score rows (the prediction's identity fields plus every metric); masks are
    compared on `grid` (see `on_grid`)."""
    pairs = [(strip_findings(p["reference"]), strip_findings(p["text"])) for p in predictions]
    text_scores = scorer.score(pairs)
    rows = []
    for p, text in zip(predictions, text_scores):
        row = {k: p[k] for k in ("key", "task", "plane", "sample_id", "abn_ids", "categories", "prompt_type",
                                 "polarity", "question", "reference", "text", "refusal", "seg_tokens", "flow")}
        row["outcome"] = _outcome(p)
        if row["outcome"] in ("FN", "FP", "TN"):  # the answer is judged by the refusal alone
            fixed = 100.0 if row["outcome"] == "TN" else 0.0
            text = {m: None if text[m] is None else fixed for m in TEXT_METRICS}
        row.update(text)
        row.update({m: None for m in METRICS if m not in row})
        if p["task"] in ("grounded", "text_guided"):
            try:
                record = records[(p["plane"], p["sample_id"])]
            except KeyError:
                raise InputError(f"prediction {p['key']}: sample {p['sample_id']} is not in the {p['plane']} "
                                 f"validation file; score against the data the predictions were made on") from None
            row.update(_seg_scores(p, record, tolerance_px, grid))
        rows.append(row)
    return rows


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def tables(summary: dict, unavailable: dict[str, str]) -> tuple[str, str]:
    """→ (CSV text: every metric, one row per task/variant/average; Markdown: the main metrics)."""
    columns = list(dict.fromkeys([*METRICS, *next(iter(summary.values()))["sample"].keys()])) if summary else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "variant", "average", "n", "categories", *columns])
    lines = ["| task | variant | average | n | " + " | ".join(TABLE_METRICS) + " |",
             "|" + "---|" * (4 + len(TABLE_METRICS))]
    for (task, variant), s in summary.items():
        for average in ("sample", "macro"):
            values = s[average]
            writer.writerow([task, variant, average, s["n"], s["categories"],
                             *("" if values.get(c) is None else f"{values[c]:.4f}" for c in columns)])
            lines.append(f"| {task} | {variant} | {average} | {s['n']} | "
                         + " | ".join(_fmt(values.get(c)) for c in TABLE_METRICS) + " |")
    notes = ["", ("Values ×100. `sample`: mean over samples; `macro`: mean over taxonomy categories. "
                  "visual_prompt `max_over_types`: per finding, the best of the four prompt types (paper headline); "
                  "the other visual_prompt rows are single types. Detection, lesion and text sensitivity/specificity "
                  "are pooled counts (same in both rows). — = not applicable or unavailable.")]
    notes += [f"- {name}: unavailable — {reason}" for name, reason in unavailable.items()]
    return buffer.getvalue(), "\n".join(lines + notes) + "\n"


def score(predictions_path: Path, data_root: Path, out: Path, model_metrics: Sequence[str] = MODEL_METRICS,
          tolerance_px: float = NSD_TOLERANCE_PX, level: int = -1, plots: bool = True, grid: str = "512") -> dict:
    """Score `predictions_path` (JSONL) against `data_root`, masks on `grid` ("512" or "native"); write
    scores.jsonl, summary.json/.csv/.md/.xlsx and plots/*.png to `out`."""
    predictions = list(read_done(predictions_path).values())
    if not predictions:
        raise InputError(f"{predictions_path} holds no predictions; run the prediction step first")
    planes = sorted({p["plane"] for p in predictions})
    records = {(plane, r.sample_id): r for plane, path in annotation_files(data_root, planes).items()
               for r in load_records(path, data_root)}
    scorer = TextScorer(model_metrics)
    rows = score_rows(predictions, records, scorer, tolerance_px, grid)
    summary = aggregate(rows, level)
    csv_text, markdown = tables(summary, scorer.unavailable)
    write_text_atomic(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(out / "summary.json", json.dumps(
        {"unavailable": scorer.unavailable, "seg_grid": grid, "nsd_tolerance_px": tolerance_px, "category_level": level,
         "groups": [{"task": t, "variant": v, **s} for (t, v), s in summary.items()]}, indent=1) + "\n")
    write_text_atomic(out / "summary.csv", csv_text)
    write_text_atomic(out / "summary.md", markdown)
    if plots:
        from evaluation.figures import write_plots, write_xlsx  # matplotlib is slow to import

        write_xlsx(summary, csv_text.split("\n", 1)[0].split(",")[5:], out / "summary.xlsx")
        write_plots(summary, out / "plots")
    return summary
