"""The hashing trick baseline: every field hashes its ids into a budgeted number of rows.

The budget buys B = budget // dim rows; field f gets its share by cardinality,
rows_f = floor(B * n_f / N), at least 1 and at most n_f (then stored in full, without collisions).
If the floor of 1 pushes the total over B, the largest fields give rows back one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.hashed import HashedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.errors import BudgetError
from dnis.search.dnis import ModelFactory
from dnis.search.methods import check_options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import train_compact
from dnis.tasks import make_task
from dnis.train.trainer import TrainConfig

HASHING_OPTIONS = ("seed", "init_std")


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


@register_method("hashing")
def hashing_method(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    options: dict[str, Any],
) -> list[SearchResult]:
    """Train one hashed model per budget."""
    check_options("hashing", options, HASHING_OPTIONS)
    seed = int(options.get("seed", 0))
    init_std = float(options.get("init_std", 0.01))
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    task = make_task(dataset)
    results = []
    for budget in budgets:
        rows = hash_rows(layout.cardinalities, budget_params(budget, full) // dim)
        trained = train_compact(
            make_model, lambda r=rows: HashedEmbedding(layout, dim, r, seed, init_std), task, train
        )
        embedding = trained.embedding
        assert isinstance(embedding, HashedEmbedding)
        collisions = embedding.collisions()
        dims = {
            name: {
                "block_dims": [dim],
                "block_rows": [rows[f]],
                "cardinality": layout.cardinalities[f],
                "collisions": collisions[f],
            }
            for f, name in enumerate(layout.names)
        }
        results.append(
            SearchResult.from_trained(
                "hashing",
                task.metric,
                budget,
                full,
                trained,
                dims,
            )
        )
    return results
