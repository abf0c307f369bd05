"""Mask → findings (SPEC §3.2): threshold 0.5 → closing (5×5 ellipse) → 8-connected components → drop < 16 px →
boxes → NMS at IoU 0.5, largest first.

Boxes are `[x_min, y_min, x_max, y_max]` in inclusive pixel indices of the mask they come from. "Largest" is the
component's pixel count. A component whose box NMS suppresses is not a finding (its box duplicates a larger one);
the thresholded union mask, which segmentation metrics use, still holds its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from monai.data.box_utils import non_max_suppression

THRESHOLD = 0.5
CLOSING_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
MIN_AREA_PX = 16
NMS_IOU = 0.5


@dataclass
class Finding:
    box_xyxy: tuple[int, int, int, int]  # inclusive pixel indices
    mask: np.ndarray  # (H, W) bool: this connected component
    area_px: int


def mask_to_findings(prob: np.ndarray, threshold: float = THRESHOLD, min_area: int = MIN_AREA_PX,
                     nms_iou: float = NMS_IOU) -> list[Finding]:
    """prob (H, W) foreground probability in [0, 1] → findings, largest first."""
    if prob.ndim != 2:
        raise ValueError(f"expected a (H, W) probability map, got shape {prob.shape}")
    binary = (prob > threshold).astype(np.uint8)
    # Pad with background: cv2's default border makes the erosion treat the outside as foreground, which would
    # grow components that lie near the image edge.
    r = CLOSING_KERNEL.shape[0] // 2
    padded = cv2.copyMakeBorder(binary, r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, CLOSING_KERNEL)[r:-r, r:-r]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    if not keep:
        return []
    x, y = stats[keep, cv2.CC_STAT_LEFT], stats[keep, cv2.CC_STAT_TOP]
    w, h = stats[keep, cv2.CC_STAT_WIDTH], stats[keep, cv2.CC_STAT_HEIGHT]
    areas = stats[keep, cv2.CC_STAT_AREA].astype(np.float64)
    # Edge coordinates (max + 1) for IoU, so a 1-px-wide box has width 1.
    edges = torch.tensor(np.stack([x, y, x + w, y + h], axis=1), dtype=torch.float64)
    kept = non_max_suppression(edges, torch.tensor(areas), nms_thresh=nms_iou).tolist()

    return [Finding((int(x[k]), int(y[k]), int(x[k] + w[k] - 1), int(y[k] + h[k] - 1)), labels == keep[k],
                    int(areas[k])) for k in kept]
