import numpy as np
import pytest
import torch

from dataset.stack25d import CONTEXT, SEG_SIZE, SquareGeometry, normalize_stack, seg_stack, stack_channels


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_constants():
    assert (CONTEXT, SEG_SIZE) == (4, 512)


def test_mask_round_trip_is_exact_when_side_equals_size():
    rng = np.random.default_rng(0)
    geometry = SquareGeometry(64, 40, size=64)  # side 64 == size: padding only
    mask = rng.random((3, 64, 40)) > 0.5
    there = geometry.to_model(mask, binary=True)
    assert there.shape == (3, 64, 64) and there.dtype == np.bool_
    assert not there[:, :, :12].any() and not there[:, :, 52:].any()
    assert np.array_equal(geometry.to_original(there, binary=True), mask)


@pytest.mark.parametrize("height, width", [(300, 200), (200, 300)])
def test_mask_round_trip_through_512(height, width):
    geometry = SquareGeometry(height, width)
    for y0, x0 in [(0, 0), (37, 61), (height - 40, width - 60), (101, 13)]:
        mask = np.zeros((1, height, width), bool)
        mask[0, y0:y0 + 40, x0:x0 + 60] = True  # 60 wide, 40 high
        there = geometry.to_model(mask, binary=True)
        assert there.shape == (1, 512, 512)
        back = geometry.to_original(there, binary=True)
        assert back.shape == (1, height, width)
        assert np.abs(np.subtract(box_of(back[0]), box_of(mask[0]))).max() < 1
        assert (back & mask).sum() / (back | mask).sum() > 0.95
        assert np.abs(np.argwhere(back[0]).mean(0) - np.argwhere(mask[0]).mean(0)).max() < 0.5


def test_padding_keeps_the_image_centred():
    geometry = SquareGeometry(300, 200, size=300)
    assert (geometry.side, geometry.pad_top, geometry.pad_left) == (300, 0, 50)
    there = geometry.to_model(np.ones((1, 300, 200), np.float32), binary=False)[0]
    assert np.all(there[:, :50] == 0) and np.all(there[:, 250:] == 0) and np.all(there[:, 50:250] == 1)
    odd = SquareGeometry(2, 5, size=5).to_model(np.ones((1, 2, 5), np.float32), binary=False)[0]
    # 3 rows of padding: 1 above, 2 below.
    assert np.array_equal(odd.any(axis=1), [False, True, True, False, False])


def test_probabilities_go_back_bilinear_and_keep_kind():
    geometry = SquareGeometry(300, 200)
    prob = torch.zeros(2, 512, 512)
    prob[0, 100:300, 200:260] = 0.8
    back = geometry.to_original(prob, binary=False)
    assert isinstance(back, torch.Tensor) and back.shape == (2, 300, 200) and back.dtype == torch.float32
    assert float(back.max()) == pytest.approx(0.8) and 0 < float(back[0][back[0] > 0].min()) < 0.8  # blended edge
    assert not back[1].any()
    with pytest.raises(ValueError, match="expected"):
        geometry.to_original(np.zeros((1, 300, 200)), binary=True)


def test_box_to_original():
    geometry = SquareGeometry(300, 200, size=600)  # scale 0.5, 50 columns of padding left
    assert geometry.box_to_original((200, 0, 399, 599)) == (50, 0, 149, 299)
    assert geometry.box_to_original((0, 0, 599, 599)) == (0, 0, 199, 299)  # padding clipped off
    assert geometry.box_to_original((101, 11, 101, 11)) == (0, 5, 0, 5)
    with pytest.raises(ValueError, match="padding"):
        geometry.box_to_original((0, 0, 99, 99))
    # The box of a mask sent back lies inside the mapped box of the model-space mask.
    geometry = SquareGeometry(300, 200)
    model_mask = np.zeros((1, 512, 512), bool)
    model_mask[0, 123:301, 190:333] = True
    outer = geometry.box_to_original(box_of(model_mask[0]))
    inner = box_of(geometry.to_original(model_mask, binary=True)[0])
    assert outer[:2] <= inner[:2] and outer[2:] >= inner[2:]
    assert np.abs(np.subtract(outer, inner)).max() <= 1


def marked_slices(count: int, size: int = 16) -> np.ndarray:
    """Slice i is zero except one bright pixel at (0, i): its z-scored maximum says which slice it is."""
    slices = np.zeros((count, size, size), np.int16)
    for i in range(count):
        slices[i, 0, i] = 100
    return slices


def slice_ids(stack: np.ndarray) -> list[int | None]:
    return [None if not channel.any() else int(np.argmax(channel[0])) for channel in stack]


def test_neighbour_order_and_missing_slices():
    stack, _ = seg_stack(marked_slices(4), key_index=0, size=16)
    assert stack.shape == (9, 16, 16) and stack.dtype == np.float32
    assert slice_ids(stack) == [None, None, None, None, 0, 1, 2, 3, None]
    stack, _ = seg_stack(marked_slices(3), key_index=2, size=16)
    assert slice_ids(stack) == [None, None, 0, 1, 2, None, None, None, None]


