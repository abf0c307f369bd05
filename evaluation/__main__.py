"""`python -m evaluation run CHECKPOINT DATA_ROOT OUT [options]`: predict (resumable) then score.
`torchrun --nproc_per_node=N -m evaluation run …`: the same, the prediction sharded over N processes (one GPU each).
`python -m evaluation score PREDICTIONS DATA_ROOT OUT [options]`: score an existing predictions.jsonl.

OUT gets predictions.jsonl (+ .meta.json), scores.jsonl (per sample), summary.json, summary.csv, summary.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dataset.ct import InputError
from dataset.visual_prompt import PROMPT_KINDS
from evaluation.predict import (
    BENCHMARKS,
    PLANES,
    PREDICTIONS,
    Item,
    check_meta,
    load_items,
    merge_shards,
    pending,
    predict,
)
from evaluation.score import SEG_GRIDS, score
from evaluation.seg_metrics import NSD_TOLERANCE_PX
from evaluation.text_metrics import MODEL_METRICS


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-metrics", nargs="*", default=list(MODEL_METRICS), choices=MODEL_METRICS,
                        help="weight-based text metrics to try (from the local cache); none: --model-metrics")
    parser.add_argument("--nsd-tolerance", type=float, default=NSD_TOLERANCE_PX, help="NSD tolerance, pixels")
    parser.add_argument("--category-level", type=int, default=-1,
                        help="taxonomy level for the macro average: 0 system, 1 structure, -1 category (leaf)")
    parser.add_argument("--seg-grid", default=SEG_GRIDS[0], choices=SEG_GRIDS,
                        help="segmentation metrics on 512×512 (padded to square and resized as the model input, "
                             "SPEC §7) or on the key slice's own grid")
    parser.add_argument("--no-plots", action="store_true", help="skip summary.xlsx and plots/*.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="predict on the benchmarks (resumable), then score")
    run.add_argument("checkpoint", type=Path)
    run.add_argument("data_root", type=Path, help="folder holding <plane>/<plane>_valid.json")
    run.add_argument("out", type=Path)
    run.add_argument("--base-model", type=Path)
    run.add_argument("--tasks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    run.add_argument("--types", nargs="+", default=list(PROMPT_KINDS), choices=PROMPT_KINDS,
                     help="visual prompt types")
    run.add_argument("--planes", nargs="+", default=list(PLANES), choices=PLANES)
    run.add_argument("--flow", default="union", choices=("union", "per_finding"), help="grounded flow")
    run.add_argument("--limit", type=int, help="first N samples of each plane (smoke runs)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=256)
    run.add_argument("--fast", action="store_true",
                     help="decode fast paths as in inference.py --fast (docs/performance.md); the plain path's "
                          "predictions, up to bf16 rounding on GPU")
    run.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available; under torchrun each rank "
                                      "uses cuda:LOCAL_RANK unless cpu is given)")
    run.add_argument("--predict-only", action="store_true",
                     help="stop after predicting; score later with `python -m evaluation score`")
    _scoring_options(run)
    only = sub.add_parser("score", help="score an existing predictions.jsonl")
    only.add_argument("predictions", type=Path)
    only.add_argument("data_root", type=Path)
    only.add_argument("out", type=Path)
    _scoring_options(only)
    args = parser.parse_args(argv)
    # Evaluation never downloads: weights come from the local cache (set before huggingface_hub is imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        start = time.perf_counter()
        if args.command == "run":
            items = load_items(args.data_root, args.planes, args.tasks, args.types, args.flow, args.limit)
            if not args.checkpoint.is_dir():
                raise InputError(f"checkpoint folder {args.checkpoint} does not exist")
            if not _predict(args, items):
                return 0  # ranks other than 0: rank 0 merges the shards and scores
            predictions = args.out / PREDICTIONS
            if args.predict_only:
                print(f"{len(items)} items predicted in {time.perf_counter() - start:.1f} s: {predictions}; score "
                      f"with python -m evaluation score {predictions} {args.data_root} {args.out}")
                return 0
        else:
            predictions = args.predictions
        summary = score(predictions, args.data_root, args.out, args.model_metrics, args.nsd_tolerance,
                        args.category_level, plots=not args.no_plots, grid=args.seg_grid)
    except InputError as err:
        rank = f" (rank {os.environ.get('RANK')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{rank}: {err}", file=sys.stderr)
        return 1
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    print(f"{sum(s['n'] for (t, v), s in summary.items() if v != 'max_over_types')} items scored in "
          f"{time.perf_counter() - start:.1f} s; results in {args.out}/ (scores.jsonl, summary.csv, summary.md, "
          f"summary.json{'' if args.no_plots else ', summary.xlsx, plots/'})")
    return 0


def _predict(args: argparse.Namespace, items: list[Item]) -> bool:
    """Predict the items not yet in `args.out`, sharded when torchrun started this process; True on the process
    that goes on to score (rank 0), once `predictions.jsonl` holds every rank's lines."""
    from inference.generate import DecodeSettings  # torch/transformers: only here
    from inference.pipeline import OmniAbnormPipeline, folder_sha256
    from model.checkpoint import CheckpointError
    from training.distributed import close_distributed, init_distributed

    meta = {"checkpoint_sha256": folder_sha256(args.checkpoint), "flow": args.flow,
            "max_new_tokens": args.max_new_tokens, "data_root": str(args.data_root.resolve())}
    env = init_distributed()
    try:
        if env.is_main:  # first, alone: refuse another run's folder; fold a crashed run's shards (any world size)
            args.out.mkdir(parents=True, exist_ok=True)
            check_meta(args.out, meta)
            merge_shards(args.out, items)
        env.barrier()
        if not env.is_main:
            check_meta(args.out, meta)  # written by rank 0: read and compare only
        _, todo = pending(items, args.out, env.rank, env.world_size)
        if todo:  # a finished share (or run) needs no model
            device = env.device if env.world_size > 1 and args.device != "cpu" else args.device
            try:
                pipeline = OmniAbnormPipeline.from_checkpoint(
                    args.checkpoint, args.base_model, device=device, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    decode=DecodeSettings.fast() if args.fast else None)
            except CheckpointError as err:
                raise InputError(str(err)) from None
            for _ in predict(pipeline, items, args.out, sys.stderr.isatty() and env.is_main, env.rank,
                             env.world_size):
                pass
        env.barrier()
        if env.is_main:
            merge_shards(args.out, items)
        return env.is_main
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
