"""FusedEmbedding: all fields in one dense table, one gather per batch, per-field offsets."""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout


class FusedEmbedding(FieldEmbedding):
    """One [sum of cardinalities, dim] table: the uniform-width input layer (the baseline)."""

    def __init__(self, layout: FieldLayout, dim: int, init_std: float = 0.01) -> None:
        super().__init__(layout, dim)
        self.weight = nn.Parameter(torch.empty(layout.total_rows, dim))
        nn.init.normal_(self.weight, std=init_std)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(rows, self.weight)

    def num_parameters(self) -> int:
        return self.weight.numel()
