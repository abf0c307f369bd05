"""Native PyTorch distributed: process group from torchrun's environment, DDP or FSDP2 wrapping, grad clipping.

One process without torchrun works too (world size 1, no process group). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from model.omniabnorm import OmniAbnormCT


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks (a float64 CPU tensor in, the same out)."""
        if not self.enabled:
            return values
        moved = values.to(self.device)
        dist.all_reduce(moved)
        return moved.cpu() / self.world_size

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return values
        moved = values.to(self.device)
        dist.all_reduce(moved)
        return moved.cpu()


def init_distributed() -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a plain process gets world 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if cuda else {}))
    return Dist(rank, world_size, local_rank, device)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: OmniAbnormCT, parallel: str, env: Dist, bf16: bool) -> nn.Module:
    """DDP or FSDP2 around `model` (already on `env.device`); unchanged in a single process.

    DDP: `find_unused_parameters=True` because a text-only batch (visual prompt, QA) never calls the segmentation
    module, so its parameters get no gradient that step. The sampler gives every rank the same task each step, so
    the unused set is the same on all ranks; DDP then leaves those gradients empty (AdamW skips them), exactly as
    in a single process. The alternative, a zero-weighted dummy segmentation pass, would cost a U-Net forward and
    backward on every text step.

    FSDP2: one shard group per LLM decoder layer, per vision block and for the segmentation module, then the root
    (embeddings, head, norms, merger). bf16 parameters in compute, fp32 gradient reduction.
    """
    if env.world_size == 1:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in [*model.vlm.model.language_model.layers, *model.vlm.model.visual.blocks, model.seg_module]:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> OmniAbnormCT:
    """The OmniAbnormCT inside DDP (FSDP2 shards in place, so its module is the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_context(model: nn.Module, sync: bool):
    """Gradient sync only on the last micro-step of an accumulation group."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 gradient norm (over all ranks' shards under FSDP2), clipped to `max_norm` when > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):  # FSDP2: per-shard partial norms → the full norm
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
