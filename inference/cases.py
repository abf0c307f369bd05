"""What one inference case is, how a run's input names its cases, and how a case becomes model-ready images.

A `Case` holds the user's request (input path, task, prompt, visual-prompt geometry, slice choice, window). The
CLI's --input names one case, a `.txt` list of inputs (one path a line) or a `.json` list of case objects whose keys
are the `Case` fields. `prepare` reads the CT and builds what the model sees, exactly as training built it
(dataset/tasks.py): the key slice for the VLM, the 2.5D segmentation stack, and the visual prompt drawn on the slice.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dataset.ct import WINDOW_PRESETS, InputError, SliceStack, gray_rgb, stretch_to_uint8, window_to_uint8
from dataset.prompts import GROUNDED_REPORT_EVAL, GROUNDED_REPORT_PER_FINDING_EVAL, visual_prompt_instruction
from dataset.readers import IMAGE_EXTENSIONS, NIFTI_EXTENSIONS, load_ct, load_image_array
from dataset.stack25d import SquareGeometry, seg_stack
from dataset.visual_prompt import PROMPT_KINDS, crop_around, draw_boxes, draw_contour, draw_ellipse, draw_prompt

Task = Literal["auto", "visual_prompt", "grounded", "text_guided", "vqa"]
TASKS = ("auto", "visual_prompt", "grounded", "text_guided", "vqa")
FLOWS = ("union", "per_finding")
NAMINGS = ("auto", "sequence", "offset")
DEFAULT_WINDOW = "abdomen"
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 4
SEGMENTING_TASKS = ("grounded", "text_guided")
# Tokens the chat template gives meaning to: a prompt holding one would be read as structure, not text.
_RESERVED = re.compile(r"<SEG>|<\|[a-z_]+\|>|</?tool_call>")
# A user-drawn mark: strongly red pixels (drawing tools antialias, so not only pure (255, 0, 0)).
_RED_MIN, _OTHER_MAX = 200, 60


@dataclass
class Case:
    """One request. Paths may be relative to the working folder (or to a list file, for batch inputs).

    Geometry is in pixels of the key slice as stored/displayed (x to the right, y down, inclusive box corners):
    box (x1, y1, x2, y2); ellipse (cx, cy, semi-axis a, semi-axis b[, angle in degrees from +x towards +y]);
    contour: a file of (x, y) points (JSON list of pairs, or text with one "x y" / "x,y" pair a line) or a mask image
    (non-zero = region; its outline is drawn as in training). `mark` says which kind of prompt the model is shown:
    with a box it may be "cropped" (crop centred on the box instead of drawing it); without geometry it names the kind
    of red mark already drawn on the image (default bbox).
    """

    input: str
    task: Task = "auto"
    flow: str = "union"  # grounded: "union" (released two-round flow) or "per_finding" (one <SEG> per finding)
    prompt: str | None = None  # text_guided: the clinical question; vqa: the question; others: replaces the default
    box: tuple[int, int, int, int] | None = None
    ellipse: tuple[float, ...] | None = None
    contour: str | None = None
    mark: str | None = None
    slice: int | None = None  # key slice index (volumes: along the plane's axis; folders: in name order)
    plane: str | None = None  # volumes: axial (default), coronal, sagittal; images: a label only
    window: str | None = None  # HU input: a preset name or "level,width"; default abdomen
    naming: str = "auto"  # slice folders: auto | sequence (0.jpg…, key = middle) | offset (-4.jpg…4.jpg, key = 0)
    hu_offset: float | None = None  # 16-bit images storing HU + offset (DeepLesion: 32768)
    id: str | None = None  # output sub-folder name in batch runs; default from the input name

    @property
    def resolved_task(self) -> str:
        """`auto` → visual_prompt when geometry or a mark is given, text_guided when a prompt is, else grounded."""
        if self.task != "auto":
            return self.task
        if self.box is not None or self.ellipse is not None or self.contour is not None or self.mark is not None:
            return "visual_prompt"
        return "text_guided" if self.prompt else "grounded"


def parse_window(text: str) -> tuple[str, float, float]:
    """"abdomen" or "40,400" → (name, level, width) in HU."""
    key = text.strip().lower()
    if key in WINDOW_PRESETS:
        return key, *WINDOW_PRESETS[key]
    parts = key.replace(" ", "").split(",")
    try:
        level, width = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"window {text!r}: give a preset ({', '.join(WINDOW_PRESETS)}) or 'level,width' in HU, "
                         f"e.g. 40,400") from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise InputError(f"window {text!r}: level must be finite and width positive")
    return f"{level:g},{width:g}", level, width


def check_case(case: Case) -> None:
    """Everything that can be checked without reading the input; raises InputError naming the problem."""
    if not str(case.input).strip():
        raise InputError("a case has no input path")
    if not Path(case.input).exists():
        raise InputError(f"input {case.input} does not exist")
    if case.task not in TASKS:
        raise InputError(f"unknown task {case.task!r}; choose one of {', '.join(TASKS)}")
    if case.flow not in FLOWS:
        raise InputError(f"unknown grounding flow {case.flow!r}; choose union or per_finding")
    if case.naming not in NAMINGS:
        raise InputError(f"unknown slice naming {case.naming!r}; choose one of {', '.join(NAMINGS)}")
    task = case.resolved_task
    geometry = [name for name in ("box", "ellipse", "contour") if getattr(case, name) is not None]
    if len(geometry) > 1:
        raise InputError(f"give one visual prompt, not {' and '.join('--' + g for g in geometry)}")
    if (geometry or case.mark) and task != "visual_prompt":
        raise InputError(f"--{geometry[0] if geometry else 'mark'} marks a region for the visual_prompt task, but "
                         f"the task is {task}")
    if case.mark is not None and case.mark not in PROMPT_KINDS:
        raise InputError(f"unknown mark {case.mark!r}; choose one of {', '.join(PROMPT_KINDS)}")
    if case.mark == "cropped" and geometry and geometry[0] != "box":
        raise InputError("a cropped visual prompt is centred on a --box; give --box with --mark cropped")
    if case.mark is not None and geometry and case.mark not in (geometry[0].replace("box", "bbox"), "cropped"):
        raise InputError(f"--mark {case.mark} does not match --{geometry[0]}; leave --mark out")
    if case.box is not None and (len(case.box) != 4 or any(float(v) != int(v) for v in case.box)):
        raise InputError(f"--box needs 4 whole pixel indices x1 y1 x2 y2, got {list(case.box)}")
    if case.ellipse is not None and len(case.ellipse) not in (4, 5):
        raise InputError(f"--ellipse needs cx cy a b [angle], 4 or 5 numbers, got {len(case.ellipse)}")
    if case.contour is not None and not Path(case.contour).is_file():
        raise InputError(f"contour file {case.contour} does not exist")
    if task in ("text_guided", "vqa") and not (case.prompt and case.prompt.strip()):
        raise InputError(f"the {task} task needs a question: pass --prompt TEXT")
    if case.prompt is not None and (reserved := _RESERVED.search(case.prompt)):
        raise InputError(f"the prompt contains {reserved.group()!r}, a token reserved for the chat format; remove it")
    if case.window is not None:
        parse_window(case.window)
    if case.slice is not None and case.slice < 0:
        raise InputError(f"--slice {case.slice}: slice indices start at 0")


# ----------------------------------------------------------------------------------------------------------------
# Resolving --input


_FIELDS = {f.name for f in dataclasses.fields(Case)}
_PATH_FIELDS = ("input", "contour")


def resolve_cases(path: str | Path, defaults: dict | None = None) -> tuple[list[Case], bool]:
    """--input → (cases, is_batch). A `.txt` file lists inputs (one a line; blank lines and `#` comments skipped); a
    `.json` file holds a list of case objects (keys: the `Case` fields; `input` required) or of input strings.
    Relative paths in a list are relative to the list file's folder. `defaults` (the CLI options) fill every field
    a case does not set."""
    path = Path(path)
    defaults = dict(defaults or {})
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json") or not path.is_file():
        return [Case(input=str(path), **defaults)], False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the case list {path}: {err}") from None
    if suffix == ".txt":
        entries: list = [line.strip() for line in text.splitlines()
                         if line.strip() and not line.lstrip().startswith("#")]
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"case list {path} is not valid JSON: {err}") from None
        if not isinstance(entries, list):
            raise InputError(f"case list {path} must hold a JSON list of cases (objects with an 'input' key)")
    if not entries:
        raise InputError(f"case list {path} lists no cases")
    cases = []
    for i, entry in enumerate(entries, start=1):
        fields = {"input": entry} if isinstance(entry, str) else entry
        if not isinstance(fields, dict) or not isinstance(fields.get("input"), str):
            raise InputError(f"case {i} in {path}: each case needs an 'input' path (a string)")
        unknown = sorted(set(fields) - _FIELDS)
        if unknown:
            raise InputError(f"case {i} in {path}: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(_FIELDS))}")
        for key in _PATH_FIELDS:
            if isinstance(fields.get(key), str) and not Path(fields[key]).is_absolute():
                fields[key] = str(path.parent / fields[key])
        for key in ("box", "ellipse"):
            if fields.get(key) is not None:
                fields[key] = _numbers(fields[key], key, f"case {i} in {path}")
        try:
            cases.append(Case(**{**defaults, **fields}))
        except TypeError as err:
            raise InputError(f"case {i} in {path}: {err}") from None
    return cases, True


def _numbers(value, key: str, where: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: '{key}' must be a list of numbers")
    return tuple(value)


def case_ids(cases: Sequence[Case]) -> list[str]:
    """Output folder name per case: its `id`, else the input's name without extension; made unique with _2, _3…"""
    ids, seen = [], {}
    for case in cases:
        name = case.id or _stem(Path(case.input))
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
        count = seen[name] = seen.get(name, 0) + 1
        ids.append(name if count == 1 else f"{name}_{count}")
    if len(set(ids)) != len(ids):
        raise InputError(f"case ids are not unique: {sorted(i for i in ids if ids.count(i) > 1)}; set 'id' per case")
    return ids


