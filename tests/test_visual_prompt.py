import cv2
import numpy as np
import pytest
from scipy import ndimage

from dataset.ct import InputError
from dataset.visual_prompt import (
    CROP_MIN_PX,
    PROMPT_KINDS,
    RED,
    crop_around,
    draw_contour,
    draw_ellipse,
    draw_prompt,
    mask_box,
)

H, W = 128, 160
GRAY = 90


def gray_image() -> np.ndarray:
    return np.full((H, W, 3), GRAY, np.uint8)


def red_of(out: np.ndarray) -> np.ndarray:
    """(H, W) bool of drawn pixels; fails unless every pixel is either untouched gray or exactly red."""
    red = np.all(out == RED, axis=-1)
    assert np.all(out[~red] == GRAY)
    return red


def enclosed_by(red: np.ndarray) -> np.ndarray:
    """Pixels the red curve separates from the image border (the curve itself excluded)."""
    labels, _ = ndimage.label(np.pad(~red, 1, constant_values=True))
    return (labels != labels[0, 0])[1:-1, 1:-1]


def ellipse_mask(center, axes, angle) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    cv2.ellipse(mask, center, axes, angle, 0, 360, 1, -1)
    return mask.astype(bool)


def test_kinds_and_mask_box():
    assert PROMPT_KINDS == ("bbox", "ellipse", "contour", "cropped")
    mask = np.zeros((H, W), bool)
    mask[10:21, 30:41] = True
    mask[50, 7] = True
    assert mask_box(mask) == (7, 10, 40, 50)
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((H, W), bool))


def test_bbox_prompt_draws_the_mask_box():
    mask = np.zeros((H, W), bool)
    mask[30:61, 40:101] = True  # box (40, 30, 100, 60)
    mask[45, 40] = False
    image = gray_image()
    red = red_of(draw_prompt(image, [mask], "bbox"))
    ys, xs = np.nonzero(red)
    on_edge = (np.minimum(np.abs(xs - 40), np.abs(xs - 100)) <= 1) | (np.minimum(np.abs(ys - 30), np.abs(ys - 60)) <= 1)
    assert on_edge.all() and xs.min() >= 39 and xs.max() <= 101 and ys.min() >= 29 and ys.max() <= 61
    assert red[30, 40:101].all() and red[60, 40:101].all() and red[30:61, 40].all() and red[30:61, 100].all()
    assert not red[35:56, 45:96].any()
    assert np.all(image == GRAY)


@pytest.mark.parametrize("angle", [0, 30, 75, -40])
def test_ellipse_prompt_encloses_the_mask(angle):
    mask = ellipse_mask((80, 64), (40, 10), angle)
    red = red_of(draw_prompt(gray_image(), [mask], "ellipse"))
    inside = enclosed_by(red)
    assert (inside & mask).sum() >= 0.95 * mask.sum()
    assert (inside | red).sum() < 1.6 * mask.sum()  # follows the lesion's orientation: not a loose circle


def test_ellipse_prompt_on_an_irregular_mask():
    mask = np.zeros((H, W), bool)
    mask[30:90, 40:50] = True
    mask[80:90, 40:100] = True  # an L
    inside = enclosed_by(red_of(draw_prompt(gray_image(), [mask], "ellipse")))
    assert (inside & mask).sum() >= 0.95 * mask.sum()


def test_contour_prompt_follows_the_border():
    mask = ellipse_mask((60, 50), (25, 15), 20)
    mask[90:110, 120:150] = True  # a second component: outlined too
    red = red_of(draw_prompt(gray_image(), [mask], "contour"))
    border = mask & ~ndimage.binary_erosion(mask)
    distance_to_border = ndimage.distance_transform_edt(~border)
    assert distance_to_border[red].max() <= 2
    assert ndimage.distance_transform_edt(~red)[border].max() <= 1  # the whole border is outlined
    assert not red[mask & (ndimage.distance_transform_edt(mask) > 3)].any()  # the inside stays clear


