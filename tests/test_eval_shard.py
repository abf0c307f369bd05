"""Prediction sharded over ranks: disjoint shares that cover every item, per-shard resume, a merge identical to one
process; and the real thing, torchrun with gloo on CPU and the demo checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dataset.phantom import write_phantom
from evaluation.predict import PREDICTIONS, load_items, merge_shards, pending, predict, shard_path
from tests.helpers import REPO


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("shard") / "data", n=10, seed=0, size=64, valid_fraction=0.5)


@pytest.fixture(scope="module")
def items(phantom):
    items = load_items(phantom, ["axial", "coronal", "sagittal"], ["visual_prompt", "grounded", "text_guided"],
                       ["bbox", "cropped"], "union")
    assert len(items) >= 10
    return items


class _EchoPipeline:
    """Stands in for OmniAbnormPipeline: the answer depends on the case alone, so any split gives the same lines."""

    batch_size = 2

    def __init__(self):
        self.calls = []

    def run(self, cases, ids):
        self.calls += [c.input for c in cases]
        return [SimpleNamespace(text=f"answer {c.task} {c.input} {c.prompt}", refusal=False,
                                flow=c.flow if c.task == "grounded" else None, generation={"seg_tokens": 1},
                                timing={"batch_seconds": 1.0, "batch_cases": len(cases)},
                                findings=[SimpleNamespace(mask=self._mask(c), text=None)]) for c in cases]

    @staticmethod
    def _mask(case) -> np.ndarray:
        mask = np.zeros((64, 64), bool)
        mask[:4, :len(case.input + (case.prompt or "")) % 50 + 1] = True  # one per case: a mixed-up line would show
        return mask


def _lines(path: Path) -> list[dict]:
    """Prediction lines without the timing (the only field that depends on the run and its batches)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def _run_ranks(items, out: Path, world_size: int, ranks=None) -> None:
    merge_shards(out, items)
    for rank in range(world_size) if ranks is None else ranks:
        list(predict(_EchoPipeline(), items, out, progress=False, rank=rank, world_size=world_size))
    merge_shards(out, items)


def test_shares_are_round_robin_disjoint_and_cover_everything(items, tmp_path):
    for world_size in (1, 2, 3, 5):
        shares = [[it.key for it in pending(items, tmp_path, r, world_size)[1]] for r in range(world_size)]
        assert shares == [[it.key for it in items[r::world_size]] for r in range(world_size)]
        every = [key for share in shares for key in share]
        assert sorted(every) == sorted(it.key for it in items) and len(set(every)) == len(items)
    path, _ = pending(items, tmp_path, 1, 3)
    assert path == tmp_path / "predictions.rank1of3.jsonl" == shard_path(tmp_path, 1, 3)
    assert pending(items, tmp_path)[0] == tmp_path / PREDICTIONS


