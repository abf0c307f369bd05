"""Clinical exports of one inference result: DICOM-SEG, DICOM-SR (TID 1500) and a FHIR R4 bundle (docs/exports.md).

    python -m exports export --report OUT/report.json --dicom SERIES_DIR --out EXPORT_DIR

An export needs the `report.json` of a DICOM input (inference/report.py) and the DICOM series it came from: the
report's key slice (`input.slice_source`, a SOPInstanceUID) must be one of the series' instances, since every object
references it. `load_case` checks all of that and puts each finding's mask onto that instance's pixel grid;
`exports.dicom_seg`, `exports.dicom_sr` and `exports.fhir` build the three objects from the resulting `ExportCase`;
`export` writes them together, atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dataset.ct import InputError
from dataset.readers import load_image_array
from inference.report import SCHEMA_PATH, rle_to_mask
from utils.atomic import atomic_folder

PathArg = str | PathLike
OUTPUT_FILES = ("seg.dcm", "sr.dcm", "fhir_bundle.json")
ALGORITHM_NAME = "OmniAbnorm-CT"
EXPORTER_VERSION = "omniabnorm-ct-exports/1"
# What every finding is, in SEG (segmented property category / type), SR (finding category / type) and FHIR
# (Observation.code): CID 7150 "Segmentation Property Categories" and CID 7159 "Lesion Segmentation Types".
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
FINDING_TYPE = codes.SCT.Lesion  # SCT 52988006
# Type 2 attributes (present, possibly empty) that highdicom copies from the source image into SEG and SR.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "SliceThickness")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows",
             "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")


@dataclass(frozen=True)
class Quantity:
    """One measurement of report.json as SR and FHIR code it: `name` is the measured concept (TID 300 concept name),
    `derivation` how it was derived from the pixels (TID 300 derivation modifier), `unit` a UCUM code."""

    key: str  # report.json finding field
    label: str  # human-readable name (FHIR CodeableConcept.text)
    name: Code
    unit: Code
    derivation: Code | None = None


MEASUREMENTS = (
    Quantity("long_axis_mm", "Long axis", codes.SCT.LongAxis, codes.UCUM.Millimeter),
    Quantity("short_axis_mm", "Short axis", codes.SCT.ShortAxis, codes.UCUM.Millimeter),
    Quantity("area_mm2", "Area", codes.SCT.Area, codes.UCUM.SquareMillimeter),
    Quantity("mean_hu", "Mean attenuation", codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit,
             codes.SCT.Mean),
    Quantity("std_hu", "Standard deviation of attenuation", codes.DCM.AttenuationCoefficient,
             codes.UCUM.HounsfieldUnit, codes.SCT.StandardDeviation),
)


@dataclass
class ExportCase:
    """A checked report.json with the header of its key slice's DICOM instance."""

    report: dict  # the report.json content (valid against inference/report.schema.json, DICOM input)
    source: pydicom.Dataset  # header (no pixel data) of the key slice's instance; absent Type 2 attributes empty
    source_path: Path
    masks: dict[int, np.ndarray]  # finding id → (Rows, Columns) bool on the source instance's pixel grid
    tracking_uids: dict[int, str]  # finding id → UID shared by its SEG segment, SR measurement group and Observation

    @property
    def findings(self) -> list[dict]:
        return self.report["findings"]

    @property
    def segmented(self) -> list[dict]:
        """Findings with a region, in report order: SEG segment k is the k-th of them."""
        return [f for f in self.findings if f["id"] in self.masks]

    @property
    def algorithm_version(self) -> str:
        """The checkpoint's SHA-256 (64 hex digits fit DICOM LO), or "unknown" for a model given in memory."""
        return self.report["model"]["checkpoint_sha256"] or "unknown"


def read_report(path: PathArg) -> dict:
    """report.json → dict, valid against inference/report.schema.json."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"report {path} does not exist; pass the report.json written by python inference.py")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read report {path}: {err}") from err
    try:
        jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        detail = " ".join(err.message.split())  # one line; messages quote the offending value, which may be long
        detail = detail if len(detail) <= 200 else detail[:200] + " …"
        raise InputError(f"{path} is not an OmniAbnorm-CT report ({SCHEMA_PATH.name}, at {where}): {detail}"
                         ) from None
    return report


def finding_mask(finding: dict, folder: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A finding's (H, W) bool mask on the key slice as displayed: from `mask_rle`, else the `mask_png` file (relative
    to the report's folder); None when the finding has no region (empty masks included)."""
    k = finding["id"]
    if finding["mask_rle"] is not None:
        rle = finding["mask_rle"]
        if tuple(rle["size"]) != shape or sum(rle["counts"]) != shape[0] * shape[1]:
            raise InputError(f"finding {k}'s mask_rle does not cover the {shape[1]}x{shape[0]} key slice "
                             f"(size {rle['size']}, {sum(rle['counts'])} pixels); the report is damaged")
        mask = rle_to_mask(rle)
    elif finding["mask_png"] is not None:
        file = folder / finding["mask_png"]
        if not file.is_file():
            raise InputError(f"finding {k}'s mask {file} is missing; keep the finding_<k>.png files beside "
                             f"report.json")
        image = load_image_array(file)
        if image.shape != shape:
            raise InputError(f"finding {k}'s mask {file} has shape {image.shape}, not the key slice's {shape} "
                             f"(a gray 0/255 image); the report is damaged")
        mask = image >= 128
    else:
        return None
    if finding["area_px"] is not None and int(mask.sum()) != finding["area_px"]:
        raise InputError(f"finding {k}'s mask has {int(mask.sum())} pixels but area_px says {finding['area_px']}; "
                         f"the report is damaged")
    return mask if mask.any() else None


