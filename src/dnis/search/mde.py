"""MDE: mixed dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021).

Each field's frequency blocks (the same `dataset_blocks` DNIS uses) get widths by a power law of
popularity: d_k = lambda * p_k^alpha, where p_k is the mean probability of an id of block k (block
count / block size / field count) and alpha in [0, 1] the temperature (0 = uniform widths).
lambda is the largest scale whose rounded widths, clamped to [1, dim], fit the budget, counting
each block's table n_k * d_k and its projection d_k * dim. The temperature is chosen on
validation data among `temperatures`; temperatures that give the same widths train once.

Also holds `train_compact`, the train-and-evaluate step the other baselines share.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.search.dnis import ModelFactory
from dnis.search.methods import check_options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import Trained, block_report, train_compact
from dnis.tasks import make_task
from dnis.train.trainer import TrainConfig

MDE_OPTIONS = ("temperatures", "num_blocks", "block_mode", "init_std")


def block_probabilities(blocks: BlockLayout, num_fields: int) -> np.ndarray:
    """p_k: mean training probability of one id of block k, within its field."""
    freq = np.asarray(blocks.frequency, dtype=np.float64)
    size = np.asarray(blocks.size, dtype=np.float64)
    field = np.asarray(blocks.field)
    total = np.bincount(field, weights=freq, minlength=num_fields)
    return freq / size / np.maximum(total[field], 1.0)


def mde_cost(widths: np.ndarray, sizes: np.ndarray, dim: int) -> int:
    """Parameters of the tables (n_k * d_k) and projections (d_k * dim)."""
    return int(((sizes + dim) * widths).sum())


def mde_widths(
    probabilities: Sequence[float],
    sizes: Sequence[int],
    dim: int,
    temperature: float,
    budget: int,
) -> list[int]:
    """Widths round(lambda * p^temperature) clamped to [1, dim], lambda the largest that fits."""
    if not 0 <= temperature <= 1:
        raise ConfigError(f"mde temperatures must be in [0, 1], got {temperature}")
    p = np.asarray(probabilities, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.int64)
    score = p**temperature  # 0 ** 0 == 1: temperature 0 is uniform, even for unseen blocks

    def widths_at(scale: float) -> np.ndarray:
        return np.clip(np.rint(scale * score), 1, dim).astype(np.int64)

    smallest = mde_cost(np.ones_like(n), n, dim)
    if smallest > budget:
        raise BudgetError(
            f"mde needs at least {smallest} parameters (width 1 and a 1 x {dim} projection per "
            f"block) but the budget is {budget}; use fewer num_blocks or a larger budget"
        )
    if mde_cost(np.full_like(n, dim), n, dim) <= budget:
        return [dim] * len(n)
    if not (score > 0).any():  # no block was ever seen: nothing to rank them by
        return [1] * len(n)
    low, high = 0.0, 2.0 * dim / score[score > 0].min()
    for _ in range(200):
        middle = (low + high) / 2
        if mde_cost(widths_at(middle), n, dim) <= budget:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return widths_at(low).tolist()


@register_method("mde")
def mde_method(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    options: dict[str, Any],
) -> list[SearchResult]:
    """Power-law widths per frequency block, temperature picked on validation data."""
    check_options("mde", options, MDE_OPTIONS)
    temperatures = [float(t) for t in options.get("temperatures", [0.1, 0.2, 0.3, 0.5])]
    if not temperatures:
        raise ConfigError("mde: temperatures must not be empty")
    num_blocks = int(options.get("num_blocks", 6))
    init_std = float(options.get("init_std", 0.01))
    blocks = dataset_blocks(dataset, num_blocks, options.get("block_mode", "count"))
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    probabilities = block_probabilities(blocks, layout.num_fields)
    task = make_task(dataset)
    results = []
    for budget in budgets:
        target = budget_params(budget, full)
        trials: dict[tuple[int, ...], Trained] = {}
        history = []
        for temperature in temperatures:
            widths = tuple(mde_widths(probabilities, blocks.size, dim, temperature, target))
            if widths not in trials:
                trials[widths] = train_compact(
                    make_model,
                    lambda w=widths: ProjectedBlockEmbedding(layout, dim, blocks, w, init_std),
                    task,
                    train,
                    test=False,
                )
            trial = trials[widths]
            history.append(
                {"temperature": temperature, "widths": list(widths), **_prefixed(trial.valid)}
            )
        best_widths = None
        for widths, trial in trials.items():
            if best_widths is None or task.better(
                trial.valid[task.metric], trials[best_widths].valid[task.metric]
            ):
                best_widths = widths
        assert best_widths is not None
        best = trials[best_widths]
        started = time.perf_counter()
        test = task.evaluate(best.model, "test", train.eval_batch_size)
        best.seconds += time.perf_counter() - started
        chosen = next(h["temperature"] for h in history if tuple(h["widths"]) == best_widths)
        for record in history:
            record["chosen"] = record["temperature"] == chosen
        results.append(
            SearchResult(
                method="mde",
                metric=task.metric,
                budget=budget,
                full_params=full,
                embedding_params=best.embedding.num_parameters(),
                memory_bytes=best.embedding.memory_bytes(),
                dims=block_report(best_widths, blocks, dataset.schema.names),
                metrics={"valid": best.valid, "test": test},
                search_seconds=sum(t.seconds for w, t in trials.items() if w != best_widths),
                retrain_seconds=best.seconds,
                train_epochs=best.epochs,
                epoch_cap_hit=best.capped,
                history=history,
                model=best.model,
            )
        )
    return results


def _prefixed(valid: dict[str, float]) -> dict[str, float]:
    return {f"valid_{k}": v for k, v in valid.items()}
