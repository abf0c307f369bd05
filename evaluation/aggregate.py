"""Per-sample scores → summary rows (SPEC §7).

Two averages of every per-sample metric: `sample` (mean over the samples that have a value) and `macro` (mean over
taxonomy categories of the mean over the samples in that category; a sample counts once in each distinct category
of its abnormalities; samples without one, such as normal images and negative questions, enter only the sample
mean). Pooled quantities are computed from counts over all samples of the group, identically for both rows:
detection ratio at t (detected GT components / GT components), lesion-wise precision/recall/F1, text sensitivity
(TP / (TP + FN)) and specificity (TN / (TN + FP)) of the text-guided answers.

Groups: visual_prompt per prompt type and `max_over_types` (per finding and per metric, the best of the four
types: the paper's headline numbers); grounded per flow; text_guided.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from evaluation.seg_metrics import DETECTION_THRESHOLDS
from evaluation.text_metrics import TEXT_METRICS

SEG_METRICS = ("dice", "nsd", "pixel_sensitivity", "pixel_specificity", "per_finding_dice")
METRICS = TEXT_METRICS + SEG_METRICS
MAX_OVER_TYPES = "max_over_types"


def category_of(path: Sequence[str], level: int = -1) -> str | None:
    """One abnormality's taxonomy path [system, structure, category] → the string at `level` (default the leaf)."""
    if not path:
        return None
    return path[level] if -len(path) <= level < len(path) else None


def max_over_types(rows: Sequence[dict]) -> list[dict]:
    """Visual-prompt rows → one row per finding (plane, sample, abnormality) holding each metric's max over types."""
    by_finding: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["task"] == "visual_prompt":
            by_finding[(row["plane"], row["sample_id"], tuple(row["abn_ids"]))].append(row)
    merged = []
    for group in by_finding.values():
        row = {**group[0], "prompt_type": MAX_OVER_TYPES, "key": group[0]["key"].rsplit("/", 1)[0] + "/max"}
        for m in METRICS:
            values = [r[m] for r in group if r.get(m) is not None]
            row[m] = max(values) if values else None
        merged.append(row)
    return merged


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def summarise(rows: Sequence[dict], level: int = -1) -> dict:
    """One group's rows → {"n", "sample": {metric: value}, "macro": {...}, "categories": n} plus pooled values."""
    sample = {m: _mean([r[m] for r in rows if r.get(m) is not None]) for m in METRICS}
    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        for name in sorted({c for path in r["categories"] if (c := category_of(path, level))}):
            by_category[name].append(r)
    macro = {}
    for m in METRICS:
        means = [v for group in by_category.values() if (v := _mean([r[m] for r in group if r.get(m) is not None]))
                 is not None]
        macro[m] = _mean(means)
    pooled: dict[str, float | None] = {}
    components = sum(r.get("gt_components", 0) for r in rows)
    for t in DETECTION_THRESHOLDS:
        pooled[f"detection@{t:.1f}"] = _ratio(sum(r.get(f"detected@{t:.1f}", 0) for r in rows), components)
    tp, fp, fn = (sum(r.get(f"lesion_{k}", 0) for r in rows) for k in ("tp", "fp", "fn"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    pooled.update(lesion_precision=precision, lesion_recall=recall,
                  lesion_f1=(2 * precision * recall / (precision + recall) if precision and recall else
                             (0.0 if precision is not None and recall is not None else None)))
    outcomes = defaultdict(int)
    for r in rows:
        if r.get("outcome"):
            outcomes[r["outcome"]] += 1
    pooled.update(text_sensitivity=_ratio(outcomes["TP"], outcomes["TP"] + outcomes["FN"]),
                  text_specificity=_ratio(outcomes["TN"], outcomes["TN"] + outcomes["FP"]))
    return {"n": len(rows), "categories": len(by_category), "sample": {**sample, **pooled},
            "macro": {**macro, **pooled}, "outcomes": dict(outcomes), "per_category": {
                name: {"n": len(group), **{m: _mean([r[m] for r in group if r.get(m) is not None]) for m in METRICS}}
                for name, group in sorted(by_category.items())}}


def group_key(row: dict) -> tuple[str, str]:
    """(task, variant): the prompt type, the grounded flow, or "all" for text-guided."""
    if row["task"] == "visual_prompt":
        return row["task"], row["prompt_type"]
    if row["task"] == "grounded":
        return row["task"], row.get("flow") or "union"
    return row["task"], "all"


def aggregate(rows: Sequence[dict], level: int = -1) -> dict[tuple[str, str], dict]:
    """All scored rows → (task, variant) → summary, visual prompts' max over types included."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in [*rows, *max_over_types(rows)]:
        groups[group_key(row)].append(row)
    order = {"visual_prompt": 0, "grounded": 1, "text_guided": 2}
    return {k: summarise(v, level) for k, v in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))}
