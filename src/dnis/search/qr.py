"""QR embeddings baseline (Shi et al., "Compositional Embeddings Using Complementary Partitions
for Memory-Efficient Recommendation Systems", KDD 2020).

One collision count m for all fields: the smallest m whose tables fit the budget, so ids share
as few rows as the budget allows. A field whose full table is no larger than its two QR tables
(n_f <= ceil(n_f / m) + m) keeps the full table (m_f = 0 in the embedding). A field's QR cost
ceil(n/m) + m falls until m ~ sqrt(n) and then rises, so no m above sqrt(max n) + 1 can fit when
none below does; the scan is vectorised over m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.qr import QREmbedding, qr_rows
from dnis.errors import BudgetError
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, train_budgets


@dataclass
class QROptions(Options):
    """QR embeddings' options (`compare.options.qr`)."""

    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.init_std > 0, "init_std", "must be > 0")


def field_rows(cardinalities: Sequence[int], m: np.ndarray) -> np.ndarray:
    """[len(m), fields]: rows each field stores for each global m (full table when cheaper)."""
    n = np.asarray(cardinalities, dtype=np.int64)[None, :]
    m = np.asarray(m, dtype=np.int64)[:, None]
    composed = -(-n // m) + m
    return np.minimum(n, composed)


def choose_m(cardinalities: Sequence[int], dim: int, budget: int) -> list[int]:
    """Per field: the global m (smallest that fits), or 0 where the full table is kept."""
    largest = max(cardinalities)
    candidates = np.arange(1, math.isqrt(largest) + 3)
    totals = field_rows(cardinalities, candidates).sum(axis=1) * dim
    fits = np.flatnonzero(totals <= budget)
    if len(fits) == 0:
        raise BudgetError(
            f"qr needs at least {int(totals.min())} parameters, the budget is {budget}"
        )
    m = int(candidates[fits[0]])
    return [0 if n <= -(-n // m) + m else m for n in cardinalities]


def qr_report(layout: FieldLayout, dim: int, m: Sequence[int]) -> dict[str, Any]:
    """Per field: its m (0: the full table) and the rows of its two tables."""
    dims = {}
    for f, name in enumerate(layout.names):
        quotient, remainder = qr_rows(layout.cardinalities[f], m[f])
        dims[name] = {
            "block_dims": [dim],
            "m": m[f],
            "quotient_rows": quotient,
            "remainder_rows": remainder,
        }
    return dims


@register_method("qr", QROptions)
def qr_method(job: Job, options: QROptions) -> list[SearchResult]:
    """Train one quotient-remainder model per budget."""
    layout, dim = job.layout, job.dim
    return train_budgets(
        job,
        partial(choose_m, layout.cardinalities, dim),
        lambda m: QREmbedding(layout, dim, m, options.init_std),
        lambda m, _: qr_report(layout, dim, m),
    )
