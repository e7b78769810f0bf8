"""MDE: mixed dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021).

Each field's frequency blocks (the same `dataset_blocks` DNIS uses) get widths by a power law of
popularity: d_k = lambda * p_k^alpha, where p_k is the mean probability of an id of block k (block
count / block size / field count) and alpha in [0, 1] the temperature (0 = uniform widths).
lambda is the largest scale whose rounded widths, clamped to [1, dim], fit the budget, counting
each block's table n_k * d_k and its projection d_k * dim. The temperature is chosen on
validation data among `temperatures`; temperatures that give the same widths train once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.search.methods import Options, register_method, require_blocks
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, Trained, block_report


@dataclass
class MdeOptions(Options):
    """MDE's options (`compare.options.mde`)."""

    temperatures: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)  # tried per budget
    num_blocks: int = 6
    block_mode: str | list[float] = "count"  # as DNIS's
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(
            bool(self.temperatures) and all(0 <= t <= 1 for t in self.temperatures),
            "temperatures",
            "must be a non-empty list of temperatures in [0, 1]",
        )
        require_blocks(self)
        self.require(self.init_std > 0, "init_std", "must be > 0")


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


@register_method("mde", MdeOptions)
def mde_method(job: Job, options: MdeOptions) -> list[SearchResult]:
    """Power-law widths per frequency block, temperature picked on validation data."""
    blocks = dataset_blocks(job.dataset, options.num_blocks, options.block_mode)
    layout, dim, task = job.layout, job.dim, job.task
    build = partial(ProjectedBlockEmbedding, layout, dim, blocks, init_std=options.init_std)
    probabilities = block_probabilities(blocks, layout.num_fields)
    results = []
    for budget in job.budgets:
        target = job.target(budget)
        trials: dict[tuple[int, ...], Trained] = {}
        history = []
        for temperature in options.temperatures:
            widths = tuple(mde_widths(probabilities, blocks.size, dim, temperature, target))
            if widths not in trials:
                trials[widths] = job.fit(partial(build, widths), test=False)
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
        best.test = task.evaluate(best.model, "test", job.train.eval_batch_size)
        best.seconds += time.perf_counter() - started
        chosen = next(h["temperature"] for h in history if tuple(h["widths"]) == best_widths)
        for record in history:
            record["chosen"] = record["temperature"] == chosen
        results.append(
            job.result(
                budget,
                best,
                block_report(best_widths, blocks, job.dataset.schema.names),
                search_seconds=sum(t.seconds for w, t in trials.items() if w != best_widths),
                history=history,
            )
        )
    return results


def _prefixed(valid: dict[str, float]) -> dict[str, float]:
    return {f"valid_{k}": v for k, v in valid.items()}
