"""Random search over block widths (the NIS-style baseline of the DNIS paper).

Every (field, frequency block) draws a width from the candidates {0, 1, 2, 4, ..., 64} (capped at
dim). A draw over the budget is scaled down greedily: the block whose step down to the next
smaller candidate saves the most parameters steps down, until the structure fits. Each of
`trials` structures trains for `trial_epochs` epochs; the best on validation data is retrained
from scratch with the full training config, stored as a `BlockMixedEmbedding` keeping the first
d_k dims of block k.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.search.methods import Options, register_method, require_blocks
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, block_report, phase_config

DEFAULT_CANDIDATES = (0, 1, 2, 4, 8, 16, 32, 64)


@dataclass
class RandomOptions(Options):
    """Random search's options (`compare.options.random`)."""

    trials: int = 4  # structures drawn per budget
    trial_epochs: int = 2  # epochs of each trial
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES  # widths to draw from (capped at dim)
    num_blocks: int = 6
    block_mode: str | list[float] = "count"  # as DNIS's
    seed: int = 0  # seed of the draws
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.trials >= 1, "trials", "must be >= 1")
        self.require(self.trial_epochs >= 1, "trial_epochs", "must be >= 1")
        self.require(
            bool(self.candidates) and min(self.candidates) >= 0, "candidates", "must be widths >= 0"
        )
        require_blocks(self)
        self.require(self.init_std > 0, "init_std", "must be > 0")


def candidate_widths(candidates: Sequence[int], dim: int) -> np.ndarray:
    """Sorted distinct candidates, capped at dim."""
    widths = sorted({min(int(c), dim) for c in candidates})
    if not widths or widths[0] < 0:
        raise ConfigError(f"random: candidates must be widths >= 0, got {list(candidates)}")
    return np.asarray(widths, dtype=np.int64)


def sample_widths(
    rng: np.random.Generator, sizes: Sequence[int], candidates: np.ndarray, budget: int
) -> list[int]:
    """Random candidate widths per block, stepped down greedily until sum n_k * d_k <= budget."""
    n = np.asarray(sizes, dtype=np.int64)
    level = rng.integers(0, len(candidates), size=len(n))
    if int((n * candidates[0]).sum()) > budget:
        raise BudgetError(
            f"random: even the smallest candidate width ({candidates[0]}) exceeds the budget"
        )
    while int((n * candidates[level]).sum()) > budget:
        saving = np.where(
            level > 0, n * (candidates[level] - candidates[np.maximum(level - 1, 0)]), -1
        )
        level[int(np.argmax(saving))] -= 1
    return candidates[level].tolist()


def keep_first(widths: Sequence[int], dim: int) -> torch.Tensor:
    """keep [num_blocks, dim]: the first d_k dims of block k."""
    return torch.arange(dim).unsqueeze(0) < torch.as_tensor(list(widths)).unsqueeze(1)


def _embedding(
    layout: FieldLayout, dim: int, blocks: BlockLayout, widths: Sequence[int], init_std: float
) -> BlockMixedEmbedding:
    embedding = BlockMixedEmbedding(layout, dim, blocks, keep_first(widths, dim))
    embedding.reset_parameters(init_std)
    return embedding


@register_method("random", RandomOptions)
def random_method(job: Job, options: RandomOptions) -> list[SearchResult]:
    """Short trials of random structures per budget, then the best one retrained in full."""
    candidates = candidate_widths(options.candidates, job.dim)
    blocks = dataset_blocks(job.dataset, options.num_blocks, options.block_mode)
    build = partial(_embedding, job.layout, job.dim, blocks, init_std=options.init_std)
    short = phase_config(job.train, options.trial_epochs)
    results = []
    for index, budget in enumerate(job.budgets):
        target = job.target(budget)
        rng = np.random.default_rng([options.seed, index])
        started = time.perf_counter()
        history: list[dict[str, Any]] = []
        best: tuple[float, list[int]] | None = None
        for trial in range(options.trials):
            widths = sample_widths(rng, blocks.size, candidates, target)
            trained = job.fit(partial(build, widths), train=short, test=False)
            score = trained.valid[job.task.metric]
            history.append(
                {
                    "trial": trial,
                    "widths": widths,
                    "params": trained.embedding.num_parameters(),
                    **{f"valid_{k}": v for k, v in trained.valid.items()},
                }
            )
            if best is None or job.task.better(score, best[0]):
                best = (score, widths)
        assert best is not None
        search_seconds = time.perf_counter() - started
        winner = best[1]
        final = job.fit(partial(build, winner))
        dims = block_report(winner, blocks, job.dataset.schema.names)
        results.append(
            job.result(budget, final, dims, search_seconds=search_seconds, history=history)
        )
    return results
