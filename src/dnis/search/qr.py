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
from typing import Any

import numpy as np

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.qr import QREmbedding, qr_rows
from dnis.errors import BudgetError
from dnis.search.dnis import ModelFactory
from dnis.search.methods import check_options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import train_compact
from dnis.tasks import make_task
from dnis.train.trainer import TrainConfig

QR_OPTIONS = ("init_std",)


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


@register_method("qr")
def qr_method(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    options: dict[str, Any],
) -> list[SearchResult]:
    """Train one quotient-remainder model per budget."""
    check_options("qr", options, QR_OPTIONS)
    init_std = float(options.get("init_std", 0.01))
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    task = make_task(dataset)
    results = []
    for budget in budgets:
        m = choose_m(layout.cardinalities, dim, budget_params(budget, full))
        trained = train_compact(
            make_model, lambda mm=m: QREmbedding(layout, dim, mm, init_std), task, train
        )
        dims = {}
        for f, name in enumerate(layout.names):
            quotient, remainder = qr_rows(layout.cardinalities[f], m[f])
            dims[name] = {
                "block_dims": [dim],
                "m": m[f],
                "quotient_rows": quotient,
                "remainder_rows": remainder,
            }
        results.append(
            SearchResult.from_trained(
                "qr",
                task.metric,
                budget,
                full,
                trained,
                dims,
            )
        )
    return results