def grid_map(orientation: list[float]) -> tuple[bool, bool, bool]:
    """How an axial DICOM instance's pixel grid relates to the slice as dataset.readers displays it (rows
    anterior→posterior, columns patient right→left), from its ImageOrientationPatient (row direction, column
    direction; LPS cosines) → (transpose, then flip rows, then flip columns). The reader only permutes and flips
    axes, so these three say everything."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    # The instance's row index advances along col_dir, its column index along row_dir; LPS axes: 0 = x, 1 = y.
    rows_axis, cols_axis = int(np.argmax(np.abs(col_dir))), int(np.argmax(np.abs(row_dir)))
    if {rows_axis, cols_axis} != {0, 1}:
        raise InputError(f"the key slice's ImageOrientationPatient {list(orientation)} is not axial; exports need "
                         f"an axial series")
    return rows_axis == 0, bool(col_dir[rows_axis] < 0), bool(row_dir[cols_axis] < 0)


def display_to_source(array: np.ndarray, orientation: list[float]) -> np.ndarray:
    """(H, W) array on the key slice as displayed → the same pixels on the instance's own (Rows, Columns) grid."""
    transpose, flip_rows, flip_cols = grid_map(orientation)
    out = array.T if transpose else array
    return np.ascontiguousarray(out[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])


def find_instance(folder: PathArg, sop_instance_uid: str) -> tuple[Path, pydicom.Dataset]:
    """The DICOM file under `folder` (searched recursively) whose SOPInstanceUID is `sop_instance_uid` (or, for an
    instance without one, whose file name is it) → (file, header without pixel data)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM folder {folder} does not exist; pass the series folder the report was made from")
    for file in sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM
        except Exception as err:  # pydicom raises many types on damaged files
            raise InputError(f"cannot read DICOM file {file}: {err}") from err
        if str(ds.get("SOPInstanceUID", file.name)) == sop_instance_uid:
            return file, ds
    raise InputError(f"{folder} does not hold the report's key slice (SOPInstanceUID {sop_instance_uid}); pass the "
                     f"DICOM series folder the report was made from")


def load_case(report_path: PathArg, dicom_folder: PathArg) -> ExportCase:
    """Check report.json against the DICOM series it came from and map its masks onto the key slice's instance."""
    report_path = Path(report_path)
    report = read_report(report_path)
    info = report["input"]
    if info["kind"] != "dicom":
        raise InputError(f"{report_path} was made from {info['kind']} input ({info['path']}); DICOM exports need a "
                         f"report of a DICOM series (run python inference.py --input SERIES_DIR)")
    if info["plane"] != "axial" or info["slice_source"] is None:
        raise InputError(f"{report_path}'s key slice is a {info['plane']} reformat, not an image of the series; "
                         f"DICOM exports need an axial report (--plane axial)")
    shape = (info["height"], info["width"])
    display_masks = {f["id"]: m for f in report["findings"]
                     if (m := finding_mask(f, report_path.parent, shape)) is not None}

    file, source = find_instance(dicom_folder, info["slice_source"])
    missing = [k for k in _REQUIRED if source.get(k) in (None, "")]
    if missing:
        raise InputError(f"DICOM file {file} lacks {', '.join(missing)}; it cannot be referenced by DICOM objects")
    for keyword in _TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    orientation = [float(v) for v in source.ImageOrientationPatient]
    transpose = grid_map(orientation)[0]
    grid = shape[::-1] if transpose else shape
    spacing = info["pixel_spacing_mm"] or [np.nan, np.nan]  # a DICOM report always has one; NaN never matches
    spacing = spacing[::-1] if transpose else spacing
    source_spacing = [float(v) for v in source.PixelSpacing]
    if (int(source.Rows), int(source.Columns)) != grid or not np.allclose(source_spacing, spacing, rtol=1e-4):
        raise InputError(f"DICOM file {file} ({source.Rows}x{source.Columns} pixels at {source_spacing} mm) does "
                         f"not match the report's key slice ({info['height']}x{info['width']} at "
                         f"{info['pixel_spacing_mm']} mm); pass the series the report was made from")
    masks = {k: display_to_source(m, orientation) for k, m in display_masks.items()}
    tracking = {f["id"]: pydicom.uid.generate_uid() for f in report["findings"]}
    return ExportCase(report, source, file, masks, tracking)


def export(report_path: PathArg, dicom_folder: PathArg, out: PathArg) -> dict:
    """Write seg.dcm, sr.dcm and fhir_bundle.json into `out`, all or nothing (a temporary folder renamed into place;
    an existing `out` is replaced only when empty or holding an earlier export). → a summary dict."""
    # The builders import ExportCase from this package, so they are imported here, not at the top.
    from exports.dicom_seg import build_seg
    from exports.dicom_sr import build_sr
    from exports.fhir import build_bundle, validate_bundle

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in OUTPUT_FILES):
        raise InputError(f"--out {out} exists and holds other files; give a new or empty folder")
    case = load_case(report_path, dicom_folder)
    if not case.segmented:
        raise InputError(f"{report_path} has no finding with a region ({len(case.findings)} finding(s), none with "
                         f"a mask), so there is no DICOM-SEG to write; nothing was exported")
    seg = build_seg(case)
    sr = build_sr(case, seg)
    bundle = build_bundle(case)
    validate_bundle(bundle)
    with atomic_folder(out) as tmp:
        seg.save_as(tmp / "seg.dcm", enforce_file_format=True)
        sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
        (tmp / "fhir_bundle.json").write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return {"out": str(out), "segments": len(case.segmented), "measurement_groups": len(case.findings),
            "observations": len(case.findings), "seg_uid": seg.SOPInstanceUID, "sr_uid": sr.SOPInstanceUID}
