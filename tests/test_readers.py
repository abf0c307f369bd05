"""CT readers: exact values and geometry for images, slice folders, DICOM series (real and synthetic) and NIfTI."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dataset.ct import InputError
from dataset.readers import load_ct, load_image_array, read_dicom_series, read_image, read_nifti, read_slice_folder

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
DICOMDIR_TESTS = CT_SMALL.parent / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 axial slices, InstanceNumber runs superior → inferior
CT2N = DICOMDIR_TESTS / "98892001" / "CT2N"  # 2 localisers of the same study
CT2 = DICOMDIR_TESTS / "77654033" / "CT2"  # 4 axial slices of another series

# ----------------------------------------------------------------------------------------------------------------
# 2D images


def save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def gray(value: int, shape=(12, 10)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def test_load_image_array_modes(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1, 2] = (255, 0, 0)
    assert np.array_equal(load_image_array(save(tmp_path / "rgb.png", rgb)), rgb)
    assert np.array_equal(load_image_array(save(tmp_path / "g.bmp", gray(7))), gray(7))
    assert np.array_equal(load_image_array(save(tmp_path / "g.tif", gray(9))), gray(9))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(load_image_array(tmp_path / "p.png"), rgb)
    bilevel = Image.fromarray(np.eye(4, dtype=bool))
    bilevel.save(tmp_path / "mask.png")
    assert np.array_equal(load_image_array(tmp_path / "mask.png"), np.eye(4, dtype=np.uint8) * 255)
    with pytest.raises(InputError, match="f.tif.*mode 'F'"):
        load_image_array(save(tmp_path / "f.tif", np.ones((3, 3), np.float32)))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="text.png"):
        load_image_array(tmp_path / "text.png")
    with pytest.raises(InputError, match="missing.png"):
        load_image_array(tmp_path / "missing.png")


def test_sixteen_bit_png_exact_and_hu_offset(tmp_path):
    stored = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000 + 7).astype(np.uint16)  # up to 57007
    path = save(tmp_path / "dl.png", stored)
    arr = load_image_array(path)
    assert arr.dtype == np.uint16 and np.array_equal(arr, stored)
    raw = read_image(path)
    assert not raw.is_hu and raw.key_rgb is None and np.array_equal(raw.pixels[0], stored.astype(np.float32))
    hu = read_image(path, hu_offset=32768)
    assert hu.is_hu and hu.pixels.shape == (1, 4, 5)
    assert np.array_equal(hu.pixels[0], stored.astype(np.float32) - 32768)
    with pytest.raises(InputError, match="8-bit"):
        read_image(save(tmp_path / "g.png", gray(3)), hu_offset=32768)


def test_rgb_and_rgba_keep_colour_and_give_luma(tmp_path):
    rgb = np.full((6, 8, 3), 100, np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    stack = read_image(save(tmp_path / "rgb.png", rgb), plane="axial")
    assert stack.plane == "axial" and stack.key_index == 0 and not stack.is_hu
    assert np.array_equal(stack.key_rgb, rgb)
    assert stack.pixels[0, 0, :4].tolist() == [76.0, 150.0, 29.0, 100.0]  # ITU-R 601 luma, as Pillow rounds it

    opaque = np.concatenate([rgb, np.full((6, 8, 1), 255, np.uint8)], axis=2)
    same = read_image(save(tmp_path / "opaque.png", opaque))
    assert np.array_equal(same.key_rgb, rgb) and np.array_equal(same.pixels, stack.pixels)

    half = opaque.copy()
    half[..., 3] = 128
    blended = load_image_array(save(tmp_path / "half.png", half))
    assert np.array_equal(blended, np.rint(rgb * (128 / 255)).astype(np.uint8))  # composited onto black

    key = read_image(save(tmp_path / "g.jpg", gray(50)))
    assert np.array_equal(key.key_rgb, np.full((12, 10, 3), 50, np.uint8))


def test_sequence_folder_key_is_middle(tmp_path):
    for i in range(5):
        save(tmp_path / "s" / f"{i}.png", gray(10 * i))
    stack = read_slice_folder(tmp_path / "s")
    assert stack.key_index == 2 and stack.pixels.shape == (5, 12, 10)
    assert stack.pixels[:, 0, 0].tolist() == [0, 10, 20, 30, 40]
    assert stack.slice_sources == ("0.png", "1.png", "2.png", "3.png", "4.png")
    assert np.array_equal(stack.key_rgb[..., 0], gray(20))
    (tmp_path / "s" / "4.png").unlink()
    assert read_slice_folder(tmp_path / "s").key_index == 2  # even N: the upper of the two middle slices
    for i in range(1, 4):  # DeepLesion-style zero-padded names starting at 1
        save(tmp_path / "dl" / f"{i:03d}.png", np.full((4, 4), 32768 + 100 * i, np.uint16))
    dl = read_slice_folder(tmp_path / "dl", hu_offset=32768)
    assert dl.is_hu and dl.key_index == 1 and dl.pixels[:, 0, 0].tolist() == [100, 200, 300]


def test_offset_folder_with_visual_instruction_and_extra_neighbours(tmp_path):
    folder = tmp_path / "case"
    for offset in range(-5, 6):
        save(folder / f"{offset}.jpg", gray(120 + 20 * offset, (16, 16)))
    save(folder / "visual_instruction" / "bbox_1.png", np.zeros((16, 16, 3), np.uint8))
    (folder / "._0.jpg").write_bytes(b"\0")  # macOS resource fork: hidden, not a slice
    stack = read_slice_folder(folder)
    assert stack.pixels.shape == (11, 16, 16) and stack.key_index == 5
    assert stack.slice_sources[stack.key_index] == "0.jpg"
    assert np.abs(stack.pixels[:, 8, 8] - (120 + 20 * np.arange(-5, 6))).max() <= 2  # JPEG, in offset order
    offsets_only_up = tmp_path / "up"
    for offset in range(3):
        save(offsets_only_up / f"{offset}.png", gray(offset))
    assert read_slice_folder(offsets_only_up, naming="offset").key_index == 0
    assert read_slice_folder(offsets_only_up, naming="sequence").key_index == 1


@pytest.mark.parametrize("files, message", [
    ({}, "no slice images"),
    ({"0.png": gray(1), "key.png": gray(1)}, "key.png"),
    ({"0.png": gray(1), "1.png": gray(1, (12, 11))}, r"0.png is 10x12, 1.png is 11x12"),
    ({"-2.png": gray(1), "-1.png": gray(1), "0.png": gray(1), "2.png": gray(1)}, "no file numbered 1"),
    ({"0.png": gray(1), "0.jpg": gray(1)}, "two slices numbered 0"),
    ({"-1.png": gray(1), "0.png": np.full((12, 10), 9, np.uint16)}, "mixes 8-bit and 16-bit"),
    ({"-2.png": gray(1), "-1.png": gray(1)}, "no key slice 0"),
])
def test_slice_folder_errors(tmp_path, files, message):
    folder = tmp_path / "f"
    folder.mkdir()
    for name, arr in files.items():
        save(folder / name, arr)
    with pytest.raises(InputError, match=message):
        read_slice_folder(folder)


def test_truncated_jpeg_is_refused_with_its_name(tmp_path):
    folder = tmp_path / "f"
    save(folder / "0.jpg", gray(5, (64, 64)))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = (save(folder / "1.jpg", noise, quality=95)).read_bytes()
    (folder / "1.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="1.jpg.*truncated"):
        read_slice_folder(folder)


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def test_ct_small_hu_and_spacing():
    ds = pydicom.dcmread(CT_SMALL)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    volume = read_dicom_series(CT_SMALL)
    assert volume.hu.shape == (1, 128, 128)
    for r, c in [(0, 0), (64, 64), (10, 100), (127, 3)]:
        assert volume.hu[0, r, c] == ds.pixel_array[r, c] * slope + intercept
    assert np.array_equal(volume.hu[0], ds.pixel_array * slope + intercept)  # axial IOP: stored order is canonical
    assert volume.spacing_mm == (float(ds.SliceThickness), *map(float, ds.PixelSpacing))
    assert volume.origin_mm == tuple(map(float, ds.ImagePositionPatient))
    stack = load_ct(CT_SMALL)
    assert stack.is_hu and stack.pixels.shape == (1, 128, 128) and stack.pixel_spacing_mm == (0.661468, 0.661468)


def _ct5n() -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sorted(CT5N.iterdir()))}


def test_ct5n_sorted_by_position_not_instance_number():
    by_uid = _ct5n()
    volume = read_dicom_series(CT5N)
    z = [float(by_uid[uid].ImagePositionPatient[2]) for uid in volume.slice_sources]
    assert np.all(np.diff(z) > 0) and np.allclose(np.diff(z), 2.5)
    by_instance = sorted(by_uid, key=lambda uid: int(by_uid[uid].InstanceNumber))
    assert list(volume.slice_sources) != by_instance
    for i, uid in enumerate(volume.slice_sources):
        ds = by_uid[uid]
        assert np.array_equal(volume.hu[i], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert volume.spacing_mm == pytest.approx((2.5, 0.488281, 0.488281))
    assert volume.origin_mm == pytest.approx((-72.199997, -143.0, -1.2375))


def test_localisers_dropped_and_second_series_refused(tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(CT5N, mixed / "ct")
    shutil.copytree(CT2N, mixed / "scout")
    (mixed / "README.txt").write_text("not DICOM")
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", mixed)
    shutil.copy(DICOMDIR_TESTS / "TINY_ALPHA" / "PT000000" / "ST000000" / "SE000000" / "IM000000", mixed)  # no pixels
    reference, volume = read_dicom_series(CT5N), read_dicom_series(mixed)
    assert volume.slice_sources == reference.slice_sources and np.array_equal(volume.hu, reference.hu)

    shutil.copytree(CT2, mixed / "other")
    other_uid = pydicom.dcmread(next(CT2.iterdir())).SeriesInstanceUID
    ct5n_uid = next(iter(_ct5n().values())).SeriesInstanceUID
    with pytest.raises(InputError, match="2 CT series") as err:
        read_dicom_series(mixed)
    assert other_uid in str(err.value) and ct5n_uid in str(err.value) and "Routine Brain" in str(err.value)


# Synthetic series: canonical volume E (z, y, x) = (6, 32, 40), stored as DICOM slices of a chosen orientation.
SPACING, ORIGIN = (2.5, 0.75, 0.5), (-20.0, 10.0, 30.0)  # (z, y, x) mm; LPS (x, y, z) mm
SLOPE, INTERCEPT = 2.0, -1000.0


def expected_volume() -> np.ndarray:
    z, y, x = np.indices((6, 32, 40))
    return (INTERCEPT + SLOPE * (2000 * z + 50 * y + x)).astype(np.float32)  # every voxel distinct


def ds_str(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".")


def write_series(folder: Path, perm: tuple[int, int, int], flips: tuple[bool, bool, bool], seed: int = 0
                 ) -> list[tuple[Path, str, float]]:
    """Write E as DICOM: DICOM axis i (k slice, r row, c column) is canonical axis perm[i], reversed where flips[i].
    Returns [(file, SOPInstanceUID, canonical index along the slice axis)] in k order."""
    canonical = expected_volume()
    data = canonical.transpose(perm)
    data = np.flip(data, [i for i in range(3) if flips[i]])
    stored = np.rint((data - INTERCEPT) / SLOPE).astype(np.int16)
    # affine: DICOM index (k, r, c) → canonical index → LPS (x, y, z)
    to_canonical = np.zeros((4, 4))
    to_canonical[3, 3] = 1
    for i, (axis, flip) in enumerate(zip(perm, flips)):
        to_canonical[axis, i] = -1 if flip else 1
        to_canonical[axis, 3] = canonical.shape[axis] - 1 if flip else 0
    canonical_to_lps = np.zeros((4, 4))
    canonical_to_lps[3, 3] = 1
    for axis, world in enumerate((2, 1, 0)):  # z → LPS z, y → LPS y, x → LPS x
        canonical_to_lps[world, axis] = SPACING[axis]
        canonical_to_lps[world, 3] = ORIGIN[world]
    affine = canonical_to_lps @ to_canonical
    row_dir, col_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2]), affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    rng = np.random.default_rng(seed)
    instance, names = rng.permutation(len(stored)) + 1, rng.permutation(len(stored))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, pixels in enumerate(stored):
        uid = f"1.2.826.0.1.3680043.99.{seed}.{k}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
        ds.SeriesInstanceUID, ds.SeriesDescription = f"1.2.826.0.1.3680043.99.{seed}", "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(instance[k])
        ds.ImageOrientationPatient = [ds_str(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [ds_str(v) for v in (affine @ [k, 0, 0, 1])[:3]]
        ds.PixelSpacing = [ds_str(np.linalg.norm(affine[:3, 1])), ds_str(np.linalg.norm(affine[:3, 2]))]
        ds.SliceThickness = ds_str(np.linalg.norm(affine[:3, 0]))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = ds_str(SLOPE), ds_str(INTERCEPT)
        ds.PixelData = pixels.astype("<i2").tobytes()
        file = folder / f"IM{names[k]:04d}"
        ds.save_as(file, enforce_file_format=True)
        out.append((file, uid, to_canonical[perm[0]] @ [k, 0, 0, 1]))
    return out


@pytest.mark.parametrize("perm, flips", [
    ((0, 1, 2), (True, False, True)),  # axial, slices written superior → inferior, columns left → right
    ((1, 0, 2), (False, True, False)),  # coronal acquisition, superior at the top row
    ((2, 0, 1), (False, True, False)),  # sagittal acquisition, slice normal pointing to the patient's right
])
def test_synthetic_series_exact_values_and_orientation(tmp_path, perm, flips):
    files = write_series(tmp_path / "series", perm, flips)
    volume = read_dicom_series(tmp_path / "series")
    assert np.array_equal(volume.hu, expected_volume())
    assert volume.spacing_mm == pytest.approx(SPACING) and volume.origin_mm == pytest.approx(ORIGIN)
    if perm[0] == 0:
        assert volume.slice_sources == tuple(uid for _, uid, z in sorted(files, key=lambda f: f[2]))
    else:
        assert volume.slice_sources == ()
    list_input = read_dicom_series([f for f, _, _ in files])
    assert np.array_equal(list_input.hu, volume.hu)


def test_synthetic_series_errors(tmp_path):
    def broken(name: str, edit) -> Path:
        files = write_series(tmp_path / name, (0, 1, 2), (False, False, False))
        file = files[3][0]
        ds = pydicom.dcmread(file)
        edit(ds)
        ds.save_as(file)
        return file

    no_slope = broken("noslope", lambda ds: delattr(ds, "RescaleSlope"))
    with pytest.raises(InputError, match=f"{no_slope.name}.*RescaleSlope.*HU"):
        read_dicom_series(tmp_path / "noslope")

    def move(ds, dz):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds_str(float(ds.ImagePositionPatient[2]) + dz)]

    broken("gap", lambda ds: move(ds, 0.5))
    with pytest.raises(InputError, match="uneven slice spacing.*3.000 mm"):
        read_dicom_series(tmp_path / "gap")
    broken("dup", lambda ds: move(ds, -2.5))
    with pytest.raises(InputError, match="same position"):
        read_dicom_series(tmp_path / "dup")
    broken("size", lambda ds: setattr(ds, "PixelSpacing", ["0.8", "0.5"]))
    with pytest.raises(InputError, match="differ in size or pixel spacing"):
        read_dicom_series(tmp_path / "size")


def test_unmarked_off_orientation_image_is_dropped(tmp_path):
    files = write_series(tmp_path / "s", (0, 1, 2), (False, False, False))
    reference = read_dicom_series(tmp_path / "s")
    ds = pydicom.dcmread(files[0][0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.0.100"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]  # a coronal scout, not marked LOCALIZER
    ds.save_as(tmp_path / "s" / "scout")
    volume = read_dicom_series(tmp_path / "s")
    assert volume.slice_sources == reference.slice_sources and np.array_equal(volume.hu, reference.hu)


# ----------------------------------------------------------------------------------------------------------------
# NIfTI


def canonical_with_marker() -> np.ndarray:
    """(z, y, x) = (5, 6, 7) LPS volume with one bright voxel at the patient's right-anterior-superior corner."""
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    volume[-1, 0, 0] = 5000.0
    return volume


