"""The model contract: a model is built around an embedding module it is given."""

from __future__ import annotations

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError


class Model(nn.Module):
    """Base of every model: `forward(ids [B, S]) -> scores [B]` (logits for CTR and top-k).

    The embedding is passed in and kept as `self.embedding`; models use only its interface, never
    its type, which is what lets a search method replace the whole input layer.
    """

    def __init__(self, schema: Schema, embedding: nn.Module) -> None:
        super().__init__()
        self.schema = schema
        self.embedding = embedding

    @property
    def dim(self) -> int:
        return int(self.embedding.dim)

    @property
    def num_fields(self) -> int:
        return int(self.embedding.layout.num_fields)

    def user_item_fields(self) -> tuple[int, int]:
        """Field indices of user and item: the schema's roles, else the first two fields."""
        if self.schema.user is not None and self.schema.item is not None:
            return self.schema.index(self.schema.user), self.schema.index(self.schema.item)
        if self.num_fields < 2:
            raise ConfigError(
                f"model {type(self).__name__} needs at least two fields (user and item), the data "
                f"has {self.num_fields}: add the item field to the schema or pick a model such as fm"
            )
        return 0, 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
