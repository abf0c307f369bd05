"""Red marks drawn on the key slice: the boxes of the grounding tool turn (SPEC §3.2) and the visual prompts of
SPEC §4.1 / §4.4 (`bbox`, `ellipse`, `contour`, `cropped`), optionally jittered for training.

Boxes are `[x_min, y_min, x_max, y_max]` in inclusive pixel indices, points are (x, y) pixel centres; colour pure
red, 2 px lines, no antialiasing (every drawn pixel is exactly (255, 0, 0)). Drawing never changes its input.
Geometry given explicitly (`draw_boxes`, `draw_ellipse`, `draw_contour`, `crop_around`: the inference CLI's
--box/--ellipse/--contour) must lie inside the image, else InputError.

Prompts drawn from a mask (`draw_prompt`):
- bbox: the mask's box.
- ellipse: the smallest ellipse with the axes and shape of the mask's second moments that contains every mask pixel
  centre, grown by ELLIPSE_MARGIN_PX so the line runs around the lesion rather than over its rim. It follows the
  lesion's orientation, unlike the box's circumscribed ellipse.
- contour: the mask's outer boundary (cv2.findContours, external; every component of the mask).
- cropped: a square crop centred on the mask's box; side = CROP_FACTOR × the box's longer side, at least
  CROP_MIN_PX, at most min(H, W); shifted (never shrunk) to stay inside the image. Nothing is drawn.
Jitter (training) moves each side of the mask's box by up to ±jitter of its size (`jitter_box`) and every kind
follows that box: bbox draws it, ellipse and contour are mapped onto it by the box-to-box affine map, cropped is
centred on it and sized from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import floor

import cv2
import numpy as np

from dataset.ct import InputError

RED = (255, 0, 0)
LINE_PX = 2
PROMPT_KINDS = ("bbox", "ellipse", "contour", "cropped")
ELLIPSE_MARGIN_PX = 1.5
CROP_FACTOR = 3.0
CROP_MIN_PX = 64
_SHIFT = 4  # cv2 fixed-point bits: ellipses keep 1/16-px precision instead of rounding centre and axes


def _check_image(image: np.ndarray) -> tuple[int, int]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    return image.shape[0], image.shape[1]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) bool → inclusive (x1, y1, x2, y2) of its pixels."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        raise ValueError("the mask is empty: it has no box")
    y1, y2 = np.flatnonzero(rows)[[0, -1]]
    x1, x2 = np.flatnonzero(cols)[[0, -1]]
    return int(x1), int(y1), int(x2), int(y2)


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


def _check_box(box: Sequence[int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    H, W = shape
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 <= x2 < W and 0 <= y1 <= y2 < H):
        raise InputError(f"box {list(box)} lies outside the {W}×{H} image or is inverted: give [x_min, y_min, "
                         f"x_max, y_max] with 0 ≤ x_min ≤ x_max ≤ {W - 1} and 0 ≤ y_min ≤ y_max ≤ {H - 1}")
    return x1, y1, x2, y2


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[int]], jitter: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """image (H, W, 3) uint8 RGB → a copy with red 2-px box outlines. `jitter` > 0 needs `rng` (training: 0.25)."""
    shape = _check_image(image)
    if jitter and rng is None:
        raise ValueError("jittered boxes need an explicit random generator (rng) for reproducibility")
    out = image.copy()
    for box in boxes:
        x1, y1, x2, y2 = _check_box(jitter_box(box, jitter, rng, shape) if jitter else box, shape)
        cv2.rectangle(out, (x1, y1), (x2, y2), RED, LINE_PX)
    return out


def _ellipse(out: np.ndarray, center_xy: Sequence[float], axes_xy: Sequence[float], angle_deg: float) -> None:
    scale = 1 << _SHIFT
    center = tuple(round(v * scale) for v in center_xy)
    axes = tuple(round(v * scale) for v in axes_xy)
    cv2.ellipse(out, center, axes, float(angle_deg), 0.0, 360.0, RED, LINE_PX, cv2.LINE_8, _SHIFT)


def draw_ellipse(image: np.ndarray, center_xy: Sequence[float], axes_xy: Sequence[float], angle_deg: float = 0.0
                 ) -> np.ndarray:
    """image (H, W, 3) uint8 → a copy with a red 2-px ellipse: centre (x, y), semi-axes (a, b) in pixels, the a axis
    turned `angle_deg` degrees from +x towards +y (clockwise on screen). The whole curve must lie inside the image."""
    H, W = _check_image(image)
    cx, cy = (float(v) for v in center_xy)
    a, b = (float(v) for v in axes_xy)
    theta = np.deg2rad(angle_deg)
    half_w = np.hypot(a * np.cos(theta), b * np.sin(theta))  # half extents of the rotated ellipse
    half_h = np.hypot(a * np.sin(theta), b * np.cos(theta))
    if not (np.isfinite([cx, cy, a, b, angle_deg]).all() and a > 0 and b > 0):
        raise InputError(f"ellipse centre {list(center_xy)}, semi-axes {list(axes_xy)}, angle {angle_deg}: give "
                         "finite numbers and positive semi-axes")
    if not (cx - half_w >= -1e-6 and cx + half_w <= W - 1 + 1e-6 and cy - half_h >= -1e-6
            and cy + half_h <= H - 1 + 1e-6):
        raise InputError(f"ellipse centre {list(center_xy)}, semi-axes {list(axes_xy)}, angle {angle_deg} reaches "
                         f"outside the {W}×{H} image (x {cx - half_w:.1f}..{cx + half_w:.1f}, "
                         f"y {cy - half_h:.1f}..{cy + half_h:.1f}): give an ellipse inside the image")
    out = image.copy()
    _ellipse(out, (cx, cy), (a, b), angle_deg)
    return out


def draw_contour(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """image (H, W, 3) uint8 → a copy with the closed red 2-px polygon through points (K ≥ 3, 2) (x, y) pixels."""
    H, W = _check_image(image)
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise InputError(f"a contour needs at least 3 finite (x, y) points, got an array of shape {points.shape}")
    if points.min() < 0 or points[:, 0].max() > W - 1 or points[:, 1].max() > H - 1:
        raise InputError(f"contour points reach outside the {W}×{H} image (x {points[:, 0].min():g}.."
                         f"{points[:, 0].max():g}, y {points[:, 1].min():g}..{points[:, 1].max():g}): give points "
                         f"with 0 ≤ x ≤ {W - 1} and 0 ≤ y ≤ {H - 1}")
    out = image.copy()
    cv2.polylines(out, [np.rint(points).astype(np.int32)], True, RED, LINE_PX)
    return out


def crop_around(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """image (H, W, 3) uint8 → the square crop around `box` (rule in the module docstring), a copy."""
    shape = _check_image(image)
    x1, y1, x2, y2 = _check_box(box, shape)
    H, W = shape
    side = int(np.clip(round(CROP_FACTOR * max(x2 - x1 + 1, y2 - y1 + 1)), CROP_MIN_PX, min(H, W)))
    # The crop's centre pixel (start + (side − 1)/2) lands within ½ px of the box centre, unless the border shifts it.
    x0 = min(max(floor((x1 + x2) / 2 - (side - 1) / 2 + 0.5), 0), W - side)
    y0 = min(max(floor((y1 + y2) / 2 - (side - 1) / 2 + 0.5), 0), H - side)
    return image[y0:y0 + side, x0:x0 + side].copy()


def _enclosing_ellipse(points_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(K, 2) pixel centres → (centre (2,), semi-axes (2,), angle in degrees): the points' moment ellipse scaled to
    contain all of them, plus ELLIPSE_MARGIN_PX. Each pixel's own spread (1/12 px² per axis) keeps a line or a
    single pixel from giving a flat ellipse."""
    center = points_xy.mean(axis=0)
    offsets = points_xy - center
    variances, axes_dirs = np.linalg.eigh(offsets.T @ offsets / len(points_xy) + np.eye(2) / 12.0)
    radii = np.sqrt(variances)
    reach = np.sqrt((((offsets @ axes_dirs) / radii) ** 2).sum(axis=1).max())  # largest Mahalanobis radius
    angle = float(np.degrees(np.arctan2(axes_dirs[1, 0], axes_dirs[0, 0])))
    return center, reach * radii + ELLIPSE_MARGIN_PX, angle