def test_cropped_prompt_is_centred_and_inside():
    image = gray_image()
    mask = np.zeros((H, W), bool)
    mask[50:61, 70:81] = True  # 11×11, centre (75, 55)
    image[mask] = (0, 255, 0)
    crop = draw_prompt(image, [mask], "cropped")
    assert crop.shape == (CROP_MIN_PX, CROP_MIN_PX, 3)  # 3 × 11 = 33 < 64
    ys, xs = np.nonzero(np.all(crop == (0, 255, 0), axis=-1))
    side = crop.shape[0]
    assert abs((xs.min() + xs.max()) / 2 - (side - 1) / 2) <= 1 and abs((ys.min() + ys.max()) / 2 - (side - 1) / 2) <= 1
    big = np.zeros((H, W), bool)
    big[40:70, 60:90] = True  # 30 px → side 90
    assert draw_prompt(image, [big], "cropped").shape == (90, 90, 3)
    huge = np.zeros((H, W), bool)
    huge[10:110, 20:70] = True  # 3 × 100 > min(H, W): the whole height
    assert draw_prompt(image, [huge], "cropped").shape == (H, H, 3)
    corner = np.zeros((H, W), bool)
    corner[0:5, 150:160] = True
    crop = crop_around(image, mask_box(corner))
    assert crop.shape == (64, 64, 3) and np.array_equal(crop, image[0:64, W - 64:W])  # shifted inside, not shrunk
    with pytest.raises(ValueError, match="exactly one"):
        draw_prompt(image, [mask, big], "cropped")


def test_group_prompt_draws_one_mark_per_mask():
    first, second = np.zeros((H, W), bool), np.zeros((H, W), bool)
    first[10:30, 10:40] = True
    second[70:100, 90:140] = True
    for kind in ("bbox", "ellipse", "contour"):
        red = red_of(draw_prompt(gray_image(), [first, second], kind))
        assert ndimage.label(red, structure=np.ones((3, 3)))[1] == 2


def test_primitives_draw_where_told_and_refuse_the_outside():
    image = gray_image()
    red = red_of(draw_ellipse(image, (80, 60), (20, 5), angle_deg=90))  # a turned to +y: a tall ellipse
    ys, xs = np.nonzero(red)
    assert abs(ys.min() - 40) <= 1 and abs(ys.max() - 80) <= 1 and abs(xs.min() - 75) <= 1 and abs(xs.max() - 85) <= 1
    points = np.array([[20, 20], [60, 20], [40, 50]])
    red = red_of(draw_contour(image, points))
    assert red[20, 20:61].all() and red[50, 40] and not red[30, 40]
    assert np.all(image == GRAY)
    with pytest.raises(InputError, match="outside"):
        draw_ellipse(image, (10, 60), (20, 5))
    with pytest.raises(InputError, match="positive"):
        draw_ellipse(image, (80, 60), (0, 5))
    with pytest.raises(InputError, match="outside"):
        draw_contour(image, [[0, 0], [W, 10], [5, 5]])
    with pytest.raises(InputError, match="at least 3"):
        draw_contour(image, [[0, 0], [5, 5]])
    with pytest.raises(InputError, match="outside"):
        crop_around(image, (150, 10, 170, 20))
    with pytest.raises(ValueError, match="unknown visual prompt"):
        draw_prompt(image, [np.ones((H, W), bool)], "arrow")


def test_inputs_untouched_and_jitter_reproducible():
    mask = ellipse_mask((80, 64), (30, 12), 25)
    image = np.random.default_rng(0).integers(0, 200, (H, W, 3), dtype=np.uint8)  # no pixel is red to begin with
    image_before, mask_before = image.copy(), mask.copy()
    for kind in PROMPT_KINDS:
        plain = draw_prompt(image, [mask], kind)
        a = draw_prompt(image, [mask], kind, np.random.default_rng(5), jitter=0.25)
        b = draw_prompt(image, [mask], kind, np.random.default_rng(5), jitter=0.25)
        assert np.array_equal(a, b)
        if kind != "cropped":
            changed = np.any(a != image, axis=-1)
            assert changed.any() and np.all(a[changed] == RED)
        others = [draw_prompt(image, [mask], kind, np.random.default_rng(seed), jitter=0.25) for seed in range(4)]
        assert sum(o.shape != plain.shape or not np.array_equal(o, plain) for o in others) >= 3
        with pytest.raises(ValueError, match="rng"):
            draw_prompt(image, [mask], kind, jitter=0.25)
    assert np.array_equal(image, image_before) and np.array_equal(mask, mask_before)


def test_jittered_box_stays_within_bounds():
    mask = np.zeros((H, W), bool)
    mask[40:80, 50:70] = True  # 20 wide, 40 high
    for seed in range(50):
        red = red_of(draw_prompt(gray_image(), [mask], "bbox", np.random.default_rng(seed), jitter=0.25))
        x1, y1, x2, y2 = mask_box(red)  # the outline's outer pixels: the box ± 1
        assert abs(x1 + 1 - 50) <= 5 and abs(x2 - 1 - 69) <= 5 and abs(y1 + 1 - 40) <= 10 and abs(y2 - 1 - 79) <= 10
