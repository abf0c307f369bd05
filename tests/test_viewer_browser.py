"""`python app.py --demo` driven in a real browser (Playwright + the system Chromium): the demo case loads, two clicks
mark a box that gets described, the grounded report lists findings, clicking a finding paints its mask in the
highlight colour (checked on screenshot pixels), an input problem shows one message, and the page fetches nothing
from outside this machine.

Needs /usr/bin/chromium (CI installs it: .ci/run); skipped without it.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.report import rle_to_mask
from tests.helpers import REPO
from tests.test_viewer import is_highlight

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_SECONDS = 180  # imports and the demo model on a busy 2-core CI machine
RUN_MS = 120_000  # one generation on the same machine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is absent (apt-get install "
                                                                "chromium; CI installs it)")]


def required(module: str):
    """Import a package of requirements.txt; missing, the test errors (a skip would hide it from CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{err}: install the pinned requirements (pip install -r requirements.txt)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py --demo` on a free port → (its URL, the process); its console output is in the log file."""
    required("gradio")
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port), "--device", "cpu",
                                 "--max-new-tokens", "64"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_SECONDS
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {START_SECONDS} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def outside() -> list[str]:
    """URLs the page requested from anything but the app."""
    return []


@pytest.fixture(scope="module")
def page(server, outside):
    url, _ = server
    sync_api = required("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1400})
        tab.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
        tab.goto(url)
        tab.locator("#view img").wait_for(timeout=60_000)
        tab.wait_for_function("() => document.querySelector('#info').innerText.includes('Demo case')")
        yield tab
        browser.close()


class View:
    """The slice image on the page: natural size (the view, `scale` × the slice) and where it is drawn."""

    def __init__(self, page):
        self.img = page.locator("#view img")
        self.measure()

    def measure(self) -> None:
        box = self.img.bounding_box()
        nw, nh = self.img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        self.ratio = min(box["width"] / nw, box["height"] / nh, 1.0)  # object-fit: contain, never enlarged
        self.left = box["x"] + (box["width"] - nw * self.ratio) / 2
        self.top = box["y"] + (box["height"] - nh * self.ratio) / 2
        self.scale = nw // 64  # the demo slice is 64 × 64

    def page_xy(self, x: int, y: int) -> tuple[float, float]:
        """Slice pixel → page coordinates of its centre (measured anew: the page may have moved)."""
        self.measure()
        return (self.left + (x * self.scale + self.scale / 2) * self.ratio,
                self.top + (y * self.scale + self.scale / 2) * self.ratio)

    def pixels(self) -> tuple[np.ndarray, float, float]:
        """Screenshot of the image element → (RGB array, x and y offset of the drawn image inside it)."""
        shot = np.asarray(Image.open(io.BytesIO(self.img.screenshot())).convert("RGB"))
        box = self.img.bounding_box()
        return shot, self.left - box["x"], self.top - box["y"]


def report_text(page) -> str:
    return page.locator("#report-text textarea").input_value()


def wait_report(page, prefix: str) -> str:
    page.wait_for_function(f"() => document.querySelector('#report-text textarea').value.startsWith({prefix!r})",
                           timeout=RUN_MS)
    return report_text(page)


def downloaded_report(page) -> dict:
    links = page.locator("#downloads a")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    href = next(h for h in hrefs if h and h.endswith("report.json"))
    return json.loads(page.request.get(href).body())


def test_demo_page_marks_describes_finds_and_highlights(page):
    view = View(page)
    assert view.ratio > 0.5, "the slice is drawn too small to click precisely"
    info = page.inner_text("#info")
    assert "nifti" in info and "window abdomen" in info and "Demo case: synthetic phantom" in info
    key = int(re.search(r"axial slice (\d+) of 0\.\.", info).group(1))

    # Two clicks → a box in the number fields → described by the model.
    page.mouse.click(*view.page_xy(20, 20))
    page.wait_for_function("() => document.querySelector('#info').innerText.includes('first corner at [20, 20]')")
    page.mouse.click(*view.page_xy(40, 36))
    page.wait_for_function("() => document.querySelector('#mark-y2 input').value === '36'")
    corners = [page.locator(f"#mark-{n} input").input_value() for n in ("x1", "y1", "x2", "y2")]
    assert corners == ["20", "20", "40", "36"]
    page.click("#describe")
    text = wait_report(page, "[visual_prompt")
    assert len(text.splitlines()[1].strip()) > 10  # the model's description, after the header line
    described = downloaded_report(page)
    assert described["visual_prompt"] == {"kind": "bbox", "box_xyxy": [20, 20, 40, 36]}
    assert described["input"]["slice_index"] == key

    # Grounded: findings listed with measurements; nothing highlighted yet.
    page.click("#clear-mark")
    page.wait_for_function("() => document.querySelector('#mark-x1 input').value === ''")
    page.click("#grounded")
    wait_report(page, "[grounded, union")
    report = downloaded_report(page)
    findings = [f for f in report["findings"] if f["mask_rle"]]
    assert findings, "the demo model found nothing on the demo case"
    rows = page.locator("#findings div.virtual-row")
    assert rows.count() == len(report["findings"])
    first = rows.nth(0).inner_text().split("\n")
    assert first[0] == "1" and first[3].endswith("mm²") and first[4].endswith(" mm") and "±" in first[5]
    before, _, _ = view.pixels()
    assert not is_highlight(before).any()

    # Click finding 1's row: its mask turns the highlight colour, nothing else does.
    src = view.img.get_attribute("src")
    page.locator('#findings [data-testid="cell-0-1"]').click()
    page.wait_for_function(f"() => document.querySelector('#view img').src !== {json.dumps(src)}", timeout=30_000)
    shot, dx, dy = view.pixels()
    target = findings[0]
    mask = rle_to_mask(target["mask_rle"])
    ys, xs = np.nonzero(mask)
    sample_x = np.rint(dx + (xs * view.scale + view.scale / 2) * view.ratio).astype(int)
    sample_y = np.rint(dy + (ys * view.scale + view.scale / 2) * view.ratio).astype(int)
    assert is_highlight(shot[sample_y, sample_x]).mean() > 0.9
    lit_y, lit_x = np.nonzero(is_highlight(shot))
    x1, y1, x2, y2 = target["box_xyxy"]
    margin = 3
    assert lit_x.min() >= dx + x1 * view.scale * view.ratio - margin
    assert lit_x.max() <= dx + (x2 + 1) * view.scale * view.ratio + margin
    assert lit_y.min() >= dy + y1 * view.scale * view.ratio - margin
    assert lit_y.max() <= dy + (y2 + 1) * view.scale * view.ratio + margin


def test_input_problem_shows_one_message_and_keeps_the_page(page):
    page.locator("#input-path textarea, #input-path input").first.fill("/nonexistent/ct")
    page.click("#open")
    message = page.get_by_text("/nonexistent/ct does not exist: give the path of a slice folder")
    message.first.wait_for(timeout=30_000)
    body = page.inner_text("body")
    assert "Traceback" not in body and "Error" not in body
    assert page.locator("#view img").is_visible()  # the slice stays on screen
    assert "Demo case" in page.inner_text("#info")


def test_page_fetches_nothing_from_outside(page, outside):
    assert outside == []


def test_stopping_removes_the_temporary_folder(server, page):
    """Last: stops the app. Its temporary folder (the demo volume, uploads, results, Gradio's file copies) goes."""
    _, proc = server
    workdir = Path(re.search(r"(/\S*?omniabnorm-viewer-[^/]+)/", page.inner_text("#info")).group(1))
    assert workdir.is_dir() and any((workdir / "gradio").iterdir())
    proc.terminate()  # SIGTERM, as `kill` sends
    assert proc.wait(timeout=60) == 0
    assert not workdir.exists()
