"""What one case's inference produces: findings with measurements, `report.json`, `overlay.png`, `finding_<k>.png`.

Coordinates are pixels of the original key slice as displayed (x right, y down); boxes are inclusive
`[x_min, y_min, x_max, y_max]`. The JSON layout is versioned (`SCHEMA_VERSION`) and described by the JSON Schema
`inference/report.schema.json`; docs/inference.md explains every field.

Measurements, when the pixel spacing is known (DICOM, NIfTI):
- area_mm2: mask pixel count × row spacing × column spacing.
- long axis: the maximum Feret diameter — the longest distance between two mask pixel centres (found on their
  convex hull, in mm, so anisotropic pixels are handled) — plus half a pixel step along that direction. Short
  axis: the mask's extent (caliper width) perpendicular to the long axis, plus half a pixel step. The half step
  makes the estimate unbiased for rasterised ellipses: pixel centres alone fall short of the true boundary by about
  half a pixel on average; tests/test_inference_report.py bounds the error below one pixel.
- mean_hu / std_hu: mean and population standard deviation of the key slice's HU inside the mask (HU input only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SCHEMA_VERSION = "omniabnorm-ct-report/1"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
# Finding colours on overlays; no red, which marks visual prompts and tool-turn boxes.
PALETTE = ((255, 215, 0), (0, 200, 255), (50, 205, 50), (255, 0, 255), (255, 140, 0), (30, 144, 255),
           (173, 255, 47), (0, 255, 160))
OVERLAY_MIN_SIDE = 512  # overlays of small slices are enlarged (nearest neighbour, whole factors) to be readable
MASK_ALPHA = 0.35


@dataclass
class Measurements:
    area_mm2: float | None = None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    mean_hu: float | None = None
    std_hu: float | None = None


def axes_mm(mask: np.ndarray, spacing_mm: tuple[float, float]) -> tuple[float, float]:
    """(H, W) bool, (row, column) spacing → (long axis, short axis) in mm (rule in the module docstring)."""
    sy, sx = spacing_mm
    points = np.argwhere(mask)[:, ::-1].astype(np.float64) * (sx, sy)  # (x, y) mm of pixel centres
    hull = points[cv2.convexHull(points.astype(np.float32), returnPoints=False)[:, 0]]
    gaps = hull[:, None, :] - hull[None, :, :]
    lengths = np.linalg.norm(gaps, axis=-1)
    i, j = np.unravel_index(np.argmax(lengths), lengths.shape)
    long = float(lengths[i, j])
    u = gaps[j, i] / long if long > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    across = hull @ v

    def half_step(direction: np.ndarray) -> float:  # half the pixel-lattice step along a unit direction, mm
        return 0.5 / float(np.hypot(direction[0] / sx, direction[1] / sy))

    return long + half_step(u), float(across.max() - across.min()) + half_step(v)


def measure(mask: np.ndarray, spacing_mm: tuple[float, float] | None, hu: np.ndarray | None) -> Measurements:
    """(H, W) bool mask on the original slice → measurements; None where spacing or HU are unknown."""
    out = Measurements()
    if not mask.any():
        return out
    if spacing_mm is not None:
        out.area_mm2 = float(mask.sum()) * spacing_mm[0] * spacing_mm[1]
        out.long_axis_mm, out.short_axis_mm = axes_mm(mask, spacing_mm)
    if hu is not None:
        values = hu[mask].astype(np.float64)
        out.mean_hu, out.std_hu = float(values.mean()), float(values.std())
    return out


def mask_rle(mask: np.ndarray) -> dict:
    """(H, W) bool → {"size": [H, W], "counts": [...]}: lengths of alternating runs in row-major order, starting with
    background (the first count is 0 when the first pixel is foreground)."""
    flat = np.concatenate([[False], mask.ravel(), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1])  # run boundaries, including the start of the first foreground
    counts = np.diff(np.concatenate([[0], changes, [mask.size]])).astype(int).tolist()
    if len(counts) > 1 and counts[-1] == 0:  # a foreground run reaching the last pixel leaves an empty tail
        counts.pop()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of `mask_rle`."""
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape(rle["size"])


@dataclass
class FindingResult:
    id: int  # 1-based, order of the report
    text: str | None  # the finding's own text (per-finding flow, text-guided answer); None when not linked
    mask: np.ndarray | None  # (H, W) bool on the original key slice; None when the model gave no region
    box_xyxy: tuple[int, int, int, int] | None
    component_boxes_xyxy: list[tuple[int, int, int, int]]  # one per connected component of the mask
    mask_probability: float | None  # mean foreground probability inside the mask (segmentation space)
    seg_probability: float | None  # probability the model gave the <SEG> token that produced the mask
    seg_index: int | None  # which <SEG> of the model's output (1-based)
    measurements: Measurements = field(default_factory=Measurements)

    @property
    def area_px(self) -> int | None:
        return int(self.mask.sum()) if self.mask is not None else None


