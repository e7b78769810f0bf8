"""FusedEmbedding: all fields in one table, one gather per batch, per-field offsets."""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.layout import FieldLayout


class FieldPooling(nn.Module):
    """Turns per-slot vectors [B, S, d] into per-field vectors [B, F, d] without a Python loop.

    Sequence slots holding id 0 are padding and are masked; categorical slots always count (their
    id 0 is the learned OOV row). Mean-pooled fields divide by the number of real ids (min 1).
    """

    def __init__(self, layout: FieldLayout) -> None:
        super().__init__()
        self.num_fields = layout.num_fields
        self.identity = not layout.has_sequences
        slot_fields = torch.tensor(layout.slot_fields, dtype=torch.long)
        sequence = torch.tensor(layout.sequence_fields)
        self.register_buffer("slot_fields", slot_fields, persistent=False)
        self.register_buffer("sequence_slot", sequence[slot_fields], persistent=False)
        self.register_buffer("mean_field", torch.tensor(layout.mean_pooled), persistent=False)

    def forward(self, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return vectors
        weights = ((ids != 0) | ~self.sequence_slot).to(vectors.dtype)  # [B, S]
        batch, _, dim = vectors.shape
        pooled = vectors.new_zeros(batch, self.num_fields, dim)
        pooled.index_add_(1, self.slot_fields, vectors * weights.unsqueeze(-1))
        counts = weights.new_zeros(batch, self.num_fields).index_add_(1, self.slot_fields, weights)
        divisor = torch.where(self.mean_field, counts.clamp(min=1.0), torch.ones_like(counts))
        return pooled / divisor.unsqueeze(-1)


class FusedEmbedding(nn.Module):
    """One [sum of cardinalities, dim] table; a batch of ids [B, S] gives field vectors [B, F, dim].

    Every model receives its input layer as a module like this one, so a search method can swap in
    another module with the same interface (`layout`, `dim`, `forward`, `field_rows`,
    `num_parameters`) and the model never notices.
    """

    def __init__(self, layout: FieldLayout, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.layout = layout
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(layout.total_rows, dim))
        nn.init.normal_(self.weight, std=init_std)
        self.register_buffer("slot_offsets", layout.slot_offsets(), persistent=False)
        self.register_buffer("field_offsets", layout.field_offsets(), persistent=False)
        self.pooling = FieldPooling(layout)
        self.last_l2 = torch.zeros(())  # mean squared norm of the rows of the last batch

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = nn.functional.embedding(ids + self.slot_offsets, self.weight)  # one gather
        if self.training:
            self.last_l2 = vectors.pow(2).sum() / ids.shape[0]
        return self.pooling(ids, vectors)

    def field_rows(self, field: int) -> torch.Tensor:
        """Every row of one field [cardinality, dim], e.g. all items for full ranking."""
        start = int(self.field_offsets[field])
        return self.weight[start : start + self.layout.cardinalities[field]]

    def num_parameters(self) -> int:
        return self.weight.numel()
