"""Training augmentation of the segmentation input (SPEC §4.3). The (S, H, W) slice stack and its (N, H, W) masks
move together; intensity changes touch the stack only; each neighbour slice (not the key, the centre one) is zeroed
with probability 0.3.

The pipeline is a MONAI `Compose` of dictionary transforms on torch tensors, seeded on every call with one integer,
so the result is a pure function of the inputs, the seed and the device. It runs wherever the tensors are: in the
training step on the GPU by default (`data.finish_on: device`, dataset/finish.py), so a DataLoader worker only
reads, windows and tokenises (SPEC §8: well under 20 ms of one core per sample); in the workers on CPU with
`finish_on: worker`. MONAI's stock RandRotate / RandZoom resample every key once each and RandGaussianNoise draws
float64 noise with numpy on the host, so those steps are small MONAI transforms of our own that draw their
parameters the way MONAI's do:

- `RandRotateZoomd`: RandRotate90 (p 0.3, k ∈ 1..max_k) → RandRotate (±0.15 rad, p 0.5) → RandZoom (0.7–1.4,
  p 0.5, keep_size), composed into one affine map about the image centre and resampled once (torch grid_sample:
  bilinear for the image, nearest for masks, zeros outside). One interpolation instead of two also blurs less.
  A quarter turn of a non-square image keeps the (H, W) shape: the corners are cropped / zero-filled.
- `RandGaussianNoiseFastd`: RandGaussianNoise (std ~ U(0, 0.2), p 0.2) with float32 noise from a torch generator
  on the tensor's device (so the noise, unlike every other draw, differs between CPU and GPU for one seed).
- RandGaussianSmoothd (σ_rows, σ_cols ~ U(0.1, 1.0), p 0.3, 2D per slice) is MONAI's own.
- RandScaleIntensityd (±0.25, p 0.5) is MONAI's own.
- `RandAdjustContrastFastd`: RandAdjustContrast (γ ∈ 0.7–1.5, p 0.3), MONAI's formula, x^γ as exp(γ·log x), with no
  host synchronisation.
- `RandDropNeighboursd`: MONAI has no per-channel dropout; ours zeroes each non-centre slice with p 0.3.

Slices that are all zero on input (missing neighbours, SPEC §4.3) are zero on output too: at inference a missing
neighbour is an exact zero slice, and noise or a contrast change must not make it look like data.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    ToTensord,
)

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
                grid = _affine_grid(matrix, image.shape[-2], image.shape[-1], image.device)
            if image.shape[0]:
                d[key] = F.grid_sample(image[None], grid, mode=self.modes[key], padding_mode="zeros",
                                       align_corners=False)[0]
        return d


def _affine_grid(matrix: np.ndarray, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(1, H, W, 2) grid_sample grid for output→input pixel offsets `matrix` about the centre (align_corners=False
    coordinates: pixel centres at (2i + 1)/n − 1). Built by broadcasting: F.affine_grid's batched matmul is ~3× slower."""
    half = np.array([width / 2.0, height / 2.0])
    theta = (matrix * half[None, :] / half[:, None]).astype(np.float32).tolist()  # D⁻¹ M D, D = diag(half)
    xs = (torch.arange(width, dtype=torch.float32, device=device) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=torch.float32, device=device) * 2 + 1) / height - 1
    gx = theta[0][0] * xs[None, :] + theta[0][1] * ys[:, None]
    gy = theta[1][0] * xs[None, :] + theta[1][1] * ys[:, None]
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
        seed = int(self.R.randint(2**31))
        for key in self.key_iterator(d):
            image = d[key]
            generator = torch.Generator(image.device).manual_seed(seed)
            d[key] = image + torch.randn(image.shape, generator=generator, device=image.device).mul_(std)
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
            low, high = torch.aminmax(image)  # 0-d tensors: no wait for the device
            span = high - low
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
                drop_slice = torch.as_tensor(drop, device=d[key].device)[:, None, None]
                d[key] = torch.where(drop_slice, 0.0, d[key])
        return d


class SegAugment:
    """Random training augmentation of (slices (S, H, W), masks (N, H, W)); S odd, the key slice in the centre.

    Each call seeds the whole pipeline with the given integer (the sample's own, drawn from its generator when it
    was built: dataset/tasks.py), so the output is a pure function of the inputs, the seed and the device, whatever
    the worker count, order or batch. `intensity=False` leaves out the intensity transforms (noise, smoothing,
    scaling, contrast); `drop_prob` is the chance that each neighbour slice is zeroed.
    """

    def __init__(self, intensity: bool = True, drop_prob: float = 0.3) -> None:
        steps: list = [RandRotateZoomd((IMAGE, MASK), modes=("bilinear", "nearest"))]
        if intensity:
            steps += [
                RandGaussianNoiseFastd(IMAGE, prob=0.2, std=0.2),
                RandGaussianSmoothd(IMAGE, sigma_x=(0.1, 1.0), sigma_y=(0.1, 1.0), prob=0.3),
                RandScaleIntensityd(IMAGE, factors=0.25, prob=0.5),
                ToTensord(IMAGE, track_meta=False),  # back to a plain tensor: MetaTensor slows every later op
                RandAdjustContrastFastd(IMAGE, prob=0.3, gamma_range=(0.7, 1.5)),
            ]
        steps.append(RandDropNeighboursd(IMAGE, prob=drop_prob))
        self.transform = Compose(steps)

    def __call__(self, image: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (image float32 (S, H, W), masks float32 (N, H, W) exactly 0/1) on the inputs' device; the inputs are
        not modified. `seed`: 0 ≤ seed < 2³²."""
        # No copy: every step writes new tensors (tests/test_augment.py checks the inputs stay as they were).
        image = torch.as_tensor(image).to(torch.float32, memory_format=torch.contiguous_format)
        masks = torch.as_tensor(masks).to(image.device, torch.float32, memory_format=torch.contiguous_format)
        if image.ndim != 3 or image.shape[0] % 2 == 0:
            raise ValueError(f"expected an (S, H, W) slice stack with odd S (key in the centre), got {tuple(image.shape)}")
        if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match the slice stack {tuple(image.shape)}")
        present = image.flatten(1).any(dim=1)[:, None, None]  # (S, 1, 1): a tensor, so no wait for the device
        self.transform.set_random_state(seed=seed)
        out = self.transform({IMAGE: image, MASK: masks})
        return torch.where(present, out[IMAGE], 0.0), (out[MASK] > 0.5).float()
