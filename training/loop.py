"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, checkpoints with exact resume.

Run folder (`output_dir`)::

    config.yaml                     the resolved config
    metrics.jsonl                   one line per optimizer step (losses per term, seg Dice, lr, samples/s, memory)
    tensorboard/                    event files (when the tensorboard package is installed)
    checkpoints/latest              name of the newest complete checkpoint
    checkpoints/step_NNNNNN/model/  our checkpoint format (model/checkpoint.py): for inference and evaluation
    checkpoints/step_NNNNNN/trainer/ trainable tensors (fp32), optimizer state, step, RNG state per rank

Exact resume: the model's trainable tensors and AdamW state are restored bit for bit, the lr is a pure function of
the step, batches are a pure function of (seed, epoch, rank, micro-step) (dataset/sampler.py), every sample of its
key, and each rank's torch / numpy / Python RNG (dropout) is restored. A run killed after checkpoint k and resumed
repeats the uninterrupted run's losses from step k + 1 on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dataset.ct import InputError
from dataset.sampler import TaskBatchSampler
from model.checkpoint import CheckpointError, load_checkpoint, load_starting_point, save_checkpoint
from model.config import ConfigError
from model.omniabnorm import compile_blocks
from model.tiny import write_tiny_base
from training.config import TINY_BASE, TrainConfig, load_config, save_config
from training.data import (
    build_finisher,
    build_loader,
    build_train_dataset,
    build_valid_grounding,
    prepare_data,
    steps_per_epoch,
)
from training.distributed import (
    Dist,
    clip_grad_norm,
    close_distributed,
    init_distributed,
    sync_context,
    unwrap,
    wrap_model,
)
from training.observe import RunLog, memory_mb

