"""Convert public 3D lesion datasets (NIfTI or DICOM volume + label volume) and DeepLesion to the project's 2D
format (SPEC §4.2): key slices containing lesions, ±`context` neighbours as 16-bit PNG holding HU + 32768, one
0/255 mask per lesion, and a JSON `sample_id → datum` loadable by `dataset.records.load_records`.

    python -m dataset.convert --dataset MSD_Liver --images Task03_Liver/imagesTr --labels Task03_Liver/labelsTr \
        --out converted/msd_liver --planes axial,coronal,sagittal --workers 8
    python -m dataset.convert --dataset DeepLesion --images Images_png --labels DL_info.csv --out converted/dl

Output (OUT/):
    images/<sample_id>/<offset>.png   uint16, HU + 32768 clipped to 0..65535; offsets -context..context that exist
    masks/<sample_id>/<id>.png        uint8 0/255, key-slice size, one per abnormality id
    <NAME>.json                       sample_id → datum (image, mask, context, plane, dataset, hu_offset, windows,
                                      pixel_spacing_mm, slice_spacing_mm, source, abnormality, abnormality_group)
    .cases/<case>.json                per-case record: the case's datums and the settings they were made with

Decisions (where the spec is silent):
- Pairing. A file `x.nii(.gz)` or a DICOM series folder `x/` in --images pairs with `x.nii(.gz)` in --labels; an
  image named `x_0000.nii.gz` (nnU-Net channel suffix) also pairs with `x.nii.gz`. Hidden files (MSD archives carry
  macOS `._x.nii.gz` companions) are skipped. Images without labels and labels without images are both errors.
  When --images and --labels are the same folder, the KiTS layout is assumed: case folders each holding
  imaging.nii(.gz) and segmentation.nii(.gz). --images FILE|SERIES_FOLDER with --labels FILE converts one case.
- Labels are read with the same reader family as the images (NIfTI through `read_nifti`, so a DICOM image and a
  NIfTI label both land in the canonical LPS layout) and must have the image's shape and integer values.
- Lesions: per lesion class (label value), 3D connected components with 26-connectivity (anisotropic CT splits
  diagonal-touching lesions into fragments under 6-connectivity). "*" as a label value means every non-zero value
  is one class (RibFrac stores one value per fracture instance).
- Key slices: per lesion and plane, the slice with the largest cross-section (the first of equal ones, in display
  order); lesions whose largest cross-section is below 16 px give no key slice; equal key slices are merged. On a
  key slice every lesion crossing it with at least 16 px gets a mask (its whole cross-section, even when that is
  several 2D pieces), one abnormality group per lesion, ids ordered by lesion class (table order) then component.
- HU are rounded to whole HU before storing (HU + 32768 must be an integer); integer HU round-trip exactly.
- Sample ids: `<NAME>_<case>_<plane>_<key index>` (3D; the key index counts display-order slices of that plane,
  also stored as `key_index`) and `DeepLesion_<File_name without .png>`.
- DeepLesion: one sample per File_name (its lesions grouped); neighbours are the PNGs of the series folder inside
  Slice_range, copied byte for byte (already HU + 32768, checked to be 16-bit and of the key slice's size); each
  box (x1, y1, x2, y2, 0-based pixels) becomes a filled mask of the pixels whose centres lie inside it after
  rounding the bounds, clipped to the image (a box wholly outside it is an error); `windows` are the sample's
  lesions' DICOM_windows (distinct, in lesion order); `split` is train/valid/test from Train_Val_Test; labels come
  from Coarse_lesion_type ("lesion" for −1, the unlabelled training lesions).
- Resuming: a case is done when its record exists and was made with the same settings (other settings are an
  error, not a silent mix); a case is built in OUT/.tmp-<case>/, its sample folders are renamed into place, then the
  record is written (temp file + os.replace); the final JSON is rebuilt from the records and replaced atomically.
  A run that finds no lesion at all writes no JSON and says so (wrong --dataset or --lesion-labels, usually).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dataset.ct import PLANES, InputError, Volume
from dataset.readers import load_image_array, read_dicom_series, read_nifti

HU_OFFSET = 32768
MIN_AREA_PX = 16  # smaller cross-sections are dropped: too few pixels to segment or describe
MAX_CONTEXT = 4  # the format holds offsets −4..4
ANY_NONZERO = "*"  # lesion-label key: every non-zero label value is one lesion class

# SPEC §4.2: per-dataset HU windows [lo, hi]; training draws one per sample.
_LUNG = ((-1150.0, 350.0), (-135.0, 215.0))
_ABDOMEN = ((-135.0, 215.0), (-140.0, 260.0))
DATASET_WINDOWS: dict[str, tuple[tuple[float, float], ...]] = {
    "Instance22": ((-10.0, 90.0),),
    "MSD_Liver": ((-50.0, 150.0), (-140.0, 260.0)),
    **{name: _LUNG for name in ("MSD_Lung", "COVID19", "NSCLC", "LIDC_IDRI", "LNDb", "MosMed")},
    **{name: _ABDOMEN for name in ("KiTS23", "KiPA22", "MSD_Colon", "MSD_Pancreas", "Adrenal_ACC_Ki67",
                                   "ULS23RadboudumcPancreas", "QUBIQ21_PancreasLesion")},
    **{name: ((-135.0, 215.0),) for name in ("SegRap2023_Task2", "FUMPE", "LNQ2023")},
    "RibFrac": ((-400.0, 1100.0),),
    "ULS23RadboudumcBone": ((-400.0, 1100.0),),
    "IRCADB3D": ((-50.0, 150.0), (-135.0, 215.0), (-140.0, 260.0)),
}

# Which label values are lesions, per dataset (label value → lesion class name). From the datasets' own label
# maps; the entries marked "unsure" follow the common NIfTI conversions of sets not released as one label map.
LESION_LABELS: dict[str, dict[int | str, str]] = {
    "Instance22": {1: "intracranial haemorrhage"},
    "MSD_Liver": {2: "liver tumour"},  # 1 liver
    "MSD_Lung": {1: "lung tumour"},
    "MSD_Colon": {1: "colon cancer"},
    "MSD_Pancreas": {2: "pancreatic tumour"},  # 1 pancreas
    "COVID19": {1: "COVID-19 lesion"},
    "NSCLC": {1: "lung tumour"},  # unsure: GTV exported as 1
    "LIDC_IDRI": {1: "lung nodule"},  # unsure: XML reads exported as 1
    "LNDb": {1: "lung nodule"},  # unsure
    "MosMed": {1: "COVID-19 lesion"},
    "KiTS23": {2: "kidney tumour", 3: "kidney cyst"},  # 1 kidney
    "KiPA22": {4: "kidney tumour"},  # unsure: 1 renal vein, 2 kidney, 3 renal artery
    "Adrenal_ACC_Ki67": {1: "adrenocortical carcinoma"},  # unsure
    "ULS23RadboudumcPancreas": {1: "pancreatic lesion"},
    "ULS23RadboudumcBone": {1: "bone lesion"},
    "QUBIQ21_PancreasLesion": {1: "pancreatic lesion"},
    "SegRap2023_Task2": {1: "nasopharyngeal tumour", 2: "metastatic lymph node"},  # unsure: 1 GTVp, 2 GTVnd
    "FUMPE": {1: "pulmonary embolism"},
    "LNQ2023": {1: "enlarged lymph node"},
    "RibFrac": {ANY_NONZERO: "rib fracture"},  # one value per fracture instance
    "IRCADB3D": {2: "liver tumour"},  # unsure: LiTS-style 1 liver, 2 tumour
}

DEEPLESION = "DeepLesion"
DEEPLESION_TYPES = {1: "bone lesion", 2: "abdomen lesion", 3: "mediastinum lesion", 4: "liver lesion",
                    5: "lung lesion", 6: "kidney lesion", 7: "soft tissue lesion", 8: "pelvis lesion", -1: "lesion"}
DEEPLESION_SPLITS = {1: "train", 2: "valid", 3: "test"}
DEEPLESION_COLUMNS = ("File_name", "Key_slice_index", "Bounding_boxes", "DICOM_windows", "Spacing_mm_px_",
                      "Coarse_lesion_type", "Slice_range", "Train_Val_Test")
KITS_IMAGE, KITS_LABEL = "imaging", "segmentation"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class VolumeCase:
    case_id: str
    image: Path  # NIfTI file or DICOM series folder
    label: Path  # NIfTI label volume
    source: str  # image path relative to --images


@dataclass(frozen=True)
class DeepLesionCase:
    case_id: str  # series folder <patient>_<study>_<series>
    folder: Path
    rows: tuple[dict[str, str], ...]  # DL_info.csv rows of this series, in file order


@dataclass(frozen=True)
class Settings:
    dataset: str
    planes: tuple[str, ...]
    context: int
    lesion_labels: tuple[tuple[int | str, str], ...]
    windows: tuple[tuple[float, float], ...]

    def as_json(self) -> dict:
        return {"dataset": self.dataset, "planes": list(self.planes), "context": self.context,
                "lesion_labels": {str(k): v for k, v in self.lesion_labels},
                "windows": [list(w) for w in self.windows]}


@dataclass
class Sample:
    sample_id: str
    datum: dict
    slices: dict[int, np.ndarray | Path]  # offset → (H, W) uint16 HU + 32768, or a PNG that already is that
    masks: list[np.ndarray]  # (H, W) bool, for abnormality ids 1..n


# ---------------------------------------------------------------------------------------------------------------
# Options


def parse_lesion_labels(text: str) -> dict[int | str, str]:
    """'2=liver tumour,3=cyst' (or '*=rib fracture') → {2: 'liver tumour', 3: 'cyst'}."""
    labels: dict[int | str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, name = item.partition("=")
        value, name = value.strip(), name.strip()
        if not sep or not name or not (value == ANY_NONZERO or value.lstrip("-").isdigit()):
            raise InputError(f"--lesion-labels item {item!r} is not VALUE=NAME; write e.g. "
                             f"'2=liver tumour,3=cyst' (or '*=rib fracture' for every non-zero value)")
        key: int | str = value if value == ANY_NONZERO else int(value)
        if key == 0:
            raise InputError("--lesion-labels: label value 0 is background and cannot be a lesion")
        labels[key] = name
    if not labels:
        raise InputError(f"--lesion-labels {text!r} names no label; write e.g. '2=liver tumour,3=cyst'")
    if ANY_NONZERO in labels and len(labels) > 1:
        raise InputError("--lesion-labels: '*' (every non-zero value) cannot be combined with single values")
    return labels


def parse_windows(text: str) -> tuple[tuple[float, float], ...]:
    """'-135,215;-140,260' → ((-135, 215), (-140, 260)) HU."""
    windows = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        try:
            lo, hi = (float(v) for v in item.split(","))
        except ValueError:
            raise InputError(f"--windows item {item!r} is not LO,HI; write e.g. '-135,215;-140,260'") from None
        if not lo < hi:
            raise InputError(f"--windows item {item!r}: the lower bound must be below the upper one")
        windows.append((lo, hi))
    if not windows:
        raise InputError(f"--windows {text!r} names no window; write e.g. '-135,215;-140,260'")
    return tuple(windows)


def make_settings(dataset: str, planes: Sequence[str] = ("axial",), context: int = MAX_CONTEXT,
                  lesion_labels: str | None = None, windows: str | None = None) -> Settings:
    """Check the options and fill in the dataset's tables (an override wins over the table)."""
    known = sorted([*LESION_LABELS, DEEPLESION])
    bad = [p for p in planes if p not in PLANES]
    if bad or not planes:
        raise InputError(f"--planes {','.join(planes)!r}: choose from {', '.join(PLANES)}, comma-separated")
    if not 0 <= context <= MAX_CONTEXT:
        raise InputError(f"--context {context}: the format holds 0 to {MAX_CONTEXT} neighbours on each side")
    if dataset == DEEPLESION:
        if tuple(planes) != ("axial",):
            raise InputError("DeepLesion holds axial slices only; drop --planes or pass --planes axial")
        if lesion_labels or windows:
            raise InputError("DeepLesion takes its lesion types and windows from DL_info.csv; drop "
                             "--lesion-labels/--windows")
        return Settings(dataset, ("axial",), context, (), ())
    if lesion_labels is None and dataset not in LESION_LABELS:
        raise InputError(f"unknown dataset {dataset!r}: known are {', '.join(known)}; for another dataset pass "
                         f"--lesion-labels (e.g. '1=lesion') and --windows (e.g. '-135,215')")
    if windows is None and dataset not in DATASET_WINDOWS:
        raise InputError(f"dataset {dataset!r} has no HU windows in the SPEC §4.2 table; pass --windows "
                         f"(e.g. '-135,215;-140,260')")
    labels = parse_lesion_labels(lesion_labels) if lesion_labels is not None else LESION_LABELS[dataset]
    table = parse_windows(windows) if windows is not None else DATASET_WINDOWS[dataset]
    return Settings(dataset, tuple(dict.fromkeys(planes)), context, tuple(labels.items()), table)


