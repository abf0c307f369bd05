"""Deterministic, task-homogeneous distributed batches.

Every global step draws one task (weighted), then the next `batch_size × world_size` positions of that task's
epoch-shuffled order; rank r takes its own contiguous slice. So one global batch is one task (the segmentation and
text-only tasks never mix), ranks never share a sample within a step, and the batch of (seed, epoch, rank, step) is
a pure function of those four numbers — restarts and resumes see exactly the same data. (The original drew random
samples ignoring the index, with the same draws on every rank.)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass(frozen=True)
class SampleKey:
    """Which sample to build: `index` into `task`'s items, in `epoch` (dataset/tasks.py builds it)."""

    task: str
    index: int
    epoch: int = 0


class TaskBatchSampler(Sampler[list[SampleKey]]):
    def __init__(self, task_sizes: Mapping[str, int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, task_weights: Mapping[str, float] | None = None, steps_per_epoch: int | None = None):
        """task_sizes: items per task; batch_size: per rank; task_weights: relative draw probability per task
        (default: proportional to size); steps_per_epoch: default enough global batches to cover every item
        once in expectation."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size ≥ 1 and 0 ≤ rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.tasks = sorted(name for name, size in task_sizes.items() if size > 0)
        if not self.tasks:
            raise ValueError("every task is empty")
        weights = task_weights or {name: float(task_sizes[name]) for name in self.tasks}
        unknown = set(weights) - set(task_sizes)
        if unknown:
            raise ValueError(f"weights given for unknown task(s) {sorted(unknown)}; tasks: {sorted(task_sizes)}")
        p = np.array([float(weights.get(name, 0.0)) for name in self.tasks])
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"task weights must be ≥ 0 with a positive sum, got {dict(weights)}")
        self.probabilities = p / p.sum()
        self.sizes = {name: int(task_sizes[name]) for name in self.tasks}
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = steps_per_epoch or max(1, math.ceil(sum(self.sizes.values()) / self.global_batch))
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Call before iterating; `start_step` resumes mid-epoch (the first `start_step` batches are skipped)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def step_tasks(self) -> list[str]:
        rng = np.random.default_rng([self.seed, self.epoch, 0x7A5C])
        return [self.tasks[i] for i in rng.choice(len(self.tasks), size=self.steps_per_epoch, p=self.probabilities)]

    def _order(self, task: str, cycle: int) -> np.ndarray:
        """The `cycle`-th shuffled pass over the task's items in this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(task.encode()), cycle])
        return rng.permutation(self.sizes[task])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        consumed = dict.fromkeys(self.tasks, 0)  # positions of each task's stream used by earlier steps
        orders: dict[tuple[str, int], np.ndarray] = {}
        for step, task in enumerate(self.step_tasks()):
            first = consumed[task] + self.rank * self.batch_size
            consumed[task] += self.global_batch
            if step < self.start_step:
                continue
            batch = []
            for position in range(first, first + self.batch_size):
                cycle, offset = divmod(position, self.sizes[task])
                if (task, cycle) not in orders:
                    orders[(task, cycle)] = self._order(task, cycle)
                batch.append(SampleKey(task, int(orders[(task, cycle)][offset]), self.epoch))
            yield batch
