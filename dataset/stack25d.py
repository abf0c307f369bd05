"""The segmentation module's input (SPEC §4.3): key ± 4 slices, each z-scored on its own, zero-padded to a centred
square and resized to 512×512; and the exact way back from model space to the original slice.

Resizing is torch's `interpolate` throughout, with half-pixel-centre geometry: bilinear with align_corners=False for
images and probabilities, "nearest-exact" for binary masks. Both treat a pixel as a unit square, so model pixel
(i + 0.5)·side/size − 0.5 and original pixel i describe the same place, the mapping has no half-pixel bias, and
when side == size both are the identity (a mask goes there and back unchanged). Plain "nearest" would not do: it
samples the pixel at floor(i·side/size), shifting everything by up to half a pixel towards the origin.
Bilinear downsizing is done without antialiasing (plain bilinear, as the spec states).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, floor
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

CONTEXT = 4  # neighbours on each side of the key slice
SEG_SIZE = 512  # model-space side in pixels

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)
_EPS = 1e-6  # slack for float round-off when mapping pixel edges


def zscore(slice: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) any numeric → (H, W) float32 (x − mean) / std over this slice alone, written into `out` (an (H, W)
    float32 array or view) when given; a constant slice → zeros. Non-finite values make the result non-finite
    (callers check)."""
    x = np.asarray(slice, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, np.float32)
    if x.size == 0 or x.min() == x.max():  # exact test: a round-off std would blow constant slices up into noise
        out[...] = 0.0
        return out
    centred = np.subtract(x, x.mean(), out=out)  # float32 pairwise summation: accurate to ~1e-6 of the values
    flat = centred.ravel()  # a copy only when `out` is a strided view
    std = np.sqrt(np.dot(flat, flat) / flat.size)  # centred first, so E[x²] has no cancellation
    centred /= std
    return centred


