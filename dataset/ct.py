"""The two shapes CT takes inside this project, and the one error type for bad user input.

`Volume`: a 3D CT in HU, resampled to nothing and reoriented (by axis permutation/flip only) to one canonical
layout, so coronal and sagittal reformats are plain array views.

`SliceStack`: what every reader ends in and everything downstream (2.5D stack, VLM image, reports) starts from —
the slices of one plane in display orientation, the key slice, and what the values and spacings are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

Plane = Literal["axial", "coronal", "sagittal", "unknown"]
PLANES = ("axial", "coronal", "sagittal")

# Window presets (SPEC §4.3) as (level, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


class InputError(ValueError):
    """A problem with what the user gave us. The message says what is wrong, in which file, and what to do;
    entry scripts print it alone and exit non-zero (no traceback)."""


def window_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU (any shape) → uint8 display values: [level − width/2, level + width/2] mapped linearly onto 0..255."""
    if width <= 0:
        raise InputError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) → (H, W, 3), the value in every channel: a grey slice as an RGB image."""
    return np.stack((gray, gray, gray), axis=-1)  # twice as fast as np.repeat along a new last axis


def stretch_to_uint8(gray: np.ndarray) -> np.ndarray:
    """(H, W) any numeric → uint8 spread over its own min..max, in float32 arithmetic whatever the input dtype: how
    the released pipeline fed the key slice to the VLM (`gray` itself when it is uint8 already spanning 0..255)."""
    lo, hi = float(gray.min()), float(gray.max())
    if gray.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):  # already spread: the arithmetic below is the identity
        return gray

    def stretch(values: np.ndarray) -> np.ndarray:
        return np.rint((np.asarray(values, np.float32) - lo) * (255.0 / max(hi - lo, 1e-10))).astype(np.uint8)

    if gray.dtype in (np.uint8, np.uint16):  # the same arithmetic on each possible value once, then a lookup: 5× faster
        return np.take(stretch(np.maximum(np.arange(int(hi) + 1), lo)), gray)  # (values below lo never occur)
    return stretch(gray)


@dataclass
class SliceStack:
    """Slices of one plane, in display orientation, with the key slice marked.

    Display orientation (radiological convention): axial — rows anterior→posterior, columns patient
    right→left; coronal — rows superior→inferior, columns patient right→left; sagittal — rows
    superior→inferior, columns anterior→posterior. 2D inputs (image files) are taken as they are ("unknown" plane
    unless the caller says otherwise).
    """

    pixels: np.ndarray  # (S, H, W) float32: HU when `is_hu`, otherwise the stored display values (0..255 for 8-bit)
    is_hu: bool
    key_index: int  # index into S of the key slice
    plane: Plane
    source: str  # where it came from: a path, plus series/volume identity where known
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing
    slice_spacing_mm: float | None = None  # distance between neighbouring slices
    key_rgb: np.ndarray | None = None  # (H, W, 3) uint8: the key slice as given, when the input was an image
    # (a colour image may carry a user-drawn visual prompt; the VLM sees this, the segmentation stack sees `pixels`)
    slice_sources: tuple[str, ...] = field(default=())  # per slice: the file (or DICOM SOPInstanceUID) it came from

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3:
            raise ValueError(f"SliceStack.pixels must be (S, H, W), got shape {self.pixels.shape}")
        if not 0 <= self.key_index < self.pixels.shape[0]:
            raise ValueError(f"key index {self.key_index} outside 0..{self.pixels.shape[0] - 1}")

    @property
    def key_slice(self) -> np.ndarray:
        """(H, W) float32."""
        return self.pixels[self.key_index]

    def display(self, window: tuple[float, float] | None = None) -> np.ndarray:
        """(S, H, W) uint8 display values. HU stacks need a (level, width) window; display stacks return as
        stored when 8-bit, otherwise rescaled from their own min..max (e.g. 16-bit images of unknown meaning)."""
        if self.is_hu:
            if window is None:
                raise ValueError("an HU stack needs a (level, width) window to be displayed")
            return window_to_uint8(self.pixels, *window)
        lo, hi = float(self.pixels.min()), float(self.pixels.max())
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(self.pixels).astype(np.uint8)
        return window_to_uint8(self.pixels, (lo + hi) / 2.0, max(hi - lo, 1e-6))

    def key_image(self, window: tuple[float, float] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the key slice, as the VLM sees it."""
        if self.key_rgb is not None:
            return self.key_rgb
        gray = self.display(window)[self.key_index]
        return gray_rgb(gray)

    def with_key(self, key_index: int) -> SliceStack:
        return replace(self, key_index=key_index, key_rgb=None if key_index != self.key_index else self.key_rgb)


@dataclass
class Volume:
    """A CT volume in HU, canonical LPS layout: array index (z, y, x) with z inferior→superior, y
    anterior→posterior, x patient right→left. Readers only permute and flip axes to get here (no resampling), so
    oblique acquisitions land on their closest canonical axes.
    """

    hu: np.ndarray  # (Z, Y, X) float32 HU
    spacing_mm: tuple[float, float, float]  # (z, y, x) voxel size
    origin_mm: tuple[float, float, float]  # LPS world position (x, y, z) of voxel (0, 0, 0)
    source: str
    slice_sources: tuple[str, ...] = field(default=())  # per z index: the file / SOPInstanceUID, when known

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must be (Z, Y, X), got shape {self.hu.shape}")

    def slices(self, plane: Plane = "axial", key: int | None = None, key_mm: float | None = None
               ) -> SliceStack:
        """All slices of `plane` in display orientation. The key slice is `key` (index along the plane's slice
        axis, in the returned order), or the slice nearest the world coordinate `key_mm` (LPS mm along that axis:
        z for axial, y for coronal, x for sagittal), or the middle slice."""
        sz, sy, sx = self.spacing_mm
        ox, oy, oz = self.origin_mm
        if plane == "axial":
            pixels, spacing, step, origin = self.hu, (sy, sx), sz, oz
        elif plane == "coronal":  # (y, z, x), rows flipped so superior is up
            pixels, spacing, step, origin = self.hu.transpose(1, 0, 2)[:, ::-1, :], (sz, sx), sy, oy
        elif plane == "sagittal":  # (x, z, y), rows flipped so superior is up
            pixels, spacing, step, origin = self.hu.transpose(2, 0, 1)[:, ::-1, :], (sz, sy), sx, ox
        else:
            raise InputError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
        count = pixels.shape[0]
        if key is not None and key_mm is not None:
            raise InputError("give the key slice either by index or by position in mm, not both")
        if key_mm is not None:
            key = round((key_mm - origin) / step)
            if not 0 <= key < count:
                raise InputError(f"key position {key_mm} mm lies outside the volume {self.source} along the "
                                 f"{plane} axis ({origin:.1f}..{origin + step * (count - 1):.1f} mm)")
        if key is None:
            key = count // 2
        if not 0 <= key < count:
            raise InputError(f"key slice {key} outside 0..{count - 1} of the {plane} slices of {self.source}")
        sources = self.slice_sources if plane == "axial" else ()
        return SliceStack(np.ascontiguousarray(pixels, dtype=np.float32), True, key, plane, self.source,
                          spacing, step, None, sources)
