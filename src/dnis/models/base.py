"""The model contract: a model is built around an embedding module it is given."""

from __future__ import annotations

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError
from dnis.models.layers import LinearTerms


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

    def output_bias(self) -> nn.Parameter | None:
        """The scalar added to every score (the global bias), or None when the model has none.

        Training starts it at the task's base score (the mean rating, the log-odds of the click
        rate), so the first epochs learn the interactions instead of the offset. Found by role:
        the linear terms' bias, else the bias of the last layer that emits the score (an ensemble,
        an output layer, or the MLP's last layer), whichever the model has first.
        """
        linear = getattr(self, "linear", None)
        if isinstance(linear, LinearTerms):
            return linear.bias
        for name in ("ensemble", "output", "mlp"):
            layer = getattr(self, name, None)
            if isinstance(layer, nn.Sequential) and len(layer):
                layer = layer[-1]
            if isinstance(layer, nn.Linear) and layer.out_features == 1 and layer.bias is not None:
                return layer.bias
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
