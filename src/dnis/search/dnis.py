"""DNIS: differentiable neural input search (Cheng, Shen, Huang, arXiv:2006.04466).

Lifecycle: warm up (plain training) -> search (bilevel: model and embedding steps on training
batches alternate with alpha steps on validation batches, first-order as in DARTS) -> prune to a
budget -> materialise compact tables -> retrain. One search serves many budgets.

Choices where the paper is open, and why:
- Blocks are per field (alpha is [field blocks, d]), so fields compete for the budget.
- alpha's gradient is divided, row by row, by its mean absolute value: rare blocks get tiny raw
  gradients and would otherwise never move (as in the authors' AutoSrh code).
- alpha is clamped to [0, 1] after each step; an L1 term on alpha pushes useless dims to 0.
- The model keeps its best validation epoch of the search, then is pruned.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import batches, num_batches
from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BLOCK_MODES, BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.search.prune import GRANULARITIES, budget_params, prune_blocks, prune_elements
from dnis.search.result import SearchResult
from dnis.search.training import ModelFactory, block_report
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.progress import Progress, SilentProgress
from dnis.train.trainer import TrainConfig, Trainer, epoch_seed, make_optimizer


@dataclass
class DnisConfig:
    """Hyper-parameters of the search (the `search:` section of a config)."""

    num_blocks: int = 6  # frequency blocks per field
    # count: equal id counts; mass: equal training frequency mass; or explicit edges as fractions
    # of each field's ids, e.g. [0.05, 0.2, 0.5] (then num_blocks is ignored)
    block_mode: str | list[float] = "count"
    warmup_epochs: int = 1  # plain training before alpha starts to move
    search_epochs: int = 10  # bilevel epochs
    alpha_lr: float = 0.01
    alpha_optimizer: str = "sgd"  # sgd | adam
    alpha_l1: float = 1e-4  # L1 penalty on alpha in the alpha step
    normalize_alpha_grad: bool = True  # per-block gradient normalisation
    granularity: str = "block"  # block | element
    retrain: str = "finetune"  # finetune: start from the searched weights; scratch: re-initialise
    budgets: list[float] = field(default_factory=lambda: [0.25])  # fractions of the full table

    def __post_init__(self) -> None:
        if isinstance(self.block_mode, str) and self.block_mode not in BLOCK_MODES:
            raise ConfigError(
                f"search.block_mode must be one of {BLOCK_MODES} or a list of edge fractions"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"search.granularity must be one of {GRANULARITIES}")
        if self.retrain not in ("finetune", "scratch"):
            raise ConfigError("search.retrain must be 'finetune' or 'scratch'")
        if self.alpha_optimizer not in ("sgd", "adam"):
            raise ConfigError("search.alpha_optimizer must be 'sgd' or 'adam'")
        for budget in self.budgets:
            budget_params(budget, 1 << 62)  # refuses 0, negatives and non-integral counts > 1
        if self.search_epochs < 1 or self.num_blocks < 1 or self.warmup_epochs < 0:
            raise ConfigError(
                "search: search_epochs and num_blocks must be >= 1, warmup_epochs >= 0"
            )


@dataclass
class SearchState:
    """What one search leaves behind, enough to prune and retrain at any budget."""

    model: Model
    embedding: SoftSelectionEmbedding
    blocks: BlockLayout
    task: Task
    before: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    seconds: float


def alpha_stats(alpha: torch.Tensor, blocks: BlockLayout, names: Sequence[str]) -> dict[str, Any]:
    a = alpha.detach()
    block_field = torch.tensor(blocks.field)
    per_field = {n: round(float(a[block_field == f].mean()), 4) for f, n in enumerate(names)}
    return {
        "alpha_mean": round(float(a.mean()), 4),
        "alpha_below_0.01": round(float((a < 0.01).float().mean()), 4),
        "alpha_field_mean": per_field,
    }


def search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int = 64,
    config: DnisConfig | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
) -> SearchState:
    """Warm up, then alternate model steps (train batches) and alpha steps (valid batches)."""
    config = config or DnisConfig()
    train = train or TrainConfig()
    progress = progress or SilentProgress()
    started = time.perf_counter()
    blocks = dataset_blocks(dataset, config.num_blocks, config.block_mode)
    torch.manual_seed(train.seed)
    embedding = SoftSelectionEmbedding(FieldLayout.from_dataset(dataset), dim, blocks)
    model = make_model(embedding)
    task = make_task(dataset)
    alpha = embedding.alpha
    alpha.requires_grad_(False)
    if config.warmup_epochs:
        warm = TrainConfig(**{**vars(train), "epochs": config.warmup_epochs, "patience": 0})
        Trainer(model, task, warm, progress=progress).fit()
    alpha.requires_grad_(True)
    model_opt = make_optimizer(model, train, exclude=[alpha])
    alpha_opt: torch.optim.Optimizer = (
        torch.optim.SGD([alpha], lr=config.alpha_lr)
        if config.alpha_optimizer == "sgd"
        else torch.optim.Adam([alpha], lr=config.alpha_lr)
    )
    best, best_state, history = None, None, []
    for epoch in range(1, config.search_epochs + 1):
        seed = epoch_seed(train.seed, 1000 + epoch)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        valid_stream = _cycle(dataset, train.batch_size, generator)
        model.train()
        progress.epoch_start(epoch, num_batches(dataset.train, train.batch_size))
        total = 0.0
        for ids, labels in batches(
            dataset.train, train.batch_size, shuffle=True, generator=generator
        ):
            loss = task.loss(model, ids, labels, generator)
            if train.embedding_l2:
                loss = loss + train.embedding_l2 * embedding.last_l2
            model_opt.zero_grad(set_to_none=True)
            loss.backward()
            model_opt.step()
            total += float(loss.detach()) * len(ids)
            _alpha_step(model, task, alpha, next(valid_stream), config, alpha_opt, generator)
            progress.batch_end()
        valid = task.evaluate(model, "valid", train.eval_batch_size)
        record = {
            "epoch": epoch,
            "loss": total / len(dataset.train),
            **{f"valid_{k}": v for k, v in valid.items()},
            **alpha_stats(alpha, blocks, dataset.schema.names),
        }
        history.append(record)
        progress.epoch_end(record)
        if task.better(valid[task.metric], best):
            best, best_state = valid[task.metric], copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    alpha.requires_grad_(False)
    before = {s: task.evaluate(model, s, train.eval_batch_size) for s in ("valid", "test")}
    return SearchState(
        model, embedding, blocks, task, before, history, time.perf_counter() - started
    )


def _cycle(dataset: EncodedDataset, batch_size: int, generator: torch.Generator):
    while True:
        yield from batches(dataset.valid, batch_size, shuffle=True, generator=generator)


def _alpha_step(
    model: Model,
    task: Task,
    alpha: nn.Parameter,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: DnisConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """One first-order step on alpha with a validation batch, then clamp to [0, 1]."""
    ids, labels = batch
    loss = task.loss(model, ids, labels, generator)
    if config.alpha_l1:
        loss = loss + config.alpha_l1 * alpha.abs().sum()
    (grad,) = torch.autograd.grad(loss, [alpha])
    if config.normalize_alpha_grad:
        grad = grad / (grad.abs().mean(dim=1, keepdim=True) + 1e-12)
    alpha.grad = grad
    optimizer.step()
    with torch.no_grad():
        alpha.clamp_(0.0, 1.0)


def materialize(state: SearchState, budget: float, granularity: str) -> FieldEmbedding:
    """The compact embedding for one budget, holding the searched weights with alpha folded in."""
    soft = state.embedding
    full = soft.weight.numel()
    target = budget_params(budget, full)
    table = soft.selected_weight().detach()
    if granularity == "block":
        keep = prune_blocks(soft.alpha, state.blocks, target)
        compact: FieldEmbedding = BlockMixedEmbedding(soft.layout, soft.dim, state.blocks, keep)
    else:
        keep = prune_elements(table, soft.layout, target)
        compact = RaggedEmbedding(soft.layout, soft.dim, keep)
    compact.load_dense(table)
    return compact


def dims_report(
    compact: FieldEmbedding, blocks: BlockLayout, names: Sequence[str]
) -> dict[str, Any]:
    """Per field: kept dims of every block (block granularity) or width statistics (element)."""
    if isinstance(compact, BlockMixedEmbedding):
        return block_report(compact.dims_per_block(), blocks, names)
    assert isinstance(compact, RaggedEmbedding)
    out: dict[str, Any] = {}
    widths = compact.widths()
    for f, name in enumerate(names):
        start = int(compact.field_offsets[f])
        w = widths[start : start + compact.layout.cardinalities[f]]
        histogram = torch.bincount(w, minlength=compact.dim + 1)
        out[name] = {
            "mean_width": round(float(w.float().mean()), 3),
            "max_width": int(w.max()),
            "zero_width_ids": int((w == 0).sum()),
            "width_histogram": {int(k): int(v) for k, v in enumerate(histogram) if v},
            "block_mean_width": [
                round(float(widths[s : s + n].float().mean()), 3)
                for s, n in ((blocks.start[b], blocks.size[b]) for b in blocks.blocks_of(f))
            ],
        }
    return out


def retrain(
    state: SearchState,
    make_model: ModelFactory,
    budget: float,
    *,
    config: DnisConfig,
    train: TrainConfig,
    progress: Progress | None = None,
) -> SearchResult:
    """Prune to `budget`, materialise, and retrain with the structure fixed."""
    started = time.perf_counter()
    compact = materialize(state, budget, config.granularity)
    torch.manual_seed(train.seed)
    model = make_model(compact)
    if config.retrain == "finetune":
        dense = {
            k: v for k, v in state.model.state_dict().items() if not k.startswith("embedding.")
        }
        model.load_state_dict(dense, strict=False)
    else:
        compact.reset_parameters()
    task = state.task
    pruned = task.evaluate(model, "valid", train.eval_batch_size)
    result = Trainer(model, task, train, progress=progress).fit()
    test = task.evaluate(model, "test", train.eval_batch_size)
    return SearchResult(
        method="dnis",
        metric=task.metric,
        budget=budget,
        full_params=state.embedding.weight.numel(),
        embedding_params=compact.num_parameters(),
        memory_bytes=compact.memory_bytes(),
        dims=dims_report(compact, state.blocks, state.task.dataset.schema.names),
        metrics={"valid": result.valid, "test": test},
        before=state.before,
        pruned=pruned,
        search_seconds=state.seconds,
        retrain_seconds=time.perf_counter() - started,
        history=state.history,
        model=model,
    )


def dnis(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int = 64,
    budget: float | Sequence[float] = 0.25,
    config: DnisConfig | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
) -> SearchResult | list[SearchResult]:
    """Search once, then prune and retrain for each budget (a list gives a list of results)."""
    config = config or DnisConfig()
    train = train or TrainConfig()
    state = search(make_model, dataset, dim=dim, config=config, train=train, progress=progress)
    budgets = [budget] if isinstance(budget, int | float) else list(budget)
    results = [
        retrain(state, make_model, b, config=config, train=train, progress=progress)
        for b in budgets
    ]
    return results[0] if isinstance(budget, int | float) else results
