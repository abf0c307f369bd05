"""CT readers: image files, folders of slice images, DICOM series and NIfTI volumes.

Every reader ends in a `dataset.ct.SliceStack` (2D inputs) or a `dataset.ct.Volume` (3D inputs, in HU, canonical
LPS (z, y, x) layout). `load_ct` picks the reader from what a path is. Bad input raises `InputError` with one
message naming the file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom

from dataset.ct import PLANES, InputError, Plane, SliceStack, Volume, gray_rgb

PathArg = str | PathLike
Naming = Literal["auto", "sequence", "offset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
_SLICE_NAME = re.compile(r"[+-]?\d+")
_READ_ERRORS = (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError)

# nibabel names each world axis by its (negative end, positive end). Our world is DICOM LPS: +x patient left,
# +y posterior, +z superior. The canonical Volume axes (z, y, x) point to S, P and L.
_LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))
_CANONICAL = nio.axcodes2ornt(("S", "P", "L"), _LPS_LABELS)
# NIfTI (nibabel) affines map to RAS world: x and y point the other way than in LPS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------------------------
# 2D images


def load_image_array(path: PathArg) -> np.ndarray:
    """The array stored in one image file (PNG/JPEG/BMP/TIFF), decoded in full so truncation is caught.

    Returns (H, W) uint8 for 8-bit gray (bilevel images become 0/255), (H, W) uint16 for 16-bit gray (also 32-bit
    integer images whose values fit 0..65535), or (H, W, 3) uint8 for colour. Palette images become RGB. An alpha
    channel that is fully opaque is dropped; a partly transparent image is composited onto black (value × alpha /
    255, rounded), since transparent CT pixels mean "nothing here". EXIF orientation is ignored (stored order).
    Float, CMYK, multi-frame and other images are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path} holds {img.n_frames} frames; save each slice as its own image file")
            img.load()  # full decode: a truncated file fails here, not later
            if img.mode in ("1", "P", "PA"):
                has_alpha = img.mode == "PA" or "transparency" in img.info
                img = img.convert("L" if img.mode == "1" else "RGBA" if has_alpha else "RGB")
            mode = img.mode
            arr = np.array(img)
    except _READ_ERRORS as err:
        raise InputError(f"cannot read image {path}: {err} (the file is truncated, corrupt or not an image)") from err
    if mode in ("L", "RGB"):
        return arr
    if mode in ("LA", "RGBA"):
        return _drop_alpha(arr)
    if mode.startswith("I;16"):
        return arr.astype(np.uint16)
    if mode == "I" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        return arr.astype(np.uint16)
    raise InputError(f"{path}: image mode {mode!r} is not supported; save the slice as 8-bit gray, 16-bit gray "
                     f"(values 0..65535) or RGB")


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W) uint8 ITU-R 601 luma as Pillow's "L" conversion computes and rounds it: how a
    colour-saved slice is read as grey, in training and inference alike."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))


def _drop_alpha(arr: np.ndarray) -> np.ndarray:
    """(H, W, C + 1) uint8 with alpha last → (H, W, C) composited onto black; (H, W) when C is 1."""
    color, alpha = arr[..., :-1], arr[..., -1:]
    if not (alpha == 255).all():
        color = np.rint(color * (alpha / 255.0)).astype(np.uint8)
    return color[..., 0] if color.shape[-1] == 1 else color


def _image_slice(arr: np.ndarray, path: Path, hu_offset: float | None
                 ) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """One image array → ((H, W) float32 pixels, (H, W, 3) uint8 RGB or None for 16-bit, is_hu)."""
    if arr.dtype == np.uint16:
        if hu_offset is None:
            return arr.astype(np.float32), None, False
        return (arr.astype(np.float64) - hu_offset).astype(np.float32), None, True
    if hu_offset is not None:
        raise InputError(f"{path} is an 8-bit image (already windowed); an HU offset applies to 16-bit images only")
    if arr.ndim == 3:
        return luma(arr).astype(np.float32), arr, False
    return arr.astype(np.float32), gray_rgb(arr), False


def _check_plane(plane: str) -> None:
    if plane not in PLANES + ("unknown",):
        raise InputError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)} (or unknown for images)")