@dataclass
class Report:
    case_id: str
    task: str
    flow: str | None
    instruction: str  # the user turn's text as the model saw it
    question: str | None  # the user's --prompt
    visual_prompt: dict | None
    text: str  # the final answer, `<SEG>` markers removed
    refusal: bool  # the text is one of the trained refusals
    rounds: list[dict]  # per generation round: {"output": raw text with <SEG>, "finished": bool}
    findings: list[FindingResult]
    input: dict
    preprocessing: dict
    model: dict
    generation: dict
    timing: dict
    overlay_base: np.ndarray | None = field(repr=False, default=None)  # (H, W, 3) uint8 drawn under the findings

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION, "case_id": self.case_id, "task": self.task, "flow": self.flow,
            "instruction": self.instruction, "question": self.question, "visual_prompt": self.visual_prompt,
            "text": self.text, "refusal": self.refusal, "rounds": self.rounds,
            "findings": [self._finding(f) for f in self.findings],
            "input": self.input, "preprocessing": self.preprocessing, "model": self.model,
            "generation": self.generation, "timing": self.timing,
        }

    def _finding(self, f: FindingResult) -> dict:
        m = f.measurements
        return {
            "id": f.id, "text": f.text,
            "box_xyxy": list(f.box_xyxy) if f.box_xyxy is not None else None,
            "component_boxes_xyxy": [list(b) for b in f.component_boxes_xyxy],
            "mask_png": f"finding_{f.id}.png" if f.mask is not None else None,
            "mask_rle": mask_rle(f.mask) if f.mask is not None else None,
            "area_px": f.area_px, "area_mm2": _round(m.area_mm2, 2), "long_axis_mm": _round(m.long_axis_mm, 2),
            "short_axis_mm": _round(m.short_axis_mm, 2), "mean_hu": _round(m.mean_hu, 1),
            "std_hu": _round(m.std_hu, 1),
            "confidence": {"mask_mean_probability": _round(f.mask_probability, 4),
                           "seg_token_probability": _round(f.seg_probability, 4)},
            "seg_index": f.seg_index, "slice_index": self.input["slice_index"], "plane": self.input["plane"],
        }

    def write(self, folder: str | Path) -> None:
        """report.json, overlay.png and finding_<k>.png into an existing (temporary) folder."""
        folder = Path(folder)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        Image.fromarray(render_overlay(self.overlay_base, self.findings)).save(folder / "overlay.png")
        for f in self.findings:
            if f.mask is not None:
                Image.fromarray(f.mask.astype(np.uint8) * 255).save(folder / f"finding_{f.id}.png")

    def summary(self) -> str:
        """Human-readable text for the terminal."""
        lines = [f"[{self.case_id}] {self.task}" + (f" ({self.flow})" if self.flow else ""), self.text or "(no text)"]
        if not self.generation["finished"]:
            lines.append(f"(output cut at {self.generation['max_new_tokens']} new tokens; raise --max-new-tokens)")
        for f in self.findings:
            parts = []
            if f.box_xyxy is None:
                parts.append("no region segmented")
            else:
                parts.append(f"box {list(f.box_xyxy)}, {f.area_px} px")
                m = f.measurements
                if m.area_mm2 is not None:
                    parts.append(f"{m.area_mm2:.1f} mm², axes {m.long_axis_mm:.1f} × {m.short_axis_mm:.1f} mm")
                if m.mean_hu is not None:
                    parts.append(f"{m.mean_hu:.0f} ± {m.std_hu:.0f} HU")
                parts.append(f"mask p {f.mask_probability:.2f}")
            if f.seg_probability is not None:
                parts.append(f"<SEG> p {f.seg_probability:.2f}")
            lines.append(f"  finding {f.id}: " + ", ".join(parts) + (f" — {f.text}" if f.text else ""))
        if self.refusal and any(f.mask is not None for f in self.findings):
            lines.append("  note: the text refuses, but the mask marks the region(s) above")
        return "\n".join(lines)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def render_overlay(base: np.ndarray, findings: list[FindingResult]) -> np.ndarray:
    """(H, W, 3) uint8 slice + findings → RGB overlay: translucent masks, outlines, boxes and finding numbers, in
    one colour per finding, enlarged by a whole factor when the slice is small (see OVERLAY_MIN_SIDE)."""
    scale = max(1, ceil(OVERLAY_MIN_SIDE / max(base.shape[:2])))
    out = cv2.resize(base, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale > 1 else base.copy()
    for f in findings:
        if f.mask is None:
            continue
        color = PALETTE[(f.id - 1) % len(PALETTE)]
        mask = np.kron(f.mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else f.mask
        out[mask] = np.rint(out[mask] * (1 - MASK_ALPHA) + np.array(color) * MASK_ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, 1)
        for x1, y1, x2, y2 in f.component_boxes_xyxy:
            cv2.rectangle(out, (x1 * scale, y1 * scale), ((x2 + 1) * scale - 1, (y2 + 1) * scale - 1), color, 1)
        x1, y1 = f.box_xyxy[0] * scale, f.box_xyxy[1] * scale
        origin = (x1, y1 - 4) if y1 >= 16 else (x1, (f.box_xyxy[3] + 1) * scale + 14)
        cv2.putText(out, str(f.id), origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, str(f.id), origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    return out