def _box_map(points_xy: np.ndarray, box: Sequence[int], new_box: Sequence[int]) -> np.ndarray:
    """Map (K, 2) pixel-centre points from `box` onto `new_box` (inclusive boxes, edge-aligned affine map)."""
    start, new_start = np.array(box[:2], float), np.array(new_box[:2], float)
    size = np.array(box[2:], float) - start + 1
    new_size = np.array(new_box[2:], float) - new_start + 1
    return new_start + (points_xy + 0.5 - start) * (new_size / size) - 0.5


def draw_prompt(image: np.ndarray, masks: Sequence[np.ndarray], kind: str, rng: np.random.Generator | None = None,
                jitter: float = 0.0) -> np.ndarray:
    """image (H, W, 3) uint8 → the visual prompt for `masks` ((H, W) bool each; one mark per mask, a group prompt
    passes several): (H, W, 3) with red marks, or for `cropped` (exactly one mask) the (side, side, 3) crop.
    `jitter` > 0 (training) needs `rng`."""
    shape = _check_image(image)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown visual prompt {kind!r}; choose one of {', '.join(PROMPT_KINDS)}")
    if jitter < 0 or (jitter and rng is None):
        raise ValueError(f"jitter {jitter}: give jitter ≥ 0, and an explicit random generator (rng) when it is > 0")
    if not masks or (kind == "cropped" and len(masks) != 1):
        raise ValueError(f"{kind} prompt got {len(masks)} masks; it needs "
                         f"{'exactly one' if kind == 'cropped' else 'at least one'}")
    out = image.copy()
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask of shape {mask.shape} does not match the {shape} image")
        box = mask_box(mask)
        new_box = jitter_box(box, jitter, rng, shape) if jitter else box
        if kind == "cropped":
            return crop_around(image, new_box)
        if kind == "bbox":
            cv2.rectangle(out, new_box[:2], new_box[2:], RED, LINE_PX)
        elif kind == "ellipse":
            _ellipse(out, *_enclosing_ellipse(_box_map(np.argwhere(mask)[:, ::-1].astype(float), box, new_box)))
        else:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            high = np.array([shape[1] - 1, shape[0] - 1])
            cv2.polylines(out, [np.clip(np.rint(_box_map(c[:, 0].astype(float), box, new_box)), 0, high)
                                .astype(np.int32) for c in contours], True, RED, LINE_PX)
    return out