# ---------------------------------------------------------------------------------------------------------------
# Finding and pairing cases


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _nifti_stem(path: Path) -> str | None:
    """'x.nii.gz' → 'x'; None for other files."""
    return next((path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)


def _listing(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if not _is_hidden(p))


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _kits_cases(root: Path) -> list[VolumeCase]:
    """Case folders each holding imaging.nii(.gz) + segmentation.nii(.gz)."""
    cases, incomplete = [], []
    for folder in (p for p in _listing(root, "--images") if p.is_dir()):
        files = {_nifti_stem(f): f for f in folder.iterdir() if f.is_file()}
        if KITS_IMAGE in files and KITS_LABEL in files:
            source = files[KITS_IMAGE].relative_to(root).as_posix()
            cases.append(VolumeCase(folder.name, files[KITS_IMAGE], files[KITS_LABEL], source))
        elif KITS_IMAGE in files or KITS_LABEL in files:
            incomplete.append(folder.name)
    if incomplete:
        raise InputError(f"{len(incomplete)} case folder(s) in {root} lack imaging.nii.gz or segmentation.nii.gz: "
                         f"{_few(incomplete)}; add the missing file or move the folder out")
    if not cases:
        raise InputError(f"no cases found in {root}: with --images and --labels the same folder, each case is a "
                         f"folder holding imaging.nii.gz and segmentation.nii.gz (KiTS layout)")
    return cases


def find_cases(images: Path, labels: Path) -> list[VolumeCase]:
    """Pair image volumes with label volumes (see the module docstring); sorted by case id."""
    if not images.exists():
        raise InputError(f"--images {images} does not exist")
    if not labels.exists():
        raise InputError(f"--labels {labels} does not exist; pass the label folder (or file) of the dataset")
    if labels.is_file():
        if images.is_dir() and any(_nifti_stem(p) for p in images.iterdir()):
            raise InputError(f"--labels {labels} is one file, so --images must be one volume (a NIfTI file or a "
                             f"DICOM series folder), but {images} holds NIfTI files; pass one of them or the label "
                             f"folder")
        case_id = _nifti_stem(images) or images.name
        return [VolumeCase(case_id, images, labels, images.name)]
    if images.resolve() == labels.resolve():
        return _kits_cases(images)
    image_files = {}
    for path in _listing(images, "--images"):
        case_id = path.name if path.is_dir() else _nifti_stem(path)
        if case_id is not None:
            image_files[case_id] = path
    label_files = {stem: p for p in _listing(labels, "--labels") if p.is_file() and (stem := _nifti_stem(p))}
    if not image_files:
        raise InputError(f"no images found in {images}: expected NIfTI files (.nii/.nii.gz) or DICOM series folders")
    if not label_files:
        raise InputError(f"no label volumes found in {labels}: expected NIfTI files (.nii/.nii.gz)")
    cases, unmatched = [], []
    for image_id, path in image_files.items():
        label_id = image_id if image_id in label_files else image_id.removesuffix("_0000")
        if label_id in label_files:
            cases.append(VolumeCase(label_id, path, label_files.pop(label_id), path.relative_to(images).as_posix()))
        else:
            unmatched.append(path.name)
    if unmatched or label_files:
        parts = [f"{len(unmatched)} image(s) without a label of the same name in {labels}: {_few(unmatched)}"
                 ] if unmatched else []
        if label_files:
            extra = sorted(p.name for p in label_files.values())
            parts.append(f"{len(extra)} label(s) without an image in {images}: {_few(extra)}")
        raise InputError("; ".join(parts) + "; images and labels pair by file name (x.nii.gz ↔ x.nii.gz)")
    return sorted(cases, key=lambda c: c.case_id)


def _numbers(row: dict[str, str], column: str, count: int | None, where: str) -> list[float]:
    try:
        values = [float(v) for v in row[column].split(",")]
    except (ValueError, AttributeError):
        raise InputError(f"{where}: column {column} is {row[column]!r}, expected comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise InputError(f"{where}: column {column} has {len(values)} numbers, expected {count}")
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{where}: column {column} is {row[column]!r}, expected finite numbers")
    return values


def find_deeplesion_cases(images: Path, info_csv: Path) -> list[DeepLesionCase]:
    """DL_info.csv rows grouped by series folder of Images_png; every folder must exist."""
    if not info_csv.is_file():
        raise InputError(f"--labels {info_csv} is not a file; for DeepLesion pass DL_info.csv")
    if not images.is_dir():
        raise InputError(f"--images {images} is not a folder; for DeepLesion pass Images_png")
    with open(info_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in DEEPLESION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{info_csv} lacks the DL_info.csv column(s) {', '.join(missing)}; pass the DeepLesion "
                             f"DL_info.csv")
        rows = list(reader)
    if not rows:
        raise InputError(f"{info_csv} holds no lesions")
    by_series: dict[str, list[dict[str, str]]] = {}
    for line, row in enumerate(rows, start=2):
        stem = row["File_name"].removesuffix(".png")
        series, _, number = stem.rpartition("_")
        if not series or not number.isdigit() or row["Key_slice_index"].strip() != str(int(number)):
            raise InputError(f"{info_csv} line {line}: File_name {row['File_name']!r} is not "
                             f"<patient>_<study>_<series>_<slice>.png with slice = Key_slice_index "
                             f"({row['Key_slice_index']!r})")
        by_series.setdefault(series, []).append(row)
    absent = [s for s in by_series if not (images / s).is_dir()]
    if absent:
        raise InputError(f"{len(absent)} series folder(s) named in {info_csv} are missing from {images}: "
                         f"{_few(absent)}; unpack every Images_png part into one folder")
    return [DeepLesionCase(s, images / s, tuple(r)) for s, r in sorted(by_series.items())]


# ---------------------------------------------------------------------------------------------------------------
# Samples of one case


def _read_volume(path: Path) -> Volume:
    return read_dicom_series(path) if path.is_dir() else read_nifti(path)


def _to_stored(hu: np.ndarray) -> np.ndarray:
    """HU (any shape) → uint16 HU + 32768, rounded to whole HU."""
    return np.clip(np.rint(hu) + HU_OFFSET, 0, 65535).astype(np.uint16)


def lesion_components(label: np.ndarray, lesion_labels: Sequence[tuple[int | str, str]]
                      ) -> tuple[np.ndarray, list[str]]:
    """(Z, Y, X) integer label map → (Z, Y, X) int32 lesion ids 1..n (0 elsewhere) and each id's class name.

    Lesions are 26-connected components of each lesion class, numbered by class (table order) then component."""
    components = np.zeros(label.shape, dtype=np.int32)
    names: list[str] = []
    structure = ndimage.generate_binary_structure(3, 3)
    for value, name in lesion_labels:
        region = label != 0 if value == ANY_NONZERO else label == value
        ids, count = ndimage.label(region, structure=structure)
        components[region] = ids[region] + len(names)
        names += [name] * count
    return components, names


def cross_sections(ids: np.ndarray, count: int) -> np.ndarray:
    """(S, H, W) lesion ids (any numeric dtype) → (S, count + 1) pixel count of each id on each slice (column 0
    unused)."""
    s, flat = np.nonzero(ids.reshape(ids.shape[0], -1))
    values = ids.reshape(ids.shape[0], -1)[s, flat].astype(np.int64)
    return np.bincount(s * (count + 1) + values, minlength=ids.shape[0] * (count + 1)).reshape(-1, count + 1)


def key_slices(areas: np.ndarray) -> dict[int, list[int]]:
    """(S, n + 1) cross-section areas → key slice index → lesion ids shown on it (≥ MIN_AREA_PX px), ascending.

    A lesion's key slice is its largest cross-section (the first of equal ones); lesions never reaching
    MIN_AREA_PX give none."""
    keys = sorted({int(np.argmax(areas[:, i])) for i in range(1, areas.shape[1]) if areas[:, i].max() >= MIN_AREA_PX})
    return {k: [int(i) for i in np.flatnonzero(areas[k] >= MIN_AREA_PX) if i > 0] for k in keys}


def _abnormalities(labels: Sequence[str], masks: Sequence[np.ndarray]) -> dict:
    return {
        "abnormality": [{"id": i, "group_id": i, "label": name, "area_px": int(m.sum())}
                        for i, (name, m) in enumerate(zip(labels, masks), start=1)],
        "abnormality_group": {str(i): {"id": [i]} for i in range(1, len(masks) + 1)},
    }


def _lesion_volume(case: VolumeCase, image: Volume, settings: Settings) -> tuple[Volume, list[str]]:
    """The case's label volume, checked against its image → lesion ids as a Volume (so they take exactly the image's
    display orientation in every plane) and each id's class name. A function of its own so that the label arrays
    are freed before the slices are cut."""
    label = read_nifti(case.label)
    if label.hu.shape != image.hu.shape:
        raise InputError(f"label {case.label} has shape {label.hu.shape} (z, y, x) but its image {case.image} has "
                         f"{image.hu.shape}; a label volume must cover its image voxel for voxel")
    fractional = label.hu != np.rint(label.hu)  # NaN was refused by the reader
    if fractional.any():
        raise InputError(f"label {case.label} is not integer-valued (e.g. {float(label.hu[fractional][0])}); pass "
                         f"a label map of integer class values, not an image or a probability map")
    components, names = lesion_components(label.hu.astype(np.int32), settings.lesion_labels)
    return Volume(components.astype(np.float32), image.spacing_mm, image.origin_mm, str(case.label)), names


def volume_samples(case: VolumeCase, settings: Settings) -> Iterator[Sample]:
    """The key slices of one 3D case, plane by plane in key order."""
    image = _read_volume(case.image)
    lesions, names = _lesion_volume(case, image, settings)
    for plane in settings.planes:
        stack = image.slices(plane)
        lesion_ids = lesions.slices(plane).pixels  # (S, H, W) float32 ids, exact below 2**24
        count = stack.pixels.shape[0]
        for key, members in key_slices(cross_sections(lesion_ids, len(names))).items():
            offsets = [o for o in range(-settings.context, settings.context + 1) if 0 <= key + o < count]
            masks = [lesion_ids[key] == i for i in members]
            datum = {
                "context": offsets, "plane": plane, "dataset": settings.dataset, "hu_offset": HU_OFFSET,
                "windows": [list(w) for w in settings.windows],
                "pixel_spacing_mm": [float(v) for v in stack.pixel_spacing_mm],
                "slice_spacing_mm": float(stack.slice_spacing_mm), "source": case.source, "key_index": key,
                **_abnormalities([names[i - 1] for i in members], masks),
            }
            slices = {o: _to_stored(stack.pixels[key + o]) for o in offsets}
            yield Sample(f"{settings.dataset}_{case.case_id}_{plane}_{key:03d}", datum, slices, masks)


def _box_mask(box: Sequence[float], shape: tuple[int, int], where: str) -> np.ndarray:
    """(x1, y1, x2, y2) in 0-based pixels → (H, W) bool, the pixels inside the rounded box, clipped to the image."""
    x1, y1, x2, y2 = (math.floor(v + 0.5) for v in box)
    height, width = shape
    if x2 < x1 or y2 < y1 or x2 < 0 or y2 < 0 or x1 >= width or y1 >= height:
        raise InputError(f"{where}: box {list(box)} is empty or outside the {width}×{height} image")
    mask = np.zeros(shape, dtype=bool)
    mask[max(y1, 0):min(y2, height - 1) + 1, max(x1, 0):min(x2, width - 1) + 1] = True
    return mask


def _check_png(path: Path, shape: tuple[int, int] | None) -> tuple[int, int]:
    array = load_image_array(path)
    if array.dtype != np.uint16 or array.ndim != 2:
        raise InputError(f"{path} is not a 16-bit grayscale PNG (got {array.dtype} {array.shape}); DeepLesion "
                         f"slices store HU + 32768 in 16 bits")
    if shape is not None and array.shape != shape:
        raise InputError(f"{path} is {array.shape[1]}×{array.shape[0]} but its key slice is {shape[1]}×{shape[0]}")
    return array.shape


def deeplesion_samples(case: DeepLesionCase, settings: Settings) -> Iterator[Sample]:
    """One sample per key slice of the series, its lesions grouped."""
    by_key: dict[int, list[dict[str, str]]] = {}
    for row in case.rows:
        by_key.setdefault(int(row["Key_slice_index"]), []).append(row)
    for key, rows in by_key.items():
        where = f"DL_info.csv File_name {rows[0]['File_name']}"
        key_path = case.folder / f"{key:03d}.png"
        if not key_path.is_file():
            raise InputError(f"{where}: key slice {key_path} is missing")
        shape = _check_png(key_path, None)
        first, last = (int(v) for v in _numbers(rows[0], "Slice_range", 2, where))
        slices: dict[int, np.ndarray | Path] = {}
        for offset in range(-settings.context, settings.context + 1):
            path = case.folder / f"{key + offset:03d}.png"
            if offset == 0 or (first <= key + offset <= last and path.is_file()):
                if offset != 0:
                    _check_png(path, shape)
                slices[offset] = path
        masks = [_box_mask(_numbers(r, "Bounding_boxes", 4, where), shape, where) for r in rows]
        types = [int(_numbers(r, "Coarse_lesion_type", 1, where)[0]) for r in rows]
        if any(t not in DEEPLESION_TYPES for t in types):
            raise InputError(f"{where}: Coarse_lesion_type {types} outside {sorted(DEEPLESION_TYPES)}")
        windows = list(dict.fromkeys(tuple(_numbers(r, "DICOM_windows", 2, where)) for r in rows))
        x, y, z = _numbers(rows[0], "Spacing_mm_px_", 3, where)
        split = int(_numbers(rows[0], "Train_Val_Test", 1, where)[0])
        datum = {
            "context": sorted(slices), "plane": "axial", "dataset": DEEPLESION, "hu_offset": HU_OFFSET,
            "windows": [list(w) for w in windows], "pixel_spacing_mm": [y, x], "slice_spacing_mm": z,
            "source": f"{case.case_id}/{key:03d}.png", "split": DEEPLESION_SPLITS.get(split, str(split)),
            **_abnormalities([DEEPLESION_TYPES[t] for t in types], masks),
        }
        yield Sample(f"{DEEPLESION}_{rows[0]['File_name'].removesuffix('.png')}", datum, slices, masks)


# ---------------------------------------------------------------------------------------------------------------
# Writing, resuming


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _record_path(out: Path, case_id: str) -> Path:
    return out / ".cases" / f"{case_id}.json"


def _done(out: Path, case_id: str, settings: Settings) -> dict | None:
    """The case's datums when a record made with the same settings exists, else None."""
    path = _record_path(out, case_id)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))  # written atomically: whole or absent
    if record["settings"] != settings.as_json():
        raise InputError(f"{out} holds case {case_id} converted with other settings ({record['settings']}); use "
                         f"a new --out folder or delete {out} to start over")
    return record["samples"]


