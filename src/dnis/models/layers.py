"""Reusable blocks: an MLP, first-order (linear) terms, and the FM interaction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout


class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout stacks, then an optional output layer."""

    def __init__(
        self, in_dim: int, hidden: Sequence[int], out_dim: int | None = 1, dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)
        self.out_dim = out_dim if out_dim is not None else in_dim


class LinearTerms(nn.Module):
    """Global bias plus one learned weight per id (a width-1 fused table): the "wide" / LR part.

    It is not the searched input layer (it has one number per id), so search methods leave it be;
    its parameters are counted apart from the embedding's.
    """

    def __init__(self, layout: FieldLayout) -> None:
        super().__init__()
        self.weights = FusedEmbedding(layout, dim=1, init_std=0.0)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weights(ids).sum(dim=(1, 2)) + self.bias


def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    """Sum of pairwise dot products of field vectors [B, F, d] -> [B], in O(F d)."""
    square_of_sum = fields.sum(dim=1).pow(2)
    sum_of_square = fields.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)
