"""MagPrune: global magnitude pruning of the trained full-width table, then fine-tuning.

The simple baseline: one-shot magnitude pruning after training, the rule whose gradual form
M. Zhu and S. Gupta study in "To prune, or not to prune: exploring the efficacy of pruning for
model compression" (arXiv:1710.01878, 2017), and which H. V. Tran, T. Chen, Q. V. H. Nguyen,
Z. Huang, L. Cui and H. Yin found hard to beat for recommender embeddings ("A Thorough
Performance Benchmarking on Lightweight Embedding-based Recommender Systems", arXiv:2406.17335,
2024; their `MagPrune`).

1. Train. The model around a full-width `FusedEmbedding` (every field at `dim`), under the job's
   train config: early-stopped on validation, the best epoch's weights restored, as every method
   trains. This one training serves every budget.
2. Prune. Per budget, keep the `budget` entries of largest |weight| over the whole table: global,
   one ranking across every field, row and dim (not per field or per row), so a field whose
   entries carry more weight keeps more of them. The ranking is one stable sort of the
   magnitudes, descending; equal magnitudes keep the lower flat index (row * dim + dim index)
   first, i.e. the more frequent id of a field, then the earlier field, then the lower dim. So
   the ranking is deterministic, and the kept set of a larger budget contains that of a smaller.
   Sequence padding rows are never read by a model, so they are never kept (a budget beyond the
   readable entries keeps them all).
3. Fine-tune. From the trained weights (table entries and dense layers), with the mask fixed: a
   `MaskedEmbedding` (pruned entries exact zeros, no gradient), early-stopped again, under the
   train config (`finetune_epochs`, `finetune_lr` replace its epochs and learning rate). The
   pruned weights themselves count as epoch 0 of that early stopping: when no fine-tuning epoch
   beats them on validation (the full-width model had already converged), they are kept. Then the
   table is made compact: a `RaggedEmbedding` holding only the kept entries (CSR: values, int16
   dim indices, int32 row pointers; plan kind `ragged`, as PEP's and DSL's results), and the
   model is evaluated on valid and test once.

Differences from the benchmark's MagPrune, and why: they prune each table (users, items) on its
own by squared magnitude and do not fine-tune; here one table holds every field and is ranked as
one (what "global" means for a fused table), and the pruned model is fine-tuned as Zhu & Gupta's
pruned models are trained on after each cut (`finetune_epochs: 0` gives the benchmark's
prune-only variant). |w| and w^2 rank alike.

A result's `before` holds the full-width model's valid and test metrics, `pruned` the valid
metrics of the pruned model before fine-tuning, `history` the full-width training's epochs, and
`dims[field]` the kept entries per id (`width_report`) with `threshold` (the smallest kept |w|)
and `finetune_best_epoch` (the fine-tuning epoch kept, 0: the pruned weights).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from dnis.embeddings.blocks import dataset_blocks
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import (
    MaskedEmbedding,
    dense_state,
    readable_rows,
    swap_embedding,
    width_report,
)
from dnis.models.base import Model
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, REPORT_BLOCKS, Job
from dnis.train.trainer import resolve_device


@dataclass
class MagPruneConfig(Options):
    """MagPrune's options (`compare.options.magprune`)."""

    finetune_epochs: int | None = None  # None: train.epochs; 0: no fine-tuning
    finetune_lr: float | None = None  # None: train.lr
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(
            self.finetune_epochs is None or self.finetune_epochs >= 0,
            "finetune_epochs",
            "must be >= 0",
        )
        self.require(self.finetune_lr is None or self.finetune_lr > 0, "finetune_lr", "must be > 0")
        self.require(self.init_std > 0, "init_std", "must be > 0")


@dataclass
class FullWidth:
    """What the trained full-width model leaves for the budgets to be pruned from."""

    table: torch.Tensor  # its trained table [rows, dim], detached, on the CPU
    dense: dict[str, torch.Tensor]  # its other weights
    before: dict[str, dict[str, float]]  # its valid and test metrics
    history: list[dict[str, Any]]
    seconds: float


@dataclass
class Tuned:
    """One budget's pruned model after fine-tuning."""

    model: Model  # compact: a RaggedEmbedding holding the kept entries
    pruned: dict[str, float]  # valid metrics pruned, before fine-tuning
    valid: dict[str, float]  # valid metrics of the returned model
    epochs: int  # fine-tuning epochs run
    best_epoch: int  # the fine-tuning epoch kept (0: none beat the pruned weights)
    capped: bool


