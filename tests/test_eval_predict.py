"""Benchmark items from the phantom, resumable prediction, and the end-to-end evaluation.sh on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dataset.phantom import write_phantom
from evaluation.predict import PREDICTIONS, load_items, predict, read_done
from tests.helpers import REPO


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("eval") / "data", n=10, seed=0, size=64, valid_fraction=0.5)


def test_items_cover_the_three_benchmarks(phantom):
    items = load_items(phantom, ["axial", "coronal", "sagittal"], ["visual_prompt", "grounded", "text_guided"],
                       ["bbox", "cropped"], "union")
    valid = {p: json.loads((phantom / p / f"{p}_valid.json").read_text()) for p in ("axial", "coronal", "sagittal")}
    samples = [(p, sid, d) for p, data in valid.items() for sid, d in data.items()]
    abnormalities = sum(len(d.get("abnormality", [])) for _, _, d in samples)
    by_task = {t: [i for i in items if i.task == t] for t in ("visual_prompt", "grounded", "text_guided")}
    assert len(by_task["visual_prompt"]) == 2 * abnormalities
    assert len(by_task["grounded"]) == len(samples)
    groups = sum(len(d.get("abnormality_group", {})) for _, _, d in samples)
    abnormal = sum(bool(d.get("abnormality")) for _, _, d in samples)
    assert len(by_task["text_guided"]) == groups + abnormal  # one positive per group, one negative per sample
    assert len({i.key for i in items}) == len(items)
    vp = by_task["visual_prompt"][0]
    assert Path(vp.case["input"]).is_file() and vp.case["mark"] == vp.prompt_type
    normal = [i for i in by_task["grounded"] if not i.abn_ids]
    assert all(i.reference == "I don't see any abnormalities on the image." for i in normal)


class _FakePipeline:
    """Stands in for OmniAbnormPipeline: echoes the case, counts what it was asked to run."""

    batch_size = 2

    def __init__(self):
        self.calls = []

    def run(self, cases, ids):
        self.calls += [c.input for c in cases]
        mask = np.zeros((64, 64), bool)
        mask[:4, :4] = True
        return [SimpleNamespace(text=f"answer {c.task}", refusal=False, flow=c.flow if c.task == "grounded" else None,
                                generation={"seg_tokens": 1}, timing={"batch_seconds": 1.0, "batch_cases": len(cases)},
                                findings=[SimpleNamespace(mask=mask, text=None)]) for c in cases]


def test_resume_after_interrupted_prediction(phantom, tmp_path):
    items = load_items(phantom, ["axial"], ["grounded", "text_guided"], [], "union")
    assert len(items) >= 5
    first = _FakePipeline()
    run = predict(first, items, tmp_path, progress=False)
    for _ in range(3):  # two batches start; the process "dies" after the third line (batch 2 half-consumed)
        next(run)
    run.close()
    with (tmp_path / PREDICTIONS).open("a") as file:  # and a crash mid-write left half a line
        file.write('{"key": "grounded/axial/x", "te')
    done = read_done(tmp_path / PREDICTIONS)
    assert len(done) == 3 and (tmp_path / PREDICTIONS).read_text().endswith("\n")  # the torn line is cut off

    second = _FakePipeline()
    lines = list(predict(second, items, tmp_path, progress=False))
    assert len(second.calls) == len(items) - 3 and len(lines) == len(items) - 3
    keys = [json.loads(line)["key"] for line in (tmp_path / PREDICTIONS).read_text().splitlines()]
    assert sorted(keys) == sorted(i.key for i in items)  # every item exactly once
    assert list(predict(_FakePipeline(), items, tmp_path, progress=False)) == []  # a finished run predicts nothing


def test_damaged_middle_line_is_refused(tmp_path):
    from dataset.ct import InputError

    (tmp_path / PREDICTIONS).write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(InputError, match="line 2"):
        read_done(tmp_path / PREDICTIONS)


def _evaluation(*args, cwd=REPO):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(REPO / "evaluation.sh"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_bad_data_root_is_one_clear_error(tmp_path):
    result = _evaluation(REPO / "checkpoint" / "demo", tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no validation file under") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluation_sh_on_phantom_with_demo_checkpoint(phantom, tmp_path):
    out = tmp_path / "out"
    # the first two axial samples of this phantom: one normal, one with a finding → 6 items, every task
    args = (REPO / "checkpoint" / "demo", phantom, out, "--device", "cpu", "--planes", "axial", "--limit", "2",
            "--types", "bbox", "cropped", "--max-new-tokens", "24", "--model-metrics")
    result = _evaluation(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = (out / PREDICTIONS).read_text().splitlines()
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == len(predictions) > 0
    tasks = {s["task"] for s in scores}
    assert tasks == {"visual_prompt", "grounded", "text_guided"}
    for s in scores:
        assert s["bertscore"] is None and 0.0 <= s["bleu1"] <= 100.0
        if s["task"] != "visual_prompt":
            assert s["dice"] is not None and 0.0 <= s["dice"] <= 100.0
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("task,variant,average,n,categories,bleu1")
    assert any(r.startswith("visual_prompt,max_over_types,sample,") for r in csv_rows)
    assert "results in" in result.stdout and "| grounded | union | sample |" in (out / "summary.md").read_text()
    from openpyxl import load_workbook

    sheet = load_workbook(out / "summary.xlsx")["summary"]
    assert [c.value for c in sheet[1]][:5] == ["task", "variant", "average", "n", "bleu1"]
    assert sheet.max_row == len(csv_rows)
    assert (out / "plots" / "visual_prompt_types.png").stat().st_size > 1000
    assert (out / "plots" / "categories_grounded_union.png").is_file()

    again = _evaluation(*args)  # resume: nothing left to predict, same predictions, same scores
    assert again.returncode == 0
    assert (out / PREDICTIONS).read_text().splitlines() == predictions
    assert [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()] == scores

    fast = _evaluation(*args[:2], tmp_path / "fast", *args[3:], "--fast")  # the fast decode paths: same predictions
    assert fast.returncode == 0, fast.stderr[-2000:]
    timeless = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in predictions]
    assert [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (tmp_path / "fast" / PREDICTIONS).read_text().splitlines()] == timeless
