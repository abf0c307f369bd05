"""The last stage of preparing a training batch: the float work, run where the model is.

A DataLoader worker reads, windows and tokenises (dataset/tasks.py) and collates raw tensors (dataset/collate.py):
uint8 pixel codes, each sample's 2.5D slices and masks as read (uint8 for JPEG slices) and its augmentation seed.
`BatchFinisher` moves the batch to the device and there turns the codes into pixel values (a table lookup), brings
each sample's slices and masks to the segmentation module's space (z-score, pad, resize: dataset/stack25d.py) and
augments them with the sample's own seed (SPEC §4.3). On a GPU that is a few milliseconds per batch instead of tens
of milliseconds of one CPU core per sample, and the worker ships a quarter of the bytes (SPEC §8); the result is
the same function of the sample as in a worker, except the Gaussian noise, which comes from the device's generator.

`data.finish_on: worker` runs the same finisher on the CPU inside the DataLoader workers instead (the plain path);
the training step then only moves the finished batch. Either way the workers hand batches over packed
(`WorkerCollate`, dataset.collate.PackedBatch).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from dataset.augment import SegAugment
from dataset.collate import BatchValue, PackedBatch, collate
from dataset.stack25d import SEG_SIZE, SquareGeometry, normalize_stack
from dataset.vision import VisionPreprocessor

AUGMENT_SEED = "seg_augment_seed"


def to_device(value: BatchValue, device: torch.device | str) -> BatchValue:
    """A collated batch entry, a tensor or a list of per-sample tensors, on `device` (copied asynchronously)."""
    if isinstance(value, list):
        return [v.to(device, non_blocking=True) for v in value]
    return value.to(device, non_blocking=True)


class BatchFinisher:
    """`finisher(batch, device)`: a collated batch, as a dict or packed → model inputs on `device`, the segmentation
    inputs at `seg_size`². A batch already finished (no pixel codes, no seeds, stacked segmentation tensors) is only
    moved."""

    def __init__(self, vision: VisionPreprocessor, augment: SegAugment | None, seg_size: int = SEG_SIZE):
        self.vision = vision
        self.augment = augment
        self.seg_size = seg_size

    def __call__(self, batch: dict[str, BatchValue] | PackedBatch, device: torch.device | str) -> dict[str, Tensor]:
        batch = batch.unpack() if isinstance(batch, PackedBatch) else dict(batch)
        seeds = batch.pop(AUGMENT_SEED, None)
        batch = {key: to_device(value, device) for key, value in batch.items()}
        if "pixel_codes" in batch:
            batch["pixel_values"] = self.vision.values(batch.pop("pixel_codes"))
        if isinstance(batch.get("seg_slices"), list):  # as collated: per sample, at its own slice size
            batch["seg_slices"], batch["seg_masks"] = self.to_model_space(batch["seg_slices"], batch["seg_masks"])
        if seeds is not None and self.augment is not None:
            # Row by row: each sample has its own draws. Padding masks (beyond seg_target_mask) are zero and stay so.
            rows = [self.augment(slices, masks, seed)
                    for slices, masks, seed in zip(batch["seg_slices"], batch["seg_masks"], seeds.tolist())]
            batch["seg_slices"] = torch.stack([slices for slices, _ in rows])
            batch["seg_masks"] = torch.stack([masks for _, masks in rows])
        return batch

    def to_model_space(self, slices: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per sample (S, H_i, W_i) slices and (N_i, H_i, W_i) bool masks → (B, S, size, size) z-scored stacks and
        (B, N, size, size) float32 masks, zero masks beyond each sample's N_i."""
        size = self.seg_size
        count = max(m.shape[0] for m in masks)
        padded = []
        for m in masks:
            m = SquareGeometry(m.shape[1], m.shape[2], size).to_model(m.float(), binary=True)
            padded.append(torch.cat([m, m.new_zeros(count - m.shape[0], size, size)]))
        return torch.stack([normalize_stack(s, size) for s in slices]), torch.stack(padded)


class WorkerCollate:
    """The DataLoader workers' collate_fn (picklable): samples → `collate`, finished on the CPU when given a
    `finisher` (data.finish_on: worker), packed for the handover when it runs in a worker (in the training process
    itself, `num_workers: 0` or evaluation, there is no handover and packing would only add a copy)."""

    def __init__(self, pad_token_id: int, finisher: BatchFinisher | None = None):
        self.pad_token_id, self.finisher = pad_token_id, finisher

    def __call__(self, samples) -> PackedBatch | dict[str, BatchValue]:
        batch = collate(samples, self.pad_token_id)
        if self.finisher is not None:
            batch = self.finisher(batch, "cpu")
        return PackedBatch.pack(batch) if get_worker_info() is not None else batch
