"""Pure functions behind the viewer: a slice as displayed, the user's mark and the findings drawn on it, clicks →
pixel geometry, a report → findings-table rows. No Gradio here: the tests run them without a browser.

Coordinates are pixels of the original slice (x right, y down; boxes inclusive `(x1, y1, x2, y2)`), as in the
inference API. The view is the slice enlarged by a whole factor (`view_scale`, the factor overlay.png uses) so a
64-px phantom stays readable and clickable.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil

import cv2
import numpy as np

from dataset.ct import SliceStack, gray_rgb, window_to_uint8
from dataset.visual_prompt import RED, draw_boxes, draw_ellipse
from inference.report import OVERLAY_MIN_SIDE, FindingResult, render_overlay

Box = tuple[int, int, int, int]
MARK_KINDS = ("bbox", "ellipse", "cropped")  # what a two-corner mark can be shown to the model as
HIGHLIGHT_RGB = (128, 0, 255)  # the selected finding: neither red (marks, tool boxes) nor a palette colour
HIGHLIGHT_ALPHA = 0.6  # stronger than the palette tint (0.35), so the selected mask stands out
FINDING_COLUMNS = ("#", "finding", "box x1,y1,x2,y2", "area", "long × short axis", "HU mean ± sd", "mask p",
                   "<SEG> p")


def view_scale(shape: Sequence[int]) -> int:
    """(H, W, …) → the whole enlargement factor of the view: the one `inference.report.render_overlay` applies."""
    return max(1, ceil(OVERLAY_MIN_SIDE / max(shape[0], shape[1])))


def slice_rgb(stack: SliceStack, index: int, window: tuple[float, float] | None) -> np.ndarray:
    """Slice `index` of the stack as displayed → (H, W, 3) uint8. HU stacks need the (level, width) window; an image
    input's own colours (e.g. a red mark drawn on it) are kept for its key slice."""
    if stack.is_hu:
        if window is None:
            raise ValueError("an HU stack needs a (level, width) window to be displayed")
        gray = window_to_uint8(stack.pixels[index], *window)
    elif index == stack.key_index and stack.key_rgb is not None:
        return stack.key_rgb
    else:
        gray = stack.display()[index]
    return gray_rgb(gray)


def box_ellipse(box: Box) -> tuple[float, float, float, float]:
    """Inclusive box → the inscribed ellipse (cx, cy, semi-axis a along x, semi-axis b along y) through the centres of
    its border pixels, so it lies inside the image whenever the box does."""
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2


def draw_mark(image: np.ndarray, kind: str, box: Box) -> np.ndarray:
    """(H, W, 3) uint8 → a copy with the red mark as the model is shown it: a 2-px box (bbox; for `cropped`, the box
    the crop is centred on) or the box's inscribed ellipse. A mark outside the image raises InputError."""
    if kind not in MARK_KINDS:
        raise ValueError(f"unknown mark kind {kind!r}; choose one of {', '.join(MARK_KINDS)}")
    if kind == "ellipse":
        cx, cy, a, b = box_ellipse(box)
        return draw_ellipse(image, (cx, cy), (a, b))
    return draw_boxes(image, [box])


def compose(base: np.ndarray, findings: Sequence[FindingResult] = (), highlight: int | None = None,
            pending_xy: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 slice (mark already drawn) → the view, (H·s, W·s, 3) uint8 with s = `view_scale`: findings as
    on overlay.png; finding `highlight` (its id) filled in HIGHLIGHT_RGB with a 2-px outline and box; a red cross on
    the first corner of a mark being clicked (`pending_xy`, slice pixels)."""
    view = render_overlay(base, list(findings))
    s = view_scale(base.shape)
    for f in findings:
        if f.id != highlight or f.mask is None:
            continue
        mask = f.mask.repeat(s, axis=0).repeat(s, axis=1)
        under = base.repeat(s, axis=0).repeat(s, axis=1)[mask].astype(np.float32)
        view[mask] = np.rint(under * (1 - HIGHLIGHT_ALPHA) + np.array(HIGHLIGHT_RGB) * HIGHLIGHT_ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(view, contours, -1, HIGHLIGHT_RGB, 2)
        for x1, y1, x2, y2 in f.component_boxes_xyxy:
            cv2.rectangle(view, (x1 * s, y1 * s), ((x2 + 1) * s - 1, (y2 + 1) * s - 1), HIGHLIGHT_RGB, 2)
    if pending_xy is not None:
        x, y = pending_xy
        cv2.drawMarker(view, (x * s + s // 2, y * s + s // 2), RED, cv2.MARKER_CROSS, max(9, 3 * s), 2)
    return view


def click_pixel(xy: Sequence[float], scale: int, shape: Sequence[int]) -> tuple[int, int]:
    """A click on the view at (x, y) view pixels → the slice pixel (x, y) under it, clamped into the (H, W) slice."""
    x = min(max(int(xy[0] // scale), 0), shape[1] - 1)
    y = min(max(int(xy[1] // scale), 0), shape[0] - 1)
    return x, y


def corners_box(a: tuple[int, int], b: tuple[int, int]) -> Box:
    """Two clicked corners (x, y), in any order → the inclusive box spanning both."""
    return min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])


def findings_rows(report: dict) -> list[list]:
    """report.json content → one table row per finding (columns FINDING_COLUMNS): id, text, box, area (mm² when the
    spacing is known, else px), long × short axis in mm, HU mean ± sd, mask and <SEG> probabilities; "—" where
    unknown."""
    rows = []
    for f in report["findings"]:
        conf = f["confidence"]
        if f["area_mm2"] is not None:
            area = f"{f['area_mm2']:.1f} mm²"
        else:
            area = f"{f['area_px']} px" if f["area_px"] is not None else "—"
        axes = (f"{f['long_axis_mm']:.1f} × {f['short_axis_mm']:.1f} mm" if f["long_axis_mm"] is not None else "—")
        hu = f"{f['mean_hu']:.0f} ± {f['std_hu']:.0f}" if f["mean_hu"] is not None else "—"
        rows.append([f["id"], f["text"] or "—", ",".join(map(str, f["box_xyxy"])) if f["box_xyxy"] else "—", area,
                     axes, hu, _prob(conf["mask_mean_probability"]), _prob(conf["seg_token_probability"])])
    return rows


def _prob(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
