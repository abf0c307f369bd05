"""XLSX tables and PNG plots of a summary (aggregate.aggregate's output). Written atomically (temp file, rename)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from openpyxl import Workbook

from evaluation.aggregate import METRICS

PLOT_METRICS = {"visual_prompt": ("bleu1", "rougeL", "meteor"), "grounded": ("bleu1", "dice"),
                "text_guided": ("bleu1", "dice")}


def write_xlsx(summary: dict, columns: Sequence[str], path: Path) -> None:
    """Sheet `summary` (one row per task/variant/average) and `per_category` (one row per group and category)."""
    book = Workbook()
    sheet = book.active
    sheet.title = "summary"
    sheet.append(["task", "variant", "average", "n", *columns])
    for (task, variant), s in summary.items():
        for average in ("sample", "macro"):
            sheet.append([task, variant, average, s["n"], *(s[average].get(c) for c in columns)])
    per_category = book.create_sheet("per_category")
    metric_names = ["n", *METRICS]
    per_category.append(["task", "variant", "category", *metric_names])
    for (task, variant), s in summary.items():
        for name, values in s["per_category"].items():
            per_category.append([task, variant, name, *(values.get(m) for m in metric_names)])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.xlsx")
    book.save(tmp)
    os.replace(tmp, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def write_plots(summary: dict, out: Path) -> list[Path]:
    """Per task, per-category bars of its main metrics (`categories_<task>_<variant>.png`), and for visual prompts a
    per-type comparison (`visual_prompt_types.png`, max over types labelled). Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, variant), s in summary.items():
        metrics = [m for m in PLOT_METRICS[task] if any(v.get(m) is not None for v in s["per_category"].values())]
        if not s["per_category"] or not metrics or (task == "visual_prompt" and variant != "max_over_types"):
            continue
        names = list(s["per_category"])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) * len(metrics)), 3.5))
        width = 0.8 / len(metrics)
        for k, m in enumerate(metrics):
            values = [s["per_category"][n].get(m) or 0.0 for n in names]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
        ax.set_ylabel("×100")
        ax.set_title(f"{task} ({variant}): per category")
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
        path = out / f"categories_{task}_{variant}.png"
        _save(fig, path)
        written.append(path)
    types = [(v, s) for (t, v), s in summary.items() if t == "visual_prompt"]
    if types:
        metrics = PLOT_METRICS["visual_prompt"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(metrics)
        for k, m in enumerate(metrics):
            ax.bar([i + k * width for i in range(len(types))], [s["sample"].get(m) or 0.0 for _, s in types], width,
                   label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(types))],
                      [v.replace("max_over_types", "max over types") for v, _ in types])
        ax.set_ylabel("×100 (sample mean)")
        ax.set_title("visual prompt: per type, and the per-finding max over types")
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
        path = out / "visual_prompt_types.png"
        _save(fig, path)
        written.append(path)
    return written
