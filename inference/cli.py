"""`python inference.py`: the command line over `inference.pipeline` (SPEC §6). See docs/inference.md."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dataset.ct import WINDOW_PRESETS, InputError
from dataset.visual_prompt import PROMPT_KINDS
from inference.cases import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    FLOWS,
    NAMINGS,
    TASKS,
    Case,
    case_ids,
    check_case,
    resolve_cases,
)
from model.config import ConfigError
from utils.atomic import atomic_folder

# The model stack (transformers, peft, MONAI) takes seconds to import: it is imported when a model is loaded, so
# --help and input errors answer at once.

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "checkpoint" / "demo"
DEMO_SEED = 2024  # not the seed the demo model was trained on (0): the demo case is unseen
DEMO_BANNER = ("DEMONSTRATION MODEL: a tiny model trained for minutes on synthetic phantoms. It shows the pipeline "
               "end to end; its output means nothing clinically.")
OUR_MARKERS = ("report.json", "batch.json")  # an existing --out folder holding one of these may be replaced


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python inference.py",
        description="Find, segment and describe abnormalities on a CT slice with OmniAbnorm-CT.",
        epilog="Input: an image, a folder of slice images, a DICOM series folder or file, a NIfTI file, or a "
               ".txt/.json list of cases for a batch run. See docs/inference.md.")
    p.add_argument("--input", help="CT input, or a .txt / .json list of cases")
    p.add_argument("--task", choices=TASKS, default="auto",
                   help="auto: visual_prompt with a mark, text_guided with --prompt, else grounded")
    p.add_argument("--flow", choices=FLOWS, default="union",
                   help="grounded task: union (released two-round flow) or per_finding (one mask per finding)")
    p.add_argument("--prompt", help="text_guided / vqa: the question; other tasks: replaces the default instruction")
    mark = p.add_mutually_exclusive_group()
    mark.add_argument("--box", nargs=4, type=int, metavar=("X1", "Y1", "X2", "Y2"),
                      help="visual prompt: red box, inclusive pixel corners on the key slice")
    mark.add_argument("--ellipse", nargs="+", type=float, metavar="V",
                      help="visual prompt: red ellipse CX CY A B [ANGLE_DEG] (semi-axes in pixels)")
    mark.add_argument("--contour", metavar="FILE",
                      help="visual prompt: red outline from a points file (.json [[x, y], …] or 'x y' lines) or a mask "
                           "image")
    p.add_argument("--mark", choices=PROMPT_KINDS,
                   help="visual prompt kind: with --box, 'cropped' crops around it; without geometry, the kind of red "
                        "mark already drawn on the image (default bbox)")
    p.add_argument("--slice", type=int, help="key slice index (volumes: along the plane; folders: in name order)")
    p.add_argument("--plane", choices=("axial", "coronal", "sagittal"), help="volumes: reformat plane (default axial)")
    p.add_argument("--window", help=f"HU input: preset ({', '.join(WINDOW_PRESETS)}) or LEVEL,WIDTH; default abdomen")
    p.add_argument("--naming", choices=NAMINGS, default="auto",
                   help="slice folders: sequence (0.jpg…, key = middle) or offset (-4.jpg…4.jpg, key = 0)")
    p.add_argument("--hu-offset", type=float, help="16-bit images that store HU + offset (DeepLesion: 32768)")
    p.add_argument("--checkpoint", help="our checkpoint folder, or the released OmniAbnorm-CT folder")
    p.add_argument("--base-model", help="local Qwen2.5-VL-7B-Instruct folder (needed by the released layout)")
    p.add_argument("--out", help="output folder (default outputs/<case>); a folder of earlier results is replaced")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="cases generated together")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--fast", action="store_true",
                   help="decode fast paths (docs/performance.md): our static-cache decode loop, each step a CUDA "
                        "graph on GPU; LoRA merged into the base weights; vision tower once per image, its "
                        "attention one variable-length call per layer; <SEG> queries from the decode; second "
                        "rounds from the first round's KV cache. The plain "
                        "path's outputs, up to bf16 rounding on GPU")
    p.add_argument("--demo", action="store_true", help="run a bundled phantom case with the demo checkpoint")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return with_clear_errors(lambda: _main(args))


def with_clear_errors(run: Callable[[], int]) -> int:
    """Run an entry point's body: a user-facing problem becomes one `error:` line on stderr and exit status 2 (1 for
    a demo checkpoint not made yet), never a traceback."""
    try:
        return run()
    except (InputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DemoMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from model.checkpoint import CheckpointError  # loaded already whenever one can be raised

        if not isinstance(err, CheckpointError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


class DemoMissing(RuntimeError):
    pass


def _main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError("--max-new-tokens and --batch-size must be at least 1")
    if args.demo:
        if args.input or args.checkpoint:
            raise InputError("--demo runs its own phantom case with checkpoint/demo/; leave out --input and "
                             "--checkpoint")
        return _demo(args)
    if not args.input:
        raise InputError("give --input PATH (a CT input or a list of cases), or --demo")
    if not args.checkpoint:
        raise InputError("give --checkpoint DIR (our format, or the released folder with --base-model DIR); "
                         "--demo runs the bundled demonstration model")
    cases, batch = resolve_cases(args.input, case_defaults(args))
    for case in cases:
        check_case(case)
    ids = case_ids(cases)
    out = Path(args.out) if args.out else Path("outputs") / (Path(args.input).stem if batch else ids[0])
    check_out(out)
    pipe = load(args.checkpoint, args.base_model, args)
    run(pipe, cases, ids, out, batch)
    return 0


def case_defaults(args: argparse.Namespace) -> dict:
    """CLI options as `Case` fields (every case of a list gets them unless it sets its own)."""
    return {"task": args.task, "flow": args.flow, "prompt": args.prompt,
            "box": tuple(args.box) if args.box else None, "ellipse": tuple(args.ellipse) if args.ellipse else None,
            "contour": args.contour, "mark": args.mark, "slice": args.slice, "plane": args.plane,
            "window": args.window, "naming": args.naming, "hu_offset": args.hu_offset}


def check_out(out: Path) -> None:
    """Refuse to replace a file or a non-empty folder that holds something other than our earlier results."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in OUR_MARKERS):
        raise InputError(f"--out {out} exists and holds other files; give a new or empty folder")


