"""Batch encoded conversations (right padding for training) with their images and segmentation targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dataset.conversation import IGNORE_INDEX, EncodedConversation


@dataclass
class Sample:
    conversation: EncodedConversation
    pixel_values: Tensor | None = None  # (patches, C·T·P·P) of all images of the sample, in order
    image_grid_thw: Tensor | None = None  # (images, 3)
    seg_slices: Tensor | None = None  # (S, H, W)
    seg_masks: Tensor | None = None  # (N_i, H, W), one per <SEG> in order
    meta: dict = field(default_factory=dict)  # sample id, task, geometry: for evaluation and debugging, not batched


def collate(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Tensor]:
    """→ model kwargs: input_ids, attention_mask, labels, mm_token_type_ids (B, L); pixel_values, image_grid_thw;
    seg_slices (B, S, H, W), seg_masks (B, N, H, W) and seg_target_mask (B, N) when any sample has slices."""
    length = max(s.conversation.input_ids.numel() for s in samples)

    def pad(values: Tensor, fill: int) -> Tensor:
        return torch.cat([values, values.new_full((length - values.numel(),), fill)])

    batch = {
        "input_ids": torch.stack([pad(s.conversation.input_ids, pad_token_id) for s in samples]),
        "labels": torch.stack([pad(s.conversation.labels, IGNORE_INDEX) for s in samples]),
        "mm_token_type_ids": torch.stack([pad(s.conversation.mm_token_type_ids, 0) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s.conversation.input_ids), 0) for s in samples]),
    }
    with_images = [s for s in samples if s.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([s.pixel_values for s in with_images])
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    if any(s.seg_slices is not None for s in samples):
        if any(s.seg_slices is None for s in samples):
            raise ValueError("a batch mixes samples with and without segmentation slices; batches must be "
                             "task-homogeneous")
        batch["seg_slices"] = torch.stack([s.seg_slices for s in samples])
        h, w = batch["seg_slices"].shape[-2:]
        masks = [s.seg_masks if s.seg_masks is not None else torch.zeros(0, h, w) for s in samples]
        n = max(m.shape[0] for m in masks)
        batch["seg_masks"] = torch.stack([torch.cat([m.float(), m.new_zeros(n - m.shape[0], h, w).float()])
                                          for m in masks])
        batch["seg_target_mask"] = torch.arange(n)[None, :] < torch.tensor([m.shape[0] for m in masks])[:, None]
    return batch
