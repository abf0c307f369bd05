"""The synthetic phantom set: the OmniAbnorm-CT-14K layout, masks and reports that follow the generator's ground
truth, determinism, the volumes (NIfTI, DICOM), and the command line."""

import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from dataset.ct import PLANES, WINDOW_PRESETS, InputError, window_to_uint8
from dataset.phantom import (
    GROUP_PROMPT_KINDS,
    LESION_KINDS,
    MIN_MASK_PX,
    ORGAN,
    ORGAN_WORDS,
    Ellipsoid,
    Lesion,
    make_case,
    report,
    voxel_mm,
    write_phantom,
)
from dataset.visual_prompt import PROMPT_KINDS, draw_prompt
from tests.helpers import REPO

SEED, N, SIZE = 1, 12, 96  # seed 1 has groups, normals and findings on both sides (asserted below)
VOLUME_SEED, VOLUME_N, VOLUME_SIZE = 3, 2, 64


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("phantom") / "set", N, SEED, SIZE, valid_fraction=0.25)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> tuple[Path, Path]:
    """The same volume set written twice (for byte comparison)."""
    root = tmp_path_factory.mktemp("volumes")
    return tuple(write_phantom(root / name, VOLUME_N, VOLUME_SEED, VOLUME_SIZE, volumes=True) for name in "ab")


def load_all(root: Path) -> dict[str, tuple[str, dict]]:
    """sample id → (file it is in, datum), over the train file and every plane's valid file."""
    samples = {}
    for name in ["merged_train.json", *(f"{p}/{p}_valid.json" for p in PLANES)]:
        for sid, datum in json.loads((root / name).read_text()).items():
            assert sid not in samples, f"{sid} is in two files"
            samples[sid] = (name, datum)
    return samples


def case_of(sid: str, seed: int = SEED, size: int = SIZE):
    return make_case(seed, int(sid.split("_")[1]), size)