def convert_case(case: VolumeCase | DeepLesionCase, settings: Settings, out: Path) -> dict:
    """Convert one case (or take it from its record) → its datums, sample_id → datum."""
    done = _done(out, case.case_id, settings)
    if done is not None:
        return done
    tmp = out / f".tmp-{case.case_id}"  # one per case, no shared parent: parallel workers never race on it
    shutil.rmtree(tmp, ignore_errors=True)
    samples = volume_samples(case, settings) if isinstance(case, VolumeCase) else deeplesion_samples(case, settings)
    datums: dict[str, dict] = {}
    try:
        for sample in samples:
            image_dir, mask_dir = tmp / "images" / sample.sample_id, tmp / "masks" / sample.sample_id
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for offset, data in sample.slices.items():
                if isinstance(data, Path):
                    shutil.copyfile(data, image_dir / f"{offset}.png")
                else:
                    _write_png(image_dir / f"{offset}.png", data)
            for i, mask in enumerate(sample.masks, start=1):
                _write_png(mask_dir / f"{i}.png", mask.astype(np.uint8) * 255)
            datums[sample.sample_id] = {"image": f"images/{sample.sample_id}", "mask": f"masks/{sample.sample_id}",
                                        **sample.datum}
        for sample_id in datums:  # whole sample folders move into place; a leftover from a crash is replaced
            for kind in ("images", "masks"):
                final = out / kind / sample_id
                shutil.rmtree(final, ignore_errors=True)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / kind / sample_id, final)
        _record_path(out, case.case_id).parent.mkdir(parents=True, exist_ok=True)
        _write_json(_record_path(out, case.case_id), {"settings": settings.as_json(), "samples": datums})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datums


