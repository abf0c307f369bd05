"""Task-homogeneous, deterministic distributed batches."""

import pytest

from dataset.sampler import TaskBatchSampler

SIZES = {"grounding": 37, "visual_prompt": 53, "referring": 11}


def batches(rank, world=2, seed=3, epoch=0, start=0, **kw):
    sampler = TaskBatchSampler(SIZES, batch_size=4, world_size=world, rank=rank, seed=seed, **kw)
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_two_ranks_one_task_per_global_batch_no_duplicates():
    r0, r1 = batches(0), batches(1)
    assert len(r0) == len(r1) == -(-sum(SIZES.values()) // 8)
    seen = {task: [] for task in SIZES}
    for b0, b1 in zip(r0, r1):
        tasks = {k.task for k in b0 + b1}
        assert len(tasks) == 1  # one task per global step, on both ranks
        keys = [k.index for k in b0 + b1]
        assert len(set(keys)) == len(keys)  # ranks never share a sample in a step
        seen[tasks.pop()] += keys
    for task, indices in seen.items():
        size = SIZES[task]
        assert all(0 <= i < size for i in indices)
        # Within one pass over a task no index repeats: the stream is a permutation per cycle.
        for start in range(0, len(indices) - len(indices) % size, size):
            assert sorted(indices[start:start + size]) == list(range(size))


def test_pure_function_of_seed_epoch_rank_step():
    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    assert batches(0, seed=4) != batches(0)
    assert batches(0, epoch=1) != batches(0)
    assert all(k.epoch == 1 for b in batches(0, epoch=1) for k in b)
    assert batches(1, start=5) == batches(1)[5:]  # resuming mid-epoch gives the remaining batches exactly


def test_weights_and_errors():
    only = batches(0, task_weights={"referring": 1.0})
    assert {k.task for b in only for k in b} == {"referring"}
    with pytest.raises(ValueError, match="unknown task"):
        TaskBatchSampler(SIZES, 2, task_weights={"nope": 1.0})
    with pytest.raises(ValueError):
        TaskBatchSampler(SIZES, 2, world_size=2, rank=2)
