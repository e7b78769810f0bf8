"""The hashing trick baseline: every field hashes its ids into a budgeted number of rows.

The budget buys B = budget // dim rows; field f gets its share by cardinality,
rows_f = floor(B * n_f / N), at least 1 and at most n_f (then stored in full, without collisions).
If the floor of 1 pushes the total over B, the largest fields give rows back one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from dnis.embeddings.hashed import HashedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.errors import BudgetError
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, train_budgets


@dataclass
class HashingOptions(Options):
    """The hashing trick's options (`compare.options.hashing`)."""

    seed: int = 0  # seed of the hash functions
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.init_std > 0, "init_std", "must be > 0")


def hash_rows(cardinalities: Sequence[int], budget_rows: int) -> list[int]:
    """Rows per field: its share of `budget_rows` by cardinality, clamped to [1, cardinality]."""
    total = sum(cardinalities)
    if budget_rows < len(cardinalities):
        raise BudgetError(
            f"hashing needs at least one row per field ({len(cardinalities)} rows), "
            f"the budget buys {budget_rows}"
        )
    rows = [min(n, max(1, budget_rows * n // total)) for n in cardinalities]
    while sum(rows) > budget_rows:  # only when clamping to 1 added rows: a few steps at most
        f = max(range(len(rows)), key=lambda i: rows[i])
        rows[f] -= 1
    return rows


def hashing_report(
    layout: FieldLayout, dim: int, rows: Sequence[int], embedding: HashedEmbedding
) -> dict[str, Any]:
    """Per field: its rows and how many of its ids collide."""
    collisions = embedding.collisions()
    return {
        name: {
            "block_dims": [dim],
            "block_rows": [rows[f]],
            "cardinality": layout.cardinalities[f],
            "collisions": collisions[f],
        }
        for f, name in enumerate(layout.names)
    }


@register_method("hashing", HashingOptions)
def hashing_method(job: Job, options: HashingOptions) -> list[SearchResult]:
    """Train one hashed model per budget."""
    return train_budgets(
        job,
        lambda target: hash_rows(job.layout.cardinalities, target // job.dim),
        lambda rows: HashedEmbedding(job.layout, job.dim, rows, options.seed, options.init_std),
        partial(hashing_report, job.layout, job.dim),
    )
