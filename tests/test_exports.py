"""Clinical exports (exports/): DICOM-SEG, DICOM-SR and FHIR written from a report.json of a real DICOM series and
read back: geometry, masks and every report value must survive; bad input ends in one `error:` line, exit 2, no
output.

The DICOM series is a phantom written by dataset.phantom (real lesions on the key slice). The fast tests export a
per-finding report built from the phantom's ground-truth masks with the production report code (`prepare` reads
the series as inference does, `Report.write` writes report.json and the finding PNGs); the slow test exports a
report made by the pipeline with the committed demo checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import jsonschema
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.sr.codedict import codes

from dataset.phantom import make_case, write_volume
from dataset.readers import read_dicom_series
from exports import MEASUREMENTS, display_to_source, finding_mask, load_case, read_report
from exports.__main__ import main
from exports.dicom_seg import build_seg, segment_label
from exports.dicom_sr import build_sr
from exports.fhir import build_bundle, validate_bundle
from inference.cases import Case, prepare
from inference.report import SCHEMA_PATH, FindingResult, Measurements, Report, measure

REPO = Path(__file__).resolve().parents[1]
CT5N = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
SEED, SIZE = 2024, 64  # the --demo phantom: what the demo checkpoint was made for
LONG_TEXT = ("There is a well-defined hypodense lesion ≈ 3 cm in the right lobe of the liver, consistent with a "
             "simple cyst; no further workup.")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """(PhantomCase, DICOM series folder): the first axial phantom case with two findings on its key slice."""
    case = next(c for c in (make_case(SEED, i, SIZE) for i in range(200))
                if c.plane == "axial" and len(c.findings()) >= 2)
    folder = tmp_path_factory.mktemp("phantom") / case.case_id
    write_volume(case, folder, SEED)
    return case, folder / "dicom"


@pytest.fixture(scope="module")
def report_dir(phantom, tmp_path_factory) -> Path:
    """A per-finding report of the phantom series: its true lesion masks with texts, plus a finding whose <SEG> gave
    no region (text only), written by inference.report exactly as the pipeline writes one."""
    case, dicom = phantom
    p = prepare(Case(str(dicom), task="grounded", flow="per_finding", slice=case.key, window="abdomen"), SIZE, 9)
    texts = [LONG_TEXT, "Small hyperdense focus in the left kidney.", "Possible second lesion, not localised."]
    findings = []
    for k, text in enumerate(texts, 1):
        mask = case.findings()[k - 1].mask if k <= 2 else None
        box = None
        if mask is not None:
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        findings.append(FindingResult(
            id=k, text=text, mask=mask, box_xyxy=box, component_boxes_xyxy=[box] if box else [],
            mask_probability=0.8 if mask is not None else None, seg_probability=0.97, seg_index=k,
            measurements=measure(mask, p.pixel_spacing_mm, p.key_hu) if mask is not None else Measurements()))
    text = " ".join(f"Findings {k}: {t}" for k, t in enumerate(texts, 1))
    report = Report(
        case_id=case.case_id, task="grounded", flow="per_finding", instruction=p.instruction, question=None,
        visual_prompt=None, text=text, refusal=False,
        rounds=[{"output": " <SEG> ".join(texts) + " <SEG>", "finished": True}], findings=findings,
        input=p.stack_info,
        preprocessing={"window": {"name": p.window[0], "level": p.window[1], "width": p.window[2]},
                       "vlm_image_size": [SIZE, SIZE], "vlm_image": "stretched", "seg_input_size": SIZE,
                       "seg_slice_indices": p.seg_slice_indices},
        model={"checkpoint": None, "layout": None, "checkpoint_sha256": None, "base_model": None, "dtype": "float32"},
        generation={"decoding": "greedy", "max_new_tokens": 64, "finished": True, "seg_tokens": 3},
        timing={"batch_cases": 1, "batch_seconds": 0.1, "device": "cpu"},
        overlay_base=np.repeat(p.display[:, :, None], 3, axis=2))
    folder = tmp_path_factory.mktemp("report")
    report.write(folder)
    jsonschema.validate(json.loads((folder / "report.json").read_text()), json.loads(SCHEMA_PATH.read_text()))
    return folder


@pytest.fixture(scope="module")
def exported(phantom, report_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["export", "--report", str(report_dir / "report.json"), "--dicom", str(phantom[1]),
                 "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Read-back checks, shared by the fast tests and the pipeline test


def key_instance(dicom: Path, report: dict) -> pydicom.Dataset:
    uid = report["input"]["slice_source"]
    return next(ds for f in sorted(dicom.iterdir()) if (ds := pydicom.dcmread(f)).SOPInstanceUID == uid)


def report_masks(report_folder: Path) -> dict[int, np.ndarray]:
    report = read_report(report_folder / "report.json")
    shape = (report["input"]["height"], report["input"]["width"])
    return {f["id"]: m for f in report["findings"] if (m := finding_mask(f, report_folder, shape)) is not None}


def check_seg(out: Path, report_folder: Path, dicom: Path) -> dict[int, str]:
    """SEG geometry, references, one segment per finding with a region and its exact pixels → {id: tracking UID}."""
    report = read_report(report_folder / "report.json")
    source = key_instance(dicom, report)
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID, seg.PatientID) == \
           (source.StudyInstanceUID, source.FrameOfReferenceUID, source.PatientID)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in source.PixelSpacing]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
           [float(v) for v in source.ImageOrientationPatient]
    frames = seg.PerFrameFunctionalGroupsSequence
    masks = report_masks(report_folder)
    assert len(frames) == seg.number_of_segments == len(masks) >= 1
    for frame in frames:
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
               [float(v) for v in source.ImagePositionPatient]
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == \
               source.SOPInstanceUID
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=list(range(1, len(masks) + 1)))
    orientation = [float(v) for v in source.ImageOrientationPatient]
    uids = {}
    for n, (k, mask) in enumerate(sorted(masks.items()), 1):
        np.testing.assert_array_equal(pixels[0, :, :, n - 1].astype(bool), display_to_source(mask, orientation))
        description = seg.get_segment_description(n)
        finding = next(f for f in report["findings"] if f["id"] == k)
        assert description.segment_label == segment_label(finding)
        assert description.tracking_id == f"Finding {k}"
        assert description.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
        uids[k] = description.tracking_uid
    return uids


def group_text(group) -> str | None:
    texts = [item.TextValue for item in group[0].ContentSequence
             if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value]
    assert len(texts) <= 1
    return texts[0] if texts else None


def check_sr(out: Path, report_folder: Path, seg_uids: dict[int, str]) -> dict[int, str]:
    """One measurement group per finding, every measurement and text exactly as in report.json → {id: tracking UID}.
    """
    report = read_report(report_folder / "report.json")
    seg = hd.seg.segread(out / "seg.dcm")
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    planar = sr.content.get_planar_roi_measurement_groups()
    image_level = sr.content.get_image_measurement_groups()
    groups = {int(g.tracking_identifier.removeprefix("Finding ")): g for g in planar + image_level}
    assert sorted(groups) == [f["id"] for f in report["findings"]]
    assert len(planar) == len(seg_uids)
    uids = {}
    for f in report["findings"]:
        group = groups[f["id"]]
        uids[f["id"]] = group.tracking_uid
        expected = {(q.name.value, q.derivation.value if q.derivation else None): (f[q.key], q.unit.value)
                    for q in MEASUREMENTS if f[q.key] is not None}
        got = {(m.name.value, m.derivation.value if m.derivation else None): (m.value, m.unit.value)
               for m in group.get_measurements()}
        assert got == expected  # exact floats: FloatingPointValue round-trips report.json bit for bit
        assert group_text(group) == f["text"]
        if f["id"] in seg_uids:
            assert group.tracking_uid == seg_uids[f["id"]]
            ref = group.referenced_segmentation_frame
            assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
            segment = ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
            assert seg.get_segment_description(segment).tracking_uid == seg_uids[f["id"]]
        else:
            assert any(g is group for g in image_level)
    evaluations = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"
                   and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert [item.TextValue for item in evaluations[0].ContentSequence] == [report["text"]]
    return uids


def check_fhir(out: Path, report_folder: Path, tracking: dict[int, str]) -> None:
    report = read_report(report_folder / "report.json")
    bundle = json.loads((out / "fhir_bundle.json").read_text(encoding="utf-8"))
    validate_bundle(bundle)
    assert bundle["type"] == "collection"
    resources = [e["resource"] for e in bundle["entry"]]
    diagnostic = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert len(diagnostic) == 1 and len(observations) == len(report["findings"]) == len(resources) - 1
    dr = diagnostic[0]
    assert dr["status"] == "preliminary" and dr["conclusion"] == report["text"]
    assert dr["code"]["coding"][0] == {"system": "http://loinc.org", "code": "25045-6",
                                       "display": "CT Unspecified body region"}
    assert dr["result"] == [{"reference": f"urn:uuid:{o['id']}"} for o in observations]
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(r["reference"] in full_urls for r in dr["result"])
    for f, obs in zip(report["findings"], observations):
        assert obs["status"] == "preliminary" and obs["code"]["text"] == f"Finding {f['id']}"
        assert obs["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{tracking[f['id']]}"}]
        assert obs.get("note") == ([{"text": f["text"]}] if f["text"] else None)
        got = {c["code"]["text"]: (c["valueQuantity"]["value"], c["valueQuantity"]["code"])
               for c in obs.get("component", [])}
        assert got == {q.label: (f[q.key], q.unit.value) for q in MEASUREMENTS if f[q.key] is not None}


def check_export(out: Path, report_folder: Path, dicom: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["fhir_bundle.json", "seg.dcm", "sr.dcm"]
    seg_uids = check_seg(out, report_folder, dicom)
    sr_uids = check_sr(out, report_folder, seg_uids)
    check_fhir(out, report_folder, sr_uids)


# ----------------------------------------------------------------------------------------------------------------
# Exports of the phantom report


def test_export_writes_seg_sr_and_fhir_that_read_back_exactly(exported, report_dir, phantom):
    check_export(exported, report_dir, phantom[1])
    report = read_report(report_dir / "report.json")
    assert [f["mask_png"] is not None for f in report["findings"]] == [True, True, False]
    assert report["findings"][0]["mean_hu"] is not None and report["findings"][0]["area_mm2"] > 0


def test_segment_labels_carry_the_finding_text_cut_to_dicom_lo():
    assert segment_label({"id": 2, "text": None}) == "Finding 2"
    assert segment_label({"id": 2, "text": "Cyst\\in\nliver."}) == "Finding 2: Cyst in liver."
    label = segment_label({"id": 1, "text": LONG_TEXT})
    assert len(label) == 64 and label.startswith("Finding 1: There is a well-defined") and label.endswith("...")


def test_masks_from_png_equal_masks_from_rle(report_dir, tmp_path):
    report = json.loads((report_dir / "report.json").read_text())
    shape = (report["input"]["height"], report["input"]["width"])
    for f in report["findings"]:
        from_rle = finding_mask(f, report_dir, shape)
        from_png = finding_mask({**f, "mask_rle": None}, report_dir, shape)
        assert (from_rle is None and from_png is None) or np.array_equal(from_rle, from_png)
    f = report["findings"][0]
    assert finding_mask({**f, "mask_rle": None, "mask_png": None}, report_dir, shape) is None


def test_api_builds_sr_and_fhir_for_findings_without_regions(report_dir, phantom, tmp_path):
    def drop_masks(data):
        for f in data["findings"]:
            f.update(mask_png=None, mask_rle=None, area_px=None, box_xyxy=None, component_boxes_xyxy=[])
    case = load_case(edited_report(report_dir, tmp_path / "r", drop_masks), phantom[1])
    assert case.masks == {} and len(case.findings) == 3
    with pytest.raises(ValueError):
        build_seg(case)
    build_sr(case, None).save_as(tmp_path / "sr.dcm")
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()
    assert [g.tracking_uid for g in groups] == [case.tracking_uids[f["id"]] for f in case.findings]
    assert [group_text(g) for g in groups] == [f["text"] for f in case.findings]
    bundle = build_bundle(case)
    validate_bundle(bundle)
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["DiagnosticReport"] + ["Observation"] * 3


def test_fhir_validation_rejects_a_wrong_bundle(exported):
    bundle = json.loads((exported / "fhir_bundle.json").read_text(encoding="utf-8"))
    bundle["entry"][1]["resource"]["component"][0]["valueQuantity"]["value"] = "12 mm"
    with pytest.raises(ValueError):
        validate_bundle(bundle)


def transformed_series(dicom: Path, out: Path, kind: str) -> Path:
    """A copy of the phantom series stored another way (columns mirrored, rows mirrored, or transposed) with the
    orientation and position that keep every voxel where it was; same UIDs, so the report still names the key."""
    out.mkdir()
    for file in sorted(dicom.iterdir()):
        ds = pydicom.dcmread(file)
        pixels = ds.pixel_array
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        step = float(ds.PixelSpacing[0])  # isotropic phantom
        if kind == "flip_columns":
            pixels, iop = pixels[:, ::-1], [-1, 0, 0, 0, 1, 0]
            ipp[0] += (ds.Columns - 1) * step
        elif kind == "flip_rows":
            pixels, iop = pixels[::-1, :], [1, 0, 0, 0, -1, 0]
            ipp[1] += (ds.Rows - 1) * step
        else:  # transpose: image rows now run along +x, columns along +y
            pixels, iop = pixels.T, [0, 1, 0, 1, 0, 0]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(out / file.name)
    return out


@pytest.mark.parametrize("kind", ["flip_columns", "flip_rows", "transpose"])
def test_masks_land_on_the_same_voxels_whatever_the_source_pixel_order(kind, phantom, report_dir, tmp_path):
    case, dicom = phantom
    other = transformed_series(dicom, tmp_path / kind, kind)
    volume, reordered = read_dicom_series(dicom), read_dicom_series(other)
    np.testing.assert_array_equal(volume.hu, reordered.hu)  # the reader sees the same CT: the report fits both
    assert volume.slice_sources == reordered.slice_sources

    export_case = load_case(report_dir / "report.json", other)
    source = pydicom.dcmread(export_case.source_path)
    orientation = [float(v) for v in source.ImageOrientationPatient]
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(display_to_source(volume.hu[case.key], orientation), hu)

    def world(mask: np.ndarray, ds: pydicom.Dataset) -> set[tuple[float, ...]]:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        rows, cols = np.nonzero(mask)
        points = (np.array([float(v) for v in ds.ImagePositionPatient])
                  + rows[:, None] * float(ds.PixelSpacing[0]) * iop[3:]
                  + cols[:, None] * float(ds.PixelSpacing[1]) * iop[:3])
        return {tuple(np.round(p, 3)) for p in points}

    original = load_case(report_dir / "report.json", dicom)
    original_source = pydicom.dcmread(original.source_path, stop_before_pixels=True)
    for k, mask in export_case.masks.items():
        assert world(mask, source) == world(original.masks[k], original_source)
        assert not np.array_equal(mask, original.masks[k])  # the pixel grid really differs


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one `error:` line, exit 2, nothing on stdout, no output folder


def refuse(capsys, report: Path, dicom: Path, out: Path) -> str:
    code = main(["export", "--report", str(report), "--dicom", str(dicom), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def edited_report(report_dir: Path, folder: Path, edit) -> Path:
    shutil.copytree(report_dir, folder)
    path = folder / "report.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_refuses_a_report_not_made_from_dicom(capsys, report_dir, phantom, tmp_path):
    def to_nifti(data):
        data["input"]["kind"] = "nifti"
    report = edited_report(report_dir, tmp_path / "r", to_nifti)
    message = refuse(capsys, report, phantom[1], tmp_path / "out")
    assert "nifti input" in message and not (tmp_path / "out").exists()


def test_refuses_a_folder_that_is_not_the_reports_series(capsys, report_dir, tmp_path):
    message = refuse(capsys, report_dir / "report.json", CT5N, tmp_path / "out")
    assert "does not hold the report's key slice" in message and not (tmp_path / "out").exists()


def test_refuses_a_report_without_regions(capsys, report_dir, phantom, tmp_path):
    def drop_masks(data):
        for f in data["findings"]:
            f.update(mask_png=None, mask_rle=None, area_px=None, box_xyxy=None, component_boxes_xyxy=[])
    report = edited_report(report_dir, tmp_path / "r", drop_masks)
    message = refuse(capsys, report, phantom[1], tmp_path / "out")
    assert "no finding with a region" in message and not (tmp_path / "out").exists()


def test_refuses_missing_files(capsys, report_dir, phantom, tmp_path):
    out = tmp_path / "out"
    assert "does not exist" in refuse(capsys, tmp_path / "nope.json", phantom[1], out)
    assert "does not exist" in refuse(capsys, report_dir / "report.json", tmp_path / "no_dicom", out)

    def png_only(data):
        for f in data["findings"]:
            f["mask_rle"] = None
    report = edited_report(report_dir, tmp_path / "r", png_only)
    (report.parent / "finding_2.png").unlink()
    assert "finding_2.png is missing" in refuse(capsys, report, phantom[1], out)
    assert not out.exists()


def test_refuses_a_damaged_report_and_keeps_an_earlier_export(capsys, report_dir, phantom, exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def wrong_area(data):
        data["findings"][0]["area_px"] += 1
    report = edited_report(report_dir, tmp_path / "r", wrong_area)
    assert "the report is damaged" in refuse(capsys, report, phantom[1], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "holds other files" in refuse(capsys, report_dir / "report.json", phantom[1], tmp_path / "busy")


# ----------------------------------------------------------------------------------------------------------------
# A report made by the pipeline


@pytest.mark.slow
def test_export_of_a_pipeline_report(phantom, tmp_path):
    """The committed demo checkpoint, grounded (union flow), on the phantom DICOM series → report → export."""
    import torch

    from inference.pipeline import OmniAbnormPipeline

    case, dicom = phantom
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = OmniAbnormPipeline.from_checkpoint(REPO / "checkpoint" / "demo", device="cpu", max_new_tokens=64)
        report = pipe.run([Case(str(dicom), task="grounded", slice=case.key, window="abdomen")])[0]
    finally:
        torch.set_num_threads(threads)
    assert report.input["kind"] == "dicom" and report.findings, "the demo model found nothing on the phantom"
    report.write(tmp_path)
    out = tmp_path / "export"
    assert main(["export", "--report", str(tmp_path / "report.json"), "--dicom", str(dicom), "--out", str(out)]) == 0
    check_export(out, tmp_path, dicom)
