"""Inference pipeline (Python API) with the tiny model: every input kind, every task and flow, batching, geometry.

Untrained weights generate arbitrary text, so the flows that need `<SEG>` script the model's replies with a logits
processor that forces given tokens through the real `generate` (`scripted`), and some tests prescribe the
segmentation maps (`prescribed_maps`); everything else runs as in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from dataset.conversation import Turn
from dataset.ct import InputError
from dataset.phantom import make_case, write_volume
from dataset.prompts import GROUNDED_REPORT_EVAL, NO_RELEVANT_ABNORMALITY, visual_prompt_instruction
from dataset.stack25d import SquareGeometry
from dataset.visual_prompt import draw_boxes
from inference import pipeline as pipeline_module
from inference.cases import Case, prepare, resolve_cases
from inference.generate import Generated, Generator, Prompt
from inference.pipeline import OmniAbnormPipeline, per_finding_texts
from inference.report import SCHEMA_PATH, SCHEMA_VERSION, rle_to_mask
from model.checkpoint import save_checkpoint
from model.omniabnorm import build_model
from model.tiny import tiny_model_config

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
CT5N = CT_SMALL.parent / "dicomdirtests" / "98892001" / "CT5N"
SEG = 64  # the tiny segmentation module's input side
NIFTI_SPACING = (0.7, 0.9, 2.5)  # x, y, z mm


# ----------------------------------------------------------------------------------------------------------------
# Schema validation (jsonschema is pinned in requirements.txt).


def validate_report(data: dict) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(data, schema)


def test_schema_rejects_wrong_reports():
    schema = json.loads(SCHEMA_PATH.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema": SCHEMA_VERSION}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": 0}, {**schema["$defs"]["finding"], "$defs": schema["$defs"]})


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's small ops run fastest on one thread; on a busy 2-core machine, two OpenMP threads make this
    module several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_base, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(tiny_model_config(tiny_base))
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pipe(checkpoint) -> OmniAbnormPipeline:
    return OmniAbnormPipeline.from_checkpoint(checkpoint, device="cpu", max_new_tokens=6, batch_size=4)


def _gray_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    body = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 <= 1
    return np.clip(body * 120 + rng.normal(0, 8, (h, w)) + 20, 0, 255).astype(np.uint8)


def write_nifti(path: Path, hu: np.ndarray, spacing=NIFTI_SPACING) -> Path:
    """hu (X, Y, Z) → NIfTI with an RAS affine of the given voxel size."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    image = nib.Nifti1Image(hu.astype(np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {"image": root / "gray.png"}
    Image.fromarray(_gray_image(72, 96, 0)).save(paths["image"])
    marked = np.repeat(_gray_image(64, 64, 1)[:, :, None], 3, axis=2)
    Image.fromarray(draw_boxes(marked, [(20, 22, 40, 38)])).save(root / "marked.png")
    paths["marked"] = root / "marked.png"
    for name, names in (("sequence", range(5)), ("offset", range(-1, 4))):
        folder = root / name
        folder.mkdir()
        for i, n in enumerate(names):
            Image.fromarray(_gray_image(64, 64, 10 + i)).save(folder / f"{n}.png")
        paths[name] = folder
    hu = np.full((64, 64, 12), -100.0)
    x, y = np.mgrid[0:64, 0:64]
    hu[((x - 32) ** 2 + (y - 32) ** 2 <= 10 ** 2)] = 100.0  # a disk of 100 HU through every slice
    paths["nifti"] = write_nifti(root / "ct.nii.gz", hu)
    case = make_case(0, 0, 64)
    write_volume(case, root / "phantom", seed=0)
    paths["dicom"] = root / "phantom" / "dicom"
    paths["ct_small"] = CT_SMALL
    paths["ct5n"] = CT5N
    return paths


class Forced(LogitsProcessor):
    """Forces row b to emit scripts[b] (then <|im_end|>) through the real generate loop."""

    def __init__(self, scripts: list[list[int]], eos: int):
        self.scripts, self.eos, self.start = scripts, eos, None

    def __call__(self, input_ids, scores):
        self.start = self.start if self.start is not None else input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, -torch.inf)
        for b, script in enumerate(self.scripts):
            forced[b, script[step] if step < len(script) else self.eos] = 0.0
        return forced


