"""DSL: dynamic sparse learning of the embedding table under a budget held at every step.

Wang, Sui, Wu, Zheng, Xiong, "Dynamic Sparse Learning: A Novel Paradigm for Efficient
Recommendation" (WSDM 2024, arXiv:2402.02855). Its prune-and-grow step is RigL's (Evci, Gale,
Menick, Castro, Elsen, "Rigging the Lottery: Making All Tickets Winners", ICML 2020).

1. Sparsity initialisation: a uniformly random mask over the embedding table holding exactly the
   budget's number of entries; kept entries are drawn normal(0, `init_std`), the others are zero.
2. Sparse training with the usual loss: entries outside the mask stay zero and get no update.
3. Dynamic exploration, every `update_every` steps up to `end_fraction` of the planned steps:
   drop the fraction p_t of the active entries of smallest |w| and regrow as many inactive
   entries of largest |dL/dw| (the dense gradient of that step's batch). Regrown entries start at
   zero with zeroed optimizer state; entries dropped and regrown in the same update keep theirs.
   p_t = drop_fraction / 2 * (1 + cos(pi * t / T_end)): the cosine-annealed update ratio. The
   update replaces that step's optimizer step, as in RigL.
The stored entries equal the budget at every step (a regrown entry is stored, at value 0). There
is no retraining: the trained sparse model is the result, stored as a `RaggedEmbedding` (CSR;
values, int16 dim indices and int32 row pointers all counted in `memory_bytes`). Its training
time is `search_seconds` (search and training are one run); `retrain_seconds` is 0.

Defaults and their sources: `update_every=100`, `drop_fraction=0.3`, `end_fraction=0.75`,
`schedule="cosine"` are RigL's (the paper's Delta T = 100, alpha = 0.3, T_end = 75% of training;
the defaults of `get_mask_updater` in github.com/google-research/rigl). The DSL paper uses the
same cosine-annealed update ratio with magnitude pruning and gradient growth; its exact alpha and
Delta T for each dataset could not be checked against its text here, so RigL's are used.

Differences, and why:
- Only the embedding table is sparse (DSL sparsifies every weight matrix): in this library the
  budget is an embedding budget and the dense layers are not counted by any method.
- One mask over the fused table of all fields (RigL keeps a sparsity per layer): fields and ids
  compete for the budget, which is the per-feature width search the comparison is about.
- Regrowth ranks the current batch's gradient (RigL's choice), in which only the batch's rows are
  non-zero; when fewer entries have a non-zero gradient than are regrown, `torch.topk` breaks the
  ties.
- Training is the library's `Trainer` with one hook (`MaskSchedule`): per-epoch validation, early
  stopping on `train.patience`, the best epoch (weights and mask) restored, the NaN guard,
  compile and multi-process training. T_end is counted in the planned steps (`train.epochs`), so
  early stopping does not stretch the schedule.
- Sequence padding rows (never read) are never kept or regrown.

Mind the step count: updates happen every `update_every` steps up to T_end only, so a run planned
with fewer than `update_every / end_fraction` steps makes no update at all and is plain static
sparse training from the random mask (the history's `updates` and `regrown` show it). Lower
`update_every` on small data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import num_batches
from dnis.embeddings.blocks import dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import (
    MaskedEmbedding,
    dense_state,
    readable_rows,
    swap_embedding,
    width_report,
)
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.search.methods import Options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, REPORT_BLOCKS, Job, ModelFactory, Phases
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.trainer import EpochContext, TrainConfig, TrainHook, resolve_device

SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclass
class DslConfig(Options):
    """DSL's options (`compare.options.dsl`)."""

    update_every: int = 100  # steps between mask updates (Delta T)
    drop_fraction: float = 0.3  # alpha: the update ratio at step 0
    end_fraction: float = 0.75  # T_end as a fraction of the planned steps; no updates after
    schedule: str = "cosine"  # cosine | constant
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.update_every >= 1, "update_every", "must be >= 1")
        self.require(0 <= self.drop_fraction <= 1, "drop_fraction", "must be in [0, 1]")
        self.require(0 < self.end_fraction <= 1, "end_fraction", "must be in (0, 1]")
        self.require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        self.require(self.init_std > 0, "init_std", "must be > 0")


