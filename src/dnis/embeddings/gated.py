"""Feature-value selection (OptFS): a gate per row while searching, only the kept rows after.

- `GatedEmbedding` (search): a dense table whose row i is returned as
  `weight[i] * sigmoid(temperature * gate[i]) / sigmoid(gate_init)`; the gate logits start at
  `gate_init` (> 0, so every gate starts open and the row at its plain value) and the search raises
  `temperature` so the gates harden towards 0 or 1. A row is open when its gate logit is > 0.
  `last_l2` (the trainer's `embedding_l2`) is taken on the table rows, so it decays the weights
  and not the gates (the reference's weight decay skips the gates too).
- `KeptRowsEmbedding` (result): the kept rows in a dense [K, dim] table, plus the sorted int32
  global indices of those rows; a lookup finds a row's position by binary search, and a dropped
  row reads the zero vector (every dropped value of every field shares it). Its memory counts the
  index: 4 bytes per kept row.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout, interval_of


def padding_mask(layout: FieldLayout) -> torch.Tensor:
    """True for the rows that hold sequence padding (never read by a model) [total_rows]."""
    mask = torch.zeros(layout.total_rows, dtype=torch.bool)
    offsets = layout.field_offsets()
    mask[offsets[torch.tensor(layout.sequence_fields, dtype=torch.bool)]] = True
    return mask


class GatedEmbedding(FusedEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        init_std: float = 0.01,
        gate_init: float = 0.5,
    ) -> None:
        super().__init__(layout, dim, init_std)
        if gate_init <= 0:
            raise ValueError(f"gate_init must be > 0 (gates start open), got {gate_init}")
        self.gate_init = gate_init
        self.gate = nn.Parameter(torch.full((layout.total_rows,), float(gate_init)))
        self.gate_scale = 1.0 + math.exp(-gate_init)  # 1 / sigmoid(gate_init)
        self.temperature = 1.0
        self._squared = torch.zeros(())
        self.register_buffer("padding", padding_mask(layout), persistent=False)

    def gates(self) -> torch.Tensor:
        """The gate of every row in (0, 1) [total_rows], before the 1/sigmoid(gate_init) scale."""
        return torch.sigmoid(self.temperature * self.gate)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.temperature * self.gate[rows]) * self.gate_scale
        vectors = functional.embedding(rows, self.weight)
        if self.training:
            self._squared = vectors.pow(2).sum(dim=-1)
        return vectors * gate.unsqueeze(-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        if self.training:  # L2 on the table rows, not through the gates (the reference's decay)
            weights = self.pooling.slot_weights(ids, self._squared.dtype)
            squared = self._squared if weights is None else self._squared * weights
            self.last_l2 = squared.sum() / ids.shape[0]
        return out

    def gate_l1(self) -> torch.Tensor:
        """Sum of all (positive) gates: the L1 penalty that closes useless feature values."""
        return self.gates().masked_fill(self.padding, 0.0).sum()

    def open_rows(self) -> torch.Tensor:
        """Rows whose gate is open (logit > 0), padding excluded [total_rows] (bool)."""
        return (self.gate.detach() > 0) & ~self.padding

    def num_parameters(self) -> int:
        return self.weight.numel() + self.gate.numel()


class KeptRowsEmbedding(FieldEmbedding):
    def __init__(
        self, layout: FieldLayout, dim: int, keep: torch.Tensor, init_std: float = 0.01
    ) -> None:
        """`keep` [total_rows] (bool): the rows that keep a vector; the others read zeros."""
        super().__init__(layout, dim)
        keep = keep.bool().cpu()
        if keep.shape != (layout.total_rows,):
            raise ValueError(f"keep must be [{layout.total_rows}], got {list(keep.shape)}")
        if layout.total_rows > torch.iinfo(torch.int32).max:
            raise ValueError("KeptRowsEmbedding stores row indices as int32")
        kept = keep.nonzero().squeeze(1)
        self.weight = nn.Parameter(torch.empty(len(kept), dim))
        self.register_buffer("kept", kept.to(torch.int32))  # sorted global rows: the structure
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.weight, std=std)

    def positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in the kept table, whether the row is kept) of every row, same shape."""
        if self.kept.numel() == 0:
            return torch.zeros_like(rows), torch.zeros_like(rows, dtype=torch.bool)
        query = rows.to(torch.int32)
        position = torch.searchsorted(self.kept, query).clamp_max(self.kept.numel() - 1)
        return position.long(), self.kept[position] == query

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kept.numel() == 0:
            return torch.zeros(*rows.shape, self.dim, device=rows.device)
        position, hit = self.positions(rows)
        return functional.embedding(position, self.weight) * hit.unsqueeze(-1).to(self.weight.dtype)

    @torch.no_grad()
    def load_dense(self, table: torch.Tensor) -> None:
        """Copy the kept rows of a dense [total_rows, dim] table."""
        self.weight.copy_(table[self.kept.long().to(table.device)].to(self.weight.device))

    def num_parameters(self) -> int:
        return self.weight.numel()

    def rows_per_field(self) -> list[int]:
        """Kept rows of every field."""
        field = interval_of(self.kept.long().cpu(), self.field_offsets.cpu())
        return torch.bincount(field, minlength=self.layout.num_fields).tolist()
