"""`python inference.py`: outputs on disk, batch runs, --demo, and bad input → one clear error, no output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import cli
from inference.pipeline import OmniAbnormPipeline
from model.checkpoint import CheckpointError, save_checkpoint
from model.omniabnorm import build_model
from model.tiny import tiny_model_config
from tests.helpers import FIXTURE, REPO, requires_shared
from tests.test_inference import one_thread, validate_report  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def checkpoint(tiny_base, tmp_path_factory) -> Path:
    """A tiny checkpoint in our format that bundles its base model (as checkpoint/demo/ does)."""
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(tiny_model_config(tiny_base))
    ckpt = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")
    shutil.copytree(tiny_base, ckpt / "base_model")
    return ckpt


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "slice.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """stderr lines other than the loading progress (one 'error:' line expected)."""
    return [line for line in err.splitlines() if not line.startswith(("loading ", "loaded in "))]


def test_single_case_writes_report_overlay_and_prints_text(capsys, checkpoint, image, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--input", image, "--checkpoint", checkpoint, "--out", out,
                                "--max-new-tokens", 4, "--device", "cpu")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["task"] == "grounded" and report["flow"] == "union" and report["case_id"] == "slice"
    assert report["model"]["checkpoint"] == str(checkpoint)
    assert report["model"]["base_model"] == str(checkpoint / "base_model")  # the bundled base is found
    assert Image.open(out / "overlay.png").size == (512, 384)
    assert stdout.startswith("[slice] grounded (union)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left

    # Running again replaces our earlier results.
    code, _, err = run_cli(capsys, "--input", image, "--checkpoint", checkpoint, "--out", out, "--task", "vqa",
                           "--prompt", "Which organ?", "--max-new-tokens", 2)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["task"] == "vqa"


def test_fast_decoding_gives_the_same_report(capsys, checkpoint, image, tmp_path):
    reports = []
    for name, extra in (("plain", ()), ("fast", ("--fast",))):
        code, _, err = run_cli(capsys, "--input", image, "--checkpoint", checkpoint, "--out", tmp_path / name,
                               "--max-new-tokens", 12, "--device", "cpu", *extra)
        assert code == 0, err
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    plain, fast = reports
    assert fast["rounds"] == plain["rounds"] and fast["text"] == plain["text"]
    assert [f["mask_rle"] for f in fast["findings"]] == [f["mask_rle"] for f in plain["findings"]]


def test_batch_from_txt_and_json(capsys, checkpoint, image, tmp_path):
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{image}\n{image}\n")
    code, stdout, err = run_cli(capsys, "--input", listing, "--checkpoint", checkpoint, "--out", tmp_path / "a",
                                "--max-new-tokens", 2, "--batch-size", 2)
    assert code == 0, err
    assert "[slice] grounded (union)" in stdout and "[slice_2] grounded (union)" in stdout
    index = json.loads((tmp_path / "a" / "batch.json").read_text())
    assert [c["case_id"] for c in index["cases"]] == ["slice", "slice_2"]
    for case in index["cases"]:
        validate_report(json.loads((tmp_path / "a" / case["folder"] / "report.json").read_text()))

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"input": str(image), "id": "boxed", "box": [5, 5, 20, 20]},
                                 {"input": str(image), "id": "question", "prompt": "Is the liver normal?"}]))
    code, _, err = run_cli(capsys, "--input", cases, "--checkpoint", checkpoint, "--out", tmp_path / "b",
                                "--max-new-tokens", 2)
    assert code == 0, err
    tasks = {c: json.loads((tmp_path / "b" / c / "report.json").read_text())["task"] for c in ("boxed", "question")}
    assert tasks == {"boxed": "visual_prompt", "question": "text_guided"}


@pytest.mark.parametrize("extra, message", [
    (["--input", "missing.png"], "missing.png does not exist"),
    (["--input", "{image}", "--box", "0", "0", "100", "10"], "box [0, 0, 100, 10] lies outside the 64×48 image"),
    (["--input", "{image}", "--task", "text_guided"], "needs a question"),
    (["--input", "{image}", "--ellipse", "1", "2"], "--ellipse needs cx cy a b"),
    (["--input", "{image}", "--window", "lung"], "not HU"),
])
def test_bad_input_is_one_error_line_and_no_output(capsys, checkpoint, image, tmp_path, extra, message):
    args = [a.replace("{image}", str(image)) for a in extra]
    code, _, err = run_cli(capsys, *args, "--checkpoint", checkpoint, "--out", tmp_path / "out",
                                "--max-new-tokens", 2)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_wrong_checkpoints_are_clear_errors(capsys, image, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for ckpt, message in ((tmp_path / "nowhere", "does not exist"), (empty, "is not an OmniAbnorm-CT checkpoint")):
        code, _, err = run_cli(capsys, "--input", image, "--checkpoint", ckpt, "--out", tmp_path / "out")
        assert code == 2 and message in error_lines(err)[0]
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_the_wrong_shape_is_refused(capsys, checkpoint, image, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    meta = json.loads((broken / "omniabnorm.json").read_text())
    meta["model"]["seg"]["d_model"] = 16  # the stored segmentation tensors no longer fit
    (broken / "omniabnorm.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "--input", image, "--checkpoint", broken, "--out", tmp_path / "out")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "size mismatch for" in lines[0]
    assert not (tmp_path / "out").exists()


@requires_shared
def test_released_layout_needs_a_base_model_and_its_seg_module(capsys, image, tmp_path):
    released = tmp_path / "released"
    shutil.copytree(FIXTURE, released, ignore=shutil.ignore_patterns("base_model"))
    code, _, err = run_cli(capsys, "--input", image, "--checkpoint", released, "--out", tmp_path / "out")
    assert code == 2 and "needs --base-model" in error_lines(err)[0]
    # With its base: the fixture's empty `seg_model` cannot fill the 7B segmentation module → a clear error.
    with pytest.raises(CheckpointError, match="segmentation module"):
        OmniAbnormPipeline.from_checkpoint(released, FIXTURE / "base_model", device="cpu")


def test_out_folder_with_other_files_is_refused(capsys, checkpoint, image, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--input", image, "--checkpoint", checkpoint, "--out", tmp_path)
    assert code == 2 and "holds other files" in error_lines(err)[0]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_without_checkpoint_says_how_to_make_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", tmp_path / "demo")
    code, _, err = run_cli(capsys, "--demo")
    assert code == 1 and "demo checkpoint is missing" in err and "configs/phantom_tiny.yaml" in err
    assert len(err.strip().splitlines()) == 1


def test_demo_runs_a_phantom_case(capsys, monkeypatch, checkpoint, tmp_path):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", checkpoint)
    code, stdout, err = run_cli(capsys, "--demo", "--out", tmp_path / "demo", "--max-new-tokens", 4)
    assert code == 0, err
    assert stdout.count("DEMONSTRATION MODEL") == 2 and "demo case: synthetic phantom" in stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    validate_report(report)
    assert report["input"]["kind"] == "nifti" and report["input"]["is_hu"]
    assert report["preprocessing"]["window"]["name"] == "abdomen"


@pytest.mark.slow
def test_entry_script_in_a_fresh_process(tmp_path):
    """The real entry point: bad input → exit 2, one line on stderr, no traceback; --help works."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "inference.py", "--input", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path)]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: input {tmp_path / 'nope.png'} does not exist"]
    help_text = subprocess.run([sys.executable, "inference.py", "--help"], check=False, cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--demo" in help_text.stdout