@pytest.fixture
def scripted(monkeypatch, pipe):
    """scripted(reply): the model answers reply(prompt text) to every prompt, through the real generate."""
    real = Generator.generate

    def install(reply):
        def generate(self, prompts, max_new_tokens, logits_processor=None, after=None):
            texts = [self.tokenizer.decode(p.input_ids) for p in prompts]
            scripts = [self.tokenizer(reply(t), add_special_tokens=False).input_ids for t in texts]
            return real(self, prompts, 64, LogitsProcessorList([Forced(scripts, self.eos_id)]), after)
        monkeypatch.setattr(Generator, "generate", generate)
    return install


@pytest.fixture
def prescribed_maps(monkeypatch):
    """prescribed_maps(maps (K, SEG, SEG)): the k-th <SEG> of every row segments maps[k]."""
    def install(maps: np.ndarray):
        def segment(self, seg_slices, queries, query_mask):
            out = np.zeros((len(seg_slices), query_mask.shape[1], SEG, SEG), np.float32)
            for b, k in query_mask.nonzero().tolist():
                out[b, k] = maps[k]
            return out
        monkeypatch.setattr(Generator, "segment", segment)
    return install


def disk(cy: float, cx: float, r: float, size: int = SEG) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((y - cy) ** 2 + (x - cx) ** 2 <= r ** 2).astype(np.float32)


def second_round(text: str) -> bool:
    return "<|im_start|>tool" in text


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def test_every_input_kind_runs_and_is_described(pipe, inputs, tmp_path):
    names = ["image", "sequence", "offset", "nifti", "dicom", "ct_small", "ct5n"]
    cases = [Case(str(inputs[n]), task="grounded", naming="offset" if n == "offset" else "auto") for n in names]
    reports = pipe.run(cases)
    got = {n: r.input for n, r in zip(names, reports)}
    assert [got[n]["kind"] for n in names] == ["image", "slice_folder", "slice_folder", "nifti", "dicom", "dicom",
                                               "dicom"]
    assert (got["image"]["height"], got["image"]["width"], got["image"]["slice_index"]) == (72, 96, 0)
    assert got["sequence"]["slice_index"] == 2 and got["offset"]["slice_index"] == 1  # middle; the slice named 0
    assert got["offset"]["slice_source"] == "0.png"
    assert got["nifti"] | {"path": None, "source": None, "pixel_spacing_mm": None} == {
        "path": None, "kind": "nifti", "source": None, "plane": "axial", "slice_index": 6, "slice_count": 12,
        "slice_source": None, "height": 64, "width": 64, "is_hu": True, "pixel_spacing_mm": None,
        "slice_spacing_mm": pytest.approx(2.5)}
    assert got["nifti"]["pixel_spacing_mm"] == pytest.approx([0.9, 0.7])  # (row = y, column = x)
    assert (got["ct_small"]["height"], got["ct_small"]["slice_count"], got["ct_small"]["is_hu"]) == (128, 1, True)
    assert got["ct5n"]["slice_count"] == 5 and got["ct5n"]["pixel_spacing_mm"] is not None
    assert all(r.input["plane"] == "unknown" for r in reports[:3])
    # 2.5D channels: the offset folder has slices −1…3, key 0 at index 1 → channels for −3…5 relative to index 1.
    assert reports[2].preprocessing["seg_slice_indices"] == [None, None, None, 0, 1, 2, 3, 4, None]
    assert reports[3].preprocessing["window"] == {"name": "abdomen", "level": 40.0, "width": 400.0}
    assert reports[0].preprocessing["window"] is None
    for report in reports:
        report.write(tmp_path)
        validate_report(json.loads((tmp_path / "report.json").read_text()))


