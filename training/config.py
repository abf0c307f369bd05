"""The one typed run configuration: a YAML file plus `key=value` overrides with dotted keys, validated up front.

    python train.py --config train.yaml output_dir=runs/a max_steps=100 model.lora.r=16 data.tasks.grounding=1000

Override values are parsed as YAML (`max_steps=6` is an int, `model.lora=null` is None, `data.train_json=[a.json]`
a list). Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key. The resolved config
(defaults filled in) is written to the run folder as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dataset.tasks import RECORD_TASKS
from model.config import ConfigError, ModelConfig, from_dict
from utils.atomic import write_text_atomic

TINY_BASE = "tiny"  # model.base_model: tiny → model/tiny.py's base is written into the run folder
TEXT_TASKS = ("instruction_qa", "report_corpus")
TASKS = (*RECORD_TASKS, *TEXT_TASKS)
# The released recipe's per-epoch quotas (SPEC §5): refer 50k + 50k and grounded generation 50k + 50k are the
# two-round and one-round / per-finding variants of each.
RELEASED_QUOTAS = {"visual_prompt": 50_000, "referring": 50_000, "referring_one_round": 50_000,
                   "grounded_report": 50_000, "grounded_report_per_finding": 50_000, "grounding": 0,
                   "instruction_qa": 0}


@dataclass
class PhantomData:
    """Write a synthetic phantom (dataset/phantom.py) into `<output_dir>/phantom` and train on it."""

    n: int = 64  # cases (train + held-out)
    seed: int = 0
    size: int = 128  # voxels per side
    valid_fraction: float = 0.2

    def validate(self) -> None:
        if self.n < 2 or self.size < 32:
            raise ConfigError(f"data.phantom needs n ≥ 2 and size ≥ 32, got n={self.n} size={self.size}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"data.phantom.valid_fraction must be in (0, 1), got {self.valid_fraction}")


@dataclass
class DataConfig:
    root: str = ""  # folder the annotation files and the paths inside them are relative to
    train_json: tuple[str, ...] = ("merged_train.json",)  # one or more annotation files (14K format), under root
    valid_json: tuple[str, ...] = ()  # held-out files for the periodic grounding Dice (eval_every)
    # Samples per epoch for each task (relative draw weights; 0 or absent = not trained).
    tasks: dict[str, float] = field(default_factory=lambda: dict(RELEASED_QUOTAS))
    instruction_qa_json: str = ""  # PubMedVision-style JSON (needed when tasks.instruction_qa > 0)
    report_corpus_json: str = ""  # JSON list of {image, caption} (needed when tasks.report_corpus > 0)
    augment: bool = True  # SPEC §4.3 augmentation of the segmentation stack
    # Where the float work of preparation runs (pixel normalisation, augmentation; dataset/finish.py): "device" in
    # the training step, batched on the GPU; "worker" on the CPU in the DataLoader workers.
    finish_on: str = "device"
    num_workers: int = 4  # DataLoader workers per rank
    phantom: PhantomData | None = None  # set → train on a phantom written on the fly (root/train_json ignored)

    def validate(self) -> None:
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ConfigError("data.tasks must map task names to samples per epoch, e.g. {grounding: 1000}")
        for name, quota in self.tasks.items():
            if name not in TASKS:
                raise ConfigError(f"data.tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
            if isinstance(quota, bool) or not isinstance(quota, (int, float)) or quota < 0:
                raise ConfigError(f"data.tasks.{name} must be a number ≥ 0, got {quota!r}")
        if not any(q > 0 for q in self.tasks.values()):
            raise ConfigError("data.tasks: at least one task needs a quota > 0")
        for name in TEXT_TASKS:
            if self.tasks.get(name, 0) > 0 and not getattr(self, f"{name}_json"):
                raise ConfigError(f"data.tasks.{name} > 0 needs data.{name}_json")
        if self.finish_on not in ("device", "worker"):
            raise ConfigError(f"data.finish_on must be 'device' or 'worker', got {self.finish_on!r}")
        if self.phantom is None and not self.root:
            raise ConfigError("data.root is empty: set it to the dataset folder (e.g. data/OmniAbnorm-CT-14K) or "
                              "use data.phantom")
        if self.phantom is None and not self.train_json:
            raise ConfigError("data.train_json must list at least one annotation file")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_ratio: float = 0.05  # fraction of max_steps with linear warmup
    schedule: str = "cosine"  # after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.0  # the schedule ends at lr · min_lr_ratio
    grad_clip: float = 0.3  # max global grad norm; 0 = off

    def validate(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"optim: need lr > 0, weight_decay ≥ 0, grad_clip ≥ 0, got {self.lr}, "
                              f"{self.weight_decay}, {self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1], got "
                              f"{self.warmup_ratio}, {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/omniabnorm-ct"
    resume_from: str = ""  # a run folder (its latest checkpoint) or one checkpoint folder: continue this run
    # Start a new stage from a trained model (our format: a run folder, a step folder or its model/ folder); its
    # model settings replace `model` except base_model. Fresh optimizer, step 0.
    init_from: str = ""
    seed: int = 0
    epochs: int = 1  # used when max_steps is 0
    max_steps: int = 0  # optimizer steps; the lr schedule spans them; 0 = epochs × steps per epoch
    stop_after: int = 0  # end (with a checkpoint) after this step without changing the schedule; 0 = off
    micro_batch_size: int = 1  # samples per rank per forward
    grad_accumulation: int = 4
    global_batch_size: int = 0  # when > 0, must equal micro_batch_size × grad_accumulation × world size
    parallel: str = "ddp"  # ddp (LoRA runs) | fsdp (FSDP2 fully_shard, for model.train_language_model runs)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool = False
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # newest step checkpoints kept; 0 = keep all
    log_every: int = 10  # steps between console lines (every step goes to metrics.jsonl)
    eval_every: int = 0  # steps between held-out grounding Dice checks (needs data.valid_json or phantom); 0 = off
    eval_samples: int = 64  # held-out cases per check
    tensorboard: bool = True  # event files in <output_dir>/tensorboard when the tensorboard package is installed

    def validate(self) -> None:
        for name in ("micro_batch_size", "grad_accumulation", "epochs", "save_every", "log_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_steps", "stop_after", "global_batch_size", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: name the run folder, e.g. output_dir=runs/my-run")
        if self.init_from and self.resume_from:
            raise ConfigError("set init_from (start a new stage from a model) or resume_from (continue a run), not both")
        if self.eval_every and not (self.data.valid_json or self.data.phantom):
            raise ConfigError("eval_every > 0 needs held-out cases: set data.valid_json (or use data.phantom)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    """Tuples → lists so that YAML writes plain sequences."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` → raw["a"]["b"]["c"] = yaml(value), creating mappings on the way."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like key=value (dotted keys for nesting, "
                          "e.g. model.lora.r=16)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({err})") from None
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[:i + 1])} is {child!r}, not a mapping")
        node = child
    node[leaf] = value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (or none: all defaults) + overrides → a validated `TrainConfig`."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return from_dict(TrainConfig, raw, "config")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
