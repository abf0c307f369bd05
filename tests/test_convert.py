"""dataset/convert.py on tiny synthetic volumes (NIfTI and a DICOM series) and a tiny DeepLesion tree."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import dataset.convert as convert_module
from dataset.convert import DATASET_WINDOWS, convert, make_settings, parse_lesion_labels
from dataset.ct import InputError
from dataset.readers import load_image_array
from dataset.records import load_records
from tests.helpers import REPO

SPACING = (2.5, 0.8, 0.7)  # (z, y, x) mm
SHAPE = (20, 48, 48)


def write_nifti(path: Path, zyx: np.ndarray, spacing=SPACING) -> None:
    """Store a canonical (z, y, x) LPS array as NIfTI: data[x, y, z] with a RAS affine diag(−x, −y, z), so
    read_nifti gives back exactly `zyx`."""
    sz, sy, sx = spacing
    nib.save(nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), np.diag([-sx, -sy, sz, 1.0])), path)


def diamond(z0: int, y0: int, x0: int, radius: int) -> np.ndarray:
    """(Z, Y, X) bool: squares of half-size radius − |z − z0| around (y0, x0); the largest (2r+1)² at z0."""
    region = np.zeros(SHAPE, dtype=bool)
    for z in range(z0 - radius, z0 + radius + 1):
        h = radius - abs(z - z0)
        region[z, y0 - h:y0 + h + 1, x0 - h:x0 + h + 1] = True
    return region


def lesions() -> dict[str, np.ndarray]:
    """Five tumours (label 2) in raster order of their first voxel: C, A, D, E, B."""
    a = diamond(10, 15, 15, 5)  # key z = 10 (121 px)
    b = np.zeros(SHAPE, dtype=bool)
    b[17:19, 35:41, 5:11] = True
    b[19, 34:42, 4:12] = True  # key z = 19, the last slice (64 px)
    c = np.zeros(SHAPE, dtype=bool)
    c[3, 40:43, 40:43] = True  # 9 px: below the 16 px floor everywhere
    d = np.zeros(SHAPE, dtype=bool)
    d[8:13, 35:40, 15:20] = True  # 25 px on z = 8..12: key = the first, z = 8
    e = np.zeros(SHAPE, dtype=bool)
    e[10, 3:7, 35:40] = True  # 20 px, key z = 10 like A: merged into A's sample
    return {"A": a, "B": b, "C": c, "D": d, "E": e}


def make_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) integer HU in int16 and a label map: 1 liver, 2 tumour."""
    hu = np.random.default_rng(seed).integers(-1024, 1500, SHAPE).astype(np.int16)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:18, 28:46, 28:46] = 1
    for region in lesions().values():
        label[region] = 2
    return hu, label