def test_window_and_slice_choice(inputs):
    lung = prepare(Case(str(inputs["nifti"]), task="grounded", window="-600,1500", slice=3), SEG, 9)
    assert lung.stack_info["slice_index"] == 3 and lung.window == ("-600,1500", -600.0, 1500.0)
    # −100 HU in a lung window (−1350…150): (−100 + 1350) · 255 / 1500 = 212.5 → 212 (round half to even)
    assert lung.display[0, 0] == 212 and lung.display[32, 32] == 246  # 100 HU: 246.5 → 246
    with pytest.raises(InputError, match="not HU"):
        prepare(Case(str(inputs["image"]), task="grounded", window="lung"), SEG, 9)
    with pytest.raises(InputError, match="preset"):
        prepare(Case(str(inputs["nifti"]), window="wide"), SEG, 9)


def test_resolve_cases_from_lists(inputs, tmp_path):
    (tmp_path / "list.txt").write_text(f"# two cases\n{inputs['image']}\n\n{inputs['nifti']}\n")
    cases, batch = resolve_cases(tmp_path / "list.txt", {"task": "grounded"})
    assert batch and [c.input for c in cases] == [str(inputs["image"]), str(inputs["nifti"])]
    assert all(c.task == "grounded" for c in cases)
    (tmp_path / "sub").mkdir()
    Image.fromarray(_gray_image(32, 32, 3)).save(tmp_path / "sub" / "a.png")
    (tmp_path / "cases.json").write_text(json.dumps([{"input": "sub/a.png", "box": [1, 2, 10, 12], "id": "x"},
                                                     "sub/a.png"]))
    cases, batch = resolve_cases(tmp_path / "cases.json", {"task": "auto"})
    assert cases[0].input == str(tmp_path / "sub" / "a.png") and cases[0].box == (1, 2, 10, 12)
    assert cases[0].resolved_task == "visual_prompt" and cases[1].resolved_task == "grounded"
    assert resolve_cases(inputs["image"]) == ([Case(str(inputs["image"]))], False)
    (tmp_path / "bad.json").write_text(json.dumps([{"input": "a.png", "colour": "red"}]))
    with pytest.raises(InputError, match="unknown key"):
        resolve_cases(tmp_path / "bad.json")


@pytest.mark.parametrize("case, message", [
    (Case("missing.png"), "does not exist"),
    (Case("{image}", box=(1, 2, 3, 4), ellipse=(5, 5, 2, 2)), "one visual prompt"),
    (Case("{image}", task="grounded", box=(1, 2, 3, 4)), "visual_prompt task"),
    (Case("{image}", task="text_guided"), "needs a question"),
    (Case("{image}", prompt="Where is the <SEG>?"), "reserved"),
    (Case("{image}", box=(0, 0, 200, 10)), "outside"),
    (Case("{image}", ellipse=(10, 10, 30, 5)), "outside"),
    (Case("{image}", box=(1.5, 2, 3, 4)), "whole pixel"),
    (Case("{image}", task="visual_prompt"), "no red mark"),
    (Case("{image}", slice=3), "outside"),
])
def test_bad_cases_raise_one_clear_error(inputs, case, message):
    case.input = case.input.format(image=inputs["image"])
    with pytest.raises(InputError, match=message):
        prepare(case, SEG, 9)


# ----------------------------------------------------------------------------------------------------------------
# Tasks and flows


