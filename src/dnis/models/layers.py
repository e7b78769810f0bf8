"""Reusable blocks: an MLP, first-order (linear) terms, and the FM interaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.windows import exporting


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


def _fm_forward(fields: torch.Tensor, field_sum: torch.Tensor) -> torch.Tensor:
    return 0.5 * (field_sum.pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


class _FMInteraction(torch.autograd.Function):
    """The FM interaction with its gradient written out: d/de_f = g * (sum_f' e_f' - e_f), one
    broadcast subtraction and one in-place product, where autograd's chain through the two
    squares and three sums takes about 3x as long (docs/performance.md, "Step roofline")."""

    @staticmethod
    def forward(ctx: Any, fields: torch.Tensor) -> torch.Tensor:
        field_sum = fields.sum(dim=1)
        ctx.save_for_backward(fields, field_sum)
        return _fm_forward(fields, field_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        fields, field_sum = ctx.saved_tensors
        return torch.sub(field_sum.unsqueeze(1), fields).mul_(grad.view(-1, 1, 1))


def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    """Sum of pairwise dot products of field vectors [B, F, d] -> [B], in O(F d): half of the
    squared sum minus the sum of squares. The same values with or without a gradient; under
    autograd the gradient comes from `_FMInteraction` (once differentiable; a trace or an ONNX
    export, which have no form for it, take autograd's own)."""
    if fields.requires_grad and torch.is_grad_enabled() and not exporting():
        return _FMInteraction.apply(fields)
    return _fm_forward(fields, fields.sum(dim=1))