STATE_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total`.

    Linear warmup over ceil(warmup_ratio · total) steps reaching 1 at its last step, then cosine / linear decay
    from 1 at the first step after warmup to `min_ratio` at the last step, or constant.
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def hard_dice(mask_logits: torch.Tensor, targets: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Dice of the 0.5-thresholded masks per valid query → (V,); both empty counts as 1 (SPEC §7)."""
    pred = mask_logits[query_mask] > 0
    gt = targets[:, :mask_logits.shape[1]][query_mask] > 0.5
    inter = (pred & gt).flatten(1).sum(1).double()
    total = pred.flatten(1).sum(1).double() + gt.flatten(1).sum(1).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def build(cfg: TrainConfig, env: Dist):
    """The starting model (same seed on every rank, so FSDP2 shards of one initialisation), trainable in fp32."""
    model_cfg = cfg.model
    if model_cfg.base_model == TINY_BASE:
        base = Path(cfg.output_dir) / "tiny_base"
        if env.is_main and not (base / "config.json").is_file():
            write_tiny_base(base, seed=0)
        env.barrier()
        model_cfg = dataclasses.replace(model_cfg, base_model=str(base))
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model, tokenizer, image_processor = load_checkpoint(resolve_model_dir(cfg.init_from), model_cfg.base_model)
    else:
        model, tokenizer, image_processor = load_starting_point(model_cfg)
    for p in model.parameters():
        if p.requires_grad:  # fp32 master weights; bf16 compute comes from autocast / FSDP2's policy
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.compile_blocks:  # before DDP / FSDP2 wrap the blocks, as torchtitan orders it
        compile_blocks(model.vlm)
    return model.to(env.device).train(), tokenizer, image_processor


def micro_batches(loader, sampler: TaskBatchSampler, start: int) -> Iterator[tuple[str, dict]]:
    """(task, batch) for every micro-step from global micro-step `start` on, across epochs."""
    epoch, position = divmod(start, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, position)
        yield from zip(sampler.step_tasks()[position:], loader, strict=True)
        epoch, position = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------- checkpoints

def resolve_model_dir(path: str) -> Path:
    """A run folder, a checkpoints/step_NNNNNN folder or a model folder → the model folder (our format)."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "omniabnorm.json").is_file():
            return candidate
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():
        return folder / "checkpoints" / latest.read_text().strip() / "model"
    raise ConfigError(f"init_from={path}: no model there (expected a run folder, a checkpoints/step_NNNNNN folder "
                      "or a folder with omniabnorm.json)")


def resolve_resume(path: str) -> Path:
    """A run folder (→ its latest checkpoint) or a checkpoint folder → the checkpoint folder."""
    folder = Path(path)
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():
        folder = folder / "checkpoints" / latest.read_text().strip()
    if not (folder / "trainer" / "state.json").is_file():
        raise ConfigError(f"resume_from={path}: no checkpoint there (expected a run folder with checkpoints/latest "
                          "or a checkpoints/step_NNNNNN folder)")
    return folder


def save_training_checkpoint(cfg: TrainConfig, env: Dist, model: nn.Module, optimizer, tokenizer, step: int,
                             epoch: int, log: RunLog) -> Path:
    """Write checkpoints/step_NNNNNN atomically (built in a hidden temp folder, renamed when complete)."""
    root = Path(cfg.output_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    env.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=STATE_OPTIONS)  # collective under FSDP2
    if env.is_main:
        # torch.save keeps the segmentation module's aliased tensors (`.conv` / `.all_modules.0`) as one storage;
        # both files are read back with weights_only=True.
        torch.save(model_state, tmp / "trainer" / "trainable.pt")
        torch.save(optim_state, tmp / "trainer" / "optimizer.pt")
        state = {"step": step, "epoch": epoch, "micro_step": step * cfg.grad_accumulation,
                 "world_size": env.world_size, "seed": cfg.seed}
        (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=1))
        save_config(cfg, tmp / "config.yaml")
    if env.is_main:  # the model in our format, from the gathered full tensors (FSDP2 shards included)
        save_checkpoint(unwrap(model), tokenizer, tmp / "model", {"step": step, "epoch": epoch}, state=model_state)
    torch.save(rng_state(), tmp / "trainer" / f"rng_rank{env.rank}.pt")
    env.barrier()
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        prune_checkpoints(root, cfg.keep_checkpoints)
        log.write(f"checkpoint: {final}")
    env.barrier()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep > 0:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(state["python"])


def load_training_checkpoint(folder: Path, env: Dist, model: nn.Module, optimizer) -> dict:
    """Restore trainable tensors, AdamW state and this rank's RNG; → the saved state.json."""
    trainer = folder / "trainer"
    state = json.loads((trainer / "state.json").read_text())
    model_state = torch.load(trainer / "trainable.pt", map_location="cpu", weights_only=True)
    optim_state = torch.load(trainer / "optimizer.pt", map_location="cpu", weights_only=True)
    # One name per tensor: the segmentation module registers each conv / norm twice (`.conv`, `.all_modules.0`),
    # and FSDP2 shards only one of the two names.
    inner = unwrap(model)
    canonical = dict(inner.named_parameters())
    every_name = {name for name, _ in inner.named_parameters(remove_duplicate=False)}
    missing = {n for n, p in canonical.items() if p.requires_grad} - model_state.keys()
    unexpected = model_state.keys() - every_name
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not fit this model: {len(missing)} trained tensors missing (e.g. "
                              f"{sorted(missing)[:2]}), {len(unexpected)} unknown (e.g. {sorted(unexpected)[:2]})")
    model_state = {name: value for name, value in model_state.items() if name in canonical}
    try:
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=False))
        # Not strict: a parameter no step has used yet (the segmentation module after text-only steps) has no
        # AdamW state, in the file or in the uninterrupted run.
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True,
                                                                                         strict=False))
        # Loading first makes AdamW state for every parameter (a zero-lr step): drop what the file did not have,
        # so a parameter's first real step has AdamW step count 1, as in the uninterrupted run.
        names: dict[int, set[str]] = {}
        for name, p in unwrap(model).named_parameters(remove_duplicate=False):
            names.setdefault(id(p), set()).add(name)
        for p in list(optimizer.state):
            if not names.get(id(p), set()) & optim_state["state"].keys():
                del optimizer.state[p]
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{folder} does not fit this model: {err}") from None
    rng_file = trainer / f"rng_rank{env.rank}.pt"
    if state["world_size"] == env.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ----------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_grounding(model: nn.Module, task, collate_fn, finisher, env: Dist, n: int, autocast) -> float:
    """Mean key-slice Dice (0.5 threshold) over the first `n` held-out grounding cases, `<SEG>` given (teacher
    forced). Every rank runs the same number of forwards (FSDP2 needs it); padding cases are not counted."""
    n = min(n, len(task))
    per_rank = math.ceil(n / env.world_size)
    totals = torch.zeros(2, dtype=torch.float64)
    model.eval()
    for k in range(per_rank):
        index = min(env.rank * per_rank + k, n - 1)
        batch = finisher(collate_fn([task[index]]), env.device)
        with autocast():
            out = model(**batch)
        if env.rank * per_rank + k < n:
            totals += torch.tensor([float(hard_dice(out.mask_logits, batch["seg_masks"], out.query_mask).mean()), 1.0],
                                   dtype=torch.float64)
    model.train()
    totals = env.sum(totals)
    return float(totals[0] / totals[1])


# ------------------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training as configured; → the run folder. Works in one process and under torchrun."""
    env = init_distributed()
    try:
        return _train(cfg, env)
    finally:
        close_distributed()


def _train(cfg: TrainConfig, env: Dist) -> Path:
    run_dir = Path(cfg.output_dir)
    if cfg.global_batch_size and cfg.global_batch_size != cfg.micro_batch_size * cfg.grad_accumulation * env.world_size:
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} != micro_batch_size {cfg.micro_batch_size} × "
                          f"grad_accumulation {cfg.grad_accumulation} × world size {env.world_size}")
    resume = resolve_resume(cfg.resume_from) if cfg.resume_from else None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and env.device.type == "cuda" else \
        contextlib.nullcontext

    model, tokenizer, image_processor = build(cfg, env)
    wrapped = wrap_model(model, cfg.parallel, env, bf16)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    files = prepare_data(cfg, env)
    dataset = build_train_dataset(cfg, files, tokenizer, image_processor)
    finisher = build_finisher(cfg, image_processor)
    loader, sampler = build_loader(cfg, dataset, env, tokenizer.pad_token_id, finisher)
    valid = build_valid_grounding(cfg, files, tokenizer, image_processor) if cfg.eval_every else None

    epoch_steps = steps_per_epoch(cfg, env.world_size)
    total = cfg.max_steps or cfg.epochs * epoch_steps
    end = min(total, cfg.stop_after) if cfg.stop_after else total
    torch.manual_seed(cfg.seed + env.rank)  # dropout streams differ per rank; a resume restores them below
    start, notes = 0, []
    if resume is not None:
        saved = load_training_checkpoint(resume, env, wrapped, optimizer)
        start = saved["step"]
        notes.append(f"resumed from {resume} at step {start}")
        if saved["world_size"] != env.world_size:
            notes.append(f"saved with world size {saved['world_size']}, now {env.world_size}: the data order and "
                         "RNG streams differ from the uninterrupted run")
    log = RunLog(run_dir, env.is_main, start, total, cfg.log_every, cfg.tensorboard)
    samples_per_step = cfg.micro_batch_size * cfg.grad_accumulation * env.world_size
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    notes.append(f"{env.world_size} process(es) on {env.device.type}, "
                 f"{cfg.parallel if env.world_size > 1 else 'no wrapper'}, {'bf16' if bf16 else 'fp32'}; "
                 f"{n_trainable:,} trainable parameters; tasks {dataset.sizes()}; steps {start + 1}..{end} of {total}, "
                 f"{samples_per_step} samples each ({epoch_steps} per epoch)")
    for note in notes:
        log.write(note)

    batches = micro_batches(loader, sampler, start * cfg.grad_accumulation)
    micro_total = cfg.grad_accumulation * env.world_size
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = cfg.optim.lr * lr_factor(step, total, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Summed over micro-steps (and below over ranks): loss, ce | dice, bce, seg micro-steps, Dice sum, queries.
        sums = torch.zeros(7, dtype=torch.float64, device=env.device)
        tasks = set()
        for k in range(cfg.grad_accumulation):
            task, batch = next(batches)
            tasks.add(task)
            batch = finisher(batch, env.device)
            with sync_context(wrapped, k == cfg.grad_accumulation - 1):
                with autocast():
                    out = wrapped(**batch)
                (out.loss / cfg.grad_accumulation).backward()
            sums[0] += out.loss.detach().double()
            sums[1] += out.ce_loss.double()
            if out.mask_logits is not None:  # some sample has a <SEG>, so some query is valid
                dice = hard_dice(out.mask_logits.detach(), batch["seg_masks"], out.query_mask)
                sums[2:] += torch.stack([out.dice_loss.double(), out.bce_loss.double(), sums.new_tensor(1.0),
                                         dice.sum(), sums.new_tensor(float(dice.numel()))])
        grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        sums = env.sum(sums.cpu()).tolist()
        elapsed = time.perf_counter() - t0
        done = step + 1
        metrics = {
            "step": done, "epoch": step // epoch_steps, "tasks": sorted(tasks),
            "loss": sums[0] / micro_total, "ce": sums[1] / micro_total,
            "dice": sums[2] / sums[4] if sums[4] else None, "bce": sums[3] / sums[4] if sums[4] else None,
            "seg_dice": sums[5] / sums[6] if sums[4] else None,
            "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_step / elapsed, "step_s": elapsed,
            **memory_mb(env.device),
        }
        if valid is not None and (done % cfg.eval_every == 0 or done == end):
            metrics["valid_dice"] = evaluate_grounding(wrapped, valid, loader.collate_fn, finisher, env, cfg.eval_samples,
                                                       autocast)
            log.write(f"step {done}: held-out grounding Dice {metrics['valid_dice']:.4f} "
                      f"({min(cfg.eval_samples, len(valid))} cases)")
        log.step(metrics)
        if done % cfg.save_every == 0 or done == end:
            save_training_checkpoint(cfg, env, wrapped, optimizer, tokenizer, done, step // epoch_steps, log)
    log.close()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train OmniAbnorm-CT (single process or under torchrun).",
        epilog="Overrides: dotted keys, YAML values, e.g. output_dir=runs/a max_steps=100 resume_from=runs/a "
               "model.lora.r=16 data.tasks.grounding=1000")
    parser.add_argument("--config", required=True, help="run config YAML (train.yaml, configs/phantom_tiny.yaml, …)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except (ConfigError, InputError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
