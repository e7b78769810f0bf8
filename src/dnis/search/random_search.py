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
from typing import Any

import numpy as np
import torch

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.search.dnis import ModelFactory
from dnis.search.methods import check_options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import block_report, train_compact
from dnis.tasks import make_task
from dnis.train.trainer import TrainConfig

RANDOM_OPTIONS = (
    "trials",
    "trial_epochs",
    "candidates",
    "num_blocks",
    "block_mode",
    "seed",
    "init_std",
)
DEFAULT_CANDIDATES = (0, 1, 2, 4, 8, 16, 32, 64)


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


@register_method("random")
def random_method(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    options: dict[str, Any],
) -> list[SearchResult]:
    """Short trials of random structures per budget, then the best one retrained in full."""
    check_options("random", options, RANDOM_OPTIONS)
    trials = int(options.get("trials", 4))
    trial_epochs = int(options.get("trial_epochs", 2))
    if trials < 1 or trial_epochs < 1:
        raise ConfigError("random: trials and trial_epochs must be >= 1")
    candidates = candidate_widths(options.get("candidates", DEFAULT_CANDIDATES), dim)
    seed = int(options.get("seed", 0))
    init_std = float(options.get("init_std", 0.01))
    blocks = dataset_blocks(
        dataset, int(options.get("num_blocks", 6)), options.get("block_mode", "count")
    )
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    task = make_task(dataset)
    short = TrainConfig(**{**vars(train), "epochs": trial_epochs, "patience": 0})
    results = []
    for index, budget in enumerate(budgets):
        target = budget_params(budget, full)
        rng = np.random.default_rng([seed, index])
        started = time.perf_counter()
        history: list[dict[str, Any]] = []
        best: tuple[float, list[int]] | None = None
        for trial in range(trials):
            widths = sample_widths(rng, blocks.size, candidates, target)
            trained = train_compact(
                make_model,
                lambda w=widths: _embedding(layout, dim, blocks, w, init_std),
                task,
                short,
                test=False,
            )
            score = trained.valid[task.metric]
            history.append(
                {
                    "trial": trial,
                    "widths": widths,
                    "params": trained.embedding.num_parameters(),
                    **{f"valid_{k}": v for k, v in trained.valid.items()},
                }
            )
            if best is None or task.better(score, best[0]):
                best = (score, widths)
        assert best is not None
        search_seconds = time.perf_counter() - started
        winner = best[1]
        final = train_compact(
            make_model, lambda w=winner: _embedding(layout, dim, blocks, w, init_std), task, train
        )
        results.append(
            SearchResult.from_trained(
                "random",
                task.metric,
                budget,
                full,
                final,
                block_report(winner, blocks, dataset.schema.names),
                search_seconds=search_seconds,
                history=history,
            )
        )
    return results