def read_gray(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "L", f"{path} is {image.mode}, expected 8-bit gray"
    return np.asarray(image)


def abnormal(samples):
    return [(sid, d) for sid, (_, d) in samples.items() if "abnormality" in d]


def test_layout_splits_and_fields(phantom):
    samples = load_all(phantom)
    info = json.loads((phantom / "phantom.json").read_text())
    assert len(samples) == info["n"] == N and (info["seed"], info["size"]) == (SEED, SIZE)
    files = {name for name, _ in samples.values()}
    assert info["splits"] == {"train": sum(f == "merged_train.json" for f, _ in samples.values()),
                              **{f"{p}_valid": sum(f == f"{p}/{p}_valid.json" for f, _ in samples.values())
                                 for p in PLANES}}
    assert all(info["splits"][f"{p}_valid"] >= 1 for p in PLANES) and len(files) == 4
    for sid, (name, d) in samples.items():
        index = int(sid.split("_")[1])
        assert sid == f"phantom_{index:05d}_{d['plane']}" and d["plane"] in PLANES
        assert name == "merged_train.json" or name.startswith(f"{d['plane']}/")
        assert (d["image"], d["mask"]) == (f"images/{sid}", f"masks/{sid}")
        # context lists exactly the slice files present; all one size
        stems = sorted(int(p.stem) for p in (phantom / d["image"]).glob("*.jpg"))
        assert d["context"] == stems and 0 in stems and all(abs(o) <= 4 for o in stems)
        assert len({read_gray(phantom / d["image"] / f"{o}.jpg").shape for o in stems}) == 1
        masks = sorted(p.name for p in (phantom / d["mask"]).iterdir())
        if "abnormality" not in d:  # normal image: no findings, nothing marked
            assert "abnormality_group" not in d and masks == []
            assert not (phantom / d["image"] / "visual_instruction").exists()
            continue
        abns = d["abnormality"]
        assert [a["id"] for a in abns] == list(range(1, len(abns) + 1))
        assert masks == sorted(f"{a['id']}.jpeg" for a in abns)
        groups = {int(g): v["id"] for g, v in d["abnormality_group"].items()}
        assert groups == {g: [a["id"] for a in abns if a["group_id"] == g] for g in {a["group_id"] for a in abns}}
        for a in abns:
            members = [b for b in abns if b["group_id"] == a["group_id"]]
            assert all(b["description"] == a["description"] and b["label"] == a["label"] for b in members)
            assert len(a["rewritten_findings"]) == 3 and len(set(a["rewritten_findings"])) == 3
            assert a["category"] == [ORGAN[organ_name(a)].system, ORGAN[organ_name(a)].structure,
                                     a["label"][0].upper() + a["label"][1:]]
            assert all(isinstance(a[f"referring_prompt_{k}"], str) and a[f"referring_prompt_{k}"] for k in range(1, 6))
            assert a["density"] in ("hypodense", "hyperdense") and a["side"] in ("left", "right", "none")
            assert len(a["center_mm"]) == 3 and a["size_mm"] > 0
            if name == "merged_train.json":
                assert "referring_prompt" not in a and "negative_referring_prompt" not in a
            else:
                assert a["referring_prompt"] == [a[f"referring_prompt_{k}"] for k in range(1, 6)]
                assert len(a["negative_referring_prompt"]) == 5


def test_grouped_valid_files_hold_the_abnormality_dicts(phantom):
    for plane in PLANES:
        flat = json.loads((phantom / plane / f"{plane}_valid.json").read_text())
        grouped = json.loads((phantom / plane / f"{plane}_valid_grouped.json").read_text())
        assert flat.keys() == grouped.keys()
        for sid, d in flat.items():
            g = grouped[sid]
            assert {k: v for k, v in g.items() if k != "abnormality_group"} == \
                {k: v for k, v in d.items() if k != "abnormality_group"}
            if "abnormality" in d:
                assert g["abnormality_group"] == {gid: [a for a in d["abnormality"] if a["id"] in v["id"]]
                                                  for gid, v in d["abnormality_group"].items()}


def organ_name(abn: dict) -> str:
    return abn["organ"] if abn["side"] == "none" else f"{abn['side']} {abn['organ']}"


def test_images_and_masks_match_the_generator(phantom):
    samples = load_all(phantom)
    for sid, (_, d) in samples.items():
        case = case_of(sid)
        assert case.plane == d["plane"] and case.context() == d["context"]
        key = read_gray(phantom / d["image"] / "0.jpg").astype(float)
        expected = window_to_uint8(case.on_key(case.volume.hu), *WINDOW_PRESETS["abdomen"]).astype(float)
        assert key.shape == expected.shape and np.abs(key - expected).mean() < 2.0  # JPEG loss only
        labels = case.on_key(case.labels)
        findings = case.findings()
        assert len(findings) == len(d.get("abnormality", []))
        for abn, finding in zip(d.get("abnormality", []), findings):
            mask = read_gray(phantom / d["mask"] / f"{abn['id']}.jpeg") >= 128
            assert np.array_equal(mask, finding.mask), f"{sid} mask {abn['id']} changed through JPEG"
            assert mask.sum() >= MIN_MASK_PX
            assert (labels[mask] == ORGAN[organ_name(abn)].label).all(), f"{sid}: mask {abn['id']} leaves its organ"
            lesion = case.lesions[finding.lesion_index]
            assert (abn["organ"], abn["density"], abn["size_mm"]) == (lesion.organ.organ, lesion.kind.density,
                                                                      finding.size_mm)
            # the analytic diameter agrees with the drawn mask's longest extent (within a pixel or two)
            rows, cols = np.nonzero(mask)
            points = np.stack([rows, cols], 1) * voxel_mm(SIZE)
            longest = max(np.linalg.norm(points[:, None] - points[None], axis=-1).max(), 0.0)
            assert abs(longest - abn["size_mm"]) < 2.5 * voxel_mm(SIZE), (sid, longest, abn["size_mm"])


def test_reports_state_the_ground_truth(phantom):
    for sid, d in abnormal(load_all(phantom)):
        for abn in d["abnormality"]:
            members = [a for a in d["abnormality"] if a["group_id"] == abn["group_id"]]
            sizes = [f"{math.floor(a['size_mm'] + 0.5)} mm" if len(members) == 1 else
                     f"{math.floor(a['size_mm'] + 0.5)}" for a in members]
            for text in [abn["description"], *abn["rewritten_findings"]]:
                assert ORGAN_WORDS[abn["organ"]][0] in text and abn["density"] in text, text
                assert abn["side"] == "none" or f"{abn['side']} " in text, text
                assert all(s in text for s in sizes), (text, sizes)
                if len(members) > 1:
                    assert {2: "two", 3: "three"}[len(members)] in text.lower(), text
            for k in range(1, 6):
                assert ORGAN_WORDS[abn["organ"]][0] in abn[f"referring_prompt_{k}"]


def test_report_wording_exactly():
    kind = next(k for k in LESION_KINDS if (k.organ, k.kind) == ("kidney", "cyst"))
    lesion = Lesion(ORGAN["right kidney"], kind, Ellipsoid((0, 0, 0), (9, 9, 9)), 5.0, "the right kidney")
    description, rewritten = report([lesion], [17.5])
    assert description == ("An 18 mm well-defined hypodense lesion in the right kidney, consistent with a simple renal "
                           "cyst.")
    assert rewritten[1] == ("There is an 18 mm well-defined hypodense lesion in the right kidney, consistent with a "
                            "simple renal cyst.")
    description, _ = report([lesion, lesion], [12.4, 23.0])
    assert description == ("Two well-defined hypodense lesions in the right kidney, the larger 23 mm, the smaller 12 "
                           "mm, consistent with simple renal cysts.")


def test_negative_questions_never_ask_about_an_organ_with_a_finding(phantom):
    checked = 0
    for sid, d in abnormal(load_all(phantom)):
        present = {a["organ"] for a in d["abnormality"]}
        words = [w for organ in present for w in ORGAN_WORDS[organ]]
        for abn in d["abnormality"]:
            for question in abn.get("negative_referring_prompt", []):
                assert not any(re.search(rf"\b{w}\b", question.lower()) for w in words), (sid, question)
                checked += 1
    assert checked >= 5


def test_patient_right_is_image_left(phantom):
    """Axial and coronal display put the patient's right on the image's left (radiological convention)."""
    sides = set()
    for sid, (_, d) in load_all(phantom).items():
        case = case_of(sid)
        if d["plane"] in ("axial", "coronal"):
            labels = case.on_key(case.labels)
            half = labels.shape[1] / 2
            for name, left_of_image in (("liver", True), ("spleen", False)):
                cols = np.nonzero(labels == ORGAN[name].label)[1]
                if len(cols) > 20:
                    assert (cols.mean() < half) == left_of_image, (sid, name)
        for abn in d.get("abnormality", []):
            if abn["side"] != "none":  # LPS x grows towards the patient's left
                assert (abn["center_mm"][0] < 0) == (abn["side"] == "right"), (sid, abn["center_mm"])
            if d["plane"] == "axial" and abn["side"] != "none":
                mask = read_gray(phantom / d["mask"] / f"{abn['id']}.jpeg") >= 128
                assert (np.nonzero(mask)[1].mean() < mask.shape[1] / 2) == (abn["side"] == "right"), (sid, abn)
                sides.add(abn["side"])
    assert sides == {"left", "right"}, "the fixture seed should give axial findings on both sides"


def test_visual_prompts_are_drawn_on_the_stored_key_slice(phantom):
    groups_seen = 0
    for sid, d in abnormal(load_all(phantom)):
        folder = phantom / d["image"] / "visual_instruction"
        key = read_gray(phantom / d["image"] / "0.jpg")
        key_rgb = np.repeat(key[:, :, None], 3, axis=2)
        masks = {a["id"]: read_gray(phantom / d["mask"] / f"{a['id']}.jpeg") >= 128 for a in d["abnormality"]}
        groups = [v["id"] for v in d["abnormality_group"].values()]
        expected = {f"{kind}_{i}.png": (kind, [masks[i]]) for kind in PROMPT_KINDS for i in masks}
        for kind in GROUP_PROMPT_KINDS:
            expected[f"{kind}_all.png"] = (kind, [np.any([masks[i] for i in ids], axis=0) for ids in groups])
            for ids in groups:
                if len(ids) > 1:
                    expected[f"{kind}_{'_'.join(map(str, ids))}.png"] = (kind, [masks[i] for i in ids])
        groups_seen += sum(len(ids) > 1 for ids in groups)
        assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
        for name, (kind, marks) in expected.items():
            assert np.array_equal(np.asarray(Image.open(folder / name).convert("RGB")),
                                  draw_prompt(key_rgb, marks, kind)), f"{sid}/{name}"
    assert groups_seen >= 1, "the fixture seed should give at least one group of findings"


def test_same_seed_same_bytes_other_seed_other_data(phantom, tmp_path):
    again = write_phantom(tmp_path / "again", N, SEED, SIZE, valid_fraction=0.25)
    ours = sorted(p.relative_to(phantom) for p in phantom.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((phantom / p).read_bytes() == (again / p).read_bytes() for p in ours)
    other = write_phantom(tmp_path / "other", 3, SEED + 1, SIZE, valid_fraction=0.25)
    assert (other / "merged_train.json").read_text() != (phantom / "merged_train.json").read_text()
    sid = next(iter(json.loads((other / "merged_train.json").read_text())))
    assert (other / "images" / sid / "0.jpg").read_bytes() != (phantom / "images" / sid / "0.jpg").read_bytes()


def test_context_shrinks_at_the_volume_ends():
    case = make_case(SEED, 0, 64)
    count = case.volume.hu.shape[0]
    assert replace(case, plane="axial", key=1).context() == [-1, 0, 1, 2, 3, 4]
    assert replace(case, plane="axial", key=count - 1).context() == [-4, -3, -2, -1, 0]


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_phantom(out, 2, 0, 64)
    assert (out / "keep.txt").read_text() == "mine"

    import dataset.phantom as phantom_module

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom_module, "write_volume", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom(out, 2, 0, 64, volumes=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and (out / "keep.txt").exists()
    monkeypatch.undo()
    write_phantom(out, 2, 0, 64, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "merged_train.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n 0"), ({"seed": -1}, "--seed -1"), ({"size": 32}, "--size 32"),
    ({"valid_fraction": 1.0}, "--valid-fraction 1.0"),
])
def test_bad_settings_are_input_errors(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        write_phantom(tmp_path / "x", **{"n": 2, "seed": 0, "size": 64, **kwargs})
    assert list(tmp_path.iterdir()) == []


def lesion_table(folder: Path) -> list[dict]:
    return json.loads((folder / "lesions.json").read_text())["lesions"]


def test_volumes_read_back_in_hu(volumes):
    root, again = volumes
    seen = 0
    for index in range(VOLUME_N):
        case = make_case(VOLUME_SEED, index, VOLUME_SIZE)
        folder = root / "volumes" / case.case_id
        image = nib.load(folder / "ct.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # array (x, y, z) of the canonical LPS volume
        data = np.asarray(image.dataobj)
        assert np.array_equal(data, case.volume.hu.transpose(2, 1, 0))
        lesion_map = np.asarray(nib.load(folder / "lesions.nii.gz").dataobj)
        files = sorted((folder / "dicom").glob("*.dcm"))
        datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
        assert len(datasets) == case.volume.hu.shape[0]
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
        assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}) == 1
        first = datasets[0]
        assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in first.PixelSpacing] == [voxel_mm(VOLUME_SIZE)] * 2
        dicom_hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
        assert np.array_equal(dicom_hu, case.volume.hu)
        for lesion in lesion_table(folder):
            x, y, z = lesion["centre_lps_mm"]
            ijk = np.rint(np.linalg.inv(image.affine) @ [-x, -y, z, 1])[:3].astype(int)  # LPS → RAS → voxel
            assert list(ijk[::-1]) == lesion["centre_voxel_zyx"]
            assert abs(data[tuple(ijk)] - lesion["hu"]) < 45  # 4.5 σ of the noise
            assert abs(dicom_hu[tuple(ijk[::-1])] - lesion["hu"]) < 45
            assert abs(data[lesion_map == lesion["index"]].mean() - lesion["hu"]) < 3
            seen += 1
    assert seen >= 1, "the volume fixture seed should have lesions"
    assert all((root / p).read_bytes() == (again / p).read_bytes()
               for p in (Path("volumes/phantom_00000/ct.nii.gz"), Path("volumes/phantom_00000/dicom/0000.dcm")))