def convert(settings: Settings, images: Path, labels: Path, out: Path, workers: int = 1) -> dict:
    """Convert every case (resuming finished ones) and write OUT/<dataset>.json → its content."""
    if workers < 1:
        raise InputError(f"--workers {workers}: pass 1 or more")
    if settings.dataset == DEEPLESION:
        cases: Sequence[VolumeCase | DeepLesionCase] = find_deeplesion_cases(images, labels)
    else:
        cases = find_cases(images, labels)
    out.mkdir(parents=True, exist_ok=True)
    run = partial(convert_case, settings=settings, out=out)
    merged: dict[str, dict] = {}
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        try:
            for i, (case, datums) in enumerate(zip(cases, pool.map(run, cases) if pool else map(run, cases)), 1):
                print(f"[{i}/{len(cases)}] {case.case_id}: {len(datums)} samples", flush=True)
                merged.update(datums)
        except BaseException:
            if pool:  # stop at the first error instead of converting every queued case first
                pool.shutdown(cancel_futures=True)
            raise
    if not merged:
        raise InputError(f"no lesion of at least {MIN_AREA_PX} px found in the {len(cases)} case(s) of {labels} "
                         f"with lesion labels {dict(settings.lesion_labels) or 'from DL_info.csv'}; check "
                         f"--dataset or pass --lesion-labels")
    _write_json(out / f"{settings.dataset}.json", merged)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(sorted([*LESION_LABELS, DEEPLESION]))}"
                        f", or any name with --lesion-labels and --windows")
    parser.add_argument("--images", required=True, type=Path, help="image folder (NIfTI files / DICOM series "
                        "folders / case folders), one volume, or DeepLesion's Images_png")
    parser.add_argument("--labels", required=True, type=Path, help="label folder, one label volume, or DL_info.csv")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--planes", default="axial", help="comma-separated: axial,coronal,sagittal")
    parser.add_argument("--context", type=int, default=MAX_CONTEXT, help="neighbours on each side of a key slice")
    parser.add_argument("--workers", type=int, default=1, help="cases converted in parallel processes")
    parser.add_argument("--lesion-labels", help="override the dataset's lesion labels, e.g. '2=liver tumour,3=cyst'")
    parser.add_argument("--windows", help="override the dataset's HU windows, e.g. '-135,215;-140,260'")
    args = parser.parse_args(argv)
    try:
        settings = make_settings(args.dataset, [p.strip() for p in args.planes.split(",")], args.context,
                                 args.lesion_labels, args.windows)
        merged = convert(settings, args.images, args.labels, args.out, args.workers)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(merged)} samples to {args.out / (settings.dataset + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
