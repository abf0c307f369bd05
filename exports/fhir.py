"""FHIR R4 JSON of a report: a `collection` Bundle of one DiagnosticReport and one Observation per finding.

- DiagnosticReport: status `preliminary` (unverified machine output), category RAD (HL7 v2-0074), code LOINC
  25045-6 "CT Unspecified body region", the patient by identifier (DICOM PatientID), the study by identifier
  (`urn:dicom:uid` / `urn:oid:<StudyInstanceUID>`), effective = StudyDate, `conclusion` = the report's text,
  `result` = the Observations.
- Observation per finding, in report order: status `preliminary`, category `imaging`, code SCT 52988006 "Lesion"
  (text "Finding <id>"), identifier = the finding's tracking UID (the same UID marks its DICOM-SEG segment and SR
  measurement group), `derivedFrom` the study, `device` the model, the finding's own text as `note`, and one
  `component` with a UCUM `valueQuantity` per known measurement (codes as in the SR, `exports.MEASUREMENTS`;
  mean/SD of attenuation are coded by their derivation, SCT Mean / Standard Deviation, in [hnsf'U]).

`validate_bundle` checks the JSON against the FHIR models of `fhir.resources` (R4B, 4.3.0, which reworked only
medication-definition, evidence and subscription resources and keeps Bundle, DiagnosticReport and Observation as in
R4 4.0.1; hl7.org/fhir/R4B/r4b-explanation.html). Those models check element names, types, cardinalities and
primitive formats, not value sets; the codes we write are constants.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydicom.sr.coding import Code

from exports import ALGORITHM_NAME, FINDING_TYPE, MEASUREMENTS, ExportCase

SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org", "UCUM": "http://unitsofmeasure.org"}
REPORT_CODE = {"system": SYSTEMS["LN"], "code": "25045-6", "display": "CT Unspecified body region"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
           "display": "Imaging"}


def coding(code: Code) -> dict:
    return {"system": SYSTEMS[code.scheme_designator], "code": code.value, "display": code.meaning}


def dicom_uid(uid: str) -> dict:
    """A DICOM UID as a FHIR Identifier (the convention of FHIR ImagingStudy)."""
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}


def study_date(value: str) -> str | None:
    """DICOM DA (YYYYMMDD) → FHIR date (YYYY-MM-DD); None when empty or malformed."""
    try:
        return datetime.strptime(str(value), "%Y%m%d").date().isoformat()
    except ValueError:
        return None


def observation(case: ExportCase, finding: dict, context: dict) -> dict:
    k = finding["id"]
    components = []
    for q in MEASUREMENTS:
        if finding[q.key] is not None:
            components.append({"code": {"coding": [coding(q.derivation or q.name)], "text": q.label},
                               "valueQuantity": {"value": finding[q.key], "unit": q.unit.meaning,
                                                 "system": SYSTEMS["UCUM"], "code": q.unit.value}})
    return {
        "resourceType": "Observation", "id": str(uuid.uuid4()),
        "identifier": [dicom_uid(case.tracking_uids[k])],
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [coding(FINDING_TYPE)], "text": f"Finding {k}"},
        **context,
        "device": {"display": f"{ALGORITHM_NAME} checkpoint sha256 {case.algorithm_version}"},
        "derivedFrom": [{"type": "ImagingStudy", "identifier": dicom_uid(case.source.StudyInstanceUID),
                         "display": f"key slice SOP Instance UID {case.source.SOPInstanceUID}"}],
        **({"note": [{"text": finding["text"]}]} if finding["text"] else {}),
        **({"component": components} if components else {}),
    }


def build_bundle(case: ExportCase) -> dict:
    """ExportCase (any number of findings) → FHIR R4 Bundle (JSON-ready dict); ids are fresh UUIDs."""
    source = case.source
    context: dict = {}  # subject and effective time, shared by the report and its observations
    if source.PatientID:
        context["subject"] = {"type": "Patient", "identifier": {"value": str(source.PatientID)}}
        if name := " ".join(str(source.PatientName).split("^")).strip():  # DICOM PN components → words
            context["subject"]["display"] = name
    if date := study_date(source.StudyDate):
        context["effectiveDateTime"] = date
    observations = [observation(case, f, context) for f in case.findings]
    report = {
        "resourceType": "DiagnosticReport", "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [REPORT_CODE], "text": "CT report"},
        **context,
        "issued": datetime.now(UTC).isoformat(timespec="seconds"),
        "imagingStudy": [{"type": "ImagingStudy", "identifier": dicom_uid(source.StudyInstanceUID)}],
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
        **({"conclusion": case.report["text"]} if case.report["text"] else {}),
    }
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
            "timestamp": report["issued"],
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in [report, *observations]]}


def validate_bundle(bundle: dict) -> None:
    """Raise pydantic's ValidationError (a ValueError) when `bundle` is not a valid FHIR Bundle (what is checked: see
    the module docstring). Our bundles always pass; a failure is a bug, not bad input."""
    from fhir.resources.R4B.bundle import Bundle  # pydantic models, about 0.4 s to import: only when validating

    Bundle.model_validate(bundle)