def test_extra_neighbours_are_dropped():
    stack, _ = seg_stack(marked_slices(13), key_index=6, size=16)  # 6 on each side
    assert slice_ids(stack) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    stack, _ = seg_stack(marked_slices(13), key_index=6, context=1, size=16)
    assert slice_ids(stack) == [5, 6, 7]


def test_each_present_slice_is_z_scored_on_its_own():
    rng = np.random.default_rng(1)
    hu = (rng.normal(size=(3, 40, 40)) * np.array([10, 300, 1])[:, None, None]
          + np.array([-800, 40, 1000])[:, None, None]).astype(np.int16)
    stack, geometry = seg_stack(hu, key_index=1, context=2, size=40)
    assert geometry == SquareGeometry(40, 40, 40)
    assert not stack[0].any() and not stack[4].any()
    for channel in stack[1:4]:
        assert abs(channel.mean()) < 1e-4 and channel.std() == pytest.approx(1.0, abs=1e-4)


def test_constant_channels_become_zeros_and_bad_values_are_refused():
    constant = normalize_stack(torch.full((1, 8, 8), 3.7))
    assert constant.shape == (1, SEG_SIZE, SEG_SIZE) and not constant.any()  # not 0 / 0, not round-off noise
    z = normalize_stack(torch.tensor([[[0, 2], [0, 2]]], dtype=torch.uint8), size=2)
    assert z.dtype == torch.float32 and torch.equal(z, torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]]))
    slices = np.ones((3, 8, 8), np.float32)
    slices[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        seg_stack(slices, key_index=0)
    with pytest.raises(ValueError, match="key index"):
        seg_stack(slices, key_index=3)


def test_default_stack_is_9_by_512_square_padded():
    rng = np.random.default_rng(2)
    slices = rng.integers(0, 256, (5, 256, 128)).astype(np.uint8)
    stack, geometry = seg_stack(slices, key_index=2)
    assert stack.shape == (9, 512, 512) and stack.dtype == np.float32
    assert (geometry.side, geometry.pad_left, geometry.pad_top) == (256, 64, 0)
    assert not stack[:2].any() and not stack[7:].any()  # slices −2, −1, 5 and 6 do not exist
    assert not stack[2:7, :, :126].any() and not stack[2:7, :, 386:].any()  # padding stays zero after bilinear
    assert (stack[2:7, :, 130:382] != 0).mean() > 0.99


def test_integer_slices_stack_exactly_as_their_float32_copy():
    """Workers hand seg_stack the slices' own dtype (uint8 for JPEG, a quarter of a float32 stack's bytes): the stack
    is bit for bit that of the float32 copy, gaps (zero slices) and a constant slice included."""
    rng = np.random.default_rng(3)
    slices = rng.integers(0, 256, (7, 96, 80)).astype(np.uint8)
    slices[1] = 0
    slices[5] = 17
    for key in (0, 3, 6):
        ours, _ = seg_stack(slices, key_index=key, size=64)
        reference, _ = seg_stack(slices.astype(np.float32), key_index=key, size=64)
        assert np.array_equal(ours, reference)


def test_stretch_to_uint8_of_integer_slices_is_that_of_their_float32_copy():
    """8- and 16-bit slices are stretched through a lookup table of every possible value: bit for bit the float32
    arithmetic on each pixel; a full-range uint8 slice is returned as it is."""
    from dataset.ct import stretch_to_uint8

    rng = np.random.default_rng(4)
    full = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    full[0, 0], full[0, 1] = 0, 255
    assert np.array_equal(stretch_to_uint8(full), full)
    assert np.array_equal(stretch_to_uint8(full), stretch_to_uint8(full.astype(np.float32)))
    narrow = (full // 2 + 10).astype(np.uint8)  # 10..137: spread to 0..255
    assert stretch_to_uint8(narrow).min() == 0 and stretch_to_uint8(narrow).max() == 255
    assert np.array_equal(stretch_to_uint8(narrow), stretch_to_uint8(narrow.astype(np.float32)))
    for high in (1, 4095, 65535):  # 16-bit: a 12-bit CT range, the full range, a two-value mask-like slice
        wide = rng.integers(0, high + 1, (40, 24)).astype(np.uint16)
        wide[0, 0] = high
        assert np.array_equal(stretch_to_uint8(wide), stretch_to_uint8(wide.astype(np.float32)))
    constant = np.full((8, 8), 7, np.uint8)
    assert np.array_equal(stretch_to_uint8(constant), np.zeros((8, 8), np.uint8))


def test_a_full_stack_is_its_slices_each_z_scored():
    """Nine present square slices at the model size: `stack_channels` hands them over as they are (no copy), and
    every channel of the stack is its own slice's z-score (float64 reference), a constant slice zeros."""
    rng = np.random.default_rng(5)
    slices = rng.integers(0, 256, (9, 48, 48)).astype(np.uint8)
    slices[3] = 9
    assert stack_channels(slices, key_index=4) is slices
    stack, _ = seg_stack(slices, key_index=4, size=48)
    for index, (channel, values) in enumerate(zip(stack, slices)):
        if index != 3:
            reference = (values - values.mean(dtype=np.float64)) / values.std(dtype=np.float64)
            np.testing.assert_allclose(channel, reference, atol=2e-6)
    assert not stack[3].any()
