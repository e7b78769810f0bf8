"""Factorization machines (Rendle 2010), Wide&Deep (Cheng et al. 2016), DeepFM (Guo et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.models.base import Model
from dnis.models.layers import MLP, LinearTerms, fm_interaction
from dnis.models.registry import register_model


@register_model("fm")
class FM(Model):
    """score = bias + sum_i w_i + sum_{i<j} <e_i, e_j> over all fields."""

    def __init__(self, schema: Schema, embedding: nn.Module) -> None:
        super().__init__(schema, embedding)
        self.linear = LinearTerms(embedding.layout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(ids) + fm_interaction(self.embedding(ids))


@register_model("widedeep")
class WideDeep(Model):
    """score = linear terms (wide, over the ids) + MLP over the concatenated field vectors (deep)."""

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, embedding)
        self.linear = LinearTerms(embedding.layout)
        self.mlp = MLP(self.num_fields * self.dim, hidden, out_dim=1, dropout=dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)
        return self.linear(ids) + self.mlp(fields.flatten(1)).squeeze(1)


@register_model("deepfm")
class DeepFM(WideDeep):
    """score = linear terms + FM interaction + MLP, all three reading the same field vectors."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)
        return self.linear(ids) + fm_interaction(fields) + self.mlp(fields.flatten(1)).squeeze(1)
