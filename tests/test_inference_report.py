"""Report pieces without a model: measurements of known shapes, mask RLE, overlays."""

import numpy as np
import pytest

from inference.report import PALETTE, FindingResult, axes_mm, mask_rle, measure, render_overlay, rle_to_mask


def ellipse_mask(a_mm: float, b_mm: float, angle_deg: float, spacing: tuple[float, float], shape=(160, 160),
                 centre_px=(80.3, 79.6)) -> np.ndarray:
    """Pixels whose centre lies inside the ellipse (semi-axes in mm, a along `angle_deg` from +x towards +y)."""
    sy, sx = spacing
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    dx, dy = (x - centre_px[1]) * sx, (y - centre_px[0]) * sy
    t = np.deg2rad(angle_deg)
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    return (u / a_mm) ** 2 + (v / b_mm) ** 2 <= 1


@pytest.mark.parametrize("a, b, angle, spacing", [
    (20.0, 12.0, 0.0, (0.8, 0.8)),
    (20.0, 12.0, 90.0, (0.8, 0.8)),
    (25.0, 9.0, 33.0, (0.7, 0.7)),
    (18.0, 18.0, 0.0, (1.0, 1.0)),  # a circle: any direction is the long axis
    (22.0, 10.0, 61.0, (0.9, 0.6)),  # anisotropic pixels
    (15.0, 8.0, 135.0, (0.5, 0.75)),
])
def test_axes_of_a_known_ellipse_within_one_pixel(a, b, angle, spacing):
    mask = ellipse_mask(a, b, angle, spacing)
    long, short = axes_mm(mask, spacing)
    pixel = max(spacing)
    assert abs(long - 2 * a) < pixel, (long, 2 * a)
    assert abs(short - 2 * b) < pixel, (short, 2 * b)


def test_axes_of_a_rectangle_are_its_diagonal_and_the_width_across_it():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:45] = True  # 10 rows × 40 columns of 1 mm pixels
    long, short = axes_mm(mask, (1.0, 1.0))
    diagonal = np.hypot(39, 9)  # between the extreme pixel centres
    assert long == pytest.approx(diagonal + 0.5)
    assert short == pytest.approx(2 * 39 * 9 / diagonal + 0.5)  # the rectangle's width perpendicular to it


def test_measure_area_and_hu():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:15] = True  # 20 px
    hu = np.full((20, 30), -1000.0, np.float32)
    hu[5:9, 10:15] = np.arange(20, dtype=np.float32).reshape(4, 5)
    m = measure(mask, (0.5, 0.8), hu)
    assert m.area_mm2 == pytest.approx(20 * 0.5 * 0.8)
    assert (m.mean_hu, m.std_hu) == (pytest.approx(9.5), pytest.approx(np.arange(20).std()))
    nothing = measure(mask, None, None)
    assert (nothing.area_mm2, nothing.long_axis_mm, nothing.mean_hu) == (None, None, None)


@pytest.mark.parametrize("mask", [
    np.zeros((3, 4), bool),
    np.ones((3, 4), bool),
    np.array([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]], bool),
    np.array([[0, 1], [1, 1]], bool),
])
def test_rle_round_trip(mask):
    rle = mask_rle(mask)
    assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
    assert np.array_equal(rle_to_mask(rle), mask)


def test_rle_counts_start_with_background():
    assert mask_rle(np.array([[1, 1, 0, 1]], bool))["counts"] == [0, 2, 1, 1]
    assert mask_rle(np.array([[0, 0, 1, 0]], bool))["counts"] == [2, 1, 1]


def test_overlay_enlarges_small_slices_and_colours_findings():
    base = np.full((64, 48, 3), 40, np.uint8)
    mask = np.zeros((64, 48), bool)
    mask[30:40, 10:20] = True
    finding = FindingResult(1, None, mask, (10, 30, 19, 39), [(10, 30, 19, 39)], 0.9, 0.8, 1)
    empty = FindingResult(2, "text only", None, None, [], None, 0.5, 2)
    out = render_overlay(base, [finding, empty])
    assert out.shape == (512, 384, 3)  # ×8 so the longer side reaches 512
    inside = out[35 * 8 + 4, 15 * 8 + 4]
    expected = np.rint(40 * 0.65 + np.array(PALETTE[0]) * 0.35)
    assert inside.tolist() == expected.tolist()
    assert out[30 * 8, 10 * 8].tolist() == list(PALETTE[0])  # box corner
    assert out[0, 0].tolist() == [40, 40, 40]
    assert np.array_equal(base, np.full((64, 48, 3), 40, np.uint8))  # input untouched
