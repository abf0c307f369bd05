"""Training augmentation of the segmentation input (SPEC §4.3). The (S, H, W) slice stack and its (N, H, W) masks
move together; intensity changes touch the stack only; each neighbour slice (not the key, the centre one) is zeroed
with probability 0.3.

The pipeline is a MONAI `Compose` of dictionary transforms, seeded on every call from the caller's numpy Generator,
so the result is a pure function of the inputs and the generator's state. MONAI's stock transforms cost 2–4× this
pipeline per (9, 512, 512) call on one core (≈ 55–95 ms against ≈ 25 ms, measured on a 2-vCPU VM):
RandGaussianNoise draws float64 noise with numpy's legacy generator (≈ 140 ms when it fires), RandRotate and RandZoom
each resample every key separately, and MONAI 1.6.1's lazy resampling, which would fuse them, fails as soon as one
transform of the chain does not fire. So the costly steps are small MONAI transforms of our own on fast kernels,
drawing their parameters the way MONAI's do:

- `RandRotateZoomd`: RandRotate90 (p 0.3, k ∈ 1..max_k) → RandRotate (±0.15 rad, p 0.5) → RandZoom (0.7–1.4,
  p 0.5, keep_size), composed into one affine map about the image centre and resampled once (torch grid_sample:
  bilinear for the image, nearest for masks, zeros outside). One interpolation instead of two also blurs less.
  A quarter turn of a non-square image keeps the (H, W) shape: the corners are cropped / zero-filled.
- `RandGaussianNoiseFastd`: RandGaussianNoise (std ~ U(0, 0.2), p 0.2) with float32 noise from a torch generator.
- `RandGaussianSmoothFastd`: RandGaussianSmooth (σ_rows, σ_cols ~ U(0.1, 1.0), p 0.3), OpenCV per slice, kernel
  radius 4σ and zero border as in MONAI.
- `RandAdjustContrastFastd`: RandAdjustContrast (γ ∈ 0.7–1.5, p 0.3), MONAI's formula, x^γ as exp(γ·log x).
- RandScaleIntensityd (±0.25, p 0.5) is MONAI's own.
- `RandDropNeighboursd`: MONAI has no per-channel dropout; ours zeroes each non-centre slice with p 0.3.

Slices that are all zero on input (missing neighbours, SPEC §4.3) are zero on output too: at inference a missing
neighbour is an exact zero slice, and noise or a contrast change must not make it look like data.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, RandomizableTransform, RandScaleIntensityd, ToTensord

IMAGE, MASK = "image", "mask"


class RandRotateZoomd(RandomizableTransform, MapTransform):
    """Quarter turns (p `rot90_prob`, k ∈ 1..max_k), rotation (p `rotate_prob`, angle ∈ ±max_angle rad) and zoom
    (p `zoom_prob`, factor ∈ zoom_range; > 1 magnifies) of (C, H, W) tensors about the centre, one resampling per key
    with the key's mode ("bilinear" or "nearest"); the shape is kept and uncovered pixels are zero."""

    def __init__(self, keys: Sequence[Hashable], modes: Sequence[str], rot90_prob: float = 0.3, max_k: int = 3,
                 rotate_prob: float = 0.5, max_angle: float = 0.15, zoom_prob: float = 0.5,
                 zoom_range: tuple[float, float] = (0.7, 1.4)) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)  # each part has its own probability
        self.modes = dict(zip(self.keys, modes, strict=True))
        self.rot90_prob, self.max_k = rot90_prob, max_k
        self.rotate_prob, self.max_angle = rotate_prob, max_angle
        self.zoom_prob, self.zoom_range = zoom_prob, zoom_range

    def randomize(self, data: object = None) -> np.ndarray | None:
        """→ the 2×2 map from output to input pixel offsets (x, y), or None when nothing fires."""
        k = int(self.R.randint(1, self.max_k + 1)) if self.R.rand() < self.rot90_prob else 0
        angle = self.R.uniform(-self.max_angle, self.max_angle) if self.R.rand() < self.rotate_prob else 0.0
        zoom = self.R.uniform(*self.zoom_range) if self.R.rand() < self.zoom_prob else 1.0
        if k == 0 and angle == 0.0 and zoom == 1.0:
            return None
        quarter = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), k)  # exact for multiples of 90°
        c, s = math.cos(angle), math.sin(angle)
        return quarter @ np.array([[c, -s], [s, c]]) / zoom

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        matrix = self.randomize()
        if matrix is None:
            return d
        grid = None
        for key in self.key_iterator(d):
            image = d[key]
            if grid is None:
                grid = _affine_grid(matrix, image.shape[-2], image.shape[-1])
            if image.shape[0]:
                d[key] = F.grid_sample(image[None], grid, mode=self.modes[key], padding_mode="zeros",
                                       align_corners=False)[0]
        return d


