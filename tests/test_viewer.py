"""The viewer's logic without a browser: views (window, marks, findings, highlight), clicks → boxes, findings-table
rows, opening inputs and uploads, the inference cases it sends, and two runs with the demo checkpoint."""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from dataset.ct import InputError, SliceStack, window_to_uint8
from dataset.visual_prompt import RED, draw_boxes, draw_ellipse
from inference.cases import check_case
from inference.cli import DEMO_CHECKPOINT, demo_case
from inference.report import PALETTE, FindingResult, render_overlay
from viewer.render import (
    HIGHLIGHT_ALPHA,
    HIGHLIGHT_RGB,
    box_ellipse,
    click_pixel,
    compose,
    corners_box,
    draw_mark,
    findings_rows,
    slice_rgb,
    view_scale,
)
from viewer.session import Session, open_input, unpack_upload

CT5N = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


def hu_stack(count: int = 3, size: int = 64) -> SliceStack:
    """(count, size, size) HU: slice k holds 100·k − 160 everywhere except a ramp row, to tell slices apart."""
    pixels = np.stack([np.full((size, size), 100.0 * k - 160.0, np.float32) for k in range(count)])
    pixels[:, 0, :] = np.linspace(-1000, 1000, size, dtype=np.float32)
    return SliceStack(pixels, True, count // 2, "axial", "test", (0.8, 0.8), 2.0)


def finding(fid: int, y: slice, x: slice, shape=(64, 64)) -> FindingResult:
    mask = np.zeros(shape, bool)
    mask[y, x] = True
    box = (x.start, y.start, x.stop - 1, y.stop - 1)
    return FindingResult(fid, None, mask, box, [box], 0.8, 0.9, 1)


def is_highlight(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) → bool: the highlight's blend over gray (B − G = 153, R − G = 77) or its pure outline colour."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (b - g >= 140) & (r - g >= 60) & (r - g <= 140)


# ----------------------------------------------------------------------------------------------------------------
# render: pure functions


def test_view_scale_is_the_overlay_enlargement():
    assert [view_scale(s) for s in [(64, 64), (64, 48), (100, 300), (512, 512), (600, 700)]] == [8, 8, 2, 1, 1]
    base = np.zeros((48, 64, 3), np.uint8)
    assert compose(base).shape == render_overlay(base, []).shape == (384, 512, 3)


def test_slice_rgb_windows_the_chosen_slice():
    stack = hu_stack()
    shown = slice_rgb(stack, 2, (40.0, 400.0))  # slice 2: 40 HU, mid-window
    assert shown.shape == (64, 64, 3) and shown.dtype == np.uint8
    np.testing.assert_array_equal(shown[..., 0], window_to_uint8(stack.pixels[2], 40.0, 400.0))
    assert shown[10, 10].tolist() == [128, 128, 128]
    assert slice_rgb(stack, 0, (40.0, 400.0))[10, 10].tolist() == [0, 0, 0]  # −160 HU: the window's floor
    lung = slice_rgb(stack, 0, (-600.0, 1500.0))
    assert lung[10, 10].tolist() == [202, 202, 202]  # (−160 + 1350) · 255 / 1500
    with pytest.raises(ValueError, match="window"):
        slice_rgb(stack, 0, None)


def test_slice_rgb_keeps_an_image_inputs_colours_on_its_key_slice():
    gray = np.stack([np.full((8, 8), v, np.float32) for v in (10, 20, 30)])
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    stack = SliceStack(gray, False, 1, "unknown", "test", key_rgb=rgb)
    assert slice_rgb(stack, 1, None) is rgb
    assert slice_rgb(stack, 2, None)[0, 0].tolist() == [30, 30, 30]


def test_clicks_map_to_slice_pixels_and_corners_to_a_box():
    shape = (64, 64)
    assert click_pixel((0, 0), 8, shape) == (0, 0)
    assert click_pixel((15.9, 8.0), 8, shape) == (1, 1)
    assert click_pixel((511, 504), 8, shape) == (63, 63)
    assert click_pixel((600, -3), 8, shape) == (63, 0)  # clamped into the slice
    assert corners_box((40, 10), (20, 30)) == corners_box((20, 30), (40, 10)) == (20, 10, 40, 30)


def test_marks_are_drawn_as_the_model_sees_them():
    base = np.full((64, 64, 3), 50, np.uint8)
    np.testing.assert_array_equal(draw_mark(base, "bbox", (10, 12, 30, 40)), draw_boxes(base, [(10, 12, 30, 40)]))
    np.testing.assert_array_equal(draw_mark(base, "cropped", (10, 12, 30, 40)), draw_boxes(base, [(10, 12, 30, 40)]))
    assert box_ellipse((10, 20, 30, 30)) == (20.0, 25.0, 10.0, 5.0)
    np.testing.assert_array_equal(draw_mark(base, "ellipse", (10, 20, 30, 30)),
                                  draw_ellipse(base, (20.0, 25.0), (10.0, 5.0)))
    draw_mark(base, "ellipse", (0, 0, 63, 63))  # an ellipse inscribed in the whole image stays inside it
    with pytest.raises(InputError, match="outside"):
        draw_mark(base, "bbox", (10, 10, 64, 20))
    with pytest.raises(InputError, match="positive semi-axes"):
        draw_mark(base, "ellipse", (10, 10, 10, 20))


def test_highlight_fills_the_selected_finding_only():
    base = np.full((64, 64, 3), 100, np.uint8)
    first, second = finding(1, slice(20, 26), slice(10, 16)), finding(2, slice(40, 50), slice(40, 52))
    plain, lit = compose(base, [first, second]), compose(base, [first, second], highlight=1)
    assert not is_highlight(plain).any()
    s = 8
    inner = (slice(21 * s, 25 * s), slice(11 * s, 15 * s))  # the mask's interior, away from outline and box
    expected = np.rint(100 * (1 - HIGHLIGHT_ALPHA) + np.array(HIGHLIGHT_RGB) * HIGHLIGHT_ALPHA)
    assert (lit[inner] == expected).all()
    assert expected.tolist() == [117, 40, 193]
    marked = is_highlight(lit)
    ys, xs = np.nonzero(marked)
    # its box (the 2-px line reaches one view pixel beyond it), no more
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20 * s - 1, 26 * s, 10 * s - 1, 16 * s)
    np.testing.assert_array_equal(lit[42 * s:48 * s, 42 * s:50 * s], plain[42 * s:48 * s, 42 * s:50 * s])
    tint = np.rint(100 * 0.65 + np.array(PALETTE[1]) * 0.35)
    assert (lit[44 * s, 45 * s] == tint).all()  # the other finding keeps its palette colour
    np.testing.assert_array_equal(compose(base, [first, second], highlight=7), plain)  # no such finding


