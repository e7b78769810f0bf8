"""Unified Embedding (Coleman et al., NeurIPS 2023, arXiv:2305.12102): feature multiplexing.

Paper: B. Coleman, W.-C. Kang, M. Fahrbach, R. Wang, L. Hong, E. H. Chi, D. Z. Cheng, "Unified
Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems". Instead of one table
per field (the hashing trick gives each field its own share of the budget), every field hashes
into ONE shared table with its own hash function. The table is the whole budget, whatever the
number of fields: `rows = budget_params // width` rows of `width` floats, so the table never
costs more than the budget and never less than the budget minus one row.

Lookups (see `dnis.embeddings.multiplexed`): `probes` = k hashed lookups per id.
- Default k = 1: the multiplexed hashing trick of the paper's analysis and public-benchmark
  experiments (Section 4), every id one row of width `dim`.
- k > 1 with ``combine: concat`` (default): Unified Embedding's multi-size lookup (Section 5,
  Figure 1): the table is `dim / k` wide and each id concatenates k chunks read through k
  independent hash functions; this is the form the paper recommends and deploys (variable-length
  embeddings are k lookups into one narrow table). Two ids then share a vector only if all k
  chunks collide.
- ``combine: sum``: k full-width rows summed (multi-probe hashing as in hash embeddings, without
  their learned importance weights), for comparison.

Options (`UnifiedOptions`): `probes` (1), `combine` ("concat"), `seed` (hash seed; None, the
default, is `train.seed`, so the seeds of a `compare` grid also vary the hash functions),
`init_std` (0.01, as the other tables).

Differences from the paper: the paper hashes raw feature values of unbounded vocabularies; we hash
the encoded (frequency-sorted) ids, whose vocabulary is fixed by the training split, with the
universal hash `((a * id + b) mod (2^31 - 1)) mod rows` of `dnis.embeddings.hashed` instead of a
fingerprint hash. Production Unified Embedding lets each feature pick its own number of chunks;
here every field has the same width `dim` (the models need equal widths). At the full budget the
table has a row for every id and ids are not hashed (no collisions), as in the hashing baseline.
We report, per field, the shared table's rows and how many of its ids collide (any row shared),
collide with another field's ids, or are indistinguishable (all rows shared with one other id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.multiplexed import COMBINES, MultiplexedEmbedding, chunk_width
from dnis.errors import BudgetError, ConfigError
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, train_budgets


@dataclass
class UnifiedOptions(Options):
    """Unified Embedding's options (`compare.options.unified`)."""

    probes: int = 1  # hashed lookups per id
    combine: str = "concat"  # concat | sum
    seed: int | None = None  # hash seed; None: train.seed
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.probes >= 1, "probes", "must be >= 1")
        self.require(self.combine in COMBINES, "combine", f"must be one of {COMBINES}")
        self.require(self.init_std > 0, "init_std", "must be > 0")


def unified_rows(budget: int, dim: int, probes: int = 1, combine: str = "concat") -> int:
    """Rows of the shared table: as many rows of its width as the parameter budget buys."""
    try:
        width = chunk_width(dim, probes, combine)
    except ValueError as error:
        raise ConfigError(f"unified: {error}") from None
    rows = budget // width
    if rows < 1:
        raise BudgetError(f"unified: a budget of {budget} parameters buys no row of width {width}")
    return rows


def unified_report(
    layout: FieldLayout, dim: int, rows: int, probes: int, embedding: MultiplexedEmbedding
) -> dict[str, Any]:
    """Per field: the shared table's rows, and how many of the field's ids collide (any row
    shared), collide with another field's ids, or are indistinguishable."""
    counts = embedding.collisions()
    return {
        name: {
            "block_dims": [dim],
            "shared_rows": rows,
            "probes": probes,
            "cardinality": layout.cardinalities[f],
            "collisions": counts["collisions"][f],
            "cross_field_collisions": counts["cross_field"][f],
            "identical": counts["identical"][f],
        }
        for f, name in enumerate(layout.names)
    }


@register_method("unified", UnifiedOptions)
def unified_method(job: Job, options: UnifiedOptions) -> list[SearchResult]:
    """Train one multiplexed model per budget."""
    layout, dim, probes, combine = job.layout, job.dim, options.probes, options.combine
    seed = job.train.seed if options.seed is None else options.seed
    return train_budgets(
        job,
        lambda target: unified_rows(target, dim, probes, combine),
        lambda rows: MultiplexedEmbedding(
            layout, dim, rows, probes, combine, seed, options.init_std
        ),
        lambda rows, embedding: unified_report(layout, dim, rows, probes, embedding),
    )