def _affine_grid(matrix: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(1, H, W, 2) grid_sample grid for output→input pixel offsets `matrix` about the centre (align_corners=False
    coordinates: pixel centres at (2i + 1)/n − 1). Built by broadcasting: F.affine_grid's batched matmul is ~3× slower."""
    half = np.array([width / 2.0, height / 2.0])
    theta = torch.as_tensor(matrix * half[None, :] / half[:, None], dtype=torch.float32)  # D⁻¹ M D, D = diag(half)
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    gx = theta[0, 0] * xs[None, :] + theta[0, 1] * ys[:, None]
    gy = theta[1, 0] * xs[None, :] + theta[1, 1] * ys[:, None]
    return torch.stack([gx, gy], dim=-1)[None]


class RandGaussianNoiseFastd(RandomizableTransform, MapTransform):
    """With probability `prob`: add N(0, σ²) noise, σ ~ U(0, std) (MONAI's sample_std), drawn in float32 by torch."""

    def __init__(self, keys: Sequence[Hashable], prob: float, std: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.std = std

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        std = self.R.uniform(0.0, self.std)
        generator = torch.Generator().manual_seed(int(self.R.randint(2**31)))
        for key in self.key_iterator(d):
            d[key] = d[key] + torch.randn(d[key].shape, generator=generator).mul_(std)
        return d


class RandGaussianSmoothFastd(RandomizableTransform, MapTransform):
    """With probability `prob`: Gaussian blur of each (H, W) slice, σ along rows and columns drawn separately from
    `sigma_range` (pixels); kernel radius round(4σ), zeros beyond the border (as MONAI's GaussianFilter)."""

    def __init__(self, keys: Sequence[Hashable], prob: float, sigma_range: tuple[float, float]) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = sigma_range

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        sigma_rows, sigma_cols = self.R.uniform(*self.sigma_range, size=2)
        ksize = (2 * int(4 * sigma_cols + 0.5) + 1, 2 * int(4 * sigma_rows + 0.5) + 1)  # (width, height)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(np.stack([
                cv2.GaussianBlur(s, ksize, sigmaX=sigma_cols, sigmaY=sigma_rows, borderType=cv2.BORDER_CONSTANT)
                for s in d[key].numpy()]))
        return d


class RandAdjustContrastFastd(RandomizableTransform, MapTransform):
    """With probability `prob`: x → ((x − min) / range)^γ · range + min over the whole tensor, γ ~ U(gamma_range)."""

    def __init__(self, keys: Sequence[Hashable], prob: float, gamma_range: tuple[float, float]) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.gamma_range = gamma_range

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        gamma = self.R.uniform(*self.gamma_range)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.numpy()  # numpy's min/max are ~10× faster than torch's on CPU
            low, span = float(values.min()), float(values.max() - values.min())
            # log(0) = −inf → exp(−inf) = 0: the minimum maps to itself, as with pow.
            d[key] = (image - low).div_(span + 1e-7).log_().mul_(gamma).exp_().mul_(span).add_(low)
        return d


class RandDropNeighboursd(RandomizableTransform, MapTransform):
    """Zero each slice of the (S, H, W) stack except the centre (key) one, independently with probability `prob`."""

    def __init__(self, keys: Sequence[Hashable], prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)  # the per-slice draws carry the probability
        self.drop_prob = prob

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            count = d[key].shape[0]
            drop = self.R.rand(count) < self.drop_prob
            drop[count // 2] = False
            if drop.any():
                d[key] = d[key].clone()
                for index in np.flatnonzero(drop):  # slice by slice: boolean-mask assignment is ~50× slower
                    d[key][index] = 0.0
        return d


class SegAugment:
    """Random training augmentation of (slices (S, H, W), masks (N, H, W)) on CPU; S odd, the key slice in the centre.

    Each call draws one integer from the caller's Generator and seeds the whole pipeline with it, so the output is a
    pure function of the inputs and the Generator's state (worker count and order do not matter).
    `intensity=False` leaves out the intensity transforms (noise, smoothing, scaling, contrast); `drop_prob` is the
    chance that each neighbour slice is zeroed.
    """

    def __init__(self, intensity: bool = True, drop_prob: float = 0.3) -> None:
        steps: list = [RandRotateZoomd((IMAGE, MASK), modes=("bilinear", "nearest"))]
        if intensity:
            steps += [
                RandGaussianNoiseFastd(IMAGE, prob=0.2, std=0.2),
                RandGaussianSmoothFastd(IMAGE, prob=0.3, sigma_range=(0.1, 1.0)),
                RandScaleIntensityd(IMAGE, factors=0.25, prob=0.5),
                ToTensord(IMAGE, track_meta=False),  # back to a plain tensor: MetaTensor slows every later op
                RandAdjustContrastFastd(IMAGE, prob=0.3, gamma_range=(0.7, 1.5)),
            ]
        steps.append(RandDropNeighboursd(IMAGE, prob=drop_prob))
        self.transform = Compose(steps)

    def __call__(self, image: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (image float32 (S, H, W), masks float32 (N, H, W) exactly 0/1); the inputs are not modified."""
        image = torch.as_tensor(image).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        masks = torch.as_tensor(masks).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if image.ndim != 3 or image.shape[0] % 2 == 0:
            raise ValueError(f"expected an (S, H, W) slice stack with odd S (key in the centre), got {tuple(image.shape)}")
        if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match the slice stack {tuple(image.shape)}")
        empty = np.flatnonzero(~image.numpy().reshape(len(image), -1).any(axis=1))  # numpy: ~10× torch's any()
        self.transform.set_random_state(seed=int(rng.integers(2**32)))
        out = self.transform({IMAGE: image, MASK: masks})
        image = out[IMAGE]
        for index in empty:
            image[index] = 0.0
        return image, (out[MASK] > 0.5).float()