def test_pending_corner_is_a_red_cross_at_its_pixel():
    view = compose(np.zeros((64, 64, 3), np.uint8), pending_xy=(10, 20))
    red = np.all(view == RED, axis=2)
    ys, xs = np.nonzero(red)
    assert red[20 * 8 + 4, 10 * 8 + 4]
    assert abs(ys.mean() - (20 * 8 + 4)) < 1 and abs(xs.mean() - (10 * 8 + 4)) < 1


def test_findings_rows_format_measurements_and_unknowns():
    report = {"findings": [
        {"id": 1, "text": None, "box_xyxy": [13, 26, 17, 31], "area_px": 26, "area_mm2": 777.61,
         "long_axis_mm": 33.71, "short_axis_mm": 30.04, "mean_hu": 189.4, "std_hu": 7.26,
         "confidence": {"mask_mean_probability": 0.6512, "seg_token_probability": 0.9991}},
        {"id": 2, "text": "Hypodense lesion.", "box_xyxy": [1, 2, 3, 4], "area_px": 9, "area_mm2": None,
         "long_axis_mm": None, "short_axis_mm": None, "mean_hu": None, "std_hu": None,
         "confidence": {"mask_mean_probability": 0.5, "seg_token_probability": None}},
        {"id": 3, "text": "No region.", "box_xyxy": None, "area_px": None, "area_mm2": None, "long_axis_mm": None,
         "short_axis_mm": None, "mean_hu": None, "std_hu": None,
         "confidence": {"mask_mean_probability": None, "seg_token_probability": 0.42}},
    ]}
    assert findings_rows(report) == [
        [1, "—", "13,26,17,31", "777.6 mm²", "33.7 × 30.0 mm", "189 ± 7", "0.65", "1.00"],
        [2, "Hypodense lesion.", "1,2,3,4", "9 px", "—", "—", "0.50", "—"],
        [3, "No region.", "—", "—", "—", "—", "—", "0.42"],
    ]
    assert findings_rows({"findings": []}) == []