def _resize(t: torch.Tensor, size: int, binary: bool) -> torch.Tensor:
    """(C, h, w) → (C, size, size) float; binary masks by nearest-exact, everything else bilinear."""
    if t.shape[-2:] == (size, size):
        return t.float()
    if t.shape[0] == 0:
        return t.new_zeros((0, size, size), dtype=torch.float32)
    if binary:
        return F.interpolate(t[None].float(), size=(size, size), mode="nearest-exact")[0]
    return F.interpolate(t[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class SquareGeometry:
    """How an (H, W) slice maps into the (size, size) model space: zero-pad to side = max(H, W) keeping the image
    centred (the odd pixel of padding goes to the bottom/right), then resize side → size."""

    height: int
    width: int
    size: int = SEG_SIZE

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.size) < 1:
            raise ValueError(f"slice {self.height}×{self.width} and model size {self.size} must all be positive")

    @property
    def side(self) -> int:
        return max(self.height, self.width)

    @property
    def pad_top(self) -> int:
        return (self.side - self.height) // 2

    @property
    def pad_left(self) -> int:
        return (self.side - self.width) // 2

    @property
    def inner(self) -> tuple[slice, slice]:
        """(rows, columns) of the side × side square that hold the original slice."""
        return slice(self.pad_top, self.pad_top + self.height), slice(self.pad_left, self.pad_left + self.width)

    def to_model(self, array: ArrayLike, binary: bool) -> ArrayLike:
        """(C, H, W) → (C, size, size): float32 for images, the input's dtype for binary masks. numpy in → numpy
        out, a tensor in → a tensor out on its device."""
        t = torch.as_tensor(array)
        if t.ndim != 3 or tuple(t.shape[1:]) != (self.height, self.width):
            raise ValueError(f"expected (C, {self.height}, {self.width}), got {tuple(t.shape)}")
        square = t.new_zeros((t.shape[0], self.side, self.side))
        square[(slice(None), *self.inner)] = t
        out = _resize(square, self.size, binary)
        return self._like(out.to(t.dtype) if binary else out, array)

    def to_original(self, array: ArrayLike, binary: bool) -> ArrayLike:
        """(C, size, size) model-space masks (binary) or probabilities → (C, H, W) on the original slice: resize to
        side × side, then crop the padding off. Same array kind as given; float32 unless binary."""
        t = torch.as_tensor(array)
        if t.ndim != 3 or tuple(t.shape[1:]) != (self.size, self.size):
            raise ValueError(f"expected (C, {self.size}, {self.size}), got {tuple(t.shape)}")
        square = _resize(t, self.side, binary)
        out = square[(slice(None), *self.inner)].contiguous()
        return self._like(out.to(t.dtype) if binary else out, array)

    def box_to_original(self, box_xyxy: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Inclusive pixel box in model space → the inclusive box of original pixels it covers (clipped to the
        slice). A box lying wholly in the padding has no original counterpart: ValueError."""
        x1, y1, x2, y2 = box_xyxy
        scale = self.side / self.size
        # Pixel i spans [i, i + 1) in edge coordinates; map both edges, then take the original pixels touched.
        ox1 = floor(x1 * scale - self.pad_left + _EPS)
        oy1 = floor(y1 * scale - self.pad_top + _EPS)
        ox2 = ceil((x2 + 1) * scale - self.pad_left - _EPS) - 1
        oy2 = ceil((y2 + 1) * scale - self.pad_top - _EPS) - 1
        if ox2 < 0 or oy2 < 0 or ox1 >= self.width or oy1 >= self.height:
            raise ValueError(f"model-space box {list(box_xyxy)} lies entirely in the padding of the "
                             f"{self.width}×{self.height} slice")
        return (max(ox1, 0), max(oy1, 0), min(ox2, self.width - 1), min(oy2, self.height - 1))

    @staticmethod
    def _like(t: torch.Tensor, reference: ArrayLike) -> ArrayLike:
        return t if isinstance(reference, torch.Tensor) else t.numpy()


def seg_stack(slices: np.ndarray, key_index: int, context: int = CONTEXT, size: int = SEG_SIZE
              ) -> tuple[np.ndarray, SquareGeometry]:
    """slices (S, H, W) any numeric (windowed display values or HU) → ((2·context + 1, size, size) float32, geometry).

    Channel c holds slice key_index + c − context; neighbours beyond ±context are dropped, missing ones are zero
    slices on their side. Each present slice is z-scored on its own, then the stack is zero-padded and resized.
    """
    slices = np.asarray(slices)
    if slices.ndim != 3 or 0 in slices.shape:
        raise ValueError(f"expected a non-empty (S, H, W) slice stack, got shape {slices.shape}")
    if not (np.issubdtype(slices.dtype, np.number) or slices.dtype == np.bool_):
        raise ValueError(f"slice values must be numeric, got dtype {slices.dtype}")
    if not 0 <= key_index < slices.shape[0]:
        raise ValueError(f"key index {key_index} outside 0..{slices.shape[0] - 1}")
    if context < 0:
        raise ValueError(f"context must be ≥ 0, got {context}")
    geometry = SquareGeometry(slices.shape[1], slices.shape[2], size)
    # z-score straight into the padded square: one pass less than to_model's pad-then-copy. Zero-filled only where
    # something stays zero (padding, missing neighbours): filling 9 MB that is overwritten anyway costs a millisecond.
    channels = range(key_index - context, key_index + context + 1)
    filled = geometry.side == geometry.height == geometry.width and all(0 <= i < slices.shape[0] for i in channels)
    square = (np.empty if filled else np.zeros)((2 * context + 1, geometry.side, geometry.side), np.float32)
    for channel, index in enumerate(channels):
        if 0 <= index < slices.shape[0]:
            zscore(slices[index], out=square[(channel, *geometry.inner)])
    # Integer slices z-score to finite values (a constant slice gives zeros); only float input can hold NaN or inf.
    if not np.issubdtype(slices.dtype, np.integer) and not np.isfinite(square).all():
        raise ValueError("the slice stack holds NaN or infinite values")
    return _resize(torch.from_numpy(square), size, binary=False).numpy(), geometry