@pytest.fixture
def msd(tmp_path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """MSD layout imagesTr/ + labelsTr/ with two cases (and a macOS '._' companion to be ignored)."""
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    volumes = {}
    for seed, case in enumerate(("liver_0", "liver_1")):
        hu, label = make_volume(seed)
        write_nifti(images / f"{case}.nii.gz", hu)
        write_nifti(labels / f"{case}.nii.gz", label)
        volumes[case] = hu
    (images / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    return images, labels, volumes


def run(images: Path, labels: Path, out: Path, dataset: str = "MSD_Liver", planes=("axial",), **kw) -> dict:
    return convert(make_settings(dataset, planes, **kw), images, labels, out)


def stored_hu(path: Path) -> np.ndarray:
    array = load_image_array(path)
    assert array.dtype == np.uint16
    return array.astype(np.int64) - 32768


def mask(path: Path) -> np.ndarray:
    array = load_image_array(path)
    assert array.dtype == np.uint8 and set(np.unique(array)) <= {0, 255}
    return array == 255


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_axial_key_slices_masks_and_lossless_hu(msd, tmp_path):
    images, labels, volumes = msd
    out = tmp_path / "out"
    data = run(images, labels, out)
    assert json.loads((out / "MSD_Liver.json").read_text()) == data
    ids = [f"MSD_Liver_liver_{c}_axial_{k:03d}" for c in (0, 1) for k in (8, 10, 19)]
    assert list(data) == ids  # C (9 px) gives no key slice; E's key slice is A's
    regions = lesions()
    expected_members = {8: ["A", "D"], 10: ["A", "D", "E"], 19: ["B"]}
    hu = volumes["liver_0"]
    for key, members in expected_members.items():
        sid = f"MSD_Liver_liver_0_axial_{key:03d}"
        datum = data[sid]
        context = [o for o in range(-4, 5) if 0 <= key + o < SHAPE[0]]
        assert datum["context"] == context
        assert sorted(p.stem for p in (out / datum["image"]).iterdir()) == sorted(str(o) for o in context)
        for offset in context:
            np.testing.assert_array_equal(stored_hu(out / datum["image"] / f"{offset}.png"), hu[key + offset])
        assert [a["id"] for a in datum["abnormality"]] == list(range(1, len(members) + 1))
        assert sorted(p.name for p in (out / datum["mask"]).iterdir()) == [f"{i}.png" for i in
                                                                            range(1, len(members) + 1)]
        for abn, name in zip(datum["abnormality"], members):
            cross_section = regions[name][key]
            np.testing.assert_array_equal(mask(out / datum["mask"] / f"{abn['id']}.png"), cross_section)
            assert abn == {"id": abn["id"], "group_id": abn["id"], "label": "liver tumour",
                           "area_px": int(cross_section.sum())}
        assert datum["abnormality_group"] == {str(i): {"id": [i]} for i in range(1, len(members) + 1)}
        assert datum["plane"] == "axial" and datum["dataset"] == "MSD_Liver" and datum["hu_offset"] == 32768
        assert datum["windows"] == [[-50, 150], [-140, 260]]
        assert datum["pixel_spacing_mm"] == pytest.approx([0.8, 0.7]) and datum["slice_spacing_mm"] == 2.5
        assert datum["source"] == "liver_0.nii.gz" and datum["key_index"] == key
    assert data["MSD_Liver_liver_0_axial_010"]["abnormality"][0]["area_px"] == 121  # A at its largest
    assert not list(out.glob(".tmp-*"))

    records = {r.sample_id: r for r in load_records(out / "MSD_Liver.json")}  # the training loader reads it
    record = records["MSD_Liver_liver_0_axial_019"]
    slices = record.read_slices()
    assert sorted(slices) == [-4, -3, -2, -1, 0]
    np.testing.assert_array_equal(slices[-2], hu[17].astype(np.float32))
    np.testing.assert_array_equal(record.read_masks([1], (48, 48))[0], regions["B"][19])


def test_coronal_plane(msd, tmp_path):
    images, labels, volumes = msd
    data = run(images, labels, tmp_path / "out", planes=("axial", "coronal"))
    coronal = [s for s in data if s.startswith("MSD_Liver_liver_0_coronal_")]
    assert coronal and all(data[s]["plane"] == "coronal" for s in coronal)
    datum = data["MSD_Liver_liver_0_coronal_015"]  # A's largest coronal cross-section: its central row y = 15
    out = tmp_path / "out"
    hu = volumes["liver_0"]
    for offset in datum["context"]:  # coronal display: rows superior → inferior, so z reversed
        np.testing.assert_array_equal(stored_hu(out / datum["image"] / f"{offset}.png"), hu[::-1, 15 + offset, :])
    a = lesions()["A"][::-1, 15, :]
    ids = [abn["id"] for abn in datum["abnormality"] if abn["area_px"] == int(a.sum())]
    np.testing.assert_array_equal(mask(out / datum["mask"] / f"{ids[0]}.png"), a)
    assert datum["pixel_spacing_mm"] == pytest.approx([2.5, 0.7]) and datum["slice_spacing_mm"] == pytest.approx(0.8)
    assert datum["context"] == list(range(-4, 5))


def test_windows_follow_the_spec_table(msd, tmp_path):
    assert DATASET_WINDOWS["KiTS23"] == ((-135, 215), (-140, 260))
    assert DATASET_WINDOWS["MSD_Lung"] == ((-1150, 350), (-135, 215))
    assert DATASET_WINDOWS["RibFrac"] == ((-400, 1100),) and DATASET_WINDOWS["Instance22"] == ((-10, 90),)
    assert DATASET_WINDOWS["IRCADB3D"] == ((-50, 150), (-135, 215), (-140, 260))
    images, labels, _ = msd
    data = run(images, labels, tmp_path / "out", dataset="MSD_Pancreas")  # label 2 is its tumour too
    assert {str(d["windows"]) for d in data.values()} == {"[[-135.0, 215.0], [-140.0, 260.0]]"}
    assert {a["label"] for d in data.values() for a in d["abnormality"]} == {"pancreatic tumour"}


def test_lesion_label_override_and_kits_layout(tmp_path):
    hu, label = make_volume(0)
    label[label == 1] = 3  # the "liver" block becomes a second lesion class
    for case in ("case_00000", "case_00001"):
        (tmp_path / "kits" / case).mkdir(parents=True)
        write_nifti(tmp_path / "kits" / case / "imaging.nii.gz", hu)
        write_nifti(tmp_path / "kits" / case / "segmentation.nii.gz", label)
    kits = tmp_path / "kits"
    data = run(kits, kits, tmp_path / "out", dataset="KiTS23")
    datum = data["KiTS23_case_00000_axial_010"]
    assert [a["label"] for a in datum["abnormality"]] == ["kidney tumour"] * 3 + ["kidney cyst"]
    assert datum["source"] == "case_00000/imaging.nii.gz"
    assert parse_lesion_labels("2=liver tumour, 3=cyst") == {2: "liver tumour", 3: "cyst"}
    data = run(kits, kits, tmp_path / "out2", dataset="MyLiver", lesion_labels="3=cyst", windows="-100,200")
    assert {a["label"] for d in data.values() for a in d["abnormality"]} == {"cyst"}
    assert next(iter(data.values()))["windows"] == [[-100.0, 200.0]]


@pytest.mark.parametrize("crash_in", ["_write_png", "_write_json"])
def test_kill_and_resume_equals_a_clean_run(msd, tmp_path, monkeypatch, crash_in):
    images, labels, _ = msd
    clean = tmp_path / "clean"
    run(images, labels, clean)
    out = tmp_path / "resumed"
    original = getattr(convert_module, crash_in)

    def crash_in_case_two(path, *args):
        # _write_png: slice +2 of liver_1's second sample (its first sample written, the second half-written);
        # _write_json: liver_1's record, after its sample folders moved into place.
        if ("liver_1_axial_010" in str(path) and path.name == "2.png") or path.name == "liver_1.json":
            raise RuntimeError("killed")
        return original(path, *args)

    monkeypatch.setattr(convert_module, crash_in, crash_in_case_two)
    with pytest.raises(RuntimeError, match="killed"):
        run(images, labels, out)
    monkeypatch.setattr(convert_module, crash_in, original)
    assert not (out / "MSD_Liver.json").exists()
    assert (out / ".cases" / "liver_0.json").is_file() and not (out / ".cases" / "liver_1.json").exists()
    assert not list(out.glob(".tmp-*"))
    for folder in (out / "images").iterdir():  # whatever sample folder is in place is complete
        assert folder.name.startswith("MSD_Liver_liver_0") or crash_in == "_write_json"
        assert tree(folder) == tree(clean / "images" / folder.name)

    converted = []
    real_samples = convert_module.volume_samples
    monkeypatch.setattr(convert_module, "volume_samples",
                        lambda case, settings: converted.append(case.case_id) or real_samples(case, settings))
    run(images, labels, out)
    assert converted == ["liver_1"]  # the finished case is not redone
    assert tree(out) == tree(clean)


def test_resume_with_other_settings_is_refused(msd, tmp_path):
    images, labels, _ = msd
    run(images, labels, tmp_path / "out")
    with pytest.raises(InputError, match="other settings"):
        run(images, labels, tmp_path / "out", planes=("axial", "sagittal"))


def test_parallel_workers_match_serial(msd, tmp_path):
    images, labels, _ = msd
    run(images, labels, tmp_path / "serial")
    convert(make_settings("MSD_Liver"), images, labels, tmp_path / "parallel", workers=2)
    assert tree(tmp_path / "parallel") == tree(tmp_path / "serial")


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=SPACING) -> None:
    """(Z, Y, X) integer HU → one axial CT series (stored = HU + 1024, intercept −1024), files in shuffled order."""
    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k in np.random.default_rng(1).permutation(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(hu.shape[0] - k)  # reversed: the reader must sort by position
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, 10.0, float(k * spacing[0])]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_with_nifti_label(tmp_path):
    hu, label = make_volume(3)
    write_dicom_series(tmp_path / "images" / "ct1", hu)
    (tmp_path / "labels").mkdir()
    write_nifti(tmp_path / "labels" / "ct1.nii.gz", label)
    out = tmp_path / "out"
    data = run(tmp_path / "images", tmp_path / "labels", out)
    assert list(data) == [f"MSD_Liver_ct1_axial_{k:03d}" for k in (8, 10, 19)]
    datum = data["MSD_Liver_ct1_axial_010"]
    assert datum["source"] == "ct1"
    for offset in datum["context"]:
        np.testing.assert_array_equal(stored_hu(out / datum["image"] / f"{offset}.png"), hu[10 + offset])
    np.testing.assert_array_equal(mask(out / datum["mask"] / "1.png"), lesions()["A"][10])


def write_png16(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint16)).save(path)


