import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from dataset.ct import gray_rgb
from dataset.vision import BandResizer, VisionPreprocessor
from dataset.visual_prompt import PROMPT_KINDS, draw_boxes, draw_prompt
from model.omniabnorm import build_image_processor

REAL, TINY = 512 * 512, 56 * 56


def make_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    boxed = gray_rgb(rng.integers(0, 256, (200, 300), dtype=np.uint8))
    boxed[50:120, 80:82] = boxed[50:52, 80:200] = (255, 0, 0)  # a red box drawn on a grey slice: G == B != R
    green = gray_rgb(rng.integers(0, 256, (61, 37), dtype=np.uint8))
    green[10:20, 5:30] = (0, 200, 0)  # R == B != G
    blue = gray_rgb(rng.integers(0, 256, (100, 90), dtype=np.uint8))
    blue[40:60, 10:80] = (0, 0, 255)  # R == G != B
    return {
        "gray_512": gray_rgb(rng.integers(0, 256, (512, 512), dtype=np.uint8)),
        "gray_300x200": gray_rgb(rng.integers(0, 256, (300, 200), dtype=np.uint8)),
        "gray_200x300": gray_rgb(rng.integers(0, 256, (200, 300), dtype=np.uint8)),
        "gray_37x61": gray_rgb(rng.integers(0, 256, (37, 61), dtype=np.uint8)),
        "gray_56": gray_rgb(rng.integers(0, 256, (56, 56), dtype=np.uint8)),  # already the 56·56 size: no resize
        "noise_rgb_512": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        "gradient_rgb": np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=2).astype(np.uint8),
        "red_box": boxed,
        "green_mark_61x37": green,
        "blue_mark_100x90": blue,
    }


IMAGES = make_images()


@pytest.fixture(scope="module")
def processors(tiny_base):
    return {pixels: build_image_processor(tiny_base, pixels) for pixels in (REAL, TINY)}


def reference(processor, images):
    out = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def assert_same(ours, theirs):
    assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[1].dtype == theirs[1].dtype == torch.int64
    assert torch.equal(ours[1], theirs[1])
    assert torch.equal(ours[0], theirs[0])  # bit-identical, not merely close


@pytest.mark.parametrize("pixels", [REAL, TINY])
@pytest.mark.parametrize("name", list(IMAGES))
def test_matches_processor_exactly(processors, pixels, name):
    processor = processors[pixels]
    assert_same(VisionPreprocessor(processor)([IMAGES[name]]), reference(processor, [IMAGES[name]]))


@pytest.mark.parametrize("pixels, grid", [(REAL, [1, 38, 38]), (TINY, [1, 4, 4])])
def test_geometry_of_a_512_slice(processors, pixels, grid):
    pixel_values, image_grid_thw = VisionPreprocessor(processors[pixels])([IMAGES["gray_512"]])
    assert image_grid_thw.tolist() == [grid]
    assert pixel_values.shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    # the two temporal copies of every patch are equal; mean/std put a mid-grey at about 0
    patches = pixel_values.reshape(-1, 3, 2, 14, 14)
    assert torch.equal(patches[:, :, 0], patches[:, :, 1])
    assert -2.0 < float(pixel_values.min()) and float(pixel_values.max()) < 2.2


def test_pixel_codes_are_the_uint8_patches_of_the_values(processors):
    """encode → uint8 codes (one byte per pixel, no temporal copies) that `values` turns into the processor's
    pixel_values; each code is the resized pixel itself, so the values are a per-channel function of it."""
    processor = processors[REAL]
    vision = VisionPreprocessor(processor)
    image = IMAGES["red_box"]
    codes, grid = vision.encode([image])
    assert codes.dtype == torch.uint8 and codes.shape == (int(grid.prod()), 3 * 14 * 14)
    values = vision.values(codes)
    assert_same((values, grid), reference(processor, [image]))
    per_channel = values.reshape(-1, 3, 2, 14 * 14)[:, :, 0]
    table = torch.from_numpy(vision.table)
    assert torch.equal(per_channel, table[torch.arange(3)[None, :, None], codes.reshape(-1, 3, 196).long()])
    with pytest.raises(ValueError, match="uint8 pixel codes"):
        vision.values(values)


@pytest.mark.parametrize("pixels", [REAL, TINY])
def test_batch_of_two_sizes(processors, pixels):
    processor = processors[pixels]
    vision = VisionPreprocessor(processor)
    batch = [IMAGES["gray_300x200"], IMAGES["red_box"]]
    ours = vision(batch)
    assert_same(ours, reference(processor, batch))
    singles = [vision([im]) for im in batch]
    assert torch.equal(ours[0], torch.cat([s[0] for s in singles]))
    assert torch.equal(ours[1], torch.cat([s[1] for s in singles]))


