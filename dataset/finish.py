"""The last stage of preparing a training batch: the float work, run where the model is.

A DataLoader worker reads, windows, stacks and tokenises (dataset/tasks.py) and collates raw tensors
(dataset/collate.py): uint8 pixel codes and un-augmented segmentation stacks with each sample's augmentation seed.
`BatchFinisher` moves the batch to the device and there turns the codes into pixel values (a table lookup) and
augments each sample's stack and masks with its own seed (SPEC §4.3). On a GPU that is a few milliseconds per batch
instead of tens of milliseconds of one CPU core per sample (SPEC §8); the result is the same function of the
sample as in a worker, except the Gaussian noise, which comes from the device's generator.

`data.finish_on: worker` runs the same finisher on the CPU inside the DataLoader workers instead (the plain path);
the training step then only moves the finished batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataset.augment import SegAugment
from dataset.vision import VisionPreprocessor

AUGMENT_SEED = "seg_augment_seed"


class BatchFinisher:
    """`finisher(batch, device)`: a collated batch → model inputs on `device`. A batch already finished (no pixel
    codes, no seeds) is only moved."""

    def __init__(self, vision: VisionPreprocessor, augment: SegAugment | None):
        self.vision = vision
        self.augment = augment

    def __call__(self, batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
        batch = dict(batch)
        seeds = batch.pop(AUGMENT_SEED, None)
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if "pixel_codes" in batch:
            batch["pixel_values"] = self.vision.values(batch.pop("pixel_codes"))
        if "seg_masks" in batch:  # collated as bool (dataset/collate.py); losses and augmentation take float32
            batch["seg_masks"] = batch["seg_masks"].float()
        if seeds is not None and self.augment is not None:
            # Row by row: each sample has its own draws. Padding masks (beyond seg_target_mask) are zero and stay so.
            rows = [self.augment(slices, masks, seed)
                    for slices, masks, seed in zip(batch["seg_slices"], batch["seg_masks"], seeds.tolist())]
            batch["seg_slices"] = torch.stack([slices for slices, _ in rows])
            batch["seg_masks"] = torch.stack([masks for _, masks in rows])
        return batch

    def in_worker(self, collate_fn):
        """collate_fn → a collate function that also finishes the batch on the CPU (for DataLoader workers)."""
        return _FinishedCollate(collate_fn, self)


class _FinishedCollate:
    """Picklable for DataLoader workers (a lambda is not)."""

    def __init__(self, collate_fn, finisher: BatchFinisher):
        self.collate_fn, self.finisher = collate_fn, finisher

    def __call__(self, samples) -> dict[str, Tensor]:
        return self.finisher(self.collate_fn(samples), "cpu")
