"""Feature multiplexing (Unified Embedding, Coleman et al., NeurIPS 2023): all fields, one table.

Every field reads the same table of `rows` rows. Field f's id i makes k lookups (k = `probes`),
probe p at row `h_pf(i) = ((a_pf * i + b_pf) mod P) mod rows`, with the universal hash of
`dnis.embeddings.hashed` (imported, not copied) and one (a, b) pair per (probe, field), drawn from
generators seeded by (seed, p * F + f): no two fields or probes share a hash function, so two
fields' ids collide only by chance, which the model can learn to tell apart (the paper's Section 3
argument: a multiplexed vector decomposes into per-field components).

How the k rows become one vector (`combine`):
- ``concat`` (the paper's Unified Embedding lookup, Section 5 / Figure 1, "multiple lookups and
  concatenate"): the table is `dim / k` wide and the k chunks are concatenated into `dim`. Two ids
  get the same vector only if all k chunks collide, and the table still costs `rows * dim / k`.
- ``sum`` (multi-probe hashing in the style of hash embeddings, without importance weights): the
  table is `dim` wide and the k rows are summed; rows start at N(0, std / sqrt(k)) so the sum has
  the scale of a plain table's entries.
With k = 1 both are the plain multiplexed hashing trick.

When the table has room for every id's k rows (`rows >= k * total ids`, i.e. the full budget), ids
get their own rows (probe p of global row r reads row `p * total + r`): no collisions, the same
rule the hashing baseline follows for a field stored in full.

`memory_bytes` counts the table, the hash parameters (a, b: two int64 per probe and field) and the
table's row count (one int64).
"""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.hashed import hash_coefficients, hash_ids
from dnis.embeddings.layout import FieldLayout

COMBINES: tuple[str, ...] = ("concat", "sum")


def chunk_width(dim: int, probes: int, combine: str) -> int:
    """Width of the shared table's rows: dim / probes when concatenating, dim when summing."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if combine == "concat":
        if dim % probes:
            raise ValueError(f"concat needs probes dividing dim: {probes} does not divide {dim}")
        return dim // probes
    return dim


class MultiplexedEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        rows: int,
        probes: int = 1,
        combine: str = "concat",
        seed: int = 0,
        init_std: float = 0.01,
    ) -> None:
        """One table of `rows` rows shared by all fields, k = `probes` hashed lookups per id."""
        super().__init__(layout, dim)
        width = chunk_width(dim, probes, combine)
        if rows < 1:
            raise ValueError(f"the shared table needs at least one row, got {rows}")
        self.probes = probes
        self.combine = combine
        self.width = width
        self.identity = rows >= probes * layout.total_rows
        a, b = hash_coefficients(probes * layout.num_fields, seed)
        shape = (probes, layout.num_fields)
        self.weight = nn.Parameter(torch.empty(rows, width))
        # [F, k]: one hash function per (field, probe), indexed by field in `indices`
        self.register_buffer("a", torch.tensor(a, dtype=torch.long).view(shape).T.contiguous())
        self.register_buffer("b", torch.tensor(b, dtype=torch.long).view(shape).T.contiguous())
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long))
        self.register_buffer(
            "probe_offsets", torch.arange(probes) * layout.total_rows, persistent=False
        )
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.01) -> None:
        scale = std / self.probes**0.5 if self.combine == "sum" else std
        nn.init.normal_(self.weight, std=scale)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def indices(self, rows: torch.Tensor) -> torch.Tensor:
        """Table rows [..., k] that global rows [...] read, one per probe."""
        if self.identity:
            return rows.unsqueeze(-1) + self.probe_offsets
        field = self.fields_of(rows)
        local = (rows - self.field_offsets[field]).unsqueeze(-1)
        return hash_ids(local, self.a[field], self.b[field], self.rows)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        chunks = nn.functional.embedding(self.indices(rows), self.weight)  # [..., k, width]
        if self.combine == "sum":
            return chunks.sum(dim=-2)
        return chunks.flatten(-2)

    def num_parameters(self) -> int:
        return self.weight.numel()

    @torch.no_grad()
    def collisions(self) -> dict[str, list[int]]:
        """Per field, counts of its ids (every id of the layout is looked up once):

        - ``collisions``: ids with at least one table row that another lookup (another id, or
          another probe) also reads: the hashing baseline's count when k = 1;
        - ``cross_field``: ids with a row that an id of another field also reads (multiplexing's
          own kind of collision);
        - ``identical``: ids whose vector is built from exactly the same rows as another id's
          (same rows in order for concat, the same multiset for sum): truly indistinguishable.
        """
        fields = self.layout.num_fields
        device = self.field_offsets.device
        every = torch.arange(self.layout.total_rows, device=device)
        field = self.fields_of(every)
        index = self.indices(every)  # [N, k]
        flat = index.reshape(-1)
        flat_field = field.repeat_interleave(self.probes)
        uses = torch.bincount(flat, minlength=self.num_rows)
        shared = (uses[index] > 1).any(dim=1)
        low = torch.full((self.num_rows,), fields, dtype=torch.long, device=device)
        high = torch.full((self.num_rows,), -1, dtype=torch.long, device=device)
        low = low.scatter_reduce(0, flat, flat_field, reduce="amin")
        high = high.scatter_reduce(0, flat, flat_field, reduce="amax")
        cross = (low[index] != high[index]).any(dim=1)
        keys = index.sort(dim=1).values if self.combine == "sum" else index
        _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
        identical = counts[inverse] > 1

        def per_field(mask: torch.Tensor) -> list[int]:
            return torch.bincount(field[mask], minlength=fields).tolist()

        return {
            "collisions": per_field(shared),
            "cross_field": per_field(cross),
            "identical": per_field(identical),
        }
