"""The hashing trick: each field's ids share a smaller table through a seeded universal hash.

Field f keeps `rows[f]` rows; id i reads row `((a_f * i + b_f) mod P) mod rows[f]` of the field's
part of one fused table, with P = 2^31 - 1 (a Mersenne prime) and a_f in [1, P), b_f in [0, P)
drawn from a generator seeded by (seed, f), so fields never share a hash. A field whose rows equal
its cardinality is stored in full (identity map, no collisions). The whole batch is hashed at once
(int64 arithmetic: a_f, i < 2^31, so a_f * i < 2^62 never overflows).

`memory_bytes` counts the table and the hash parameters (a, b, rows: three int64 per field).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout

PRIME = 2**31 - 1


def hash_coefficients(num_fields: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(a, b) per field, from generators seeded by (seed, field)."""
    a, b = [], []
    for f in range(num_fields):
        rng = np.random.default_rng([seed, f])
        a.append(int(rng.integers(1, PRIME)))
        b.append(int(rng.integers(0, PRIME)))
    return a, b


def hash_ids(
    ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """((a * id + b) mod P) mod rows, element-wise (a, b, rows broadcast against ids)."""
    return ((a * ids + b) % PRIME) % rows


def count_collisions(buckets: torch.Tensor) -> int:
    """Number of ids that share their bucket with at least one other id."""
    if buckets.numel() == 0:
        return 0
    counts = torch.bincount(buckets.reshape(-1))
    return int(counts[counts > 1].sum())


class HashedEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        rows: Sequence[int],
        seed: int = 0,
        init_std: float = 0.01,
    ) -> None:
        """`rows[f]` (1..cardinality of f) is the number of table rows field f hashes into."""
        super().__init__(layout, dim)
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        cards = torch.tensor(layout.cardinalities, dtype=torch.long)
        if rows_t.shape != cards.shape:
            raise ValueError(f"rows must have {layout.num_fields} entries, got {len(rows_t)}")
        if bool((rows_t < 1).any()) or bool((rows_t > cards).any()):
            raise ValueError(f"rows per field must be in [1, cardinality], got {rows_t.tolist()}")
        a, b = hash_coefficients(layout.num_fields, seed)
        self.weight = nn.Parameter(torch.empty(int(rows_t.sum()), dim))
        self.register_buffer("a", torch.tensor(a, dtype=torch.long))
        self.register_buffer("b", torch.tensor(b, dtype=torch.long))
        self.register_buffer("rows", rows_t)
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), rows_t[:-1]]), 0)
        self.register_buffer("table_offsets", offsets, persistent=False)
        self.register_buffer("full", rows_t == cards, persistent=False)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.weight, std=std)

    def buckets(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(field, row within the field's part of the table) of global rows."""
        field = self.fields_of(rows)
        local = rows - self.field_offsets[field]
        hashed = hash_ids(local, self.a[field], self.b[field], self.rows[field])
        return field, torch.where(self.full[field], local, hashed)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        field, bucket = self.buckets(rows)
        return nn.functional.embedding(self.table_offsets[field] + bucket, self.weight)

    def num_parameters(self) -> int:
        return self.weight.numel()

    def collisions(self) -> list[int]:
        """Per field: number of its ids that share a row with another id."""
        out = []
        for f in range(self.layout.num_fields):
            start = int(self.field_offsets[f])
            end = start + self.layout.cardinalities[f]
            rows = torch.arange(start, end, device=self.field_offsets.device)
            out.append(count_collisions(self.buckets(rows)[1]))
        return out
