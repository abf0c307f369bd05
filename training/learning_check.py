"""Proof of learning on the synthetic phantom (issue #4): train the tiny config from scratch, then check held-out cases.

    python -m training.learning_check --config configs/phantom_tiny.yaml --out runs/learning_check [key=value ...]

Trains with `training.loop.train`, then runs the trained model through the inference pipeline on every held-out
phantom case (`<out>/phantom/<plane>/<plane>_valid.json`) in the grounded, two-round (union) flow — the model
generates everything, nothing is teacher-forced — and measures:
- key-slice Dice of the union of the predicted finding masks against the union of the ground-truth masks, on the
  original slice (both empty → 1, one empty → 0, SPEC §7), averaged over cases;
- organ naming: an abnormal case counts when its report names every organ the phantom put a lesion in ("liver",
  "kidney", "spleen"); a normal case counts when the report is the trained no-abnormality answer.
Writes `<out>/learning_check.json` (per-case results and the totals) and exits 1 when a target is missed.
The majority baseline is the organ-naming rate of a model that writes the same report for every image: it names
the most common organ set of the held-out cases. `--demo-out checkpoint/demo` also writes the trained model with its
tiny base inside (the demo checkpoint that `python inference.py --demo` uses).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dataset.prompts import NO_ABNORMALITY
from dataset.records import load_records
from evaluation.seg_metrics import dice
from inference.cases import Case
from inference.pipeline import OmniAbnormPipeline
from training.config import load_config
from training.loop import resolve_model_dir, train
from utils.atomic import atomic_folder

DICE_TARGET = 0.8
ORGAN_TARGET = 0.8
PLANES = ("axial", "coronal", "sagittal")


def names_organs(text: str, organs: set[str]) -> bool:
    """A report names the right organs: all of them for an abnormal case, the refusal for a normal one."""
    text = text.lower()
    return NO_ABNORMALITY.lower() in text if not organs else all(o in text for o in organs)


def check_run(run_dir: str | Path, batch_size: int = 8) -> dict:
    """Evaluate a finished phantom run's latest model on its held-out cases → totals and per-case results."""
    run = Path(run_dir)
    pipeline = OmniAbnormPipeline.from_checkpoint(resolve_model_dir(str(run)), batch_size=batch_size,
                                                  max_new_tokens=96)
    cases = []
    for plane in PLANES:
        path = run / "phantom" / plane / f"{plane}_valid.json"
        raw = json.loads(path.read_text())
        for record in load_records(path):
            organs = {a["organ"] for a in raw[record.sample_id].get("abnormality", [])}
            cases.append((record, organs))
    reports = pipeline.run([Case(input=str(r.image_dir), task="grounded", naming="offset") for r, _ in cases],
                           ids=[r.sample_id for r, _ in cases])
    results = []
    for (record, organs), report in zip(cases, reports, strict=True):
        shape = (report.input["height"], report.input["width"])
        gt = record.read_masks([a.id for a in record.abnormalities], shape).any(axis=0)  # (H, W) original slice
        pred = np.zeros(shape, dtype=bool)
        for finding in report.findings:
            if finding.mask is not None:
                pred |= finding.mask
        results.append({"id": record.sample_id, "organs": sorted(organs), "text": report.text,
                        "dice": dice(pred, gt), "organ_named": names_organs(report.text, organs)})
    mean_dice = float(np.mean([r["dice"] for r in results]))
    organ_rate = float(np.mean([r["organ_named"] for r in results]))
    sets = Counter(tuple(r["organs"]) for r in results)
    return {"cases": len(results), "dice": mean_dice, "organ_named": organ_rate,
            "majority_baseline": sets.most_common(1)[0][1] / len(results),
            "passed": mean_dice >= DICE_TARGET and organ_rate >= ORGAN_TARGET, "results": results}


def write_demo(run_dir: str | Path, out_dir: str | Path) -> Path:
    """The run's latest model with its tiny base copied inside as `base_model/` (a relative base is read from inside
    the checkpoint folder), written atomically to `out_dir`."""
    run = Path(run_dir)
    with atomic_folder(out_dir) as tmp:
        shutil.copytree(resolve_model_dir(str(run)), tmp, dirs_exist_ok=True)
        shutil.copytree(run / "tiny_base", tmp / "base_model")
        meta = json.loads((tmp / "omniabnorm.json").read_text())
        meta["model"]["base_model"] = "base_model"
        (tmp / "omniabnorm.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/phantom_tiny.yaml")
    parser.add_argument("--out", required=True, help="run folder (training output and learning_check.json)")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate an existing run in --out")
    parser.add_argument("--demo-out", help="also write the trained model here as a demo checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if not args.skip_training:
        train(load_config(args.config, [f"output_dir={args.out}", *args.overrides]))
    trained = time.perf_counter()
    summary = check_run(args.out)
    summary["train_seconds"] = round(trained - start, 1)
    summary["check_seconds"] = round(time.perf_counter() - trained, 1)
    (Path(args.out) / "learning_check.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out cases {summary['cases']}: Dice {summary['dice']:.3f} (target {DICE_TARGET}), organ named "
          f"{summary['organ_named']:.1%} (target {ORGAN_TARGET:.0%}, majority baseline "
          f"{summary['majority_baseline']:.1%}); training {summary['train_seconds']} s, "
          f"check {summary['check_seconds']} s → {'PASS' if summary['passed'] else 'FAIL'}")
    if args.demo_out:
        print(f"demo checkpoint written to {write_demo(args.out, args.demo_out)}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
