"""bench/perf_bench.py: the table it prints and writes, and a `--tiny` run end to end (the GPU run's code on CPU)."""

from __future__ import annotations

import json

import pytest

from bench.perf_bench import ROWS, blocks_compiled, complete, main, markdown_table


def test_table_has_ratios_and_percent_of_limit():
    rows = complete({"decode_b1_tokens_per_s": {"stock": 12.0, "ours": 165.0},
                     "grounded_b1_s_per_case": {"stock": 1.0, "ours": 0.25},
                     "cpu_ms_per_sample": {"stock": None, "ours": 14.0}})
    assert rows["decode_b1_tokens_per_s"]["ratio"] == 13.75
    assert rows["decode_b1_tokens_per_s"]["pct_of_limit"] == 75.0  # of 220 tokens/s
    assert rows["grounded_b1_s_per_case"]["ratio"] == 0.25 and rows["grounded_b1_s_per_case"]["pct_of_limit"] is None
    assert markdown_table(rows).splitlines() == [
        "| what | unit | stock | ours | ours / stock | % of H100 limit | target |",
        "|---|---|---|---|---|---|---|",
        "| decode, batch 1 | tokens/s | 12 | 165 | 13.8 (higher is better) | 75 | ≥ 150 |",
        "| grounded report, batch 1 | s/case | 1 | 0.25 | 0.25 (lower is better) | — | ≤ 0.25 |",
        "| CPU per prepared training sample (1 core) | ms | — | 14 | — | — | < 20 |",
    ]


def test_a_failing_compiled_trial_is_recorded_and_the_blocks_run_eagerly_again(tiny):
    """The CUDA-only compiled timings: an error inside is recorded in the checks, not raised, and compilation is
    undone either way (the stock path measured after must not run compiled blocks)."""
    vlm = tiny[0].vlm
    blocks = [*vlm.model.language_model.layers, *vlm.model.visual.blocks]
    checks = {}
    with blocks_compiled(vlm, checks, "train"):
        assert all(block._compiled_call_impl is not None for block in blocks)
        raise RuntimeError("no kernel for this")
    assert checks == {"train_compiled_error": "RuntimeError: no kernel for this"}
    assert all(block._compiled_call_impl is None for block in blocks)
    with blocks_compiled(vlm, checks, "vision"):
        checks["vision_images_per_s_ours_compiled"] = 1.0
    assert "vision_compiled_error" not in checks and all(block._compiled_call_impl is None for block in blocks)


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, capsys):
    """Every section on the tiny model (about a minute on a busy 2-core CPU); a later partial run keeps the rows."""
    out = tmp_path / "perf.json"
    assert main(["--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data["rows"]) == set(ROWS) and data["meta"]["scale"] == "tiny"
    for key, row in ROWS.items():
        assert f"| {row.what} | {row.unit} |" in printed and f"| {row.what} |" in data["table"]
        measured = data["rows"][key]
        if key.startswith(("train_mfu", "train_peak")):  # CUDA only
            assert measured["stock"] is None and measured["ours"] is None
        elif key == "cpu_ms_per_sample":
            assert measured["stock"] is None and measured["ours"] > 0
        else:
            assert measured["stock"] > 0 and measured["ours"] > 0
            assert measured["ratio"] == pytest.approx(measured["ours"] / measured["stock"])
    checks = data["checks"]
    assert checks["vision_max_abs_diff"] < 1e-4 and checks["linear_ce_abs_diff"] < 1e-4
    assert checks["packed_loss_abs_diff"] < 1e-4 and checks["train_samples_per_s_ours_packed"] > 0
    assert checks["decode_greedy_tokens_equal"] and checks["grounded_reports_equal"]
    assert checks["grounded_continued_max_abs_score_diff"] < 1e-4 and checks["grounded_score_abs_max"] > 0

    assert main(["--tiny", "--only", "data", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert set(again["rows"]) == set(ROWS)
    assert again["rows"]["vision_images_per_s"] == data["rows"]["vision_images_per_s"]


def test_data_bench_times_the_worker_handover():
    """bench/data_bench.py with --handover: every record task gets its prepare, finish, handover and receive times
    (batches of 2 through a real DataLoader worker)."""
    from bench.data_bench import time_samples

    times = time_samples(n=4, size=64, repeats=1, seg_size=64, image_pixels=56 * 56, handover=True, batch_size=2)
    assert len(times) == 6
    for ms in times.values():
        assert set(ms) == {"prepare", "finish", "handover", "receive"} and all(v > 0 for v in ms.values())