DL_HEADER = ("File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
             "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
             "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test")


def dl_row(file_name: str, key: int, box: str, lesion_type: int, slice_range: str, windows: str, split: int) -> str:
    return (f'{file_name},1,1,1,{key},"1, 2, 3, 4, 5, 6, 7, 8","{box}","9.5, 4.2","0.4, 0.5, 0.6",{lesion_type},0,'
            f'"{slice_range}","0.8, 0.7, 5","32, 32","{windows}",F,62,{split}')


@pytest.fixture
def deeplesion(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = tmp_path / "Images_png"
    for series, numbers in (("000001_01_01", range(106, 116)), ("000002_01_01", range(1, 8))):
        for n in numbers:
            write_png16(images / series / f"{n:03d}.png", rng.integers(31000, 34000, (32, 32)))
    rows = [DL_HEADER,
            dl_row("000001_01_01_109.png", 109, "5.2, 6.7, 12.4, 15.5", 4, "103, 115", "-175, 275", 1),
            dl_row("000002_01_01_005.png", 5, "-3, 20, 4.4, 40", 5, "1, 6", "-1350, 150", 3),
            dl_row("000001_01_01_109.png", 109, "20, 20, 25, 24", -1, "103, 115", "-1350, 150", 1)]
    (tmp_path / "DL_info.csv").write_text("\n".join(rows) + "\n")
    return images, tmp_path / "DL_info.csv"


def test_deeplesion(deeplesion, tmp_path):
    images, info = deeplesion
    out = tmp_path / "out"
    data = run(images, info, out, dataset="DeepLesion")
    assert list(data) == ["DeepLesion_000001_01_01_109", "DeepLesion_000002_01_01_005"]
    first = data["DeepLesion_000001_01_01_109"]
    assert first["context"] == list(range(-3, 5))  # 105 is not on disk
    for offset in first["context"]:  # neighbours copied byte for byte
        assert (out / first["image"] / f"{offset}.png").read_bytes() == \
            (images / "000001_01_01" / f"{109 + offset:03d}.png").read_bytes()
    box = np.zeros((32, 32), dtype=bool)
    box[7:17, 5:13] = True  # x 5.2..12.4 → 5..12, y 6.7..15.5 → 7..16
    np.testing.assert_array_equal(mask(out / first["mask"] / "1.png"), box)
    box2 = np.zeros((32, 32), dtype=bool)
    box2[20:25, 20:26] = True
    np.testing.assert_array_equal(mask(out / first["mask"] / "2.png"), box2)
    assert first["abnormality"] == [{"id": 1, "group_id": 1, "label": "liver lesion", "area_px": 80},
                                    {"id": 2, "group_id": 2, "label": "lesion", "area_px": 30}]
    assert first["windows"] == [[-175, 275], [-1350, 150]]
    assert first["pixel_spacing_mm"] == [0.7, 0.8] and first["slice_spacing_mm"] == 5
    assert first["source"] == "000001_01_01/109.png" and first["split"] == "train" and first["plane"] == "axial"
    second = data["DeepLesion_000002_01_01_005"]
    assert second["context"] == [-4, -3, -2, -1, 0, 1]  # Slice_range ends at 6 although 7.png exists
    clipped = np.zeros((32, 32), dtype=bool)
    clipped[20:32, 0:5] = True  # the box runs off the image: clipped
    np.testing.assert_array_equal(mask(out / second["mask"] / "1.png"), clipped)
    assert second["abnormality"][0]["label"] == "lung lesion" and second["split"] == "test"
    record = {r.sample_id: r for r in load_records(out / "DeepLesion.json")}["DeepLesion_000002_01_01_005"]
    np.testing.assert_array_equal(record.read_slices()[0],
                                  load_image_array(images / "000002_01_01" / "005.png").astype(np.float32) - 32768)


def test_non_integer_label_is_refused(tmp_path):
    hu, label = make_volume(0)
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    write_nifti(tmp_path / "i" / "x.nii.gz", hu)
    write_nifti(tmp_path / "l" / "x.nii.gz", label.astype(np.float32) * 0.5)
    with pytest.raises(InputError, match="not integer-valued"):
        run(tmp_path / "i", tmp_path / "l", tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataset.convert", *args], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=120)


@pytest.mark.parametrize("problem", ["unknown dataset", "missing labels", "unmatched case", "shape mismatch",
                                     "box outside"])
def test_bad_input_one_message_nothing_written(tmp_path, problem, deeplesion):
    hu, label = make_volume(0)
    images, labels, out = tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "out"
    images.mkdir()
    labels.mkdir()
    write_nifti(images / "a.nii.gz", hu)
    write_nifti(labels / "a.nii.gz", label if problem != "shape mismatch" else label[:, :, :40])
    dataset, expected = "MSD_Liver", {
        "unknown dataset": "unknown dataset 'LiTS'", "missing labels": "does not exist",
        "unmatched case": "1 image(s) without a label of the same name", "shape mismatch": "has shape (20, 48, 40)",
        "box outside": "outside the 32×32 image"}[problem]
    if problem == "unknown dataset":
        dataset = "LiTS"
    elif problem == "missing labels":
        labels = tmp_path / "nowhere"
    elif problem == "unmatched case":
        write_nifti(images / "b.nii.gz", hu)
    elif problem == "box outside":
        dataset, (images, labels) = "DeepLesion", deeplesion
        labels.write_text(labels.read_text().replace("20, 20, 25, 24", "40, 40, 45, 44"))
    result = cli("--dataset", dataset, "--images", str(images), "--labels", str(labels), "--out", str(out))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and expected in result.stderr
    if problem == "unknown dataset":
        assert "MSD_Liver" in result.stderr and "DeepLesion" in result.stderr
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == []


def test_cli_converts(msd, tmp_path):
    images, labels, _ = msd
    result = cli("--dataset", "MSD_Liver", "--images", str(images), "--labels", str(labels), "--out",
                 str(tmp_path / "out"), "--planes", "axial,sagittal", "--context", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "MSD_Liver.json").read_text())
    assert {d["plane"] for d in data.values()} == {"axial", "sagittal"}
    assert data["MSD_Liver_liver_0_axial_010"]["context"] == [-2, -1, 0, 1, 2]
