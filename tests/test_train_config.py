"""Run config: the shipped YAML files, key=value overrides, clear errors (exit 2, no traceback), the lr schedule."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

from model.config import ConfigError
from tests.helpers import REPO
from training.config import RELEASED_QUOTAS, load_config
from training.loop import hard_dice, lr_factor

SHIPPED = ["train.yaml", "train_from_scratch.yaml", "configs/seg_pretrain.yaml", "configs/visual_prompt_stage.yaml",
           "configs/phantom_tiny.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / name)
    assert cfg.output_dir and not cfg.output_dir.startswith("/")
    assert not cfg.model.base_model.startswith("/") and not cfg.data.root.startswith("/")


def test_released_recipe():
    cfg = load_config(REPO / "train.yaml")
    assert cfg.global_batch_size == 32 == cfg.micro_batch_size * cfg.grad_accumulation * 8
    assert cfg.data.tasks == RELEASED_QUOTAS
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.grad_clip, cfg.optim.schedule) == (2e-4, 0.05, 0.3, "cosine")
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (32, 16, 0.05)
    assert cfg.model.released_checkpoint and cfg.parallel == "ddp" and cfg.precision == "auto"


def test_overrides_are_typed_and_dotted():
    cfg = load_config(REPO / "configs/phantom_tiny.yaml", [
        "output_dir=runs/x", "max_steps=6", "resume_from=runs/y", "model.train_language_model=false",
        "model.lora={r: 4, alpha: 8}", "model.lora.r=8", "data.tasks.grounding=5",
        "optim.betas=[0.8, 0.9]", "data.phantom=null", "data.root=data/x", "eval_every=0"])
    assert (cfg.output_dir, cfg.max_steps, cfg.resume_from) == ("runs/x", 6, "runs/y")
    assert cfg.model.lora.r == 8 and cfg.data.tasks["grounding"] == 5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.phantom is None and cfg.data.tasks["visual_prompt"] == 160  # other quotas kept
    assert load_config(None, ["data.root=d"]).model.lora.r == 32  # no file: all defaults


@pytest.mark.parametrize("overrides, message", [
    (["max_step=5"], "unknown key(s) in config: max_step"),
    (["model.lora={rank: 4}"], "unknown key(s) in config.model.lora: rank"),
    (["max_steps=six"], "config.max_steps must be int, got 'six'"),
    (["optim.lr=1e-3"], "config.optim.lr must be float, got '1e-3'"),  # YAML 1.1: 1e-3 is a string, 1.0e-3 a float
    (["parallel=zero3"], "parallel must be ddp or fsdp"),
    (["max_steps"], "must look like key=value"),
    (["data.tasks.segmentation=5"], "unknown task 'segmentation'"),
    (["data.tasks={grounding: 0}"], "at least one task needs a quota > 0"),
    (["data.phantom=null"], "data.root is empty"),
    (["data.finish_on=gpu"], "data.finish_on must be 'device' or 'worker', got 'gpu'"),
    (["model.lora={r: 4}"], "set model.lora: null"),  # the phantom config trains the whole language model
    (["micro_batch_size=0"], "micro_batch_size must be ≥ 1"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1)"),
    (["init_from=a", "resume_from=b"], "not both"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/phantom_tiny.yaml", overrides)
    assert message in str(err.value)


@pytest.mark.slow  # two interpreter start-ups with torch + transformers imports (≈ 10 s each on 2 cores)
def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1, 2\n")
    for args, message in ((["--config", str(bad)], "is not valid YAML"),
                          (["--config", str(REPO / "configs/phantom_tiny.yaml"), "epochs=-1"], "epochs must be ≥ 1")):
        run = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                             env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=120, check=False)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("error: ") and message in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_lr_warmup_then_cosine():
    f = [lr_factor(s, 100, 0.05, "cosine", 0.0) for s in range(100)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 % warmup really runs
    assert f[5] == 1.0 and f[52] == pytest.approx(0.5) and f[99] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(f[5:]))
    assert lr_factor(52, 100, 0.05, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(80, 100, 0.05, "constant", 0.0) == 1.0
    assert lr_factor(0, 6, 0.05, "cosine", 0.0) == 1.0  # ceil(0.3) = 1 warmup step
    assert lr_factor(3, 6, 0.0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 5)))


def test_hard_dice():
    logits = torch.full((2, 2, 4, 4), -5.0)
    targets = torch.zeros(2, 2, 4, 4)
    logits[0, 0, :2, :2] = 5  # 4 px predicted, 2 of them right, target 4 px → 2·2 / 8
    targets[0, 0, :2, 1:3] = 1
    query_mask = torch.tensor([[True, False], [True, True]])
    logits[1, 1, 0, 0] = 5  # predicted, target empty → 0; sample 1 query 0: both empty → 1
    assert hard_dice(logits, targets, query_mask).tolist() == [0.5, 1.0, 0.0]