def _stem(path: Path) -> str:
    name = path.name
    for ext in (*NIFTI_EXTENSIONS, *IMAGE_EXTENSIONS, ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------------------------------------------
# Reading a case


@dataclass
class PreparedCase:
    """A case read and turned into model inputs. Images are on the original key slice's pixel grid."""

    case: Case
    task: str
    stack_info: dict  # input description for the report (kind, source, plane, sizes, spacing)
    window: tuple[str, float, float] | None  # (name, level, width) applied to HU input
    display: np.ndarray  # (H, W) uint8: the key slice as a radiologist views it (windowed), for overlays
    vlm_image: np.ndarray  # (H', W', 3) uint8: the image of the user turn (a crop is smaller than the slice)
    key_rgb: np.ndarray  # (H, W, 3) uint8: the key slice the tool turn draws its boxes on (grounding tasks)
    instruction: str
    visual_prompt: dict | None  # what was drawn: {"kind", and box_xyxy | ellipse | contour_points}
    seg_slices: np.ndarray | None  # (S, size, size) float32 z-scored 2.5D stack, for segmenting tasks
    geometry: SquareGeometry | None  # slice ↔ segmentation space
    seg_slice_indices: list[int | None]  # per stack channel: the input slice index, None for a zero slice
    key_hu: np.ndarray | None  # (H, W) float32 HU of the key slice, when the input is in HU
    pixel_spacing_mm: tuple[float, float] | None  # (row, column)


def input_kind(path: Path, stack: SliceStack) -> str:
    """image | slice_folder | dicom | nifti: volumes are the inputs that come with a pixel spacing."""
    if stack.pixel_spacing_mm is None:
        return "image" if path.is_file() else "slice_folder"
    return "nifti" if path.name.lower().endswith(NIFTI_EXTENSIONS) else "dicom"


def prepare(case: Case, seg_size: int, seg_slices: int) -> PreparedCase:
    """Read `case.input` and build the model inputs. `seg_size`/`seg_slices`: the segmentation module's input side
    and channel count (key ± (seg_slices − 1) / 2). Raises InputError for anything wrong with the input."""

    check_case(case)
    task = case.resolved_task
    path = Path(case.input)
    stack = load_ct(path, plane=case.plane, key=case.slice, naming=case.naming, hu_offset=case.hu_offset)
    key = stack.key_index
    if stack.is_hu:
        window = parse_window(case.window or DEFAULT_WINDOW)
        display = window_to_uint8(stack.key_slice, window[1], window[2])
    elif case.window is not None:
        raise InputError(f"{path} holds display values, not HU (already windowed), so --window does not apply; leave "
                         f"it out (16-bit images storing HU need --hu-offset)")
    else:
        window = None
        display = stack.display()[key]

    info = {
        "path": str(path), "kind": input_kind(path, stack), "source": stack.source, "plane": stack.plane,
        "slice_index": key, "slice_count": int(stack.pixels.shape[0]),
        "slice_source": stack.slice_sources[key] if stack.slice_sources else None,
        "height": int(display.shape[0]), "width": int(display.shape[1]), "is_hu": stack.is_hu,
        "pixel_spacing_mm": list(stack.pixel_spacing_mm) if stack.pixel_spacing_mm else None,
        "slice_spacing_mm": stack.slice_spacing_mm,
    }
    # Training fed grounding tasks the key slice stretched over its min..max (dataset/tasks.py) and visual prompts
    # the slice as displayed, marks drawn on it; a colour input keeps its colours (the user's marks) for the latter.
    key_rgb = gray_rgb(stretch_to_uint8(display))
    base = stack.key_rgb if stack.key_rgb is not None and not stack.is_hu else gray_rgb(display)

    seg, geometry, indices = None, None, []
    instruction, visual_prompt, vlm_image = case.prompt, None, key_rgb
    if task in SEGMENTING_TASKS:
        seg, geometry, indices = _seg_input(stack, window, seg_size, seg_slices)
        instruction = instruction or (GROUNDED_REPORT_PER_FINDING_EVAL if case.flow == "per_finding" else
                                      GROUNDED_REPORT_EVAL)
    elif task == "visual_prompt":
        vlm_image, visual_prompt = _visual_prompt(case, base)
        instruction = instruction or visual_prompt_instruction(visual_prompt["kind"], "single")
    else:  # vqa: the slice as displayed
        vlm_image = base
    return PreparedCase(case, task, info, window, display, vlm_image, key_rgb, instruction.strip(), visual_prompt,
                        seg, geometry, indices, stack.key_slice.copy() if stack.is_hu else None,
                        stack.pixel_spacing_mm)


def _seg_input(stack: SliceStack, window: tuple[str, float, float] | None, size: int, channels: int
               ) -> tuple[np.ndarray, SquareGeometry, list[int | None]]:
    """The 2.5D stack as training built it: HU clipped to the window (then z-scored), display values as stored."""
    context = (channels - 1) // 2
    key, count = stack.key_index, stack.pixels.shape[0]
    lo, hi = max(0, key - context), min(count, key + context + 1)
    slices = stack.pixels[lo:hi]
    if window is not None:
        _, level, width = window
        slices = np.clip(slices, level - width / 2, level + width / 2)
    try:
        seg, geometry = seg_stack(slices, key - lo, context=context, size=size)
    except ValueError as err:
        raise InputError(f"{stack.source}: {err}") from None
    indices = [i if 0 <= i < count else None for i in range(key - context, key + context + 1)]
    return seg, geometry, indices


def _visual_prompt(case: Case, base: np.ndarray) -> tuple[np.ndarray, dict]:
    """Draw the requested mark on the key slice (as training drew them) → (image, description for the report)."""
    if case.box is not None:
        box = tuple(int(v) for v in case.box)
        if case.mark == "cropped":
            return crop_around(base, box), {"kind": "cropped", "box_xyxy": list(box)}
        return draw_boxes(base, [box]), {"kind": "bbox", "box_xyxy": list(box)}
    if case.ellipse is not None:
        cx, cy, a, b, *angle = (float(v) for v in case.ellipse)
        image = draw_ellipse(base, (cx, cy), (a, b), angle[0] if angle else 0.0)
        return image, {"kind": "ellipse", "ellipse": {"center_xy": [cx, cy], "semi_axes": [a, b],
                                                      "angle_deg": angle[0] if angle else 0.0}}
    if case.contour is not None:
        return _contour(Path(case.contour), base)
    kind = case.mark or "bbox"
    if kind != "cropped":
        red = (base[..., 0] >= _RED_MIN) & (base[..., 1] <= _OTHER_MAX) & (base[..., 2] <= _OTHER_MAX)
        if not red.any():
            raise InputError(f"{case.input} shows no red mark for the visual_prompt task: draw one on the image, or "
                             f"give --box, --ellipse or --contour (or --mark cropped for a crop centred on the "
                             f"finding)")
    return base, {"kind": kind, "drawn_by": "user"}


def _contour(path: Path, base: np.ndarray) -> tuple[np.ndarray, dict]:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        mask = load_image_array(path)
        mask = (mask.max(axis=2) if mask.ndim == 3 else mask) > 0
        if mask.shape != base.shape[:2]:
            raise InputError(f"contour mask {path} is {mask.shape[1]}x{mask.shape[0]}, the key slice is "
                             f"{base.shape[1]}x{base.shape[0]}; give a mask of the slice's size")
        if not mask.any():
            raise InputError(f"contour mask {path} is empty; mark the region with non-zero pixels")
        return draw_prompt(base, [mask], "contour"), {"kind": "contour", "contour_mask": str(path)}
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            points = np.asarray(json.loads(text), dtype=np.float64)
        else:
            rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
            points = np.asarray(rows, dtype=np.float64)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise InputError(f"cannot read contour points from {path} ({err}); give a JSON list of [x, y] pairs, a text "
                         f"file with one 'x y' pair a line, or a mask image") from None
    image = draw_contour(base, points)
    return image, {"kind": "contour", "contour_points": np.rint(points).astype(int).tolist()}
