"""Red marks drawn on the key slice: the boxes of the grounding tool turn (SPEC §3.2), optionally jittered.

Boxes are `[x_min, y_min, x_max, y_max]` in inclusive pixel indices; colour pure red, 2 px lines.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

RED = (255, 0, 0)
LINE_PX = 2


def jitter_box(box: Sequence[int], fraction: float, rng: np.random.Generator, shape: tuple[int, int]
               ) -> tuple[int, int, int, int]:
    """Move each side by up to ±fraction of the box's width (x) or height (y); stays inside the (H, W) image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1 + 1, y2 - y1 + 1
    dx = rng.uniform(-fraction, fraction, size=2) * w
    dy = rng.uniform(-fraction, fraction, size=2) * h
    nx1, nx2 = sorted((x1 + dx[0], x2 + dx[1]))
    ny1, ny2 = sorted((y1 + dy[0], y2 + dy[1]))
    H, W = shape
    return (int(np.clip(round(nx1), 0, W - 1)), int(np.clip(round(ny1), 0, H - 1)),
            int(np.clip(round(nx2), 0, W - 1)), int(np.clip(round(ny2), 0, H - 1)))


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[int]], jitter: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """image (H, W, 3) uint8 RGB → a copy with red 2-px box outlines. `jitter` > 0 needs `rng` (training: 0.25)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if jitter and rng is None:
        raise ValueError("jittered boxes need an explicit random generator (rng) for reproducibility")
    out = image.copy()
    H, W = image.shape[:2]
    for box in boxes:
        x1, y1, x2, y2 = jitter_box(box, jitter, rng, (H, W)) if jitter else tuple(int(v) for v in box)
        if not (0 <= x1 <= x2 < W and 0 <= y1 <= y2 < H):
            raise ValueError(f"box {list(box)} lies outside the {W}×{H} image")
        cv2.rectangle(out, (x1, y1), (x2, y2), RED, LINE_PX)
    return out
