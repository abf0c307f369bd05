"""DICOM-SR measurement report (TID 1500, Comprehensive 3D SR) of a report's findings.

Content tree:
- observer: the device "OmniAbnorm-CT" (TID 1004); procedure reported: LOINC 25045-6 "CT unspecified body region".
- Imaging Measurements: one measurement group per finding, in report order, tracked by the UID its SEG segment and
  FHIR Observation share and the identifier "Finding <id>". A finding with a region is a planar ROI group (TID 1410)
  referencing its SEG segment; one without is an image-level group (TID 1501) referencing the key slice. Each holds
  the finding's measurements (TID 300; below) and, when the finding has its own text, a TEXT item (DCM 121071
  "Finding"): TID 1501's qualitative evaluations allow coded questions with text answers, which highdicom's
  QualitativeEvaluation (CODE only) does not build, so the item is appended to the group.
- Qualitative Evaluations (TID 1500 row 12): the report's whole text as TEXT (DCM 121070 "Findings").

Measurements (`exports.MEASUREMENTS`): long axis (SCT 103339001), short axis (SCT 103340004), area (SCT 42798000),
mean and standard deviation of attenuation (DCM 112031 with derivation SCT 373098007 / 386136009), in UCUM mm, mm2
and [hnsf'U]. highdicom stores each value as DS text and as an exact FD (FloatingPointValue), so report.json values
come back bit for bit.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from exports import ALGORITHM_NAME, EXPORTER_VERSION, FINDING_CATEGORY, FINDING_TYPE, MEASUREMENTS, ExportCase

SR_SERIES_NUMBER = 902
PROCEDURE = codes.LN.CTUnspecifiedBodyRegion  # LOINC 25045-6, CID 100 "Quantitative Diagnostic Imaging Procedures"
# TID 1500 row 12, not among pydicom's named codes: the standard's concept for document-level qualitative evaluations.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def measurements(finding: dict) -> list[hd.sr.Measurement]:
    """The finding's known measurements (null ones left out) as TID 300 items."""
    return [hd.sr.Measurement(name=q.name, value=float(finding[q.key]), unit=q.unit, derivation=q.derivation)
            for q in MEASUREMENTS if finding[q.key] is not None]


def text_item(name: hd.sr.CodedConcept, text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def measurement_group(case: ExportCase, seg: hd.seg.Segmentation | None, finding: dict) -> Group:
    k = finding["id"]
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=case.tracking_uids[k], identifier=f"Finding {k}"),
        finding_type=FINDING_TYPE, finding_category=FINDING_CATEGORY,
        algorithm_id=hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=case.algorithm_version),
        measurements=measurements(finding) or None)
    if k in case.masks:
        if seg is None:
            raise ValueError(f"finding {k} has a region: the SR needs the SEG that holds it")
        segment = 1 + [f["id"] for f in case.segmented].index(k)
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegmentationFrame.from_segmentation(seg, segment_number=segment),
            **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(case.source)], **common)
    if finding["text"]:
        group[0].ContentSequence.append(text_item(codes.DCM.Finding, finding["text"]))
    return group


def build_sr(case: ExportCase, seg: hd.seg.Segmentation | None) -> hd.sr.Comprehensive3DSR:
    """ExportCase with at least one finding (TID 1500 needs a measurement group) and the SEG of its regions → SR."""
    if not case.findings:
        raise ValueError("a TID 1500 measurement report needs at least one finding")
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=ALGORITHM_NAME,
                                                       model_name=case.algorithm_version)
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=PROCEDURE,
        imaging_measurements=[measurement_group(case, seg, f) for f in case.findings])
    if case.report["text"]:
        evaluations = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        evaluations.ContentSequence = hd.sr.ContentSequence([text_item(codes.DCM.Findings, case.report["text"])])
        report[0].ContentSequence.append(evaluations)
    evidence = [case.source] + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=ALGORITHM_NAME, software_versions=EXPORTER_VERSION,
        series_description="OmniAbnorm-CT measurements", is_complete=True, is_final=False, is_verified=False,
        specific_character_set="ISO_IR 192")
