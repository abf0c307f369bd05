"""Batch encoded conversations (right padding for training) with their images and segmentation targets.

A collated batch is still raw: uint8 pixel codes, each sample's slices and masks as read (at its own slice size, so
kept as lists) and its augmentation seed. `dataset.finish.BatchFinisher` turns it into model inputs where the model
is (or in the worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dataset.conversation import IGNORE_INDEX, EncodedConversation


@dataclass
class Sample:
    conversation: EncodedConversation
    pixel_codes: Tensor | None = None  # (patches, C·P·P) uint8 of all images of the sample, in order (dataset/vision.py)
    image_grid_thw: Tensor | None = None  # (images, 3)
    seg_slices: Tensor | None = None  # (S, H, W) key ± context as read, its dtype (dataset.stack25d.stack_channels)
    seg_masks: Tensor | None = None  # (N_i, H, W) bool on the same slice, one per <SEG> in order
    seg_augment_seed: int | None = None  # 0 ≤ seed < 2³² when the stack and masks are to be augmented
    meta: dict = field(default_factory=dict)  # sample id, task, geometry: for evaluation and debugging, not batched


def collate(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Tensor | list[Tensor]]:
    """→ input_ids, attention_mask, labels, mm_token_type_ids (B, L); pixel_codes, image_grid_thw; when any sample
    has slices: seg_slices [(S, H_i, W_i)] and seg_masks [(N_i, H_i, W_i) bool] per sample, seg_target_mask (B, N)
    (N = max N_i), and seg_augment_seed (B,) int64 when they are to be augmented."""
    length = max(s.conversation.input_ids.numel() for s in samples)

    def pad(values: Tensor, fill: int) -> Tensor:
        return torch.cat([values, values.new_full((length - values.numel(),), fill)])

    batch = {
        "input_ids": torch.stack([pad(s.conversation.input_ids, pad_token_id) for s in samples]),
        "labels": torch.stack([pad(s.conversation.labels, IGNORE_INDEX) for s in samples]),
        "mm_token_type_ids": torch.stack([pad(s.conversation.mm_token_type_ids, 0) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s.conversation.input_ids), 0) for s in samples]),
    }
    with_images = [s for s in samples if s.pixel_codes is not None]
    if with_images:
        batch["pixel_codes"] = torch.cat([s.pixel_codes for s in with_images])
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    if any(s.seg_slices is not None for s in samples):
        if any(s.seg_slices is None for s in samples):
            raise ValueError("a batch mixes samples with and without segmentation slices; batches must be "
                             "task-homogeneous")
        batch["seg_slices"] = [s.seg_slices for s in samples]
        # bool, a quarter of float32's bytes to ship; dataset.finish.BatchFinisher makes them float32
        batch["seg_masks"] = [s.seg_masks.bool() if s.seg_masks is not None else
                              torch.zeros(0, *s.seg_slices.shape[1:], dtype=torch.bool) for s in samples]
        counts = torch.tensor([m.shape[0] for m in batch["seg_masks"]])
        batch["seg_target_mask"] = torch.arange(int(counts.max()))[None, :] < counts[:, None]
        seeds = [s.seg_augment_seed for s in samples]
        if any(seed is not None for seed in seeds):
            if None in seeds:
                raise ValueError("a batch mixes samples with and without augmentation")
            batch["seg_augment_seed"] = torch.tensor(seeds, dtype=torch.int64)
    return batch
