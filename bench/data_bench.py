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
- handover (with `--handover`): in a real DataLoader worker, the training loader's collate of a one-sample batch
  (`WorkerCollate`: `collate` and packing into one buffer) plus what the worker's queue does to send the batch
  (pickling, which moves the buffer to shared memory);
- receive (with `--handover`): the training process's CPU time to take that batch from the queue.
With `--batch B` the handover and receive columns are per batch of B samples.

    python bench/data_bench.py [--n 24] [--size 512] [--repeats 3] [--handover [--batch 1]]
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
from dataset.finish import BatchFinisher, WorkerCollate
from dataset.phantom import write_phantom
from dataset.records import load_records
from dataset.sampler import SampleKey
from dataset.tasks import RECORD_TASKS, SampleBuilder
from model.omniabnorm import build_image_processor
from model.tiny import write_tiny_base
from model.tokenizer import add_seg_token


class _TimedHandover:
    """A DataLoader collate_fn: the training loader's (`WorkerCollate`), then what the worker's queue does to send
    the batch; returns (the seconds both took, the batch), picklable for the worker."""

    def __init__(self, pad_token_id: int):
        self.collate = WorkerCollate(pad_token_id)

    def __call__(self, samples):
        start = time.perf_counter()
        batch = self.collate(samples)
        ForkingPickler.dumps(batch)  # moves it to shared memory; the queue's own pickling then finds it there
        return time.perf_counter() - start, batch


def time_handover(task, pad_token_id: int, repeats: int, batch_size: int = 1) -> tuple[float, float]:
    """(handover, receive) ms per batch of `batch_size` samples of `task` through one DataLoader worker: the worker's
    collate and sending, and the CPU time the training process spends taking the batch from the queue (unpickling
    and fetching the shared memory). Medians over `repeats` passes (allocating shared memory costs page faults that
    vary much from call to call)."""
    order = [SampleKey(task.task, i, epoch) for epoch in range(repeats) for i in range(len(task))]
    keys = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    batches = iter(DataLoader(task, batch_sampler=keys, num_workers=1, collate_fn=_TimedHandover(pad_token_id)))
    sent, received = [], []
    while True:
        start = time.process_time()  # this process's CPU only: waiting for the worker costs none
        try:
            seconds, _ = next(batches)
        except StopIteration:
            break
        received.append(time.process_time() - start)
        sent.append(seconds)
    return float(np.median(sent)) * 1e3, float(np.median(received)) * 1e3


def time_samples(n: int = 24, size: int = 512, repeats: int = 3, seg_size: int = 512,
                 image_pixels: int = 512 * 512, handover: bool = False, batch_size: int = 1
                 ) -> dict[str, dict[str, float]]:
    """{task: {"prepare": ms, "finish": ms[, "handover": ms, "receive": ms]}} per record task (phantom of `n` cases
    of `size`² slices): prepare and finish, milliseconds of one thread per sample (the mean over one pass over each
    task's items, the fastest of `repeats` passes, after one warm-up sample); with `handover`, `time_handover`'s
    milliseconds per batch of `batch_size`. Leaves torch's thread count as it was."""
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
                    result[name]["handover"], result[name]["receive"] = time_handover(
                        task, tokenizer.pad_token_id, repeats, batch_size)
            return result
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="phantom cases")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each task's items (the fastest counts)")
    parser.add_argument("--handover", action="store_true", help="also time collate + sending in a DataLoader worker")
    parser.add_argument("--batch", type=int, default=1, help="samples per batch handed over (per-batch ms)")
    args = parser.parse_args()
    print(f"phantom of {args.n} cases of {args.size}×{args.size}, 1 thread, {args.repeats} pass(es)"
          + (f", handover and receive per batch of {args.batch}" if args.handover else "") + "\n")
    print(f"{'task':32s} {'prepare ms':>11s} {'finish ms':>10s} {'handover ms':>12s} {'receive ms':>11s}"
          "   (finish: on the GPU with data.finish_on=device)")
    for name, ms in time_samples(args.n, args.size, args.repeats, handover=args.handover,
                                 batch_size=args.batch).items():
        print(f"{name:32s} {ms['prepare']:11.1f} {ms['finish']:10.1f} {ms.get('handover', float('nan')):12.1f} "
              f"{ms.get('receive', float('nan')):11.1f}")


if __name__ == "__main__":
    main()