def test_visual_prompts_draw_as_training_does(pipe, inputs, tmp_path):
    points = tmp_path / "points.json"
    points.write_text(json.dumps([[10, 10], [30, 12], [25, 40]]))
    mask = np.zeros((72, 96), np.uint8)
    mask[20:30, 40:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = str(inputs["image"])
    cases = [Case(image, box=(10, 12, 40, 30)), Case(image, box=(10, 12, 40, 30), mark="cropped"),
             Case(image, ellipse=(48, 36, 20, 10, 30)), Case(image, contour=str(points)),
             Case(image, contour=str(tmp_path / "mask.png")), Case(str(inputs["marked"]), mark="bbox")]
    prepared = [prepare(c, SEG, 9) for c in cases]
    assert [p.visual_prompt["kind"] for p in prepared] == ["bbox", "cropped", "ellipse", "contour", "contour", "bbox"]
    base = np.repeat(np.asarray(Image.open(image))[:, :, None], 3, axis=2)
    assert np.array_equal(prepared[0].vlm_image, draw_boxes(base, [(10, 12, 40, 30)]))  # not stretched, as trained
    assert prepared[1].vlm_image.shape == (72, 72, 3)  # crop: 3 × 31 px, at most the slice's 72 px
    assert prepared[0].instruction == visual_prompt_instruction("bbox", "single")
    assert prepared[2].instruction == visual_prompt_instruction("ellipse", "single")
    assert prepared[5].vlm_image[22, 30].tolist() == [255, 0, 0]  # the user's own mark reaches the model
    for report in pipe.run(cases):
        assert report.task == "visual_prompt" and report.findings == [] and len(report.rounds) == 1
        report.write(tmp_path)
        validate_report(json.loads((tmp_path / "report.json").read_text()))


def test_union_flow_segments_then_describes_with_boxes(pipe, inputs, scripted, prescribed_maps, monkeypatch,
                                                       tmp_path):
    answer = "Findings 1: A round hypodense lesion in the liver.\nFindings 2: A cyst in the spleen.\n"
    scripted(lambda prompt: answer if second_round(prompt) else "<SEG>")
    prescribed_maps(np.maximum(disk(20, 20, 6), disk(44, 40, 8))[None])
    drawn = []
    monkeypatch.setattr(pipeline_module, "draw_boxes", lambda image, boxes: drawn.append(boxes) or image)
    report = pipe.run([Case(str(inputs["nifti"]), task="grounded")])[0]
    assert [r["output"] for r in report.rounds] == ["<SEG>", answer]
    assert report.text == answer.strip() and not report.refusal
    # Largest first, boxes on the 64×64 slice (geometry is the identity here), inclusive corners.
    assert [f.box_xyxy for f in report.findings] == [(32, 36, 48, 52), (14, 14, 26, 26)]
    assert drawn == [[(32, 36, 48, 52), (14, 14, 26, 26)]]  # the tool turn shows exactly those boxes
    assert all(f.text is None and f.seg_index == 1 for f in report.findings)
    assert all(f.mask_probability == 1.0 and 0 < f.seg_probability < 1 for f in report.findings)
    assert report.generation["seg_tokens"] == 1
    report.write(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    validate_report(data)
    assert np.array_equal(rle_to_mask(data["findings"][1]["mask_rle"]), report.findings[1].mask)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "finding_1.png")) > 0, report.findings[0].mask)
    assert Image.open(tmp_path / "overlay.png").size == (512, 512)  # 64 px slice enlarged ×8


def test_per_finding_flow_links_each_text_to_its_mask(pipe, inputs, scripted, prescribed_maps):
    reply = "Findings 1: A cyst in the liver. <SEG>\nFindings 2: A nodule in the right lung. <SEG>\n"
    scripted(lambda prompt: reply)
    maps = np.stack([disk(20, 20, 6), disk(44, 40, 8)])
    prescribed_maps(maps)
    report = pipe.run([Case(str(inputs["nifti"]), task="grounded", flow="per_finding")])[0]
    assert len(report.rounds) == 1 and report.flow == "per_finding"
    assert report.text == "Findings 1: A cyst in the liver.\nFindings 2: A nodule in the right lung."
    assert [f.text for f in report.findings] == ["A cyst in the liver.", "A nodule in the right lung."]
    assert [f.seg_index for f in report.findings] == [1, 2]
    assert np.array_equal(report.findings[0].mask, maps[0] > 0.5)
    assert np.array_equal(report.findings[1].mask, maps[1] > 0.5)
    assert per_finding_texts("Findings 1: a <SEG>\nFindings 2:  <SEG>\n") == ["a", None]


