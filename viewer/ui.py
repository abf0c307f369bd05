"""The Gradio page: its components and events, glued to `viewer.session` (docs/viewer.md).

Every handler takes the tab's `Session` (a gr.State) and returns it with the parts of the page it changed. An
InputError becomes one message in the page (no traceback); anything else is a bug, logged with its
traceback on the server's console. One model serves every tab: runs take turns under a lock.
"""

import html
import threading
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import gradio as gr

from dataset.ct import PLANES, WINDOW_PRESETS, InputError
from dataset.readers import IMAGE_EXTENSIONS, NIFTI_EXTENSIONS
from viewer.render import FINDING_COLUMNS, MARK_KINDS, findings_rows
from viewer.session import Mark, Session, unpack_upload

UPLOAD_TYPES = [*IMAGE_EXTENSIONS, *NIFTI_EXTENSIONS, ".gz", ".dcm", ".zip"]
# A handler parameter defaulting to a gr.Progress gets a fresh progress tracker per event; the default is a marker.
PROGRESS = gr.Progress()
MESSAGE_SECONDS = 30  # how long an input problem stays on screen (it can be closed)


@dataclass
class Initial:
    """What the page opens with (--demo): an input path, its slice, and a line about it."""

    path: str
    slice: int | None
    note: str


def user_errors(fn):
    """InputError → its message alone in a pop-up (HTML-escaped: it names paths), the page left as it was. (gr.Error
    would also stamp "Error" over every output of the event and blank them.)"""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            gr.Warning(html.escape(str(err)), duration=MESSAGE_SECONDS)
            return gr.skip()

    return wrapper


def mark_of(kind: str, x1, y1, x2, y2) -> Mark | None:
    """The four number fields → a mark, None while any is empty."""
    values = (x1, y1, x2, y2)
    if any(v is None for v in values):
        return None
    return kind, tuple(int(v) for v in values)