def nifti_variants() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same physical object as (data, RAS affine) in three storage layouts; LPS origin (ox, oy, oz) of
    canonical voxel (0, 0, 0) is (-10, 20, 30), spacing (z, y, x) = (3, 2, 1) mm."""
    canonical, (ox, oy, oz), (ny, nx) = canonical_with_marker(), (-10.0, 20.0, 30.0), (6, 7)
    # RAS storage: i → right, j → anterior, k → superior.
    ras = canonical.transpose(2, 1, 0)[::-1, ::-1, :]
    ras_affine = np.array([[1, 0, 0, -(ox + (nx - 1) * 1)], [0, 2, 0, -(oy + (ny - 1) * 2)],
                           [0, 0, 3, oz], [0, 0, 0, 1]], float)
    # LPS storage (diag(-1, -1, 1) in RAS terms): i → left, j → posterior, k → superior.
    lps = canonical.transpose(2, 1, 0)
    lps_affine = np.array([[-1, 0, 0, -ox], [0, -2, 0, -oy], [0, 0, 3, oz], [0, 0, 0, 1]], float)
    # Permuted storage: the array is (z, y, x) itself.
    permuted_affine = np.array([[0, 0, -1, -ox], [0, -2, 0, -oy], [3, 0, 0, oz], [0, 0, 0, 1]], float)
    return {"ras": (ras, ras_affine), "lps": (lps, lps_affine), "permuted": (canonical.copy(), permuted_affine)}


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


@pytest.mark.parametrize("layout", ["ras", "lps", "permuted"])
def test_nifti_any_affine_gives_the_canonical_volume(tmp_path, layout):
    data, affine = nifti_variants()[layout]
    volume = read_nifti(save_nifti(tmp_path / f"{layout}.nii.gz", data, affine))
    assert np.array_equal(volume.hu, canonical_with_marker())
    assert volume.spacing_mm == pytest.approx((3, 2, 1)) and volume.origin_mm == pytest.approx((-10, 20, 30))
    assert np.unravel_index(volume.hu.argmax(), volume.hu.shape) == (4, 0, 0)  # superior, anterior, right
    coronal, sagittal = volume.slices("coronal"), volume.slices("sagittal")
    assert coronal.pixels[0, 0, 0] == 5000  # most anterior slice: superior top row, patient right first column
    assert sagittal.pixels[0, 0, 0] == 5000  # most right slice: superior top row, anterior first column
    assert coronal.pixel_spacing_mm == (3, 1) and sagittal.pixel_spacing_mm == (3, 2)


def test_nifti_scaling_and_errors(tmp_path):
    data, affine = nifti_variants()["lps"]
    img = nib.Nifti1Image(np.rint(data).astype(np.int16), affine)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    assert np.array_equal(read_nifti(tmp_path / "scaled.nii").hu, canonical_with_marker() * 2 - 1024)
    single = read_nifti(save_nifti(tmp_path / "one.nii", data[..., None], affine))
    assert np.array_equal(single.hu, canonical_with_marker())

    nan = data.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="nan.nii.*NaN"):
        read_nifti(save_nifti(tmp_path / "nan.nii", nan, affine))
    with pytest.raises(InputError, match="4d.nii.*3D"):
        read_nifti(save_nifti(tmp_path / "4d.nii", np.stack([data, data], axis=-1), affine))
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "scaled.nii").read_bytes()[:400])
    with pytest.raises(InputError, match="cut.nii.gz"):
        read_nifti(tmp_path / "cut.nii.gz")


# ----------------------------------------------------------------------------------------------------------------
# load_ct dispatch


def test_load_ct_dispatch(tmp_path):
    image = load_ct(save(tmp_path / "key.png", gray(30)), plane="coronal")
    assert image.plane == "coronal" and image.pixels.shape == (1, 12, 10) and not image.is_hu

    for offset in (-1, 0, 1):
        save(tmp_path / "folder" / f"{offset}.png", gray(40 + offset))
    folder = load_ct(tmp_path / "folder")
    assert folder.key_index == 1 and folder.key_slice[0, 0] == 40
    assert load_ct(tmp_path / "folder", key=2).key_slice[0, 0] == 41

    data, affine = nifti_variants()["ras"]
    for name in ("v.nii", "v.nii.gz"):
        sagittal = load_ct(save_nifti(tmp_path / name, data, affine), plane="sagittal", key=0)
        assert sagittal.is_hu and sagittal.plane == "sagittal" and sagittal.pixels.shape == (7, 5, 6)
        assert sagittal.key_slice[0, 0] == 5000

    shutil.copytree(CT5N, tmp_path / "export")
    save(tmp_path / "export" / "thumbnail.jpg", gray(0))  # a DICOM folder with a stray image is still DICOM
    assert load_ct(tmp_path / "export").pixels.shape == (5, 16, 16)
    series = load_ct(CT5N, key_mm=6.0)  # slices at z = -1.2375 … 8.7625 mm, 2.5 mm apart
    assert series.plane == "axial" and series.pixels.shape == (5, 16, 16) and series.key_index == 3
    assert load_ct(CT5N, plane="coronal").pixels.shape == (16, 5, 16)
    single = load_ct(next(CT5N.iterdir()))  # a DICOM file without extension
    assert single.pixels.shape == (1, 16, 16) and single.is_hu
    assert load_ct(CT_SMALL).pixels.shape == (1, 128, 128)

    (tmp_path / "notes.txt").write_text("hello")
    for bad, kwargs, message in [(tmp_path / "nothing", {}, "does not exist"),
                                 (tmp_path / "notes.txt", {}, "not a supported CT input"),
                                 (tmp_path / "key.png", {"key_mm": 3.0}, "not mm"),
                                 (tmp_path / "key.png", {"key": 1}, "outside"),
                                 (CT5N, {"hu_offset": 32768}, "image inputs only"),
                                 (tmp_path / "empty", {}, "no DICOM images")]:
        if bad.name == "empty":
            bad.mkdir()
        with pytest.raises(InputError, match=message):
            load_ct(bad, **kwargs)