def test_volumes_through_the_project_readers(volumes):
    readers = pytest.importorskip("dataset.readers")
    root, _ = volumes
    case = make_case(VOLUME_SEED, 0, VOLUME_SIZE)
    for volume in (readers.read_nifti(root / "volumes" / case.case_id / "ct.nii.gz"),
                   readers.read_dicom_series(root / "volumes" / case.case_id / "dicom")):
        assert np.array_equal(volume.hu, case.volume.hu)
        assert np.allclose(volume.spacing_mm, case.volume.spacing_mm)
        assert np.allclose(volume.origin_mm, case.volume.origin_mm, atol=1e-3)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataset.phantom", *args], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=120)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    done = cli("--out", str(out), "--n", "2", "--seed", "0", "--size", "64")
    assert done.returncode == 0, done.stderr
    assert (out / "merged_train.json").is_file()
    for args, message in ((["--n", "0"], "--n 0"), ([], "not empty")):
        bad = cli("--out", str(out), "--seed", "0", "--size", "64", *(args or ["--n", "2"]))
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr


def test_section_diameter_is_exact():
    sphere = Ellipsoid((0, 0, 0), (10, 10, 10))
    assert sphere.section_diameter(0, 6.0) == pytest.approx(16.0) and sphere.section_diameter(1, 10.5) == 0.0
    flat = Ellipsoid((0, 0, 0), (5, 4, 10))  # semi-axes (z, v, u); u = x unturned
    assert [flat.section_diameter(axis, 0.0) for axis in range(3)] == pytest.approx([20.0, 20.0, 10.0])
    turned = replace(flat, angle=math.pi / 2)  # u now along y
    assert [turned.section_diameter(axis, 0.0) for axis in range(3)] == pytest.approx([20.0, 10.0, 20.0])
    box, inside = turned.voxels((40, 40, 40), 1.0)  # centred on voxel 0: one octant lies inside the array
    assert box == (slice(0, 11),) * 3 and inside.shape == (11, 11, 11)
    assert inside[4, 0, 0] and inside[0, 9, 0] and inside[0, 0, 4]
    assert not inside[6, 0, 0] and not inside[0, 0, 5] and not inside[3, 8, 3]
