import numpy as np
import pytest
import torch
from monai.transforms import RandGaussianSmoothd

from dataset.augment import (
    RandAdjustContrastFastd,
    RandGaussianNoiseFastd,
    RandRotateZoomd,
    SegAugment,
)


def stack_with_square(slices: int = 9, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Slices of low noise with a bright 20×12 block; the mask marks exactly the block."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.05, (slices, size, size)).astype(np.float32)
    masks = np.zeros((2, size, size), np.float32)
    masks[0, 20:32, 14:34] = 1
    masks[1, 40:50, 40:45] = 1
    image[:, 20:32, 14:34] += 3.0
    return image, masks


def test_same_seed_same_result_and_seeds_differ():
    image, masks = stack_with_square()
    augment = SegAugment()
    a = augment(image, masks, 7)
    b = augment(image, masks, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [augment(image, masks, seed)[0] for seed in range(8)]
    assert sum(torch.equal(o, a[0]) for o in others) <= 1  # seed 7 is not among them; at most a chance tie
    assert len({o.sum().item() for o in others}) >= 6


def test_shapes_dtypes_binary_masks_and_inputs_untouched():
    image, masks = stack_with_square()
    image_before, masks_before = image.copy(), masks.copy()
    augment = SegAugment()
    for seed in range(10):
        out, out_masks = augment(image, masks, seed)
        assert out.shape == (9, 64, 64) and out.dtype == torch.float32
        assert out_masks.shape == (2, 64, 64) and out_masks.dtype == torch.float32
        assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert np.array_equal(image, image_before) and np.array_equal(masks, masks_before)
    tensor_in = torch.from_numpy(image)
    augment(tensor_in, masks, 0)
    assert np.array_equal(tensor_in.numpy(), image_before)


def test_non_square_and_no_masks():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 40, 60)).astype(np.float32)
    for seed in range(6):
        out, out_masks = SegAugment()(image, np.zeros((0, 40, 60), np.float32), seed)
        assert out.shape == (3, 40, 60) and out_masks.shape == (0, 40, 60) and out_masks.dtype == torch.float32


def test_mask_follows_the_image():
    image, masks = stack_with_square()
    augment = SegAugment(intensity=False)
    moved = 0
    for seed in range(30):
        out, out_masks = augment(image, masks, seed)
        bright = out[4] > 1.5  # the key slice is never dropped
        mask = out_masks[0].bool()
        moved += not mask.equal(torch.from_numpy(masks[0]).bool())
        assert mask.any()
        assert (bright & mask).sum() / (bright | mask).sum() > 0.8  # bilinear image vs nearest mask at the rim
        assert (bright & ~mask).sum() <= 0.1 * mask.sum()
    assert moved >= 15  # spatial transforms fire in ~80 % of draws


def test_quarter_turn_is_exact_and_zoom_scales_area():
    image = torch.rand(2, 16, 16)
    mask = (torch.rand(1, 16, 16) > 0.5).float()
    turn = RandRotateZoomd(("image", "mask"), modes=("bilinear", "nearest"), rot90_prob=1.0, max_k=1,
                           rotate_prob=0.0, zoom_prob=0.0)
    turn.set_random_state(0)
    out = turn({"image": image, "mask": mask})
    assert torch.equal(out["image"], torch.rot90(image, 1, (1, 2)))  # no interpolation blur for a quarter turn
    assert torch.equal(out["mask"], torch.rot90(mask, 1, (1, 2)))
    zoom = RandRotateZoomd(("image", "mask"), modes=("bilinear", "nearest"), rot90_prob=0.0, rotate_prob=0.0,
                           zoom_prob=1.0, zoom_range=(1.25, 1.25))
    square = torch.zeros(1, 64, 64)
    square[0, 22:42, 22:42] = 1  # 20×20, centred
    out = zoom({"image": square, "mask": square})["mask"]
    assert out.sum().item() == 25 * 25 and out[0, 19:44, 19:44].all()


def test_neighbour_dropout_rate_and_key_kept():
    image = np.ones((9, 8, 8), np.float32)
    augment = SegAugment(intensity=False)
    dropped = np.zeros(9)
    draws = 400
    for seed in range(draws):
        out, _ = augment(image, np.zeros((0, 8, 8), np.float32), seed)
        dropped += (out.flatten(1) == 0).all(dim=1).numpy()
    assert dropped[4] == 0
    rates = np.delete(dropped, 4) / draws
    assert np.all(np.abs(rates - 0.3) < 0.08) and abs(rates.mean() - 0.3) < 0.03  # ±3.5σ per slice, ±3.7σ overall


def test_missing_slices_stay_zero_through_intensity_transforms():
    image, masks = stack_with_square()
    image[[0, 1, 8]] = 0
    augment = SegAugment()
    for seed in range(12):
        out, _ = augment(image, masks, seed)
        assert not out[[0, 1, 8]].any()
        assert out[4].abs().sum() > 0


def test_intensity_transforms():
    image = torch.linspace(-2, 3, 9 * 32 * 32).reshape(9, 32, 32)
    noise = RandGaussianNoiseFastd("image", prob=1.0, std=0.2)
    noise.set_random_state(3)
    delta = noise({"image": image})["image"] - image
    assert 0 < delta.std() < 0.2 and abs(delta.mean()) < 0.02
    contrast = RandAdjustContrastFastd("image", prob=1.0, gamma_range=(1.5, 1.5))
    out = contrast({"image": image})["image"]
    assert out.min() == pytest.approx(-2) and out.max() == pytest.approx(3, abs=1e-5)
    expected = ((image + 2) / 5) ** 1.5 * 5 - 2
    assert torch.allclose(out, expected, atol=1e-5)
    # The pipeline's smoothing (MONAI's) blurs each slice in 2D: a point spreads within its slice, not across.
    smooth = next(t for t in SegAugment().transform.transforms if isinstance(t, RandGaussianSmoothd))
    point = torch.zeros(3, 31, 31)
    point[1, 15, 15] = 1
    smooth.set_random_state(0)
    smooth.prob = 1.0
    blurred = torch.as_tensor(smooth({"image": point})["image"])
    assert not blurred[[0, 2]].any()
    assert blurred[1].sum() == pytest.approx(1, abs=1e-3) and blurred[1].max() < 0.9


def test_bad_shapes():
    augment = SegAugment()
    with pytest.raises(ValueError, match="odd"):
        augment(np.zeros((8, 16, 16)), np.zeros((1, 16, 16)), 0)
    with pytest.raises(ValueError, match="match"):
        augment(np.zeros((9, 16, 16)), np.zeros((1, 16, 8)), 0)
