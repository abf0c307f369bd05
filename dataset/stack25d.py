"""The segmentation module's input (SPEC §4.3): key ± 4 slices, each z-scored on its own, zero-padded to a centred
square and resized to 512×512; and the exact way back from model space to the original slice.

Two steps, so the float work can run where the model is: `stack_channels` (numpy, where the slices are read) picks
the key ± context slices in their stored dtype, zero slices for missing neighbours; `normalize_stack` (torch, any
device) z-scores, pads and resizes them. `seg_stack` is both in one call.

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


def _resize(t: torch.Tensor, size: int, binary: bool) -> torch.Tensor:
    """(C, h, w) → (C, size, size): binary masks by nearest-exact in their own dtype (a new tensor), everything else
    bilinear in float32 (`t` itself when it is float32 of that size already)."""
    if binary:
        if t.shape[-2:] == (size, size):
            return t.clone()
        if t.shape[0] == 0:
            return t.new_zeros((0, size, size))
        return F.interpolate(t[None].float(), size=(size, size), mode="nearest-exact")[0].to(t.dtype)
    if t.shape[-2:] == (size, size):
        return t.float()
    if t.shape[0] == 0:
        return t.new_zeros((0, size, size), dtype=torch.float32)
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
        return self._like(_resize(square, self.size, binary), array)

    def to_original(self, array: ArrayLike, binary: bool) -> ArrayLike:
        """(C, size, size) model-space masks (binary) or probabilities → (C, H, W) on the original slice: resize to
        side × side, then crop the padding off. Same array kind as given; float32 unless binary."""
        t = torch.as_tensor(array)
        if t.ndim != 3 or tuple(t.shape[1:]) != (self.size, self.size):
            raise ValueError(f"expected (C, {self.size}, {self.size}), got {tuple(t.shape)}")
        square = _resize(t, self.side, binary)
        return self._like(square[(slice(None), *self.inner)].contiguous(), array)

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


def stack_channels(slices: np.ndarray, key_index: int, context: int = CONTEXT) -> np.ndarray:
    """slices (S, H, W) any numeric (display values or HU) → (2·context + 1, H, W), same dtype: channel c holds slice
    key_index + c − context, a zero slice where that is outside the stack (neighbours beyond ±context are dropped).
    The slices themselves when they are exactly that. Float slices must be finite."""
    slices = np.asarray(slices)
    if slices.ndim != 3 or 0 in slices.shape:
        raise ValueError(f"expected a non-empty (S, H, W) slice stack, got shape {slices.shape}")
    if not (np.issubdtype(slices.dtype, np.number) or slices.dtype == np.bool_):
        raise ValueError(f"slice values must be numeric, got dtype {slices.dtype}")
    if not 0 <= key_index < slices.shape[0]:
        raise ValueError(f"key index {key_index} outside 0..{slices.shape[0] - 1}")
    if context < 0:
        raise ValueError(f"context must be ≥ 0, got {context}")
    first = key_index - context
    if first == 0 and slices.shape[0] == 2 * context + 1:
        channels = slices
    else:
        channels = np.zeros((2 * context + 1, *slices.shape[1:]), slices.dtype)
        lo, hi = max(first, 0), min(key_index + context + 1, slices.shape[0])
        channels[lo - first:hi - first] = slices[lo:hi]
    if np.issubdtype(channels.dtype, np.inexact) and not np.isfinite(channels).all():
        raise ValueError("the slice stack holds NaN or infinite values")
    return channels


def normalize_stack(channels: torch.Tensor, size: int = SEG_SIZE) -> torch.Tensor:
    """(S, H, W) any numeric, on any device → (S, size, size) float32 there: each channel z-scored on its own,
    (x − mean) / std with the population std, a constant channel (a missing neighbour's zero slice included) → zeros;
    then zero-padded to a centred square and resized (`SquareGeometry.to_model`)."""
    if channels.ndim != 3 or 0 in channels.shape:
        raise ValueError(f"expected a non-empty (S, H, W) stack, got shape {tuple(channels.shape)}")
    # One CPU core may run this (DataLoader workers with data.finish_on: worker, inference): written for it, in place
    # where possible (torch's fused aminmax and var_mean, and pow, take several times longer there).
    values = channels.to(torch.float32, copy=True).flatten(1)
    # exact test: a round-off std would blow a constant channel up into noise
    constant = values.amax(dim=1) == values.amin(dim=1)
    centred = values.sub_(values.mean(dim=1, keepdim=True))
    std = (centred * centred).mean(dim=1, keepdim=True).sqrt()
    z = centred.mul_(torch.where(constant[:, None], 0.0, std.reciprocal())).view(channels.shape)
    if channels.shape[1:] == (size, size):  # already the model's square
        return z
    return SquareGeometry(channels.shape[1], channels.shape[2], size).to_model(z, binary=False)


def seg_stack(slices: np.ndarray, key_index: int, context: int = CONTEXT, size: int = SEG_SIZE
              ) -> tuple[np.ndarray, SquareGeometry]:
    """slices (S, H, W) any numeric (windowed display values or HU) → ((2·context + 1, size, size) float32, geometry):
    `normalize_stack(stack_channels(...))` on the CPU."""
    channels = stack_channels(slices, key_index, context)
    stack = normalize_stack(torch.from_numpy(np.ascontiguousarray(channels)), size)
    return stack.numpy(), SquareGeometry(channels.shape[1], channels.shape[2], size)
