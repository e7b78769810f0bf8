"""FieldSubsetEmbedding: full-width rows for the kept fields, nothing for the dropped ones.

The result of a field-selection method (OutRank): kept fields keep a dense [n_f, dim] table, all of
them stored one after another in one compact table (one gather per batch); a dropped field stores
nothing and its lookups return zero vectors, so a model reads it as absent (zero vectors add
nothing to FM interactions, and an MLP sees constant zeros). Models keep their equal-width input.

`num_parameters` counts the kept fields' rows only; `memory_bytes` adds the keep mask (one bool per
field); the compact offsets are derived from it and not saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout


class FieldSubsetEmbedding(FieldEmbedding):
    def __init__(
        self, layout: FieldLayout, dim: int, keep: Sequence[bool], init_std: float = 0.01
    ) -> None:
        """`keep[f]`: whether field f gets its full-width table (else it reads zeros)."""
        super().__init__(layout, dim)
        keep_t = torch.tensor([bool(k) for k in keep], dtype=torch.bool)
        if keep_t.shape != (layout.num_fields,):
            raise ValueError(f"keep must have {layout.num_fields} entries, got {len(keep_t)}")
        cards = torch.tensor(layout.cardinalities, dtype=torch.long)
        kept_rows = torch.where(keep_t, cards, 0)
        self.weight = nn.Parameter(torch.empty(int(kept_rows.sum()), dim))
        self.register_buffer("keep", keep_t)
        offsets = torch.cumsum(kept_rows, 0) - kept_rows
        self.register_buffer("compact_offsets", offsets, persistent=False)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.weight, std=std)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == 0:  # every field dropped
            return self.weight.new_zeros(*rows.shape, self.dim)
        field = self.fields_of(rows)
        kept = self.keep[field]
        compact = self.compact_offsets[field] + rows - self.field_offsets[field]
        vectors = nn.functional.embedding(torch.where(kept, compact, 0), self.weight)
        return vectors * kept.unsqueeze(-1).to(vectors.dtype)

    def num_parameters(self) -> int:
        return self.weight.numel()
