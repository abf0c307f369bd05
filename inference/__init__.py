"""Inference: CT input → model → findings, report.json and overlays (SPEC §6). Entry point: inference.py."""
