"""Segmentation metrics on one key slice (SPEC §7). Masks are (H, W) bool on one pixel grid.

Conventions: both masks empty → Dice 1 and NSD 1; exactly one empty → 0; a model that emitted no `<SEG>` gets Dice
and NSD 0 whatever the ground truth (`seg_metrics(..., emitted_seg=False)`). Connected components use
8-connectivity. Pixel sensitivity is None when the ground truth is empty (no positive pixel to find).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

DETECTION_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
NSD_TOLERANCE_PX = 2.0
LESION_IOU = 0.1
_EIGHT = np.ones((3, 3), dtype=bool)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|); 1 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance_px: float = NSD_TOLERANCE_PX) -> float:
    """Normalised surface Dice at `tolerance_px` pixels (MONAI `compute_surface_dice`); 1 both empty, 0 one empty."""
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    import torch  # torch and MONAI take seconds to import: only when a surface is scored
    from monai.metrics import compute_surface_dice

    # MONAI wants one-hot (B, C, H, W); channel 0 (background) is left out of the score.
    def onehot(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        return float(compute_surface_dice(onehot(pred), onehot(gt), class_thresholds=[tolerance_px],
                                          include_background=False)[0, 0])


def components(mask: np.ndarray) -> list[np.ndarray]:
    """(H, W) bool → one (H, W) bool per 8-connected component, in label order."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    return [labels == k for k in range(1, count + 1)]


def detected(pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] = DETECTION_THRESHOLDS) -> dict:
    """How many ground-truth components the prediction covers by at least t (|C∩P| / |C| ≥ t), per threshold.
    → {"gt_components": n, "detected@0.1": k, …}; the detection ratio is pooled over samples in aggregation."""
    coverage = [float((c & pred).sum()) / float(c.sum()) for c in components(gt)]
    return {"gt_components": len(coverage),
            **{f"detected@{t:.1f}": sum(cov >= t - 1e-12 for cov in coverage) for t in thresholds}}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def match(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], min_iou: float = LESION_IOU
          ) -> list[tuple[int, int]]:
    """One-to-one (pred index, gt index) pairs maximising total IoU (Hungarian), keeping pairs with IoU ≥ min_iou."""
    if not preds or not gts:
        return []
    table = np.array([[iou(p, g) for g in gts] for p in preds])
    rows, cols = linear_sum_assignment(table, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if table[r, c] >= min_iou]


def lesion_counts(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], min_iou: float = LESION_IOU) -> dict:
    """Lesion-wise TP/FP/FN: predicted lesions against ground-truth lesions, matched one-to-one at IoU ≥ min_iou.
    Precision/recall/F1 are computed from counts pooled over samples (aggregate.py)."""
    tp = len(match(preds, gts, min_iou))
    return {"lesion_tp": tp, "lesion_fp": len(preds) - tp, "lesion_fn": len(gts) - tp}


def per_finding_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float | None:
    """Mean over ground-truth findings of the Dice with the prediction matched to it (Hungarian on Dice, any
    overlap); an unmatched finding counts 0. None when the sample has no ground-truth finding (extra predictions
    are counted by the lesion-wise precision instead)."""
    if not gts:
        return None
    if not preds:
        return 0.0
    table = np.array([[dice(p, g) for g in gts] for p in preds])
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(sum(table[r, c] for r, c in zip(rows, cols)) / len(gts))


def seg_metrics(pred: np.ndarray, gt: np.ndarray, emitted_seg: bool = True,
                tolerance_px: float = NSD_TOLERANCE_PX) -> dict:
    """Pixel metrics of one sample's union masks, ×100 except counts. pred/gt: (H, W) bool, same shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} are on different grids")
    pred = pred if emitted_seg else np.zeros_like(gt)
    tp, fp = int((pred & gt).sum()), int((pred & ~gt).sum())
    fn, tn = int((~pred & gt).sum()), int((~pred & ~gt).sum())
    return {
        "dice": 100.0 * dice(pred, gt) if emitted_seg else 0.0,
        "nsd": 100.0 * nsd(pred, gt, tolerance_px) if emitted_seg else 0.0,
        "pixel_sensitivity": 100.0 * tp / (tp + fn) if tp + fn else None,
        "pixel_specificity": 100.0 * tn / (tn + fp) if tn + fp else None,
        **detected(pred, gt),
    }