def test_text_guided_answer_and_refusal(pipe, inputs, scripted, prescribed_maps):
    def reply(prompt):
        if not second_round(prompt):
            return "<SEG>"
        return NO_RELEVANT_ABNORMALITY if "pancreas" in prompt else "A hypodense lesion in the liver."
    scripted(reply)
    prescribed_maps(disk(30, 30, 7)[None])
    positive, negative = pipe.run([Case(str(inputs["nifti"]), prompt="Evaluate the liver for focal lesions."),
                                   Case(str(inputs["nifti"]), prompt="Is there a mass in the pancreas?")])
    assert positive.task == "text_guided" and positive.instruction == "Evaluate the liver for focal lesions."
    assert [f.text for f in positive.findings] == ["A hypodense lesion in the liver."]
    assert not positive.refusal and negative.refusal and negative.text == NO_RELEVANT_ABNORMALITY
    assert negative.findings[0].text is None  # the mask is kept (the model drew it) but not described


def test_two_round_flow_without_seg_keeps_first_answer(pipe, inputs, scripted):
    scripted(lambda prompt: "I don't see any abnormalities on the image.")
    report = pipe.run([Case(str(inputs["image"]), task="grounded")])[0]
    assert report.refusal and report.findings == [] and len(report.rounds) == 1


def test_vqa_and_grounded_instruction(pipe, inputs):
    vqa, grounded = pipe.run([Case(str(inputs["image"]), task="vqa", prompt="Which organ is shown?"),
                              Case(str(inputs["image"]))])
    assert vqa.instruction == "Which organ is shown?" and vqa.preprocessing["vlm_image"] == "as_displayed"
    assert grounded.instruction == GROUNDED_REPORT_EVAL and grounded.preprocessing["vlm_image"] == "stretched"
    assert grounded.model["layout"] == "omniabnorm" and len(grounded.model["checkpoint_sha256"]) == 64


# ----------------------------------------------------------------------------------------------------------------
# Geometry and measurements end to end


def test_masks_map_back_to_the_original_slice(pipe, inputs, scripted, prescribed_maps):
    """72×96 slice: padded to 96² (12 rows top and bottom), resized to 64: model pixel = 1.5 original pixels."""
    scripted(lambda prompt: "Findings 1: x <SEG>\n")
    model_mask = np.zeros((SEG, SEG), np.float32)
    model_mask[20:36, 10:30] = 1.0
    prescribed_maps(model_mask[None])
    finding = pipe.run([Case(str(inputs["image"]), task="grounded", flow="per_finding")])[0].findings[0]
    assert finding.mask.shape == (72, 96)
    assert finding.box_xyxy == (15, 18, 44, 41)  # columns 10..29 → 15..44; rows 20..35 → 30..53 − 12 = 18..41
    expected = SquareGeometry(72, 96, SEG).to_original(model_mask[None] > 0.5, binary=True)[0]
    assert np.array_equal(finding.mask, expected) and finding.area_px == 30 * 24
    assert finding.measurements.area_mm2 is None and finding.measurements.mean_hu is None  # no spacing, no HU


def test_measurements_from_spacing_and_hu(pipe, inputs, scripted, prescribed_maps):
    scripted(lambda prompt: "Findings 1: x <SEG>\n")
    prescribed_maps(disk(32, 32, 8)[None])
    finding = pipe.run([Case(str(inputs["nifti"]), task="grounded", flow="per_finding")])[0].findings[0]
    m = finding.measurements
    row_mm, col_mm = 0.9, 0.7
    assert finding.area_px == int(disk(32, 32, 8).sum())
    assert m.area_mm2 == pytest.approx(finding.area_px * row_mm * col_mm)
    assert abs(m.long_axis_mm - 16 * row_mm) < row_mm and abs(m.short_axis_mm - 16 * col_mm) < col_mm
    assert (m.mean_hu, m.std_hu) == (100.0, 0.0)  # inside the 100 HU disk, read from the unwindowed slice


# ----------------------------------------------------------------------------------------------------------------
# Batching


def test_batch_equals_each_case_alone(pipe, inputs):
    """Left padding and per-row rope deltas: different prompt lengths and image grids give the same tokens."""
    cases = [Case(str(inputs["image"]), task="grounded"),
             Case(str(inputs["nifti"]), prompt="Evaluate the liver for focal lesions."),
             Case(str(inputs["marked"]), mark="bbox")]
    together = pipe.run(cases)
    alone = [pipe.run([c])[0] for c in cases]
    for a, b in zip(together, alone):
        assert a.rounds == b.rounds and a.text == b.text


