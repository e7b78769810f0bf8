"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", WWW 2021).

x_0 is the concatenation of all field vectors (width F * d). Each cross layer computes
x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (full-rank W_l), or with `low_rank` = r the low-rank form
x_{l+1} = x_0 * (U_l (V_l^T x_l) + b_l) + x_l (the mixture of low-rank experts is not included).
The cross network and a ReLU MLP (`hidden`) are combined either "stacked" (x_0 -> cross -> MLP ->
logit) or "parallel" (cross(x_0) and MLP(x_0) concatenated -> logit).

Input layer: the model reads `embedding(ids) -> [B, F, d]` only. Mixed-width results of a search
arrive padded to width d with zeros at pruned dims, so x_0 always has width F * d; a pruned dim
is 0 in x_0 and therefore stays 0 in every cross layer's output (x_0 multiplies element-wise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.models.layers import MLP
from dnis.models.registry import register_model

STRUCTURES = ("stacked", "parallel")


class CrossNetV2(nn.Module):
    """`num_layers` cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l over vectors [B, D]."""

    def __init__(self, dim: int, num_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(dim, dim)
            if low_rank is None
            else nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim))
            for _ in range(num_layers)
        )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


@register_model("dcnv2")
class DCNv2(Model):
    """Deep & Cross Network V2 over the flattened field embeddings.

    Consumes the padded view of mixed-width embeddings: every field vector has width d.
    """

    def __init__(
        self,
        schema: Schema,
        embedding: nn.Module,
        num_cross_layers: int = 3,  # paper tunes 1-4 (best on Criteo: 2); 3 is the common default
        low_rank: int | None = None,  # None = full-rank W_l; r = low-rank U_l V_l^T
        structure: str = "stacked",  # "stacked" or "parallel"; paper: stacked best on Criteo
        hidden: Sequence[int] = (768, 768),  # paper's best DNN on Criteo: 2 layers of 768
        dropout: float = 0.0,
    ) -> None:
        super().__init__(schema, embedding)
        if structure not in STRUCTURES:
            raise ConfigError(f"dcnv2: structure must be one of {STRUCTURES}, got {structure!r}")
        if num_cross_layers < 0:
            raise ConfigError(f"dcnv2: num_cross_layers must be >= 0, got {num_cross_layers}")
        if low_rank is not None and low_rank < 1:
            raise ConfigError(f"dcnv2: low_rank must be >= 1 or None, got {low_rank}")
        self.structure = structure
        width = self.num_fields * self.dim
        self.cross = CrossNetV2(width, num_cross_layers, low_rank)
        self.deep = MLP(width, tuple(hidden), out_dim=None, dropout=dropout)
        out_width = self.deep.out_dim if structure == "stacked" else width + self.deep.out_dim
        self.output = nn.Linear(out_width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(ids).flatten(1)  # [B, F * d]
        if self.structure == "stacked":
            out = self.deep(self.cross(x0))
        else:
            out = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.output(out).squeeze(1)
