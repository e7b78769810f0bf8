"""Matrix factorisation (Koren et al. 2009) and its implicit-feedback form for BPR (Rendle 2009)."""

from __future__ import annotations

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.models.base import Model
from dnis.models.layers import LinearTerms
from dnis.models.registry import register_model


@register_model("mf")
class MF(Model):
    """score = <e_user, e_item> (+ global bias + user bias + item bias when `biased`).

    Only the user and item fields are used; other fields of the dataset are ignored.
    """

    def __init__(self, schema: Schema, embedding: nn.Module, biased: bool = True) -> None:
        super().__init__(schema, embedding)
        self.user_field, self.item_field = self.user_item_fields()
        self.linear = LinearTerms(embedding.layout) if biased else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fields = self.embedding(ids)
        score = (fields[:, self.user_field] * fields[:, self.item_field]).sum(dim=1)
        if self.linear is not None:
            columns = [self.user_field, self.item_field]
            score = score + self.linear.weights(ids)[:, columns].sum(dim=(1, 2)) + self.linear.bias
        return score

    def factors(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(user side [B, k], item side [B, k]) with forward(ids) = (user * item).sum(1): the
        biases ride along as two extra columns. Full-ranking evaluation scores all items for a
        chunk of users as one matrix product of these, instead of a forward pass per pair."""
        fields = self.embedding(ids)
        user, item = fields[:, self.user_field], fields[:, self.item_field]
        if self.linear is None:
            return user, item
        weights = self.linear.weights(ids).squeeze(2)  # [B, F]
        ones = torch.ones_like(weights[:, :1])
        user_bias = weights[:, self.user_field : self.user_field + 1] + self.linear.bias
        item_bias = weights[:, self.item_field : self.item_field + 1]
        return torch.cat([user, user_bias, ones], 1), torch.cat([item, ones, item_bias], 1)


@register_model("bprmf")
class BPRMF(MF):
    """MF without biases, the classic model trained with the BPR loss for top-k ranking."""

    def __init__(self, schema: Schema, embedding: nn.Module) -> None:
        super().__init__(schema, embedding, biased=False)
