"""DICOM-SEG (Segmentation Storage, BINARY) of a report's findings, on the key slice's source instance.

One segment per finding with a region, in report order (segment k = the k-th such finding), one frame each, on the
source instance's own pixel grid: highdicom copies its geometry (pixel spacing, orientation, position), frame of
reference, patient and study, and references it from every frame. Labels are "Finding <id>: <text>" (cut to the 64
characters DICOM LO allows); the full text goes to SR and FHIR.
"""

from __future__ import annotations

import re

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from exports import ALGORITHM_NAME, EXPORTER_VERSION, FINDING_CATEGORY, FINDING_TYPE, ExportCase

SEG_SERIES_NUMBER = 901
LO_MAX = 64  # DICOM LO: at most 64 characters, no backslash or control characters


def segment_label(finding: dict) -> str:
    """"Finding <id>", plus ": <text>" when the finding has its own text, cut to fit DICOM LO."""
    label = f"Finding {finding['id']}"
    if finding["text"]:
        label += ": " + re.sub(r"[\s\\]+", " ", finding["text"]).strip()
    return label if len(label) <= LO_MAX else label[:LO_MAX - 3].rstrip() + "..."


def algorithm(case: ExportCase) -> hd.AlgorithmIdentificationSequence:
    report = case.report
    parameters = {"task": report["task"], **({"flow": report["flow"]} if report["flow"] else {})}
    return hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence,
                                              version=case.algorithm_version, parameters=parameters)


def build_seg(case: ExportCase) -> hd.seg.Segmentation:
    """ExportCase with at least one segmented finding → Segmentation (SOP instance and series UIDs new)."""
    segmented = case.segmented
    if not segmented:
        raise ValueError("a DICOM-SEG needs at least one finding with a region")
    pixels = np.stack([case.masks[f["id"]] for f in segmented], axis=-1)[None].astype(np.uint8)  # (1, R, C, S)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=segment_label(f), segmented_property_category=FINDING_CATEGORY,
            segmented_property_type=FINDING_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm(case), tracking_uid=case.tracking_uids[f["id"]],
            tracking_id=f"Finding {f['id']}")
        for n, f in enumerate(segmented, 1)]
    return hd.seg.Segmentation(
        source_images=[case.source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=ALGORITHM_NAME, software_versions=EXPORTER_VERSION,
        device_serial_number=case.algorithm_version[:LO_MAX], series_description="OmniAbnorm-CT findings",
        content_label="FINDINGS", content_description="OmniAbnorm-CT findings (automatic, not verified)",
        omit_empty_frames=False, specific_character_set="ISO_IR 192")