def test_batched_seg_queries_and_masks_equal_singles(pipe, inputs):
    gen = pipe.generator
    tok = pipe.tokenizer
    prepared = [prepare(Case(str(inputs[n]), task="grounded"), SEG, 9) for n in ("image", "nifti")]
    prompts = [gen.encode(Prompt([Turn("user", p.instruction, images=1)], [p.vlm_image])) for p in prepared]
    assert not torch.equal(prompts[0].image_grid_thw, prompts[1].image_grid_thw)  # different visual token counts
    outputs = ["Findings 1: a <SEG>\nFindings 2: b <SEG>\n", "Findings 1: a lesion in the liver <SEG>\n"]
    rows = [Generated(p, torch.tensor(tok(t, add_special_tokens=False).input_ids), t, True)
            for p, t in zip(prompts, outputs)]
    queries, mask, seg_p = gen.seg_queries(rows)
    assert mask.tolist() == [[True, True], [True, False]]
    maps = gen.segment([p.seg_slices for p in prepared], queries, mask)
    for b in range(2):
        q1, m1, p1 = gen.seg_queries([rows[b]])
        n = int(m1.sum())
        torch.testing.assert_close(queries[b, :n], q1[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(seg_p[b, :n], p1[0], atol=1e-6, rtol=1e-4)
        single = gen.segment([prepared[b].seg_slices], q1, m1)
        np.testing.assert_allclose(maps[b, :n], single[0], atol=1e-5)
    assert (maps[1, 1] == 0).all()  # the padded query slot segments nothing


def test_seg_query_is_the_post_norm_hidden_state_at_seg(pipe, inputs):
    gen = pipe.generator
    p = prepare(Case(str(inputs["image"]), task="grounded"), SEG, 9)
    prompt = gen.encode(Prompt([Turn("user", p.instruction, images=1)], [p.vlm_image]))
    ids = torch.tensor(pipe.tokenizer("x <SEG>", add_special_tokens=False).input_ids)
    queries, _, seg_p = gen.seg_queries([Generated(prompt, ids, "x <SEG>", True)])
    batch = gen.batch([(prompt, ids)])
    out = pipe.model(**batch)  # the training forward
    hidden = pipe.model.vlm.model(**batch, use_cache=False).last_hidden_state
    torch.testing.assert_close(queries[0, 0], hidden[0, -1])
    assert seg_p[0, 0] == pytest.approx(out.logits[0, -2].softmax(-1)[pipe.model.seg_token_id].item(), rel=1e-5)


def test_generate_and_the_seg_forward_see_the_same_positions(pipe, inputs):
    """The full forward that yields the queries reproduces generate's own logits (left padding, rope deltas), so a
    `<SEG>` query is the state the model emitted `<SEG>` from."""
    gen = pipe.generator
    prepared = [prepare(Case(str(inputs[n]), task="grounded"), SEG, 9) for n in ("image", "nifti")]
    prompts = [gen.encode(Prompt([Turn("user", p.instruction, images=1)], [p.vlm_image])) for p in prepared]
    inputs_ = gen.batch([(p, torch.zeros(0, dtype=torch.long)) for p in prompts])
    assert (inputs_["attention_mask"] == 0).any()  # one row is left-padded
    out = pipe.model.vlm.generate(**inputs_, do_sample=False, max_new_tokens=5, eos_token_id=-1, use_cache=True,
                                  pad_token_id=gen.pad_id, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs_["input_ids"].shape[1]:]
    full = gen.batch([(p, new[b]) for b, p in enumerate(prompts)])
    with torch.no_grad():
        logits = pipe.model.vlm(**full, use_cache=False).logits[:, -6:-1]
    torch.testing.assert_close(logits, torch.stack(out.logits, dim=1), atol=1e-5, rtol=1e-4)
