"""AutoDim (Zhao, Liu, Guo, Tang et al., "AutoDim: Field-aware Embedding Dimension Search in
Recommender Systems", WWW 2021; arXiv:2006.14827 "Memory-efficient Embedding for
Recommendations").

Lifecycle, as in the paper: a supernet in which every field has one embedding table per candidate
width, each mapped to the model width by its own linear layer and a batch norm
(`MultiWidthEmbedding`); pre-train it with equal, fixed architecture weights; then alternate,
first-order DARTS style, a step on the architecture weights alpha with a validation batch and a
step on every other weight with a training batch, the field's vector being the Gumbel-softmax
mixture of its candidates; pick each field's arg-max width; retrain the derived structure from
scratch.

Defaults and where they come from:
- candidates {2, 8, 16, 24, 32} (the issue's set), then doubling widths (64, 128, ...) up to
  `dim`, all capped at `dim` (so the full width is always a candidate). The Hetu re-implementation
  (PKU-DAIR/Hetu, `AutoDimEmbedding`) uses powers of two 2, 4, ..., dim instead.
- Gumbel-softmax temperature tau = max(0.01, 1 - 5e-5 * t), t the training step at the paper's
  batch size of 2000 (as the Hetu re-implementation reads it); we count training examples, so
  tau = max(min_temperature, 1 - temperature_decay * examples) with temperature_decay = 5e-5 /
  2000 per example. On small data (MovieLens) tau therefore stays near 1: the paper's schedule
  anneals over roughly one epoch of Criteo. A larger `temperature_decay` anneals faster.
- architecture weights start equal (alpha = 0, softmax 1/M); the mixture samples p[f] =
  softmax((log_softmax(alpha[f]) + gumbel) / tau), fresh noise every forward pass;
  alpha's optimizer is Adam (`alpha_lr`); `arch_every` training steps per alpha step (1: strict
  alternation as DARTS and the paper's algorithm).
- candidate projections: linear with bias, Xavier-normal initialised (as Hetu). The paper (and
  Hetu) follow it with a batch norm; here that is `batch_norm: true` (per field, candidate and
  dim, no affine parameters, then one learned per-field scale shared by the candidates), and it is
  OFF by default. Why: batch norm gives every candidate's output unit variance, so for a field
  whose ids carry no signal the validation gradient has no reason to prefer any candidate.
  Measured on the synthetic generator (ranks (8, 8), two noise fields, 6000 rows, FM, dim 16,
  candidates {2, 8, 16}, train seeds 0-3): without batch norm the noise fields took width 2 in 7
  of 8 cases and the signal fields 8 or 16 in all 8; with it the signal fields took width 2 in 4
  of 8 cases and the noise fields 8 or 16 in 3 of 8 (DeepFM behaved alike).
- `weight_sharing: true` lets every candidate read the first c_m dims of one table (the
  weight-sharing variant some re-implementations use) instead of one table per candidate.

The budget (AutoDim has none): field f at width w costs its table and its projection,
(n_f + dim) * w. Start from every field's arg-max width; while the total is over the budget, step
down to its next smaller candidate the field that loses the least architecture weight per
parameter saved, (p[f, now] - p[f, next]) / (cost[f, now] - cost[f, next]), p = softmax(alpha).
A budget below every field at the smallest candidate is refused.

Retraining: the selected widths become a `ProjectedBlockEmbedding` with one block per field
(a [n_f, w_f] table and a [w_f, dim] projection, which starts as the identity on the first w_f
dims); projection parameters count in embedding_params. Differences from the paper: batch norm off
by default (above); the retrained projection has no bias and no batch norm (Hetu's retraining
keeps a linear layer with bias and drops the batch norm); first-order updates (Hetu uses DARTS's
second-order estimate).

The warm-up and the search are `Trainer` runs, the search with one hook (`ArchitectureSteps`:
the temperature and the alpha step before each model step), so both have the trainer's NaN
guard, compile and multi-process training (an alpha step takes each rank's share of the
validation batch and averages the gradients, so alpha stays the same on every rank).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from dnis import distributed
from dnis.data.dataset import EncodedDataset
from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.multiwidth import MultiWidthEmbedding
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.models.base import Model
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import (
    INIT_STD,
    Job,
    ModelFactory,
    Phases,
    endless_batches,
    phase_config,
)
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.trainer import EpochContext, TrainConfig, TrainHook, valid_metrics

BASE_CANDIDATES = (2, 8, 16, 24, 32)


@dataclass
class AutoDimConfig(Options):
    """AutoDim's options (`compare.options.autodim`)."""

    candidates: tuple[int, ...] | None = None  # None: BASE_CANDIDATES, then doubling up to dim
    search_epochs: int = 10
    warmup_epochs: int = 1
    alpha_lr: float = 0.01
    arch_every: int = 1
    temperature_decay: float = 5e-5 / 2000  # per training example
    min_temperature: float = 0.01
    batch_norm: bool = False
    weight_sharing: bool = False
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.search_epochs >= 1, "search_epochs", "must be >= 1")
        self.require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        self.require(self.arch_every >= 1, "arch_every", "must be >= 1")
        self.require(self.alpha_lr > 0, "alpha_lr", "must be > 0")
        self.require(self.temperature_decay >= 0, "temperature_decay", "must be >= 0")
        self.require(0 < self.min_temperature <= 1, "min_temperature", "must be in (0, 1]")
        self.require(self.init_std > 0, "init_std", "must be > 0")