class Viewer:
    def __init__(self, pipe, workdir: Path, initial: Initial | None = None, note: str | None = None):
        self.pipe, self.workdir, self.initial, self.note = pipe, Path(workdir), initial, note
        self.lock = threading.Lock()  # one generation at a time on the shared model

    # ------------------------------------------------------------------------------------------------------------
    # Page parts that handlers return

    def status(self, s: Session, problem: str | None = None) -> str:
        """The lines under the image: what is open, which slice, the first corner clicked, a mark that cannot be
        drawn, where the findings are."""
        if s.opened is None:
            return self.initial.note if self.initial else "Open an input to start."
        st = s.stack
        parts = [f"**{s.opened.kind}** `{s.opened.path}`", f"{st.plane} slice {s.index} of 0..{st.pixels.shape[0] - 1}",
                 f"{st.pixels.shape[2]}×{st.pixels.shape[1]} px",
                 f"window {s.window}" if st.is_hu else "display values (no HU window)"]
        if st.pixel_spacing_mm:
            parts.append(f"pixel {st.pixel_spacing_mm[0]:.2f}×{st.pixel_spacing_mm[1]:.2f} mm")
        lines = [" · ".join(parts)]
        if s.pending is not None:
            lines.append(f"first corner at {list(s.pending)}: click the opposite corner")
        if problem:
            lines.append(f"mark not drawn: {problem}")
        if s.report is not None and s.report_at != s.position:
            lines.append(f"the findings belong to {s.report_at[1]} slice {s.report_at[2]}: go back there to see them")
        if self.initial and str(s.opened.path) == self.initial.path:
            lines.append(self.initial.note)
        return "\n\n".join(lines)

    def view(self, s: Session, mark: Mark | None) -> tuple:
        image, problem = s.view(mark)
        return s, image, self.status(s, problem)

    def loaded(self, s: Session) -> tuple:
        """Everything that changes when an input (or a plane) is opened; the mark is cleared."""
        st = s.stack
        count, volume = st.pixels.shape[0], s.opened.is_volume
        return (*self.view(s, None),
                gr.update(minimum=0, maximum=max(count - 1, 1), value=s.index, interactive=count > 1),
                gr.update(value=st.plane if volume else None, interactive=volume),
                gr.update(value=s.window, interactive=st.is_hu),
                *self.results(s), None, None, None, None)

    @staticmethod
    def results(s: Session) -> tuple:
        """Report text, findings table, downloads."""
        if s.report is None:
            return "", {"data": [], "headers": list(FINDING_COLUMNS)}, None
        r = s.report
        head = f"[{r.task}" + (f", {r.flow}" if r.flow else "") + f"; {len(r.findings)} finding(s); " \
            f"{r.timing['batch_seconds']:.2f} s on {r.timing['device']}]"
        if not r.generation["finished"]:
            head += f" (cut at {r.generation['max_new_tokens']} new tokens)"
        table = {"data": findings_rows(r.to_dict()), "headers": list(FINDING_COLUMNS)}
        return f"{head}\n{r.text or '(the model wrote no text)'}", table, s.files

    # ------------------------------------------------------------------------------------------------------------
    # Handlers

    @user_errors
    def open_path(self, s: Session, path: str, progress=PROGRESS):
        progress(0, desc=f"reading {path}")
        s.open(path)
        return self.loaded(s)

    @user_errors
    def open_upload(self, s: Session, file: str, progress=PROGRESS):
        progress(0, desc="reading the upload")
        path = unpack_upload(file, self.workdir)
        s.open(path)
        return str(path), *self.loaded(s)

    @user_errors
    def open_initial(self, s: Session, progress=PROGRESS):
        progress(0, desc=f"reading {self.initial.path}")
        s.open(self.initial.path, key=self.initial.slice)
        return self.initial.path, *self.loaded(s)

    @user_errors
    def change_plane(self, s: Session, plane: str, progress=PROGRESS):
        progress(0, desc=f"reformatting to {plane}")
        s.open(s.opened.path, plane=plane)
        return self.loaded(s)

    @user_errors
    def change_slice(self, s: Session, index: float, kind: str, x1, y1, x2, y2):
        s.set_index(int(index))
        return self.view(s, mark_of(kind, x1, y1, x2, y2))

    @user_errors
    def change_window(self, s: Session, window: str, kind: str, x1, y1, x2, y2):
        s.set_window(window)
        return self.view(s, mark_of(kind, x1, y1, x2, y2))

    @user_errors
    def redraw(self, s: Session, kind: str, x1, y1, x2, y2):
        return self.view(s, mark_of(kind, x1, y1, x2, y2))

    @user_errors
    def click(self, s: Session, kind: str, x1, y1, x2, y2, evt: gr.SelectData):
        box = s.click(evt.index)
        if box is not None:
            x1, y1, x2, y2 = box
        return *self.view(s, mark_of(kind, x1, y1, x2, y2)), x1, y1, x2, y2

    @user_errors
    def clear_mark(self, s: Session):
        s.pending = None
        return *self.view(s, None), None, None, None, None

    @user_errors
    def select_finding(self, s: Session, kind: str, x1, y1, x2, y2, evt: gr.SelectData):
        if evt.row_value:
            s.select(int(evt.row_value[0]))
        return self.view(s, mark_of(kind, x1, y1, x2, y2))

    def _run(self, s: Session, progress, mark: Mark | None, task: str, **options) -> tuple:
        """Run `task` on the slice shown; the mark (still drawn on the view) goes to the model only as a visual
        prompt."""
        case = s.case(task, mark=mark if task == "visual_prompt" else None, **options)
        progress(0.1, desc=f"{task}: waiting for the model")
        with self.lock:
            progress(0.3, desc=f"{task}: generating on {self.pipe.device}")
            s.run(self.pipe, case, self.workdir)
        return *self.view(s, mark), *self.results(s)

    @user_errors
    def run_visual_prompt(self, s: Session, kind: str, x1, y1, x2, y2, progress=PROGRESS):
        mark = mark_of(kind, x1, y1, x2, y2)
        if mark is None:
            raise InputError("no region marked: click two opposite corners on the image, or type x1 y1 x2 y2")
        return self._run(s, progress, mark, "visual_prompt")

    @user_errors
    def run_grounded(self, s: Session, kind: str, x1, y1, x2, y2, progress=PROGRESS):
        return self._run(s, progress, mark_of(kind, x1, y1, x2, y2), "grounded", flow="union")

    @user_errors
    def run_per_finding(self, s: Session, kind: str, x1, y1, x2, y2, progress=PROGRESS):
        return self._run(s, progress, mark_of(kind, x1, y1, x2, y2), "grounded", flow="per_finding")

    @user_errors
    def run_text_guided(self, s: Session, question: str, kind: str, x1, y1, x2, y2, progress=PROGRESS):
        if not (question or "").strip():
            raise InputError("no question: type a clinical question (e.g. Evaluate the liver for focal lesions.)")
        return self._run(s, progress, mark_of(kind, x1, y1, x2, y2), "text_guided", prompt=question)

    # ------------------------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="OmniAbnorm-CT viewer", analytics_enabled=False) as page:
            gr.Markdown("## OmniAbnorm-CT viewer" + (f"\n\n**{self.note}**" if self.note else ""))
            state = gr.State(Session())
            with gr.Row(equal_height=True):
                path = gr.Textbox(label="Input path on this computer", scale=4, elem_id="input-path",
                                  placeholder="slice folder, image, DICOM series folder or NIfTI file")
                open_button = gr.Button("Open", scale=1, elem_id="open")
                upload = gr.File(label="…or upload an image, .dcm, .nii(.gz) or a .zip of a folder", scale=2,
                                 file_types=UPLOAD_TYPES, type="filepath", height=150, elem_id="upload")
            with gr.Row():
                with gr.Column(scale=3):
                    image = gr.Image(label="Slice", show_label=False, type="numpy", format="png", interactive=False,
                                     buttons=["fullscreen"], elem_id="view")
                    index = gr.Slider(0, 1, value=0, step=1, label="Slice", interactive=False, elem_id="slice")
                    with gr.Row():
                        plane = gr.Radio(list(PLANES), value=None, label="Plane (volumes)", interactive=False,
                                         elem_id="plane")
                        window = gr.Dropdown(list(WINDOW_PRESETS), value="abdomen", allow_custom_value=True,
                                             label="Window: preset or level,width (HU)", interactive=False,
                                             elem_id="window")
                    # Below the image: its changing length must not move the image between two clicks.
                    info = gr.Markdown(self.status(Session()), elem_id="info")
                with gr.Column(scale=2):
                    gr.Markdown("**Describe a marked region** (visual prompt): click two opposite corners on the "
                                "slice, or type them")
                    kind = gr.Radio(list(MARK_KINDS), value="bbox", label="Shown to the model as", elem_id="kind")
                    with gr.Row():
                        corners = [gr.Number(label=n, precision=0, minimum=0, elem_id=f"mark-{n}", min_width=60)
                                   for n in ("x1", "y1", "x2", "y2")]
                    with gr.Row():
                        describe = gr.Button("Describe marked region", variant="primary", elem_id="describe")
                        clear = gr.Button("Clear mark", elem_id="clear-mark")
                    gr.Markdown("**Find abnormalities** (grounded, text-guided)")
                    with gr.Row():
                        grounded = gr.Button("Grounded report", elem_id="grounded")
                        per_finding = gr.Button("Grounded, per finding", elem_id="per-finding")
                    question = gr.Textbox(label="Clinical question", elem_id="question",
                                          placeholder="Evaluate the liver for focal lesions.")
                    ask = gr.Button("Ask (text-guided)", elem_id="ask")
                    text = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="report-text")
            table = gr.Dataframe(headers=list(FINDING_COLUMNS), label="Findings: click a row to highlight it",
                                 interactive=False, wrap=True, elem_id="findings")
            files = gr.File(label="Downloads: report.json, overlay.png, finding masks", file_count="multiple",
                            interactive=False, elem_id="downloads")

            view_out = [state, image, info]
            loaded_out = [*view_out, index, plane, window, text, table, files, *corners]
            result_out = [*view_out, text, table, files]
            mark_in = [kind, *corners]
            quiet = dict(show_progress="hidden", trigger_mode="always_last")

            open_button.click(self.open_path, [state, path], loaded_out)
            path.submit(self.open_path, [state, path], loaded_out)
            upload.upload(self.open_upload, [state, upload], [path, *loaded_out])
            plane.input(self.change_plane, [state, plane], loaded_out)
            index.input(self.change_slice, [state, index, *mark_in], view_out, **quiet)
            window.input(self.change_window, [state, window, *mark_in], view_out, **quiet)
            for control in mark_in:
                control.input(self.redraw, [state, *mark_in], view_out, **quiet)
            image.select(self.click, [state, *mark_in], [*view_out, *corners], show_progress="hidden")
            clear.click(self.clear_mark, [state], [*view_out, *corners])
            table.select(self.select_finding, [state, *mark_in], view_out, show_progress="hidden")
            describe.click(self.run_visual_prompt, [state, *mark_in], result_out)
            grounded.click(self.run_grounded, [state, *mark_in], result_out)
            per_finding.click(self.run_per_finding, [state, *mark_in], result_out)
            ask.click(self.run_text_guided, [state, question, *mark_in], result_out)
            question.submit(self.run_text_guided, [state, question, *mark_in], result_out)
            if self.initial is not None:
                page.load(self.open_initial, [state], [path, *loaded_out])
        return page