def read_image(path: PathArg, hu_offset: float | None = None, plane: Plane = "unknown") -> SliceStack:
    """One image file → a one-slice SliceStack (S = 1, key 0).

    8-bit gray: pixels are the stored values, key_rgb the gray replicated. RGB(A): pixels are the luma (Pillow "L",
    ITU-R 601), key_rgb the colour image, so a red visual prompt reaches the VLM. 16-bit gray: pixels are the
    stored integers (is_hu False), or stored − `hu_offset` in HU when given (DeepLesion PNGs store HU + 32768).
    """
    path = Path(path)
    _check_plane(plane)
    pixels, rgb, is_hu = _image_slice(load_image_array(path), path, hu_offset)
    return SliceStack(pixels[None], is_hu, 0, plane, str(path), key_rgb=rgb, slice_sources=(path.name,))


def _slice_index(name: str, stem: str, folder: Path) -> int:
    if not _SLICE_NAME.fullmatch(stem):
        raise InputError(f"slice image {name} in {folder} is not named by an integer; name slices 0.jpg, 1.jpg, ... "
                         f"(sequence) or -1.jpg, 0.jpg, 1.jpg (offsets from the key slice)")
    return int(stem)


def read_slice_folder(path: PathArg, naming: Naming = "auto", hu_offset: float | None = None,
                      plane: Plane = "unknown") -> SliceStack:
    """A folder of slice images named by integers → SliceStack, slices in name order.

    naming "sequence": 0.jpg … N−1.jpg (any contiguous start is accepted, e.g. DeepLesion's 001.png …); the key is
    the middle slice, index N // 2 (for even N the upper of the two middle slices). "offset": signed offsets from
    the key slice, e.g. −4.jpg … 4.jpg, contiguous around 0, key = 0. "auto": offset if any name is negative, else
    sequence; a 14K-format folder whose key is its first slice (0.jpg … 4.jpg) needs naming="offset".
    Only files with image extensions count; subfolders (e.g. `visual_instruction/`), hidden files and other files
    are ignored. Any number of neighbours per side is read. Slices may mix 8-bit gray and RGB (RGB slices become
    luma), not 8- and 16-bit. `hu_offset` and the key RGB follow `read_image`.
    """
    folder = Path(path)
    _check_plane(plane)
    if naming not in ("auto", "sequence", "offset"):
        raise InputError(f"unknown slice naming {naming!r}; choose auto, sequence or offset")
    if not folder.is_dir():
        raise InputError(f"slice folder {folder} does not exist")
    files: dict[int, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        index = _slice_index(file.name, file.stem, folder)
        if index in files:
            raise InputError(f"{folder} has two slices numbered {index}: {files[index].name} and {file.name}; "
                             f"keep one")
        files[index] = file
    if not files:
        raise InputError(f"{folder} holds no slice images ({', '.join(IMAGE_EXTENSIONS)} files named by integers)")

    indices = sorted(files)
    if naming == "auto":
        naming = "offset" if indices[0] < 0 else "sequence"
    missing = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
    if missing:
        raise InputError(f"slices are missing from {folder}: no file numbered {missing[0]} between "
                         f"{indices[0]} and {indices[-1]}; slices must be contiguous")
    if naming == "offset":
        if 0 not in files:
            raise InputError(f"{folder} has no key slice 0 (offset naming: -1.jpg, 0.jpg, 1.jpg, ...)")
        key = indices.index(0)
    else:
        if indices[0] < 0:
            raise InputError(f"{folder} has negative slice names ({files[indices[0]].name}); use offset naming")
        key = len(indices) // 2

    slices, rgbs, is_hus = [], [], []
    first: tuple[Path, np.ndarray] | None = None
    for index in indices:
        file = files[index]
        arr = load_image_array(file)
        if first is None:
            first = (file, arr)
        elif arr.shape[:2] != first[1].shape[:2]:
            raise InputError(f"slices differ in size: {first[0].name} is {_size(first[1])}, {file.name} is "
                             f"{_size(arr)} (in {folder}); all slices must have the same size")
        elif (arr.dtype == np.uint16) != (first[1].dtype == np.uint16):
            raise InputError(f"{folder} mixes 8-bit and 16-bit slices ({first[0].name}: {_bits(first[1])}, "
                             f"{file.name}: {_bits(arr)}); use one bit depth")
        pixels, rgb, is_hu = _image_slice(arr, file, hu_offset)
        slices.append(pixels)
        rgbs.append(rgb)
        is_hus.append(is_hu)
    return SliceStack(np.stack(slices), is_hus[0], key, plane, str(folder), key_rgb=rgbs[key],
                      slice_sources=tuple(files[i].name for i in indices))


def _size(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def _bits(arr: np.ndarray) -> str:
    return "16-bit" if arr.dtype == np.uint16 else "8-bit"


# ----------------------------------------------------------------------------------------------------------------
# Volumes


def _to_volume(data: np.ndarray, affine_lps: np.ndarray, source: str, slice_sources: Sequence[str] = ()) -> Volume:
    """(A, B, C) array + 4×4 affine from voxel index to LPS world mm → canonical Volume, by permuting and flipping
    axes only (an oblique axis lands on its closest canonical axis). `slice_sources` label array axis 0; they are
    kept (in the new order) when that axis becomes z, dropped otherwise."""
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        raise InputError(f"{source} contains {bad} NaN or infinite voxels; fix or re-export the volume")
    if not np.isfinite(affine_lps).all() or abs(np.linalg.det(affine_lps[:3, :3])) < 1e-9:
        raise InputError(f"{source} has degenerate geometry (voxel-to-world matrix {affine_lps[:3, :3].tolist()})")
    transform = nio.ornt_transform(nio.io_orientation(affine_lps), _CANONICAL)
    hu = np.ascontiguousarray(nio.apply_orientation(data, transform), dtype=np.float32)
    affine = affine_lps @ nio.inv_ornt_aff(transform, data.shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis, flip = int(transform[0, 0]), transform[0, 1]
    sources = tuple(slice_sources)[::int(flip)] if axis == 0 else ()
    return Volume(hu, (float(spacing[0]), float(spacing[1]), float(spacing[2])),
                  (float(affine[0, 3]), float(affine[1, 3]), float(affine[2, 3])), source, sources)


def _image_type(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def _floats(ds: pydicom.Dataset, file: Path, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in (value if value is not None else [])], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (count,):
        raise InputError(f"DICOM file {file} lacks a valid {keyword} ({value!r}); cannot place the slice in space")
    return out


def _dicom_images(path: PathArg | Sequence[PathArg]) -> tuple[str, list[tuple[Path, pydicom.Dataset]]]:
    """(where, [(file, dataset)]) for every DICOM file with pixel data; other files are skipped."""
    if isinstance(path, (str, PathLike)):
        root = Path(path)
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif root.is_file():
            files = [root]
        else:
            raise InputError(f"DICOM path {root} does not exist")
    else:
        files = [Path(f) for f in path]
        if not files:
            raise InputError("no DICOM files given")
        root = files[0].parent
        for f in files:
            if not f.is_file():
                raise InputError(f"DICOM file {f} does not exist")
    images = []
    for file in files:
        try:
            ds = pydicom.dcmread(file)
        except InvalidDicomError:
            continue  # not DICOM (README, thumbnails, ...)
        except Exception as err:  # pydicom raises many types on damaged files
            raise InputError(f"cannot read DICOM file {file}: {err}") from err
        if "PixelData" in ds:  # DICOMDIR, reports and presentation states have none
            images.append((file, ds))
    return str(root), images


def read_dicom_series(path: PathArg | Sequence[PathArg]) -> Volume:
    """One CT series (a folder, searched recursively, or a list of files) → canonical Volume in HU.

    Non-DICOM files and DICOM files without pixel data are skipped. Non-CT images are ignored (refused when no CT
    image remains). Localisers are dropped: images whose ImageType says LOCALIZER, then, within the series, images
    whose orientation differs from the majority. Several series left → InputError listing them (pass one series
    folder). Slices are sorted along the slice normal (row × column direction cosines) by ImagePositionPatient, not
    by InstanceNumber; HU = stored × RescaleSlope + RescaleIntercept. Slice spacing must be even (1 % or 0.01 mm);
    a single slice takes its spacing from SliceThickness, else SpacingBetweenSlices, else 1.0 mm.
    """
    where, images = _dicom_images(path)
    if not images:
        raise InputError(f"no DICOM images found in {where}; pass a folder (or files) of one DICOM CT series")
    ct = [(f, ds) for f, ds in images if str(ds.get("Modality", "")).upper() == "CT"]
    if not ct:
        modalities = sorted({str(ds.get("Modality", "unknown")) for _, ds in images})
        raise InputError(f"{where} holds {', '.join(modalities)} images, not CT; only CT series are supported")
    ct = [(f, ds) for f, ds in ct if "LOCALIZER" not in _image_type(ds)]
    if not ct:
        raise InputError(f"{where} holds only localiser (scout) images; pass the folder of an axial CT series")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in ct)
    if len(series) > 1:
        descriptions = {str(ds.get("SeriesInstanceUID", "")): str(ds.get("SeriesDescription", "")) for _, ds in ct}
        listing = "; ".join(f"{uid} '{descriptions[uid]}' ({n} images)" for uid, n in series.most_common())
        raise InputError(f"{where} holds {len(series)} CT series: {listing}. Pass the folder of one series")
    uid = next(iter(series))

    iops = np.stack([_floats(ds, f, "ImageOrientationPatient", 6) for f, ds in ct])
    # Component-wise median = the majority orientation whenever more than half of the images share it.
    keep = np.abs(iops - np.median(iops, axis=0)).max(axis=1) < 1e-3
    if 2 * keep.sum() <= len(ct):
        raise InputError(f"series {uid} in {where} has no majority slice orientation; export the slices again")
    ct = [item for item, k in zip(ct, keep) if k]
    row_dir, col_dir = iops[keep][0, :3], iops[keep][0, 3:]
    normal = np.cross(row_dir, col_dir)

    f0, ds0 = ct[0]
    pixel_spacing = _floats(ds0, f0, "PixelSpacing", 2)
    for f, ds in ct:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{f} is a multi-frame or colour DICOM image; only single-frame gray CT slices are "
                             f"supported (convert it to NIfTI, e.g. with dcm2niix)")
        if (ds.get("Rows"), ds.get("Columns")) != (ds0.get("Rows"), ds0.get("Columns")) or \
                not np.allclose(_floats(ds, f, "PixelSpacing", 2), pixel_spacing, rtol=1e-4, atol=1e-6):
            raise InputError(f"slices of series {uid} differ in size or pixel spacing: {f0.name} is "
                             f"{ds0.get('Rows')}x{ds0.get('Columns')} at {pixel_spacing.tolist()} mm, {f.name} is "
                             f"{ds.get('Rows')}x{ds.get('Columns')} at {ds.get('PixelSpacing')} mm")
        if ds.get("RescaleSlope") is None or ds.get("RescaleIntercept") is None:
            raise InputError(f"DICOM file {f} has no RescaleSlope/RescaleIntercept; cannot convert to HU")

    positions = np.stack([_floats(ds, f, "ImagePositionPatient", 3) for f, ds in ct])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    ct, positions, depth = [ct[i] for i in order], positions[order], depth[order]
    gaps = np.diff(depth)
    if len(ct) > 1:
        if (gaps < 0.01).any():
            i = int(np.argmax(gaps < 0.01))
            raise InputError(f"{ct[i][0].name} and {ct[i + 1][0].name} of series {uid} lie at the same position; "
                             f"the series holds several acquisitions or phases: export one")
        step_mm = float(np.median(gaps))
        uneven = np.abs(gaps - step_mm) > max(0.01, 0.01 * step_mm)
        if uneven.any():
            i = int(np.argmax(uneven))
            raise InputError(f"uneven slice spacing in series {uid}: {gaps[i]:.3f} mm between {ct[i][0].name} and "
                             f"{ct[i + 1][0].name}, {step_mm:.3f} mm elsewhere (missing or extra slices?)")
        # The mean step vector, not normal × spacing, so a tilted-gantry (sheared) series keeps its true geometry.
        step = (positions[-1] - positions[0]) / (len(ct) - 1)
    else:
        thickness = ds0.get("SliceThickness") or ds0.get("SpacingBetweenSlices") or 1.0
        step = normal * abs(float(thickness))

    slices = []
    for f, ds in ct:
        try:
            stored = ds.pixel_array
        except Exception as err:  # missing decoder plugins, damaged pixel data, ...
            raise InputError(f"cannot decode the pixels of DICOM file {f}: {err}") from err
        hu = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append(hu.astype(np.float32))
    affine = np.eye(4)
    # Voxel (k, r, c) → IPP_0 + k·step + r·ΔRow·column-direction + c·ΔColumn·row-direction (DICOM PS3.3 C.7.6.2).
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = step, col_dir * pixel_spacing[0], row_dir * pixel_spacing[1]
    affine[:3, 3] = positions[0]
    return _to_volume(np.stack(slices), affine, f"{where} (series {uid})",
                      [str(ds.get("SOPInstanceUID", f.name)) for f, ds in ct])


def read_nifti(path: PathArg) -> Volume:
    """A 3D NIfTI (.nii / .nii.gz) CT in HU → canonical Volume; scl_slope/scl_inter applied, any affine (RAS,
    LPS, permuted axes) reoriented. 4D with a single volume is accepted; a file without orientation is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"NIfTI file {path} does not exist")
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel/gzip raise many types on damaged files
        raise InputError(f"cannot read NIfTI file {path}: {err}") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path} is not a NIfTI image")
    shape = img.shape
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise InputError(f"{path} has shape {shape}; a 3D volume is needed (one volume, not a 4D series)")
    if img.header["qform_code"] == 0 and img.header["sform_code"] == 0:
        raise InputError(f"{path} has no orientation (qform_code and sform_code are 0), so left and right cannot "
                         f"be told apart; re-export it with its affine")
    try:
        data = img.get_fdata(dtype=np.float32).reshape(shape[:3])
    except Exception as err:  # truncated data, unsupported data types (RGB, complex)
        raise InputError(f"cannot read the voxels of NIfTI file {path}: {err}") from err
    # nibabel's affine maps voxels to RAS world (+x towards the patient's right, +y anterior, +z superior); DICOM
    # and Volume use LPS (+x left, +y posterior), so negate the x and y rows.
    return _to_volume(data, _RAS_TO_LPS @ img.affine, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_EXTENSIONS)


def load_ct(path: PathArg, plane: Plane | None = None, key: int | None = None, key_mm: float | None = None,
            naming: Naming = "auto", hu_offset: float | None = None) -> SliceStack:
    """Any supported CT input → SliceStack.

    A .nii/.nii.gz file, a DICOM file or a folder of DICOM files is a volume (a folder is read as slice images when
    its top level holds image files and no DICOM file): `plane` (default axial) picks the reformat, `key` (index) or `key_mm` (LPS mm along the plane's
    slice axis) the key slice, default the middle. An image file or a folder of slice images is 2D: `plane` is only
    a label, `key` re-picks the key slice by index, `key_mm` is refused; `naming` and `hu_offset` apply to images.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    is_image = path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    is_folder_of_images = False
    if path.is_dir():
        top = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")]
        images = [f.suffix.lower() in IMAGE_EXTENSIONS for f in top]
        # A DICOM export may carry a thumbnail image; any DICOM file makes it a DICOM folder.
        is_folder_of_images = any(images) and not any(is_dicom(f) for f, image in zip(top, images) if not image)
    if is_image or is_folder_of_images:
        if key_mm is not None:
            raise InputError(f"{path} is a 2D image input without positions; choose the key slice by index, not mm")
        label = plane or "unknown"
        stack = (read_image(path, hu_offset, label) if is_image
                 else read_slice_folder(path, naming, hu_offset, label))
        if key is None or key == stack.key_index:
            return stack
        if not 0 <= key < stack.pixels.shape[0]:
            raise InputError(f"key slice {key} outside 0..{stack.pixels.shape[0] - 1} of {path}")
        return stack.with_key(key)

    if hu_offset is not None or naming != "auto":
        raise InputError(f"{path} is a volume; hu_offset and slice naming apply to image inputs only")
    if path.is_file() and _is_nifti(path):
        volume = read_nifti(path)
    elif path.is_dir() or path.suffix.lower() == ".dcm" or is_dicom(path):
        volume = read_dicom_series(path)
    else:
        raise InputError(f"{path} is not a supported CT input: use a DICOM series folder, a DICOM file, a .nii or "
                         f".nii.gz file, an image ({', '.join(IMAGE_EXTENSIONS)}) or a folder of slice images")
    return volume.slices(plane or "axial", key, key_mm)