@pytest.mark.parametrize("settings", [
    {"image_mean": [0.5, 0.25, 0.125], "image_std": [0.2, 0.3, 0.4], "resample": Image.Resampling.BILINEAR},
    {"do_normalize": False, "rescale_factor": 1 / 127.5},
    {"do_rescale": False, "min_pixels": 28 * 28, "max_pixels": 64 * 64},
    {"patch_size": 16, "merge_size": 1, "temporal_patch_size": 1},
])
def test_reads_every_setting_from_the_processor(settings):
    processor = Qwen2VLImageProcessorPil(**{"min_pixels": 96 * 96, "max_pixels": 96 * 96, **settings})
    batch = [IMAGES["gradient_rgb"], IMAGES["gray_37x61"]]
    assert_same(VisionPreprocessor(processor)(batch), reference(processor, batch))


@pytest.mark.parametrize("bad, message", [
    ([], "no images"),
    ([np.zeros((32, 32), np.uint8)], r"image 0: expected an \(H, W, 3\) uint8 RGB array, got a uint8 array of shape"),
    ([IMAGES["gray_56"], np.zeros((32, 32, 4), np.uint8)], "image 1: .* shape \\(32, 32, 4\\)"),
    ([np.zeros((32, 32, 3), np.float32)], "image 0: .* float32 array"),
    ([np.zeros((0, 32, 3), np.uint8)], r"shape \(0, 32, 3\)"),
    ([Image.new("RGB", (32, 32))], "image 0: expected .* got a <class 'PIL.Image.Image'>"),
    ([np.zeros((1, 300, 3), np.uint8)], "aspect ratio"),
])
def test_bad_input(processors, bad, message):
    with pytest.raises(ValueError, match=message):
        VisionPreprocessor(processors[TINY])(bad)


def marked_versions(gray: np.ndarray) -> list[np.ndarray]:
    """A grey slice as RGB, then the same slice with red boxes (a tool turn) and with each visual prompt kind."""
    h, w = gray.shape
    image = gray_rgb(gray)
    mask = np.zeros((h, w), bool)
    mask[h // 4:h // 2, w // 5:w // 2] = True
    return [image, draw_boxes(image, [(w // 5, h // 4, w // 2, h // 2), (w - 12, h - 10, w - 1, h - 1)]),
            *[draw_prompt(image, [mask], kind) for kind in PROMPT_KINDS]]


@pytest.mark.parametrize("pixels", [REAL, TINY])
def test_a_slice_and_its_marked_copies_in_one_call(processors, pixels):
    """A sample's images are one slice, unmarked and marked: bands after the first are resized only where they
    differ from it, and the result is still the processor's, bit for bit."""
    gray = np.random.default_rng(7).integers(0, 256, (300, 260), dtype=np.uint8)
    batch = marked_versions(gray)
    assert_same(VisionPreprocessor(processors[pixels])(batch), reference(processors[pixels], batch))


@pytest.mark.parametrize("resample", list(Image.Resampling))
def test_band_resizer_is_pils_resize(resample):
    """Random bands, random sizes up and down, each filter: bands that differ from an earlier one in a few rows
    (marks), in most rows (another slice), or not at all."""
    rng = np.random.default_rng(int(resample))
    for _ in range(12):
        shape, size = tuple(rng.integers(5, 120, 2)), tuple(rng.integers(5, 160, 2))
        first = rng.integers(0, 256, shape, dtype=np.uint8)
        marked = first.copy()
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        marked[y:y + 3, x:] = 255
        marked[y:, x:x + 1] = 0
        resize = BandResizer(resample)
        for band in (first, marked, marked.copy(), rng.integers(0, 256, shape, dtype=np.uint8)):
            expected = np.asarray(Image.fromarray(band).resize(size[::-1], resample=resample))
            assert np.array_equal(resize(band, *size), expected)


def test_band_resizer_redoes_only_the_marked_rows_and_columns(monkeypatch):
    resize = BandResizer(Image.Resampling.BICUBIC)
    calls = []
    pil = resize._pil
    monkeypatch.setattr(resize, "_pil", lambda array, h, w: calls.append(array.shape) or pil(array, h, w))
    gray = np.random.default_rng(8).integers(0, 256, (512, 512), dtype=np.uint8)
    resize(gray, 532, 532)
    assert calls == [(512, 512), (512, 532)]  # horizontal pass, then vertical
    calls.clear()
    marked = gray.copy()
    marked[100:103, 200:300] = 255  # a 3-row line: 3 rows again, then the ~100 columns it reaches
    resize(marked, 532, 532)
    (rows, width), (height, columns) = calls
    assert (rows, width, height) == (3, 512, 512) and 100 <= columns < 120
    calls.clear()
    assert np.array_equal(resize(marked.copy(), 532, 532), pil(marked, 532, 532))  # a band like the last one
    assert calls == []  # (a red mark's blue band after its green one) is found first and costs nothing
