import numpy as np
import pytest

from dataset.visual_prompt import RED, draw_boxes, jitter_box
from postprocess.findings import mask_to_findings


def blank(h=64, w=64):
    return np.zeros((h, w), dtype=np.float32)


def test_threshold_is_strictly_above_half():
    prob = blank()
    prob[5:15, 5:15] = 0.5
    assert mask_to_findings(prob) == []
    prob[5:15, 5:15] = 0.51
    (finding,) = mask_to_findings(prob)
    assert finding.box_xyxy == (5, 5, 14, 14) and finding.area_px == 100


def test_components_under_16_px_are_dropped_and_16_kept():
    prob = blank()
    prob[2:5, 2:7] = 1  # 15 px
    prob[30:34, 30:34] = 1  # 16 px
    (finding,) = mask_to_findings(prob)
    assert finding.box_xyxy == (30, 30, 33, 33) and finding.area_px == 16


def test_closing_bridges_a_one_pixel_gap():
    prob = blank()
    prob[10:20, 10:20] = 1
    prob[10:20, 21:31] = 1  # one empty column between the halves
    (finding,) = mask_to_findings(prob)
    assert finding.box_xyxy == (10, 10, 30, 19)
    assert finding.mask[15, 20]  # the gap is filled


def test_diagonal_touch_is_one_component_with_8_connectivity():
    prob = blank()
    prob[10:20, 10:20] = 1
    prob[20:30, 20:30] = 1
    assert len(mask_to_findings(prob)) == 1


def test_separate_lesions_are_separate_findings_largest_first():
    prob = blank()
    prob[5:10, 5:10] = 1  # 25 px
    prob[40:52, 40:52] = 1  # 144 px
    findings = mask_to_findings(prob)
    assert [f.area_px for f in findings] == [144, 25]
    assert not (findings[0].mask & findings[1].mask).any()


def ring_with_blob(ring_side: int, gap: int, thickness: int = 2, origin: int = 10):
    """A square ring (box side `ring_side`) around a centred blob `gap` px inside it, on an 80×80 map."""
    prob = blank(80, 80)
    lo, hi = origin, origin + ring_side
    prob[lo:hi, lo:hi] = 1
    prob[lo + thickness:hi - thickness, lo + thickness:hi - thickness] = 0
    inner = thickness + gap
    prob[lo + inner:hi - inner, lo + inner:hi - inner] = 1
    return prob, ring_side - 2 * inner


def test_nms_keeps_boxes_overlapping_at_most_half():
    prob, side = ring_with_blob(60, gap=10)  # blob 36×36 inside a 60×60 box: IoU 0.36
    assert side == 36
    findings = mask_to_findings(prob)
    assert [f.box_xyxy for f in findings] == [(22, 22, 57, 57), (10, 10, 69, 69)]  # blob has more pixels
    # closing with the 5×5 ellipse fills 2 px in each of the ring's 4 inner corners
    assert [f.area_px for f in findings] == [36 * 36, 60 * 60 - 56 * 56 + 4 * 2]


def test_nms_suppresses_the_box_of_the_smaller_component():
    prob, side = ring_with_blob(60, gap=5)  # blob 46×46: IoU 2116/3600 = 0.59 > 0.5, gap too wide to close
    assert side == 46
    (finding,) = mask_to_findings(prob)
    assert finding.box_xyxy == (17, 17, 62, 62)  # the blob (2116 px) outranks the ring (464 px)
    assert finding.mask[40, 40] and not finding.mask[10, 10]
    assert finding.area_px == int(finding.mask.sum()) == 46 * 46


def test_closing_does_not_grow_components_at_the_image_edge():
    prob = blank()
    prob[0:3, 0:6] = 1
    (finding,) = mask_to_findings(prob)
    assert finding.box_xyxy == (0, 0, 5, 2) and finding.area_px == 18


def test_draw_boxes_red_two_px_and_input_untouched():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    out = draw_boxes(image, [(8, 8, 20, 20)])
    assert image.sum() == 0
    red = np.all(out == RED, axis=-1)
    assert red[8, 8:21].all() and red[20, 8:21].all() and red[8:21, 8].all()
    assert red[14, 7:9].all()  # 2 px wide
    assert not red[14, 14]  # outline only


def test_box_outside_image_is_refused():
    with pytest.raises(ValueError, match="outside"):
        draw_boxes(np.zeros((32, 32, 3), np.uint8), [(10, 10, 40, 20)])


def test_jitter_is_bounded_and_reproducible():
    rng = np.random.default_rng(0)
    box = (20, 20, 39, 59)  # 20 wide, 40 high
    for _ in range(200):
        x1, y1, x2, y2 = jitter_box(box, 0.25, rng, (100, 100))
        assert abs(x1 - 20) <= 5 and abs(x2 - 39) <= 5 and abs(y1 - 20) <= 10 and abs(y2 - 59) <= 10
    a = draw_boxes(np.zeros((100, 100, 3), np.uint8), [box], 0.25, np.random.default_rng(3))
    b = draw_boxes(np.zeros((100, 100, 3), np.uint8), [box], 0.25, np.random.default_rng(3))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        draw_boxes(np.zeros((100, 100, 3), np.uint8), [box], 0.25)