@dataclass
class AutoDimState:
    """What one search leaves behind: the architecture weights, enough to select at any budget."""

    probabilities: np.ndarray  # softmax(alpha) [fields, candidates]
    candidates: tuple[int, ...]
    valid: dict[str, float]  # the supernet's validation metrics after the search
    history: list[dict[str, Any]]
    seconds: float


def default_candidates(dim: int) -> tuple[int, ...]:
    widths = list(BASE_CANDIDATES)
    while widths[-1] < dim:
        widths.append(widths[-1] * 2)
    return candidate_widths(widths, dim)


def candidate_widths(candidates: Sequence[int], dim: int) -> tuple[int, ...]:
    """Sorted distinct candidates, capped at dim."""
    widths = sorted({min(int(c), dim) for c in candidates})
    if not widths or widths[0] < 1:
        raise ConfigError(f"autodim: candidates must be widths >= 1, got {list(candidates)}")
    return tuple(widths)


def field_costs(cardinalities: Sequence[int], candidates: Sequence[int], dim: int) -> np.ndarray:
    """cost[f, m] = (n_f + dim) * c_m: field f's table and projection at candidate m."""
    n = np.asarray(cardinalities, dtype=np.int64)
    c = np.asarray(candidates, dtype=np.int64)
    return (n[:, None] + dim) * c[None, :]


def check_floor(costs: np.ndarray, budget: int) -> None:
    """Refuse a budget below every field at the smallest candidate."""
    if int(costs[:, 0].sum()) > budget:
        raise BudgetError(
            f"autodim: every field at the smallest candidate costs {int(costs[:, 0].sum())} "
            f"parameters (tables and projections), over the budget of {budget}; add a smaller "
            "candidate or raise the budget"
        )


def select_widths(probabilities: np.ndarray, costs: np.ndarray, budget: int) -> list[int]:
    """Candidate index per field: arg-max, then cheapest-regret step-downs until it fits."""
    p = np.asarray(probabilities, dtype=np.float64)
    level = p.argmax(axis=1)
    rows = np.arange(len(level))
    check_floor(costs, budget)
    while int(costs[rows, level].sum()) > budget:
        down = np.maximum(level - 1, 0)
        saved = costs[rows, level] - costs[rows, down]
        loss = np.where(level > 0, (p[rows, level] - p[rows, down]) / np.maximum(saved, 1), np.inf)
        level[int(np.argmin(loss))] -= 1
    return level.tolist()


class ArchitectureSteps(TrainHook):
    """AutoDim's part of the training loop: before a model step, the Gumbel temperature of the
    examples trained on so far, and (every `arch_every` steps) a first-order step on the
    architecture weights alpha with a validation batch, the weights held fixed."""

    def __init__(
        self,
        model: Model,
        embedding: MultiWidthEmbedding,
        task: Task,
        config: AutoDimConfig,
        train: TrainConfig,
    ) -> None:
        self.model, self.embedding, self.task = model, embedding, task
        self.config, self.batch_size = config, train.batch_size
        self.optimizer = torch.optim.Adam([embedding.alpha], lr=config.alpha_lr)
        self.valid: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.step = 0  # training steps of the whole run
        self.examples = 0  # training examples of the epochs before the running one
        self.seen = 0  # training examples of the running epoch's steps so far

    def epoch_start(self, context: EpochContext) -> None:
        self.valid = endless_batches(
            self.task.dataset.valid,
            self.batch_size,
            context.generator,
            "AutoDim's architecture steps",
        )
        self.examples += self.seen
        self.seen = 0

    def before_step(self, context: EpochContext) -> None:
        config = self.config
        self.embedding.temperature = max(
            config.min_temperature, 1.0 - config.temperature_decay * (self.examples + self.seen)
        )
        if self.step % config.arch_every == 0:
            assert self.valid is not None
            self._alpha_step(next(self.valid), context.sampler)

    def after_step(self, context: EpochContext) -> None:
        self.step += 1
        self.seen = context.rows

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        p = self.embedding.probabilities().cpu()
        names, candidates = self.task.dataset.schema.names, self.embedding.candidates
        record.update(
            temperature=round(self.embedding.temperature, 6),
            argmax_width={n: candidates[int(p[f].argmax())] for f, n in enumerate(names)},
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "examples": self.examples + self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.examples, self.seen = state["step"], state["examples"], 0

    def _alpha_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
    ) -> None:
        """One first-order step on alpha with a validation batch (the weights held fixed).

        alpha requires a gradient only here, so the model steps do not compute one (the mixture
        weights' gradient costs a full pass over every candidate's vectors). Under torchrun each
        rank takes its share of the batch and the gradients are averaged."""
        alpha = self.embedding.alpha
        ids, labels = distributed.shard(*batch)
        alpha.requires_grad_(True)
        try:
            loss = self.task.loss(self.model, ids, labels, generator)
            (grad,) = torch.autograd.grad(loss, [alpha])
        finally:
            alpha.requires_grad_(False)
        distributed.all_reduce_mean_(grad)
        alpha.grad = grad
        self.optimizer.step()


