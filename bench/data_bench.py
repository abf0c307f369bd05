"""CPU cost of one prepared training sample per task (SPEC §8: under 20 ms per sample per core).

Builds a phantom dataset at the real input size (512 × 512 slices), the tokenizer of the tiny base (same class and
special tokens as Qwen's; BPE merges differ, tokenising is a small share of the cost) and the image processor at
the real budget (512 × 512 pixels), then times on one thread, per sample:
- prepare: what a DataLoader worker does with `data.finish_on: device` (the default): `dataset[key]` (read slices
  and masks, window, pick the key ± 4 slices, prompt drawing, resize and patch order of the VLM images, chat
  encoding) and `collate` of the sample;
- finish: what `BatchFinisher` adds (pixel values, the 2.5D stack's z-score, padding and resize, MONAI augmentation)
  when it runs on this CPU, as it does in the workers with `data.finish_on: worker`; with `device` it runs on the
  GPU instead;
- handover (with `--handover`): in a real DataLoader worker, `collate` of one sample plus what the worker's queue
  does to send the batch (pickling, which moves every tensor not yet in shared memory there).

    python bench/data_bench.py [--n 24] [--size 512] [--repeats 3] [--handover]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler  # with torch's reducers for tensors, as workers send with
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from dataset.augment import SegAugment
from dataset.collate import collate
from dataset.finish import BatchFinisher
from dataset.phantom import write_phantom
from dataset.records import load_records
from dataset.sampler import SampleKey
from dataset.tasks import RECORD_TASKS, SampleBuilder
from model.omniabnorm import build_image_processor
from model.tiny import write_tiny_base
from model.tokenizer import add_seg_token


class _TimedHandover:
    """A DataLoader collate_fn that collates one sample, sends it the way the worker's queue will, and returns the
    batch with the seconds both took (picklable for the worker)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples):
        start = time.perf_counter()
        ForkingPickler.dumps(collate(samples, self.pad_token_id))  # the queue's later pickling then finds it shared
        return time.perf_counter() - start


def time_handover(task, pad_token_id: int, repeats: int) -> float:
    """ms of `collate` and the queue's pickling of one sample inside one DataLoader worker: the median over
    `repeats` passes of `task` (allocating shared memory costs page faults that vary much from call to call)."""
    keys = [[SampleKey(task.task, i, epoch)] for epoch in range(repeats) for i in range(len(task))]
    loader = DataLoader(task, batch_sampler=keys, num_workers=1, collate_fn=_TimedHandover(pad_token_id))
    return float(np.median(list(loader))) * 1e3


def time_samples(n: int = 24, size: int = 512, repeats: int = 3, seg_size: int = 512,
                 image_pixels: int = 512 * 512, handover: bool = False) -> dict[str, dict[str, float]]:
    """{task: {"prepare": ms, "finish": ms[, "handover": ms]}}: milliseconds of one thread per sample, per record task
    (phantom of `n` cases of `size`² slices; the mean over one pass over each task's items, the fastest of `repeats`
    passes, after one warm-up sample). Leaves torch's thread count as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_phantom(Path(tmp) / "phantom", n=n, seed=0, size=size)
            base = write_tiny_base(Path(tmp) / "base")
            tokenizer = AutoTokenizer.from_pretrained(base)
            add_seg_token(tokenizer)
            builder = SampleBuilder(tokenizer, build_image_processor(base, image_pixels), augment=True)
            finisher = BatchFinisher(builder.vision, SegAugment(), seg_size)
            records = load_records(root / "merged_train.json")
            result = {}
            for name, task_cls in RECORD_TASKS.items():
                task = task_cls(records, builder, seed=0, train=True)
                finisher(collate([task[SampleKey(name, 0)]], tokenizer.pad_token_id), "cpu")  # first-call costs
                passes = []
                for epoch in range(repeats):  # each pass: every item once, with that epoch's randomness
                    start = time.perf_counter()
                    batches = [collate([task[SampleKey(name, i, epoch)]], tokenizer.pad_token_id)
                               for i in range(len(task))]
                    prepared = time.perf_counter()
                    for batch in batches:
                        finisher(batch, "cpu")
                    finished = time.perf_counter()
                    passes.append(((prepared - start) * 1e3 / len(task), (finished - prepared) * 1e3 / len(task)))
                # the fastest pass: on a shared machine, other tenants only ever add time
                result[name] = {"prepare": min(p for p, _ in passes), "finish": min(f for _, f in passes)}
                if handover:
                    result[name]["handover"] = time_handover(task, tokenizer.pad_token_id, repeats)
            return result
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="phantom cases")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each task's items (the fastest counts)")
    parser.add_argument("--handover", action="store_true", help="also time collate + sending in a DataLoader worker")
    args = parser.parse_args()
    print(f"phantom of {args.n} cases of {args.size}×{args.size}, 1 thread, {args.repeats} pass(es)\n")
    print(f"{'task':32s} {'prepare ms':>11s} {'finish ms':>10s} {'handover ms':>12s}"
          "   (finish: on the GPU with data.finish_on=device)")
    for name, ms in time_samples(args.n, args.size, args.repeats, handover=args.handover).items():
        print(f"{name:32s} {ms['prepare']:11.1f} {ms['finish']:10.1f} {ms.get('handover', float('nan')):12.1f}")


if __name__ == "__main__":
    main()
