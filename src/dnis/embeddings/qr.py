"""Quotient-remainder embeddings (Shi et al., KDD 2020): two small tables compose every id's vector.

Field f with n_f ids and collision count m_f stores a quotient table [ceil(n_f / m_f), dim] and a
remainder table [m_f, dim]; id i reads `Q_f[i // m_f] * R_f[i % m_f]` (element-wise product, the
paper's default operation). The pair (i // m, i % m) is unique per id, so no two ids share a
vector even though every row is shared. A field with m_f = 0 keeps a full table [n_f, dim] (in the
quotient buffer) and no remainder rows. All fields' quotient rows live in one buffer and all
remainder rows in another, so a batch is two gathers with per-field offsets.

Initialisation: both tables ~ N(0, sqrt(std)), so their product has the scale (std) of a plain
table's entries; full tables are N(0, std).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout


def qr_rows(cardinality: int, m: int) -> tuple[int, int]:
    """(quotient rows, remainder rows) of a field; m = 0 means a full table."""
    if m == 0:
        return cardinality, 0
    return math.ceil(cardinality / m), m


class QREmbedding(FieldEmbedding):
    def __init__(
        self, layout: FieldLayout, dim: int, m: Sequence[int], init_std: float = 0.01
    ) -> None:
        """`m[f]`: field f's collision count (>= 1), or 0 for a full table."""
        super().__init__(layout, dim)
        m_list = [int(v) for v in m]
        if len(m_list) != layout.num_fields or any(v < 0 for v in m_list):
            raise ValueError(f"m must be {layout.num_fields} counts >= 0, got {m_list}")
        shapes = [qr_rows(n, v) for n, v in zip(layout.cardinalities, m_list, strict=True)]
        quotient = torch.tensor([q for q, _ in shapes], dtype=torch.long)
        remainder = torch.tensor([r for _, r in shapes], dtype=torch.long)
        zero = torch.zeros(1, dtype=torch.long)
        self.quotient = nn.Parameter(torch.empty(int(quotient.sum()), dim))
        self.remainder = nn.Parameter(torch.empty(int(remainder.sum()), dim))
        self.register_buffer("m", torch.tensor(m_list, dtype=torch.long))
        # derived (not saved): per-field offsets and the divisor (1 for full tables)
        self.register_buffer("q_offsets", torch.cumsum(torch.cat([zero, quotient[:-1]]), 0), False)
        self.register_buffer("r_offsets", torch.cumsum(torch.cat([zero, remainder[:-1]]), 0), False)
        self.register_buffer("divisor", self.m.clamp(min=1), persistent=False)
        self.register_buffer("composed", self.m > 0, persistent=False)
        self.register_buffer(
            "full_row",
            (~self.composed)[torch.repeat_interleave(torch.arange(len(quotient)), quotient)],
            persistent=False,
        )
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.quotient, std=math.sqrt(std))
        nn.init.normal_(self.remainder, std=math.sqrt(std))
        self.quotient[self.full_row] = torch.randn_like(self.quotient[self.full_row]) * std

    def indices(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quotient row, remainder row, composed?) of global rows."""
        field = self.fields_of(rows)
        local = rows - self.field_offsets[field]
        divisor = self.divisor[field]
        composed = self.composed[field]
        q = self.q_offsets[field] + local // divisor
        r = torch.where(composed, self.r_offsets[field] + local % divisor, 0)
        return q, r, composed

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        q, r, composed = self.indices(rows)
        vectors = nn.functional.embedding(q, self.quotient)
        if self.remainder.numel() == 0:
            return vectors
        factor = nn.functional.embedding(r, self.remainder)
        return vectors * torch.where(composed.unsqueeze(-1), factor, 1.0)

    def num_parameters(self) -> int:
        return self.quotient.numel() + self.remainder.numel()