def drop_fraction_at(step: int, config: DslConfig, t_end: int) -> float:
    """The update ratio p_t: constant, or cosine-annealed from `drop_fraction` to 0 at T_end."""
    if config.schedule == "constant":
        return config.drop_fraction
    return config.drop_fraction / 2 * (1 + math.cos(math.pi * min(step, t_end) / t_end))


def random_mask(
    layout: FieldLayout, dim: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """bool [rows, dim] with exactly `count` entries, uniformly random over readable rows."""
    allowed = readable_rows(layout).unsqueeze(1).expand(layout.total_rows, dim).reshape(-1)
    candidates = allowed.nonzero().squeeze(1)
    if count > len(candidates):
        raise ConfigError(f"dsl: {count} entries asked, the table has {len(candidates)}")
    mask = torch.zeros(allowed.shape, dtype=torch.bool)
    mask[candidates[torch.randperm(len(candidates), generator=generator)[:count]]] = True
    return mask.view(layout.total_rows, dim)


@torch.no_grad()
def prune_and_regrow(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    readable: torch.Tensor,
    fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RigL's update of one mask: (new mask, entries newly activated).

    Drops floor(active * fraction) active entries of smallest |weight|, then activates as many
    entries of largest |grad| among the inactive ones (just-dropped ones included) of readable
    rows, so the count is unchanged."""
    flat = mask.reshape(-1)
    count = int(int(flat.sum()) * fraction)
    if count == 0:
        return mask.clone(), torch.zeros_like(mask)
    inf = torch.tensor(math.inf, device=weight.device, dtype=weight.dtype)
    magnitude = weight.detach().abs().reshape(-1)
    drop = torch.topk(torch.where(flat, magnitude, inf), count, largest=False).indices
    kept = flat.clone()
    kept[drop] = False
    allowed = readable.unsqueeze(1).expand_as(mask).reshape(-1)
    score = torch.where(kept | ~allowed, -inf, grad.detach().abs().reshape(-1))
    grow = torch.topk(score, count).indices
    new = kept.clone()
    new[grow] = True
    return new.view_as(mask), (new & ~flat).view_as(mask)


@torch.no_grad()
def apply_mask(
    embedding: MaskedEmbedding,
    optimizer: Any,
    new_mask: torch.Tensor,
    grown: torch.Tensor,
) -> None:
    """Install `new_mask`: entries off the mask and newly grown ones get value 0 and zeroed
    optimizer state (moments), so they start from scratch and masked entries never drift."""
    reset = ~new_mask | grown
    weight = embedding.weight
    weight[reset] = 0.0
    for value in optimizer.state.get(weight, {}).values():
        if torch.is_tensor(value) and value.shape == weight.shape:
            value[reset] = 0
    embedding.mask.copy_(new_mask)


class MaskSchedule(TrainHook):
    """DSL's part of the training loop: every `update_every` steps up to T_end, the step's
    backward computes the dense gradient and a prune-and-regrow update of the mask replaces the
    optimizer step (RigL); `on_step(step, embedding)` is called after every step."""

    def __init__(
        self,
        embedding: MaskedEmbedding,
        readable: torch.Tensor,
        config: DslConfig,
        t_end: int,
        on_step: Callable[[int, MaskedEmbedding], None] | None = None,
    ) -> None:
        self.embedding, self.readable, self.config = embedding, readable, config
        self.t_end, self.on_step = t_end, on_step
        self.step = 0  # training steps of the whole run
        self.update = False  # whether the running step updates the mask
        self.updates = self.regrown = 0  # of the running epoch
        self.fraction = 0.0
        self.active: list[int] = []

    def epoch_start(self, context: EpochContext) -> None:
        self.updates = self.regrown = 0
        self.fraction = 0.0
        self.active = [int(self.embedding.mask.sum())]

    def before_step(self, context: EpochContext) -> None:
        self.step += 1
        self.update = self.step % self.config.update_every == 0 and self.step <= self.t_end
        self.embedding.dense_grad = self.update  # the dense gradient, for regrowth

    def after_backward(self, context: EpochContext) -> bool:
        if not self.update:
            return False
        embedding, optimizer = self.embedding, context.trainer.optimizer
        embedding.dense_grad = False
        self.fraction = drop_fraction_at(self.step, self.config, self.t_end)
        new_mask, grown = prune_and_regrow(
            embedding.weight, embedding.weight.grad, embedding.mask, self.readable, self.fraction
        )
        apply_mask(embedding, optimizer, new_mask, grown)
        optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.regrown += int(grown.sum())
        self.active.append(int(embedding.mask.sum()))
        return True  # the update replaces this step's optimizer step

    def after_step(self, context: EpochContext) -> None:
        if self.on_step is not None:
            self.on_step(self.step, self.embedding)

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        record.update(
            active_min=min(self.active),
            active_max=max(self.active),
            updates=self.updates,
            regrown=self.regrown,
            drop_fraction=round(self.fraction, 6),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}  # the mask is in the model's state, its moments the optimizer's

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


@dataclass
class DslRun:
    model: Model
    embedding: MaskedEmbedding
    task: Task
    target: int
    valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_sparse(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int,
    budget: float,
    train: TrainConfig,
    config: DslConfig | None = None,
    on_step: Callable[[int, MaskedEmbedding], None] | None = None,
    phases: Phases | None = None,
) -> DslRun:
    """Train a model whose embedding holds `budget` parameters at every step (`on_step(step,
    embedding)` is called after each step, e.g. to check that; `phases`: where the training
    keeps checkpoints)."""
    config = config or DslConfig()
    started = time.perf_counter()
    layout = FieldLayout.from_dataset(dataset)
    readable = readable_rows(layout)
    target = min(budget_params(budget, layout.total_rows * dim), int(readable.sum()) * dim)
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    mask = random_mask(layout, dim, target, torch.Generator().manual_seed(train.seed))
    embedding = MaskedEmbedding(layout, dim, mask, init_std=config.init_std)
    model = make_model(embedding).to(device)
    t_end = max(
        1, int(config.end_fraction * train.epochs * num_batches(dataset.train, train.batch_size))
    )
    hook = MaskSchedule(embedding, readable.to(device), config, t_end, on_step)
    task = make_task(dataset)
    # the best epoch's weights and mask are restored
    fit = (phases or Phases()).fit(model, task, train, hooks=[hook], phase="dsl epoch")
    return DslRun(
        model, embedding, task, target, fit.valid, fit.history, time.perf_counter() - started
    )


@register_method("dsl", DslConfig)
def dsl_method(job: Job, config: DslConfig) -> list[SearchResult]:
    """One sparse training run per budget, the budget held at every step."""
    make_model, dataset, dim, train = job.make_model, job.dataset, job.dim, job.train
    layout = FieldLayout.from_dataset(dataset)
    blocks = dataset_blocks(dataset, REPORT_BLOCKS)
    results = []
    for budget in job.budgets:
        run = train_sparse(
            make_model, dataset, dim=dim, budget=budget, train=train, config=config,
            phases=job.phases,
        )  # fmt: skip
        final: Model = swap_embedding(make_model, run.embedding.to_ragged(), dense_state(run.model))
        test = run.task.evaluate(final, "test", train.eval_batch_size)
        results.append(
            SearchResult.of_model(
                "dsl",
                run.task.metric,
                budget,
                layout.total_rows * dim,
                final,
                width_report(run.embedding.row_widths(), layout, blocks, dataset.schema.names),
                run.valid,
                test,
                search_seconds=run.seconds,
                retrain_seconds=0.0,
                train_epochs=len(run.history),  # DSL trains once: its sparse training is the search
                history=run.history,
            )
        )
    return results
