"""`python -m exports export --report REPORT.json --dicom SERIES_DIR --out DIR`: see docs/exports.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dataset.ct import InputError
from exports import export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports",
                                description="Export an OmniAbnorm-CT result to DICOM-SEG, DICOM-SR and FHIR.")
    commands = p.add_subparsers(dest="command", required=True)
    e = commands.add_parser("export", help="write seg.dcm, sr.dcm and fhir_bundle.json for one report",
                            description="Write seg.dcm (DICOM-SEG), sr.dcm (DICOM-SR TID 1500) and fhir_bundle.json "
                                        "(FHIR R4) for a report.json made from a DICOM series.")
    e.add_argument("--report", required=True, help="report.json written by python inference.py (DICOM input)")
    e.add_argument("--dicom", required=True, help="the DICOM series folder the report was made from")
    e.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export: replaced)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export(args.report, args.dicom, args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['out']}: seg.dcm ({summary['segments']} segment(s)), sr.dcm "
          f"({summary['measurement_groups']} measurement group(s)), fhir_bundle.json "
          f"({summary['observations']} observation(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