def search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int,
    config: AutoDimConfig,
    train: TrainConfig,
    phases: Phases | None = None,
) -> AutoDimState:
    """Pre-train the supernet with equal weights, then alternate alpha and weight steps
    (`phases`: where they keep checkpoints)."""
    phases = phases or Phases()
    started = time.perf_counter()
    candidates = (
        default_candidates(dim)
        if config.candidates is None
        else candidate_widths(config.candidates, dim)
    )
    torch.manual_seed(train.seed)
    embedding = MultiWidthEmbedding(
        FieldLayout.from_dataset(dataset),
        dim,
        candidates,
        init_std=config.init_std,
        batch_norm=config.batch_norm,
        weight_sharing=config.weight_sharing,
    )
    model = make_model(embedding)
    task = make_task(dataset)
    embedding.alpha.requires_grad_(False)  # it takes gradients only in the alpha steps
    if config.warmup_epochs:
        embedding.warmup = True
        warm = phase_config(train, config.warmup_epochs)
        phases.fit(model, task, warm, phase="autodim warm-up epoch")
        embedding.warmup = False
    hook = ArchitectureSteps(model, embedding, task, config, train)
    fit = phases.fit(
        model,
        task,
        phase_config(train, config.search_epochs),
        hooks=[hook],
        exclude=[embedding.alpha],
        phase="autodim search epoch",
        seed_offset=2000,
        restore_best=False,  # the search's result is where it ends
    )
    return AutoDimState(
        embedding.probabilities().cpu().numpy(),
        candidates,
        valid_metrics(fit.history[-1]),  # the supernet's, where the search ended
        fit.history,
        time.perf_counter() - started,
    )


def field_blocks(dataset: EncodedDataset) -> BlockLayout:
    """One block per field: its whole id range."""
    return dataset_blocks(dataset, 1)


def dims_report(state: AutoDimState, levels: Sequence[int], layout: FieldLayout) -> dict[str, Any]:
    out = {}
    for f, name in enumerate(layout.names):
        width = state.candidates[levels[f]]
        out[name] = {
            "width": width,
            "argmax_width": state.candidates[int(state.probabilities[f].argmax())],
            "block_dims": [width],
            "block_rows": [layout.cardinalities[f]],
            "arch_weights": {
                str(c): round(float(p), 4)
                for c, p in zip(state.candidates, state.probabilities[f], strict=True)
            },
        }
    return out


@register_method("autodim", AutoDimConfig)
def autodim_method(job: Job, config: AutoDimConfig) -> list[SearchResult]:
    """One supernet search, then per budget: select widths that fit and retrain from scratch."""
    make_model, dataset, dim, layout = job.make_model, job.dataset, job.dim, job.layout
    candidates = (
        default_candidates(dim)
        if config.candidates is None
        else candidate_widths(config.candidates, dim)
    )
    costs = field_costs(layout.cardinalities, candidates, dim)
    targets = [job.target(b) for b in job.budgets]
    for target in targets:  # refuse infeasible budgets before the search, not after it
        check_floor(costs, target)
    state = search(make_model, dataset, dim=dim, config=config, train=job.train, phases=job.phases)
    build = partial(
        ProjectedBlockEmbedding, layout, dim, field_blocks(dataset), init_std=config.init_std
    )
    results = []
    for budget, target in zip(job.budgets, targets, strict=True):
        levels = select_widths(state.probabilities, costs, target)
        trained = job.fit(partial(build, [state.candidates[level] for level in levels]))
        results.append(
            job.result(
                budget,
                trained,
                dims_report(state, levels, layout),
                before={"valid": state.valid},
                search_seconds=state.seconds,
                history=state.history,
            )
        )
    return results
