"""Train a few rows of the token embedding and output head (the `<SEG>` row) without training the matrices.

The release trained the full 151,666 × 3,584 embedding and head (1.09 B parameters, plus their Adam state) to learn
one token. Here the full matrices stay frozen and each layer gets a small `trainable_rows` parameter (k, hidden)
that overrides rows `row_ids`: the gradient is (k, hidden), and no full-size weight copy or weight gradient is
made in forward or backward (peft's trainable-tokens layer materialises both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RowOverride:
    row_ids: Tensor
    trainable_rows: nn.Parameter

    def _init_rows(self, weight: Tensor, row_ids: list[int]) -> None:
        ids = torch.as_tensor(sorted(set(row_ids)), dtype=torch.long, device=weight.device)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= weight.shape[0]:
            raise ValueError(f"row ids {row_ids} out of range for a matrix with {weight.shape[0]} rows")
        self.register_buffer("row_ids", ids, persistent=False)
        self.trainable_rows = nn.Parameter(weight.detach()[ids].clone())
        weight.requires_grad_(False)

    @torch.no_grad()
    def load_rows_from_weight(self) -> None:
        """Re-read the trainable rows from `weight` (after a full matrix was loaded into it)."""
        self.trainable_rows.copy_(self.weight[self.row_ids])

    def merged_weight(self) -> Tensor:
        """Full matrix with the trained rows written in (for export to the released layout)."""
        return self.weight.detach().index_copy(0, self.row_ids, self.trainable_rows.detach().to(self.weight.dtype))


class EmbeddingWithTrainableRows(_RowOverride, nn.Embedding):
    """nn.Embedding whose rows `row_ids` come from `trainable_rows`; the state dict keeps `weight` under its name."""

    @classmethod
    def wrap(cls, embedding: nn.Embedding, row_ids: list[int]) -> EmbeddingWithTrainableRows:
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        new.weight = embedding.weight
        new._init_rows(embedding.weight, row_ids)
        return new

    def forward(self, input_ids: Tensor) -> Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx)
        # No data-dependent branch (no host sync); with no hit the rows still get a (zero) gradient, as DDP needs.
        hit = input_ids.unsqueeze(-1) == self.row_ids  # (..., k)
        replacement = hit.to(out.dtype) @ self.trainable_rows.to(out.dtype)  # (..., hidden)
        return torch.where(hit.any(-1, keepdim=True), replacement, out)


class LinearWithTrainableRows(_RowOverride, nn.Linear):
    """Bias-free output head whose output features `row_ids` use `trainable_rows` as their weights."""

    @classmethod
    def wrap(cls, linear: nn.Linear, row_ids: list[int]) -> LinearWithTrainableRows:
        if linear.bias is not None:
            raise ValueError("LinearWithTrainableRows supports bias-free heads only (Qwen's lm_head has none)")
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        new._init_rows(linear.weight, row_ids)
        return new

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight)
        rows = F.linear(x, self.trainable_rows.to(x.dtype))  # (..., k)
        return logits.index_copy(-1, self.row_ids, rows.to(logits.dtype))
