"""Qwen2-VL vision inputs from RGB arrays: the exact output of transformers' `Qwen2VLImageProcessorPil`, faster,
in two stages so the float work can run on the GPU.

The processor resizes with PIL, rescales in float64, normalises in float32, then reorders the pixels into patches
(temporal copies included). Here:
- `encode` (CPU): the resize is PIL's, same filter, same `smart_resize` size, applied band by band (PIL resamples
  bands independently with the same weights, so this is pixel-identical), and only where a band differs from one
  already resized in the same call (`BandResizer`: a grey slice costs one band, the same slice with red marks a few
  rows and columns more); then the uint8 pixels are reordered into patches, one reshape/transpose: (patches, C·P·P)
  uint8 "pixel codes", a quarter of the float bytes and no temporal copies;
- `values` (any device): rescale and normalise depend on one uint8 value and its channel only, so they are looked up
  in a (3, 256) float32 table computed once with the processor's own `rescale` / `normalize` (its arithmetic, order
  and dtypes, hence bit-identical; a fused x·a + b in float32 is off by up to 5e-7), and the temporal copies are
  made there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

CHANNELS = 3


class VisionPreprocessor:
    """`VisionPreprocessor(processor)(images)` == `processor(images=[PIL images], return_tensors="pt")`.

    All settings (pixel budget, patch/temporal/merge sizes, resample filter, rescale factor, mean/std, do_* flags)
    are read from the processor object at construction.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil):
        p = image_processor
        self.min_pixels, self.max_pixels = p.size.get("shortest_edge"), p.size.get("longest_edge")
        if p.do_resize and not (self.min_pixels and self.max_pixels):
            raise ValueError(f"the image processor's size needs 'shortest_edge' and 'longest_edge', got {p.size}")
        self.do_resize = bool(p.do_resize)
        self.resample = Image.Resampling(p.resample)
        self.patch_size, self.merge_size = p.patch_size, p.merge_size
        self.temporal_patch_size = p.temporal_patch_size
        # Every uint8 value in every channel, (C, 1, 256), through the processor's own steps → (C, 256) float32.
        table = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 1, 256)))
        if p.do_rescale:
            table = p.rescale(table, p.rescale_factor)
        if p.do_normalize:
            table = p.normalize(table, p.image_mean, p.image_std)
        self.table = np.ascontiguousarray(table, dtype=np.float32).reshape(CHANNELS, 256)
        # per device values() has run on: the flattened table, and each code position's channel offset c·256 in it
        self._lookup: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the resized image, multiples of patch_size · merge_size."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def encode(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (H, W, 3) uint8 RGB arrays → pixel codes (patches, 3·P·P) uint8, image_grid_thw (images, 3) int64
        (1, H'/P, W'/P per image), patches of all images concatenated in order, in the processor's patch order
        (P: patch_size, H' × W': the `smart_resize` size). `values(codes)` gives the processor's pixel_values."""
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                    or image.shape[2] != CHANNELS or 0 in image.shape:
                what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
                raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got a {what}")
        p, m = self.patch_size, self.merge_size
        sizes = [self.target_size(*image.shape[:2]) for image in images]
        grid = torch.tensor([(1, h // p, w // p) for h, w in sizes], dtype=torch.int64)
        counts = grid.prod(dim=1).tolist()
        codes = np.empty((sum(counts), CHANNELS * p * p), dtype=np.uint8)
        resize = BandResizer(self.resample)  # one per call: the images of one sample are often one slice, marked
        start = 0
        for image, (h, w), n in zip(images, sizes, counts):
            bh, bw = h // (p * m), w // (p * m)
            bands = np.stack([resize(np.ascontiguousarray(image[:, :, c]), h, w) for c in range(CHANNELS)])
            # (C, H, W) → (blocks_h, blocks_w, merge_h, merge_w, C, P, P): the processor's patch order
            blocks = bands.reshape(CHANNELS, bh, m, p, bw, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
            codes[start:start + n].reshape(bh, bw, m, m, CHANNELS, p, p)[...] = blocks
            start += n
        return torch.from_numpy(codes), grid

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """pixel codes (patches, 3·P·P) uint8 → pixel_values (patches, 3·T·P·P) float32 on the codes' device (T:
        temporal_patch_size copies of each patch, the processor's layout (C, T, P, P))."""
        p, t = self.patch_size, self.temporal_patch_size
        if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] != CHANNELS * p * p:
            raise ValueError(f"expected (patches, {CHANNELS * p * p}) uint8 pixel codes, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if codes.device not in self._lookup:
            self._lookup[codes.device] = (torch.from_numpy(self.table).to(codes.device).view(-1),
                                          torch.arange(CHANNELS, device=codes.device).repeat_interleave(p * p) * 256)
        table, offsets = self._lookup[codes.device]
        values = table[codes.long() + offsets]
        return values.view(-1, CHANNELS, 1, p * p).expand(-1, CHANNELS, t, p * p).reshape(-1, CHANNELS * t * p * p)

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (H, W, 3) uint8 RGB arrays → pixel_values (patches, 3·T·P·P) float32, image_grid_thw (images, 3)
        int64, on the CPU: `values(encode(images))`."""
        codes, grid = self.encode(images)
        return self.values(codes), grid


class BandResizer:
    """`BandResizer(resample)(band, height, width)` == `Image.fromarray(band).resize((width, height), resample)`, pixel
    for pixel, for (H, W) uint8 bands, doing only the work that bands resized before by the same object leave.

    PIL resizes in two separable passes whose integer weights depend only on the sizes: first horizontally, each
    row of an 8-bit intermediate from its own input row, then vertically, each output column from its own
    intermediate column. So a band equal to an earlier one except in some rows (the same slice with red marks: a
    box, ellipse, contour or crop marks) redoes the first pass on those rows only, and the second on the
    intermediate columns that then differ; every other pixel is the earlier band's. Bands are kept by reference,
    so callers must not change them while the object is in use.
    """

    def __init__(self, resample: Image.Resampling):
        self.resample = resample
        self.done: list[tuple[np.ndarray, tuple[int, int], np.ndarray, np.ndarray]] = []  # band, size, mid, out

    def _pil(self, array: np.ndarray, height: int, width: int) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize((width, height), resample=self.resample))

    def __call__(self, band: np.ndarray, height: int, width: int) -> np.ndarray:
        """band: (H, W) uint8 C-contiguous → (height, width) uint8."""
        if band.shape == (height, width):  # PIL's resize to the same size is a copy
            return band
        for earlier, size, earlier_mid, earlier_out in reversed(self.done):  # latest first: a band
            # often equals the one just before it (grey: all three; red marks: green and blue), found at once
            if size != (height, width) or earlier.shape != band.shape:
                continue
            rows = np.flatnonzero((earlier != band).any(axis=1))
            if rows.size == 0:
                return earlier_out
            if 2 * rows.size > band.shape[0]:  # mostly different: no cheaper than a whole resize
                continue
            mid = earlier_mid.copy()
            mid[rows] = self._pil(band[rows], rows.size, width)
            columns = np.flatnonzero((mid[rows] != earlier_mid[rows]).any(axis=0))
            out = earlier_out.copy()
            if columns.size:
                out[:, columns] = self._pil(np.ascontiguousarray(mid[:, columns]), height, columns.size)
            break
        else:
            mid = self._pil(band, band.shape[0], width)
            out = self._pil(mid, height, width)
        self.done.append((band, (height, width), mid, out))
        return out