def load(checkpoint: str | Path, base_model: str | None, args: argparse.Namespace):
    """→ OmniAbnormPipeline, with transformers' progress bars off (stdout/stderr carry results and errors)."""
    import transformers

    from inference.generate import DecodeSettings
    from inference.pipeline import OmniAbnormPipeline

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    print(f"loading {checkpoint} …", file=sys.stderr)
    decode = DecodeSettings.fast() if args.fast else None
    pipe = OmniAbnormPipeline.from_checkpoint(checkpoint, base_model, device=args.device, decode=decode,
                                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"loaded in {time.perf_counter() - start:.1f} s on {pipe.device}", file=sys.stderr)
    return pipe


def run(pipe, cases: list[Case], ids: list[str], out: Path, batch: bool) -> None:
    """Run and write every case into a temporary folder that becomes `out` only when all succeeded."""
    start = time.perf_counter()
    index = []
    with atomic_folder(out) as tmp:
        for report in pipe.iter_run(cases, ids):
            folder = tmp / report.case_id if batch else tmp
            folder.mkdir(exist_ok=True)
            report.write(folder)
            print(report.summary(), flush=True)
            index.append({"case_id": report.case_id, "input": report.input["path"], "task": report.task,
                          "folder": report.case_id, "findings": len(report.findings), "refusal": report.refusal})
        if batch:
            (tmp / "batch.json").write_text(json.dumps({"cases": index}, indent=1) + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - start
    print(f"wrote {out} ({len(cases)} case{'s' * (len(cases) != 1)}, {elapsed:.2f} s, "
          f"{elapsed / len(cases):.2f} s per case)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# --demo


def _demo(args: argparse.Namespace) -> int:
    if not (DEMO_CHECKPOINT / "omniabnorm.json").is_file():
        raise DemoMissing(
            f"the demo checkpoint is missing: {DEMO_CHECKPOINT} has no omniabnorm.json. Make it by training the "
            f"tiny phantom model (python train.py --config configs/phantom_tiny.yaml), then copy its last "
            f"checkpoints/step_*/model/ folder to checkpoint/demo/ and its tiny_base/ folder to "
            f"checkpoint/demo/base_model/ (see checkpoint/README.md)")
    print(DEMO_BANNER, flush=True)
    pipe = load(DEMO_CHECKPOINT, None, args)
    out = Path(args.out) if args.out else Path("demo_out")
    check_out(out)
    with tempfile.TemporaryDirectory(prefix="omniabnorm-demo-") as tmp:
        case, truth = demo_case(Path(tmp), pipe.seg_size)
        case.flow = args.flow
        print(f"demo case: synthetic phantom (seed {DEMO_SEED}), {case.plane} slice {case.slice}; truth: {truth}",
              flush=True)
        run(pipe, [case], ["demo"], out, batch=False)
    print(DEMO_BANNER, flush=True)
    return 0


def demo_case(folder: Path, size: int) -> tuple[Case, str]:
    """Write the first axial phantom case (seed DEMO_SEED) with at least two findings on its key slice as NIfTI into
    `folder` → (grounded Case, ground-truth summary). Deterministic."""
    from dataset.phantom import make_case, write_volume

    size = min(max(size, 64), 512)
    for index in range(200):
        case = make_case(DEMO_SEED, index, size)
        found = case.findings()
        if case.plane == "axial" and len(found) >= 2:
            break
    else:  # pragma: no cover - the phantom generator always yields such a case within 200
        raise RuntimeError("no phantom case with two findings")
    write_volume(case, folder / case.case_id, DEMO_SEED)
    truth = "; ".join(f"{case.lesions[f.lesion_index].kind.label} in {case.lesions[f.lesion_index].location}, "
                      f"{f.size_mm:.0f} mm" for f in found)
    return Case(str(folder / case.case_id / "ct.nii.gz"), task="grounded", slice=case.key, plane="axial",
                window="abdomen"), truth
