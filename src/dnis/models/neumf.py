"""NeuMF (He et al., WWW 2017): a GMF branch and an MLP branch fused by a final linear layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.models.base import Model
from dnis.models.layers import MLP
from dnis.models.registry import register_model


@register_model("neumf")
class NeuMF(Model):
    """GMF (element-wise product) and MLP over [user; item], concatenated into one output.

    Deviation from the paper, on purpose: both branches read the same user and item vectors, so
    the model has one searchable input layer (the paper gives each branch its own embedding).
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        hidden: Sequence[int] = (64, 32, 16),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, embedding)
        self.user_field, self.item_field = self.user_item_fields()
        self.mlp = MLP(2 * self.dim, hidden, out_dim=None, dropout=dropout)
        self.output = nn.Linear(self.dim + self.mlp.out_dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)
        user, item = fields[:, self.user_field], fields[:, self.item_field]
        deep = self.mlp(torch.cat([user, item], dim=1))
        return self.output(torch.cat([user * item, deep], dim=1)).squeeze(1)
