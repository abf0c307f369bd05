"""What one browser tab holds, without Gradio: the open input, the slice and window shown, the mark being clicked,
the last report; and how they become a view image and an inference `Case`.

Inputs are read with `dataset.readers.load_ct` and run with the inference API (`OmniAbnormPipeline.run`), so the
viewer shows and sends exactly what `python inference.py` would read for the same path, slice, plane and window.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.ct import InputError, SliceStack
from dataset.readers import load_ct
from inference.cases import DEFAULT_WINDOW, Case, input_kind, parse_window
from inference.report import Report
from viewer.render import Box, box_ellipse, click_pixel, compose, corners_box, draw_mark, slice_rgb, view_scale

VOLUME_KINDS = ("dicom", "nifti")  # inputs with a 3D geometry: they have planes and HU windows
Mark = tuple[str, Box]  # (kind from render.MARK_KINDS, box)


@dataclass
class Opened:
    path: Path  # what `Case.input` gets
    kind: str  # image | slice_folder | dicom | nifti
    stack: SliceStack  # the slices of the current plane, in display orientation

    @property
    def is_volume(self) -> bool:
        return self.kind in VOLUME_KINDS


def open_input(path: str | Path, plane: str | None = None, key: int | None = None) -> Opened:
    """A path on this computer (slice folder, image, DICOM series folder or file, NIfTI file) → Opened. `plane`
    reformats volumes (default axial); `key` is the slice shown first (default the input's key slice)."""
    text = str(path).strip()
    if not text:
        raise InputError("no input given: type the path of a slice folder, an image, a DICOM series folder or a NIfTI "
                         "file, or upload a file")
    location = Path(text).expanduser()
    if not location.exists():
        raise InputError(f"{location} does not exist: give the path of a slice folder, an image, a DICOM series "
                         f"folder or a NIfTI file on this computer")
    stack = load_ct(location, plane=plane, key=key)
    return Opened(location, input_kind(location, stack), stack)


def unpack_upload(file: str | Path, folder: str | Path) -> Path:
    """An uploaded file → the path to open: the file itself, or for a `.zip` its contents unpacked into a new
    sub-folder of `folder` — the single entry at the zip's top (e.g. a zipped series folder) when there is one."""
    file = Path(file)
    if file.suffix.lower() != ".zip":
        return file
    out = Path(tempfile.mkdtemp(prefix=f"{file.stem}-", dir=folder))
    try:
        with zipfile.ZipFile(file) as archive:
            archive.extractall(out)  # zipfile drops absolute paths and '..' from member names
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"cannot unpack {file.name} ({err}): upload a valid .zip of a slice folder or a DICOM "
                         f"series") from None
    entries = [e for e in out.iterdir() if not e.name.startswith((".", "__MACOSX"))]
    if not entries:
        raise InputError(f"{file.name} holds no files: zip a slice folder, a DICOM series or a NIfTI file")
    return entries[0] if len(entries) == 1 else out


@dataclass
class Session:
    """State of one browser tab. `report` belongs to the slice at `report_at` = (path, plane, index): its findings
    are drawn only while that slice is shown."""

    opened: Opened | None = None
    index: int = 0  # slice shown, along the current plane
    window: str = DEFAULT_WINDOW  # HU input: preset name or "level,width"
    pending: tuple[int, int] | None = None  # first corner of a mark being clicked, slice pixels (x, y)
    report: Report | None = None
    report_at: tuple[str, str, int] | None = None
    highlight: int | None = None  # id of the selected finding
    files: list[str] = field(default_factory=list)  # report.json, overlay.png, finding_<k>.png of `report`

    def open(self, path: str | Path, plane: str | None = None, key: int | None = None) -> None:
        """Open an input (a new path, or the same path in another plane); forgets the mark and the report."""
        self.opened = open_input(path, plane, key)
        self.index = self.opened.stack.key_index
        self.pending, self.report, self.report_at, self.highlight, self.files = None, None, None, None, []

    @property
    def stack(self) -> SliceStack:
        if self.opened is None:
            raise InputError("open an input first: type its path and press Open, or upload a file")
        return self.opened.stack

    @property
    def position(self) -> tuple[str, str, int]:
        return str(self.opened.path), self.stack.plane, self.index

    def set_window(self, text: str) -> None:
        parse_window(text)  # InputError for a bad preset or level,width
        self.window = text.strip()

    def set_index(self, index: int) -> None:
        count = self.stack.pixels.shape[0]
        if not 0 <= index < count:
            raise InputError(f"slice {index} outside 0..{count - 1}")
        self.index = index

    def slice_image(self) -> np.ndarray:
        """(H, W, 3) uint8: the slice shown, windowed."""
        window = parse_window(self.window)[1:] if self.stack.is_hu else None
        return slice_rgb(self.stack, self.index, window)

    def view(self, mark: Mark | None) -> tuple[np.ndarray, str | None]:
        """The image to show (see `render.compose`) and, when the mark cannot be drawn, why (the mark is left off)."""
        base, problem = self.slice_image(), None
        if mark is not None:
            try:
                base = draw_mark(base, *mark)
            except InputError as err:
                problem = str(err)
        findings = self.report.findings if self.report is not None and self.report_at == self.position else []
        return compose(base, findings, self.highlight, self.pending), problem

    def click(self, view_xy: tuple[float, float]) -> Box | None:
        """A click on the view → the box once two corners are clicked (None after the first; a third click starts
        a new box)."""
        shape = self.stack.pixels.shape[1:]
        xy = click_pixel(view_xy, view_scale(shape), shape)
        if self.pending is None:
            self.pending = xy
            return None
        first, self.pending = self.pending, None
        return corners_box(first, xy)

    def select(self, finding_id: int) -> None:
        """Highlight a finding of the report; selecting the highlighted one again clears the highlight."""
        self.highlight = None if self.highlight == finding_id else finding_id

    def case(self, task: str, flow: str = "union", prompt: str | None = None, mark: Mark | None = None) -> Case:
        """The inference request for the slice shown: volumes keep their plane, HU inputs their window."""
        stack, opened = self.stack, self.opened  # self.stack raises when nothing is open
        kind, box = mark if mark is not None else (None, None)
        return Case(str(opened.path), task=task, flow=flow, prompt=(prompt or "").strip() or None,
                    box=box if kind in ("bbox", "cropped") else None,
                    ellipse=box_ellipse(box) if kind == "ellipse" else None,
                    mark="cropped" if kind == "cropped" else None, slice=self.index,
                    plane=stack.plane if opened.is_volume else None, window=self.window if stack.is_hu else None)

    def run(self, pipe, case: Case, out_root: str | Path) -> Report:
        """Run `case` with an OmniAbnormPipeline and write its files into a new folder under `out_root`."""
        report = pipe.run([case])[0]
        folder = Path(tempfile.mkdtemp(prefix=f"{report.case_id}-", dir=out_root))
        report.write(folder)  # the paths are handed out only once every file is written
        self.report, self.report_at, self.highlight = report, self.position, None
        self.files = [str(folder / name) for name in ("report.json", "overlay.png")] + [
            str(folder / f"finding_{f.id}.png") for f in report.findings if f.mask is not None]
        return report
