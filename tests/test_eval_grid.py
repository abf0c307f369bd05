"""Segmentation metrics on the 512×512 grid of SPEC §7 for key slices of another size, against hand-computed values."""

import numpy as np
import pytest
from PIL import Image

from dataset.records import Abnormality, Record
from evaluation.score import on_grid, score_rows
from evaluation.text_metrics import TEXT_METRICS
from inference.report import mask_rle


def _box(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_non_square_slice_is_padded_centred_then_scaled():
    # 256 high × 128 wide: padded to 256 × 256 with 64 columns on each side, then ×2 → pixel (r, c) covers rows
    # 2r, 2r+1 and columns 2(c + 64), 2(c + 64) + 1
    gt = _box((256, 128), (0, 10), (0, 10))
    big = on_grid(gt[None])[0]
    assert big.shape == (512, 512) and big.dtype == bool and big.sum() == 400
    rows, cols = np.nonzero(big)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 19, 128, 147)
    assert np.array_equal(on_grid(gt[None], "native")[0], gt)
    assert on_grid(np.zeros((0, 256, 128), bool)).shape == (0, 512, 512)
    with pytest.raises(ValueError, match="grid"):
        on_grid(gt[None], "1024")


def test_512_slices_are_scored_as_they_are():
    # OmniAbnorm-CT-14K: the key slices are 512×512, so both grids are the same
    mask = np.random.default_rng(0).random((2, 512, 512)) > 0.5
    assert np.array_equal(on_grid(mask), mask)


def test_non_integer_scale_weights_pixels_unequally():
    # 3 × 2 → padded to 3 × 3 (the padding column on the right), resized to 512 by nearest-exact: source index
    # floor((i + 0.5)·3/512) gives rows/columns 0, 1, 2 the widths 171, 170, 171.
    gt = np.array([[1, 0], [1, 0], [0, 0]], bool)  # (0, 0), (1, 0)
    pred = np.array([[0, 0], [1, 1], [0, 0]], bool)  # (1, 0), (1, 1)
    g, p = on_grid(gt[None])[0], on_grid(pred[None])[0]
    assert g.sum() == 171 * 171 + 170 * 171 and p.sum() == 170 * 171 + 170 * 170 and (g & p).sum() == 170 * 171
    # Dice 1/2 natively, 2·29070 / (58311 + 57970) at 512
    from evaluation.seg_metrics import dice

    assert dice(gt, pred) == 0.5
    assert dice(g, p) == pytest.approx(58140 / 116281, abs=1e-12)


class _NoText:
    """Text metrics are not under test here (METEOR alone starts a Java process)."""

    def score(self, pairs):
        return [dict.fromkeys(TEXT_METRICS) for _ in pairs]


def _record(tmp_path, shape, masks: dict[int, np.ndarray]) -> Record:
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "img" / "0.png")
    for abn_id, m in masks.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "mask" / f"{abn_id}.png")
    return Record("s", tmp_path / "img", tmp_path / "mask", [0], "axial",
                  [Abnormality(k, k, "cyst", "liver cyst") for k in masks])


def test_score_rows_on_both_grids_by_hand(tmp_path):
    shape = (256, 128)
    gt = _box(shape, (0, 10), (0, 10))  # 100 px
    pred = _box(shape, (0, 10), (5, 15))  # 100 px, 50 shared
    record = _record(tmp_path, shape, {1: gt})
    line = {"key": "g", "task": "grounded", "plane": "axial", "sample_id": "s", "abn_ids": [1],
            "categories": [], "prompt_type": None, "polarity": None, "question": None, "reference": "liver cyst",
            "text": "liver cyst", "refusal": False, "seg_tokens": 1, "flow": "per_finding",
            "mask_rle": mask_rle(pred), "finding_masks_rle": [mask_rle(pred)]}
    scorer = _NoText()
    (big,) = score_rows([line], {("axial", "s"): record}, scorer)
    (native,) = score_rows([line], {("axial", "s"): record}, scorer, grid="native")
    # an integer scale factor (×2) keeps Dice and sensitivity; the padding adds true negatives at 512
    for row in (big, native):
        assert row["dice"] == pytest.approx(50.0) and row["per_finding_dice"] == pytest.approx(50.0)
        assert row["pixel_sensitivity"] == pytest.approx(50.0)
        assert row["gt_components"] == 1 and row["detected@0.5"] == 1 and row["detected@0.6"] == 0
        assert (row["lesion_tp"], row["lesion_fp"], row["lesion_fn"]) == (1, 0, 0)  # IoU 1/3
    assert native["pixel_specificity"] == pytest.approx(100 * (32768 - 100 - 50) / (32768 - 100))
    assert big["pixel_specificity"] == pytest.approx(100 * (512 * 512 - 400 - 200) / (512 * 512 - 400))
