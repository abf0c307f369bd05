"""Batch encoded conversations (right padding for training) with their images and segmentation targets.

A collated batch is still raw: uint8 pixel codes, each sample's slices and masks as read (at its own slice size, so
kept as lists) and its augmentation seed. `dataset.finish.BatchFinisher` turns it into model inputs where the model
is (or in the worker). DataLoader workers hand a batch over as a `PackedBatch`: one buffer instead of a dozen tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dataset.conversation import IGNORE_INDEX, EncodedConversation

BatchValue = Tensor | list[Tensor]


@dataclass
class Sample:
    conversation: EncodedConversation
    pixel_codes: Tensor | None = None  # (patches, C·P·P) uint8 of all images of the sample, in order (dataset/vision.py)
    image_grid_thw: Tensor | None = None  # (images, 3)
    seg_slices: Tensor | None = None  # (S, H, W) key ± context as read, its dtype (dataset.stack25d.stack_channels)
    seg_masks: Tensor | None = None  # (N_i, H, W) bool on the same slice, one per <SEG> in order
    seg_augment_seed: int | None = None  # 0 ≤ seed < 2³² when the stack and masks are to be augmented
    meta: dict = field(default_factory=dict)  # sample id, task, geometry: for evaluation and debugging, not batched


def collate(samples: Sequence[Sample], pad_token_id: int) -> dict[str, BatchValue]:
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


PACK_ALIGN = 64  # bytes: every entry starts on a cache line, so each dtype view is aligned


@dataclass(frozen=True)
class PackedBatch:
    """A batch of tensors and lists of tensors in one (bytes,) uint8 buffer: how DataLoader workers hand batches over.

    A worker sends each tensor as its own shared-memory file, and the receiving process fetches each file descriptor
    from the worker in a round trip; a batch is a dozen tensors or more (one slice stack and one mask set per
    sample). Packed, it is one file, one round trip and, with `pin_memory`, one pinned copy. `unpack()` gives the
    batch back bit for bit, as views of the buffer. `layout` holds, per tensor in the batch's order, (key, position
    in the key's list or None for an entry that is one tensor, dtype, shape, byte offset in the buffer).
    """

    buffer: Tensor  # (bytes,) uint8
    layout: tuple[tuple[str, int | None, torch.dtype, tuple[int, ...], int], ...]

    @classmethod
    def pack(cls, batch: Mapping[str, BatchValue]) -> PackedBatch:
        layout, tensors, size = [], [], 0
        for key, value in batch.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"batch entry {key!r} is an empty list; there is nothing to unpack it from")
            for position, tensor in enumerate(value) if isinstance(value, list) else [(None, value)]:
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"batch entry {key!r} holds a {type(tensor).__name__}; only tensors and lists "
                                    "of tensors can be packed")
                layout.append((key, position, tensor.dtype, tuple(tensor.shape), size))
                tensors.append(tensor)
                size += math.ceil(tensor.numel() * tensor.element_size() / PACK_ALIGN) * PACK_ALIGN
        packed = cls(torch.empty(size, dtype=torch.uint8), tuple(layout))
        for view, tensor in zip(packed._views(), tensors, strict=True):
            view.copy_(tensor)
        return packed

    def _views(self) -> Iterator[Tensor]:
        for _, _, dtype, shape, offset in self.layout:
            nbytes = math.prod(shape) * dtype.itemsize
            yield self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def unpack(self) -> dict[str, BatchValue]:
        """The packed batch: its tensors are views of the buffer (no copy)."""
        batch: dict[str, BatchValue] = {}
        for (key, position, *_), view in zip(self.layout, self._views(), strict=True):
            if position is None:
                batch[key] = view
            else:
                batch.setdefault(key, []).append(view)
        return batch

    def pin_memory(self) -> PackedBatch:
        """Called by the DataLoader's pin-memory thread."""
        return PackedBatch(self.buffer.pin_memory(), self.layout)