def train_full(job: Job, config: MagPruneConfig) -> FullWidth:
    """Train the job's model with every field at `job.dim`, early-stopped on validation."""
    started = time.perf_counter()
    torch.manual_seed(job.train.seed)
    embedding = FusedEmbedding(job.layout, job.dim, config.init_std)
    model = job.make_model(embedding)
    fit = job.phases.fit(model, job.task, job.train, phase="magprune full-width epoch")
    test = job.task.evaluate(model, "test", job.train.eval_batch_size)
    return FullWidth(
        table=embedding.weight.detach().cpu().clone(),
        dense=dense_state(model),
        before={"valid": fit.valid, "test": test},
        history=list(fit.history),
        seconds=time.perf_counter() - started,
    )


def magnitude_order(table: torch.Tensor, layout: FieldLayout) -> torch.Tensor:
    """Flat indices of the table's readable entries by descending |value|; ties: lower index
    first (a stable sort). Keeping the first k of them is global magnitude pruning to k."""
    magnitude = table.detach().abs().cpu().reshape(-1)
    readable = readable_rows(layout).unsqueeze(1).expand(table.shape).reshape(-1)
    candidates = readable.nonzero().squeeze(1)
    ranked = torch.sort(magnitude[candidates], descending=True, stable=True).indices
    return candidates[ranked]


def keep_first(order: torch.Tensor, shape: torch.Size, count: int) -> torch.Tensor:
    """bool mask of `shape`: the first `count` entries of `order` (all of them when fewer)."""
    keep = torch.zeros(shape.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep.view(shape)


def finetune(job: Job, full: FullWidth, mask: torch.Tensor, config: MagPruneConfig) -> Tuned:
    """The pruned model, fine-tuned with `mask` fixed and made compact."""
    task, train = job.task, job.train
    torch.manual_seed(train.seed)
    masked = MaskedEmbedding(job.layout, job.dim, mask, weight=full.table)
    model: Model = swap_embedding(job.make_model, masked, full.dense)
    model.to(resolve_device(train.device))
    pruned = task.evaluate(model, "valid", train.eval_batch_size)
    valid, epochs, best_epoch, capped = pruned, 0, 0, False
    if config.finetune_epochs != 0:
        start = copy.deepcopy(model.state_dict())
        schedule = replace(
            train,
            epochs=config.finetune_epochs or train.epochs,
            lr=config.finetune_lr or train.lr,
        )
        fit = job.phases.fit(model, task, schedule, phase="magprune fine-tune epoch")
        epochs = len(fit.history)
        if task.better(fit.valid[task.metric], pruned[task.metric]):
            valid, best_epoch, capped = fit.valid, fit.best_epoch, fit.capped
        else:  # early stopping at epoch 0: no fine-tuning epoch beat the pruned weights
            model.load_state_dict(start)
    tuned_table = model.embedding
    assert isinstance(tuned_table, MaskedEmbedding)
    compact: Model = swap_embedding(job.make_model, tuned_table.to_ragged(), dense_state(model))
    return Tuned(compact, pruned, valid, epochs, best_epoch, capped)


@register_method("magprune", MagPruneConfig)
def magprune_method(job: Job, config: MagPruneConfig) -> list[SearchResult]:
    """One full-width training; per budget, global magnitude pruning and a fine-tune."""
    full = train_full(job, config)
    order = magnitude_order(full.table, job.layout)
    blocks = dataset_blocks(job.dataset, REPORT_BLOCKS)
    magnitude = full.table.abs().reshape(-1)
    results = []
    for budget in job.budgets:
        started = time.perf_counter()
        count = min(job.target(budget), len(order))
        mask = keep_first(order, full.table.shape, count)
        tuned = finetune(job, full, mask, config)
        model = tuned.model
        test = job.task.evaluate(model, "test", job.train.eval_batch_size)
        dims = width_report(mask.sum(1), job.layout, blocks, job.dataset.schema.names)
        threshold = float(magnitude[order[count - 1]]) if count else 0.0
        for entry in dims.values():
            entry.update(threshold=threshold, finetune_best_epoch=tuned.best_epoch)
        results.append(
            SearchResult.of_model(
                job.method,
                job.task.metric,
                budget,
                job.full,
                model,
                dims,
                tuned.valid,
                test,
                before=full.before,
                pruned=tuned.pruned,
                search_seconds=full.seconds,
                retrain_seconds=time.perf_counter() - started,
                train_epochs=tuned.epochs,
                epoch_cap_hit=tuned.capped,
                history=full.history,
            )
        )
    return results