# ----------------------------------------------------------------------------------------------------------------
# session: inputs and cases


def test_open_input_refuses_nothing_and_missing_paths(tmp_path):
    with pytest.raises(InputError, match="no input given"):
        open_input("  ")
    with pytest.raises(InputError, match=r"nope does not exist: give the path"):
        open_input(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a supported CT input"):
        open_input(tmp_path / "notes.txt")


def test_dicom_series_opens_in_planes_and_becomes_cases():
    s = Session()
    s.open(f"  {CT5N}  ")
    assert (s.opened.kind, s.opened.is_volume, s.stack.plane, s.stack.pixels.shape, s.index) == \
        ("dicom", True, "axial", (5, 16, 16), 2)
    s.set_index(4)
    case = s.case("grounded", flow="per_finding")
    assert (case.input, case.task, case.flow, case.slice, case.plane, case.window, case.box) == \
        (str(CT5N), "grounded", "per_finding", 4, "axial", "abdomen", None)
    s.set_window("lung")
    mark = s.case("visual_prompt", mark=("bbox", (2, 3, 9, 12)))
    assert (mark.box, mark.mark, mark.ellipse, mark.window) == ((2, 3, 9, 12), None, None, "lung")
    ellipse = s.case("visual_prompt", mark=("ellipse", (2, 3, 9, 12)))
    assert (ellipse.box, ellipse.ellipse, ellipse.resolved_task) == (None, (5.5, 7.5, 3.5, 4.5), "visual_prompt")
    cropped = s.case("visual_prompt", mark=("cropped", (2, 3, 9, 12)))
    assert (cropped.box, cropped.mark) == ((2, 3, 9, 12), "cropped")
    question = s.case("text_guided", prompt="  Evaluate the lungs.  ")
    assert question.prompt == "Evaluate the lungs."
    for c in (case, mark, ellipse, cropped, question):
        check_case(c)
    s.open(s.opened.path, plane="coronal")
    assert (s.stack.plane, s.stack.pixels.shape[0], s.index, s.window) == ("coronal", 16, 8, "lung")
    with pytest.raises(InputError, match="slice 16 outside 0..15"):
        s.set_index(16)
    with pytest.raises(InputError, match="window 'wide'"):
        s.set_window("wide")
    assert s.window == "lung"


def test_image_input_cases_have_no_plane_or_window(tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray(np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)).save(path)
    s = Session()
    s.open(path)
    assert (s.opened.kind, s.opened.is_volume, s.stack.is_hu) == ("image", False, False)
    case = s.case("grounded")
    assert (case.plane, case.window, case.slice) == (None, None, 0)
    check_case(case)
    np.testing.assert_array_equal(s.slice_image()[..., 1], np.asarray(Image.open(path)))


def test_clicks_make_a_box_and_a_third_click_starts_anew():
    s = Session()
    s.open(CT5N)  # 16 px: the view is enlarged 32×
    assert s.click((100, 40)) is None and s.pending == (3, 1)
    assert s.click((20, 300)) == (0, 1, 3, 9) and s.pending is None
    assert s.click((511, 511)) is None and s.pending == (15, 15)


def test_a_bad_mark_is_left_off_the_view_with_the_reason():
    s = Session()
    s.open(CT5N)
    plain, problem = s.view(None)
    assert problem is None and plain.shape == (512, 512, 3)
    view, problem = s.view(("bbox", (2, 2, 16, 5)))
    assert "outside the 16×16 image" in problem
    np.testing.assert_array_equal(view, plain)
    drawn, problem = s.view(("bbox", (2, 2, 10, 5)))
    assert problem is None and np.all(drawn == RED, axis=2).any()


def test_unpack_upload_opens_a_zipped_series(tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(CT5N.iterdir()):
            z.write(f, f"CT5N/{f.name}")
        z.writestr("__MACOSX/._CT5N", b"")
    path = unpack_upload(archive, tmp_path)
    assert path.name == "CT5N" and path.parent.parent == tmp_path
    assert open_input(path).stack.pixels.shape == (5, 16, 16)
    assert unpack_upload(CT5N / "CT2", tmp_path) == CT5N / "CT2"  # not a zip: opened as it is
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot unpack broken.zip"):
        unpack_upload(tmp_path / "broken.zip", tmp_path)
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with pytest.raises(InputError, match="holds no files"):
        unpack_upload(tmp_path / "empty.zip", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# With the demo checkpoint: the same runs as the page's buttons


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from inference.pipeline import OmniAbnormPipeline

    if not (DEMO_CHECKPOINT / "omniabnorm.json").is_file():
        pytest.skip("checkpoint/demo/ is missing")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's small ops are fastest on one thread
    pipe = OmniAbnormPipeline.from_checkpoint(DEMO_CHECKPOINT, device="cpu", max_new_tokens=64, batch_size=1)
    folder = tmp_path_factory.mktemp("demo")
    case, _ = demo_case(folder, pipe.seg_size)
    yield pipe, case, folder
    torch.set_num_threads(threads)


def test_grounded_run_lists_findings_and_highlights_the_selected_mask(demo, tmp_path):
    pipe, case, _ = demo
    s = Session()
    s.open(case.input, key=case.slice)
    report = s.run(pipe, s.case("grounded"), tmp_path)
    data = json.loads(Path(s.files[0]).read_text())
    assert [Path(f).name for f in s.files] == ["report.json", "overlay.png"] + [
        f"finding_{f['id']}.png" for f in data["findings"] if f["mask_rle"]]
    assert data["task"] == "grounded" and data["input"]["slice_index"] == case.slice
    assert data["preprocessing"]["window"]["name"] == "abdomen"
    assert len(report.findings) >= 1
    assert findings_rows(data) == findings_rows(report.to_dict())

    target = report.findings[0]
    s.select(target.id)
    view, _ = s.view(None)
    lit = is_highlight(view)
    block = np.kron(target.mask, np.ones((8, 8), bool))
    assert lit[block].mean() > 0.95  # the mask is filled with the highlight colour
    x1, y1, x2, y2 = target.box_xyxy
    outside = np.ones_like(lit)
    outside[y1 * 8 - 1:(y2 + 1) * 8 + 1, x1 * 8 - 1:(x2 + 1) * 8 + 1] = False
    assert not lit[outside].any()  # and nothing outside its box
    s.select(target.id)  # selecting again clears it
    assert not is_highlight(s.view(None)[0]).any()

    s.set_index(case.slice + 1)  # the findings belong to the report's slice only
    np.testing.assert_array_equal(s.view(None)[0], compose(s.slice_image()))


def test_visual_prompt_run_sends_the_clicked_box(demo, tmp_path):
    pipe, case, _ = demo
    s = Session()
    s.open(case.input, key=case.slice)
    s.click((20 * 8, 20 * 8))
    box = s.click((40 * 8 + 7, 36 * 8))
    report = s.run(pipe, s.case("visual_prompt", mark=("ellipse", box)), tmp_path)
    assert box == (20, 20, 40, 36)
    assert report.task == "visual_prompt" and report.text
    assert report.visual_prompt["kind"] == "ellipse"
    assert report.visual_prompt["ellipse"] == {"center_xy": [30.0, 28.0], "semi_axes": [10.0, 8.0], "angle_deg": 0.0}
    assert [Path(f).name for f in s.files] == ["report.json", "overlay.png"]


# ----------------------------------------------------------------------------------------------------------------
# The command line's errors: one line, status 2, before the model or Gradio is loaded


def test_app_errors_end_in_one_line(capsys):
    from viewer.app import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cases = {("--demo", "--checkpoint", "x"): "leave out --checkpoint",
                 ("--max-new-tokens", "0"): "--max-new-tokens must be at least 1",
                 ("--port", "70000"): "between 1 and 65535",
                 ("--port", str(port)): f"cannot serve on 127.0.0.1:{port}"}
        for args, message in cases.items():
            assert main(list(args)) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