def test_merged_shards_equal_one_process_run(items, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    list(predict(_EchoPipeline(), items, one, progress=False))
    reference = _lines(one / PREDICTIONS)
    assert [line["key"] for line in reference] == [it.key for it in items]
    for world_size in (2, 3):
        out = tmp_path / f"n{world_size}"
        out.mkdir()
        _run_ranks(items, out, world_size)
        assert _lines(out / PREDICTIONS) == reference
        assert not list(out.glob("predictions.rank*"))  # shards folded in, then deleted


def test_a_restarted_rank_skips_what_it_wrote(items, tmp_path):
    rank1 = _EchoPipeline()
    run = predict(rank1, items, tmp_path, progress=False, rank=1, world_size=2)
    for _ in range(3):  # rank 1 dies after 3 of its 8 items (its second batch half written) ...
        next(run)
    run.close()
    shard = shard_path(tmp_path, 1, 2)
    with shard.open("a") as file:  # ... in the middle of a line
        file.write('{"key": "grounded/axial/x", "te')
    _, todo = pending(items, tmp_path, 1, 2)
    assert [it.key for it in todo] == [it.key for it in items[1::2][3:]] and shard.read_text().endswith("\n")
    again = _EchoPipeline()
    list(predict(again, items, tmp_path, progress=False, rank=1, world_size=2))
    assert len(again.calls) == len(items[1::2]) - 3
    list(predict(_EchoPipeline(), items, tmp_path, progress=False, rank=0, world_size=2))
    merge_shards(tmp_path, items)
    keys = [line["key"] for line in _lines(tmp_path / PREDICTIONS)]
    assert keys == [it.key for it in items]


def test_leftover_shards_of_another_world_size_are_folded_in_first(items, tmp_path):
    # a 3-process run crashed: rank 0 had written 2 items, rank 2 one; now 2 processes resume
    for rank, count in ((0, 2), (2, 1)):
        run = predict(_EchoPipeline(), items, tmp_path, progress=False, rank=rank, world_size=3)
        for _ in range(count):
            next(run)
        run.close()
    merge_shards(tmp_path, items)  # rank 0, before the barrier
    finished = {items[0].key, items[3].key, items[2].key}
    assert {line["key"] for line in _lines(tmp_path / PREDICTIONS)} == finished
    assert not list(tmp_path.glob("predictions.rank*"))
    rest = [it for it in items if it.key not in finished]
    assert [it.key for it in pending(items, tmp_path, 1, 2)[1]] == [it.key for it in rest[1::2]]
    _run_ranks(items, tmp_path, 2)
    assert [line["key"] for line in _lines(tmp_path / PREDICTIONS)] == [it.key for it in items]


# ------------------------------------------------------------------------------ torchrun, gloo, demo checkpoint

_DEMO = ("--device", "cpu", "--planes", "axial", "--limit", "2", "--types", "bbox", "--max-new-tokens", "24",
         "--batch-size", "1")


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "evaluation", "run", *map(str, args)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def one_process(phantom, tmp_path_factory) -> list[dict]:
    """The reference: `python -m evaluation run --predict-only` in one process (5 items: both samples, all tasks)."""
    out = tmp_path_factory.mktemp("one") / "out"
    result = subprocess.run([sys.executable, "-m", "evaluation", "run", REPO / "checkpoint" / "demo", phantom, out,
                             *_DEMO, "--predict-only"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _lines(out / PREDICTIONS)
    assert len(lines) == 5 and {line["task"] for line in lines} == {"visual_prompt", "grounded", "text_guided"}
    return lines


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(phantom, one_process, tmp_path):
    out = tmp_path / "out"
    result = _torchrun(REPO / "checkpoint" / "demo", phantom, out, *_DEMO, "--predict-only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _lines(out / PREDICTIONS) == one_process
    assert sorted(p.name for p in out.iterdir()) == [PREDICTIONS, "predictions.meta.json"]
    assert result.stdout.count("items predicted") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_evaluation_sh_gpus_2_resumes_a_crashed_shard_and_scores(phantom, one_process, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # rank 1 of 2 had written its first item (marked, to see it is not predicted again), then died mid-line
    written = {**one_process[1], "seconds": 0.5, "text": "written before the crash"}
    shard_path(out, 1, 2).write_text(json.dumps(written) + '\n{"key": "text_guided/ax')
    result = subprocess.run(["bash", REPO / "evaluation.sh", REPO / "checkpoint" / "demo", phantom, out, "--gpus",
                             "2", *_DEMO, "--model-metrics", "--no-plots"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _lines(out / PREDICTIONS)
    assert [line["key"] for line in lines] == [line["key"] for line in one_process]
    assert lines[1]["text"] == "written before the crash"  # skipped, not predicted again
    assert lines[:1] + lines[2:] == one_process[:1] + one_process[2:]
    assert not list(out.glob("predictions.rank*"))
    assert result.stdout.count(f"results in {out}/") == 1  # rank 0 scores and says where
    assert len((out / "scores.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "summary.json").read_text())["seg_grid"] == "512"


def test_evaluation_sh_refuses_a_bad_gpus_value(tmp_path):
    for bad in (["--gpus", "0"], ["--gpus=two"], ["--gpus"]):
        result = subprocess.run(["bash", REPO / "evaluation.sh", "ckpt", "data", tmp_path / "out", *bad], env=_env(),
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error: --gpus") and not result.stdout
    assert not (tmp_path / "out").exists()
