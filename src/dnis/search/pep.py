"""PEP: Learnable Embedding Sizes for Recommender Systems (Liu, Gao, Chen, Jin, Li; ICLR 2021).

One pruning run serves every budget; each snapshot is then retrained as a lottery ticket.

1. Search. The input layer is a `SoftThresholdEmbedding`: V_hat = sign(V) * relu(|V| - g(s)),
   g = sigmoid, trained jointly with the model under the task's usual loss. The thresholds start
   very negative (g(s) ~ 0, nothing pruned) and rise, so the non-zeros of V_hat fall. They are
   counted every `check_every` steps; the first time they drop to a requested count (largest
   budget first) that mask is saved. The run stops once the smallest budget is saved, as the
   authors' script does.
2. Retrain. Each mask is retrained from the *initial* weights: table = V_0 * mask (the
   lottery-ticket re-initialisation), dense layers rewound to their initial values, mask fixed,
   thresholds gone. The returned model stores only the kept entries (`RaggedEmbedding`, CSR:
   values + int16 dim indices + int32 row pointers, all counted in `memory_bytes`).

Defaults and their sources (the authors' code, github.com/ssui-liu/learnable-embed-sizes-for-RecSys):
- `granularity="feature_dim"`: every script of theirs and the paper's best; `feature`,
  `field_dim`, `field`, `dimension` and `global` as in their `threshold_type`.
- `threshold_init=-15`: their MovieLens-1M script (-150 in their Criteo and Avazu scripts).
- The thresholds use the training optimizer and lr (`threshold_lr=None`; they use one Adam for
  every parameter) with weight decay `threshold_decay=1e-5` on s (their `l2_regularization`).
  Under Adam that decay is what lifts s at about `lr` per step while g'(s) is tiny; the loss
  gradient steers each threshold once g(s) nears the weights' magnitudes. A larger
  `threshold_lr` sweeps the thresholds faster when a dataset gives few steps per epoch.
- `check_every=1`: they count the non-zeros after every step (`log_interval=1`) and save the
  table when the count is <= the target, so a snapshot holds at most the budget. A count reads
  the whole table (one pass over V and s); raise `check_every` for very large tables.
- Retraining re-initialises to the saved initial table times the mask (`re_init=False` in their
  retrain scripts).

Differences from the paper and the authors' code, and why:
- The search is bounded: `search_epochs` (default: train.epochs) plus at most `extra_epochs`
  (default 10) more while some budget is still unreached; the authors train until every target
  is met, without bound. A budget still unreached then is pruned by magnitude to exactly its
  count: the `target` entries of largest |V_hat| at the last step (the same rule, with the
  threshold set by hand instead of learned). The result says so (`dims[field]["snapshot"] ==
  "magnitude_fallback"` and a history record), so a bigger model is never passed off as PEP's.
- Table initialisation is the library's normal(0, `init_std`=0.01), not Xavier-uniform, so all
  methods start alike; the L2 on embeddings is the library's per-batch `embedding_l2` on V_hat
  (their `l2_penalty`), not Adam weight decay on V.
- Dense layers are rewound to their saved initial weights explicitly; the authors get the same
  by rebuilding the model from the same seed.
- Counts leave out sequence padding rows, which a model never reads.

The search is a `Trainer` run with one hook (`ThresholdSchedule`: the thresholds' step, the
counts, the snapshots), so it has the trainer's NaN guard, compile and multi-process training;
the retraining is a plain `Trainer` run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import num_batches
from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import (
    THRESHOLD_GRANULARITIES,
    MaskedEmbedding,
    SoftThresholdEmbedding,
    dense_state,
    swap_embedding,
    width_report,
)
from dnis.errors import ConfigError
from dnis.models.base import Model
from dnis.search.methods import Options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, REPORT_BLOCKS, Job, ModelFactory, Phases, phase_config
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.trainer import (
    OPTIMIZERS,
    EpochContext,
    TrainConfig,
    TrainHook,
    resolve_device,
)


@dataclass
class PepConfig(Options):
    """PEP's options (`compare.options.pep`)."""

    granularity: str = "feature_dim"
    threshold_init: float = -15.0
    threshold_lr: float | None = None  # None: train.lr
    threshold_decay: float = 1e-5
    search_epochs: int | None = None  # None: train.epochs
    extra_epochs: int = 10  # more epochs only while a budget is unreached
    check_every: int = 1  # steps between non-zero counts
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(
            self.granularity in THRESHOLD_GRANULARITIES,
            "granularity",
            f"must be one of {THRESHOLD_GRANULARITIES}",
        )
        self.require(
            self.threshold_lr is None or self.threshold_lr > 0, "threshold_lr", "must be > 0"
        )
        self.require(self.threshold_decay >= 0, "threshold_decay", "must be >= 0")
        self.require(self.init_std > 0, "init_std", "must be > 0")
        self.require(
            self.search_epochs is None or self.search_epochs >= 1, "search_epochs", "must be >= 1"
        )
        self.require(self.extra_epochs >= 0, "extra_epochs", "must be >= 0")
        self.require(self.check_every >= 1, "check_every", "must be >= 1")


@dataclass
class PepSnapshot:
    """The pruned table saved for one budget."""

    target: int  # the budget as a parameter count
    mask: torch.Tensor  # bool [rows, dim]
    values: torch.Tensor  # V_hat * mask at the snapshot
    dense: dict[str, torch.Tensor]  # the model's other weights at the snapshot
    step: int
    epoch: int
    source: str  # "threshold" (PEP's own) or "magnitude_fallback"

    @property
    def nonzeros(self) -> int:
        return int(self.mask.sum())


@dataclass
class PepSearch:
    """What one pruning run leaves: the initial weights and one snapshot per budget."""

    layout: FieldLayout
    dim: int
    task: Task
    blocks: BlockLayout
    init_weight: torch.Tensor  # V_0, for the lottery-ticket re-initialisation
    init_dense: dict[str, torch.Tensor]  # the model's other initial weights
    budgets: list[float]
    snapshots: list[PepSnapshot]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def same_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, decay: float):
    """An optimizer of the training kind for extra parameters (PEP's thresholds).

    The thresholds are dense, so under `sparse_adam` (sparse rows for the table) they use Adam.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}")
    kind = {"adam": torch.optim.Adam, "sparse_adam": torch.optim.Adam,
            "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}  # fmt: skip
    return kind[name](params, lr=lr, weight_decay=decay)


def top_magnitude(table: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of the `count` entries of largest |table| (magnitude pruning to a count)."""
    flat = table.detach().abs().reshape(-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, min(count, flat.numel()), sorted=False).indices] = True
    return keep.view_as(table)


def ticket_embedding(
    layout: FieldLayout, dim: int, mask: torch.Tensor, init_weight: torch.Tensor
) -> MaskedEmbedding:
    """PEP's retraining table: the saved initial weights times the mask, the mask fixed."""
    return MaskedEmbedding(layout, dim, mask, weight=init_weight)


class ThresholdSchedule(TrainHook):
    """PEP's part of the training loop: after every model step, the thresholds' own optimizer
    step; every `check_every` steps and at the end of each epoch, the non-zeros are counted and
    the mask saved for each budget they have dropped to (largest budget first). Once every
    budget is saved the run stops, as the authors' script does."""

    def __init__(
        self,
        model: Model,
        embedding: SoftThresholdEmbedding,
        budgets: Sequence[float],
        targets: Sequence[int],
        config: PepConfig,
        train: TrainConfig,
        search_epochs: int,
    ) -> None:
        self.model, self.embedding = model, embedding
        self.budgets, self.targets = list(budgets), list(targets)
        self.check_every, self.search_epochs = config.check_every, search_epochs
        self.batch_size = train.batch_size
        self.optimizer = same_optimizer(
            train.optimizer,
            [embedding.threshold],
            config.threshold_lr or train.lr,
            config.threshold_decay,
        )
        self.pending = sorted(range(len(budgets)), key=lambda i: -self.targets[i])
        self.snapshots: dict[int, PepSnapshot] = {}
        self.step = 0  # training steps of the whole run
        self.epoch_step = self.epoch_steps = 0
        self.reached: list[float] = []  # budgets saved in the running epoch

    def epoch_start(self, context: EpochContext) -> None:
        self.epoch_step, self.reached = 0, []
        self.epoch_steps = num_batches(context.trainer.task.dataset.train, self.batch_size)

    def after_step(self, context: EpochContext) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.epoch_step += 1
        # the last steps of an epoch are checked whatever check_every
        if self.step % self.check_every == 0 or self.epoch_step == self.epoch_steps:
            self.take(context.epoch)
            context.stop = not self.pending  # every budget saved: the authors' run stops here

    def take(self, epoch: int) -> None:
        """Save the mask of every pending budget the non-zeros have dropped to."""
        nonzeros = self.embedding.num_nonzero()
        while self.pending and nonzeros <= self.targets[self.pending[0]]:
            i = self.pending.pop(0)
            mask = self.embedding.kept()
            self.snapshots[i] = PepSnapshot(
                self.targets[i], mask, self.embedding.sparse_table() * mask,
                dense_state(self.model), self.step, epoch, "threshold",
            )  # fmt: skip
            self.reached.append(self.budgets[i])

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        nonzeros = self.embedding.num_nonzero()
        record.update(
            extra=context.epoch > self.search_epochs,
            nonzeros=nonzeros,
            fraction=round(nonzeros / self.embedding.weight.numel(), 6),
            threshold_mean=self.embedding.mean_threshold(),
            reached=list(self.reached),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "pending": list(self.pending),
            "snapshots": {i: vars(s) for i, s in self.snapshots.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.pending = state["step"], list(state["pending"])
        self.snapshots = {int(i): PepSnapshot(**s) for i, s in state["snapshots"].items()}


def pep_search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    config: PepConfig | None = None,
    phases: Phases | None = None,
) -> PepSearch:
    """Train with soft thresholds and save the pruned mask when each budget is first reached
    (`phases`: where the training keeps checkpoints)."""
    config = config or PepConfig()
    started = time.perf_counter()
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    torch.manual_seed(train.seed)
    embedding = SoftThresholdEmbedding(
        layout, dim, config.granularity, config.threshold_init, config.init_std
    )
    model = make_model(embedding).to(resolve_device(train.device))
    init_weight = embedding.weight.detach().clone()
    init_dense = dense_state(model)
    readable = int(embedding.readable.sum()) * dim
    targets = [min(budget_params(b, full), readable) for b in budgets]
    task = make_task(dataset)
    search_epochs = config.search_epochs or train.epochs
    hook = ThresholdSchedule(model, embedding, budgets, targets, config, train, search_epochs)
    history: list[dict[str, Any]] = []
    if hook.pending:
        fit = (phases or Phases()).fit(
            model,
            task,
            phase_config(train, search_epochs + config.extra_epochs),
            hooks=[hook],
            exclude=[embedding.threshold],  # stepped by the hook, with its own lr and decay
            phase="pep epoch",
            restore_best=False,  # the snapshots are the result
        )
        history = list(fit.history)
    epoch = len(history)
    if hook.pending:  # unreached within the bound: magnitude pruning to exactly the budget
        table = embedding.sparse_table()
        for i in hook.pending:
            mask = top_magnitude(table, targets[i])
            hook.snapshots[i] = PepSnapshot(
                targets[i], mask, table * mask, dense_state(model), hook.step, epoch,
                "magnitude_fallback",
            )  # fmt: skip
        history.append(
            {
                "epoch": epoch,
                "nonzeros": embedding.num_nonzero(),
                "magnitude_fallback": [budgets[i] for i in hook.pending],
            }
        )
    return PepSearch(
        layout=layout,
        dim=dim,
        task=task,
        blocks=dataset_blocks(dataset, REPORT_BLOCKS),
        init_weight=init_weight,
        init_dense=init_dense,
        budgets=list(budgets),
        snapshots=[hook.snapshots[i] for i in range(len(budgets))],
        history=history,
        seconds=time.perf_counter() - started,
    )


def pep_retrain(
    search: PepSearch,
    make_model: ModelFactory,
    index: int,
    train: TrainConfig,
    phases: Phases | None = None,
) -> SearchResult:
    """Retrain the snapshot of budget `index` from V_0 * mask, the mask fixed."""
    started = time.perf_counter()
    snapshot = search.snapshots[index]
    task, layout, dim = search.task, search.layout, search.dim
    # the snapshot as it was, pruned and not retrained
    at_snapshot = swap_embedding(
        make_model, MaskedEmbedding(layout, dim, snapshot.mask, snapshot.values), snapshot.dense
    )
    pruned = task.evaluate(at_snapshot, "valid", train.eval_batch_size)
    torch.manual_seed(train.seed)
    ticket = ticket_embedding(layout, dim, snapshot.mask, search.init_weight)
    model: Model = swap_embedding(make_model, ticket, search.init_dense)
    fit = (phases or Phases()).fit(model, task, train)
    masked = model.embedding
    assert isinstance(masked, MaskedEmbedding)
    final: Model = swap_embedding(make_model, masked.to_ragged(), dense_state(model))
    test = task.evaluate(final, "test", train.eval_batch_size)
    dims = width_report(masked.row_widths(), layout, search.blocks, task.dataset.schema.names)
    for entry in dims.values():
        entry.update(snapshot=snapshot.source, snapshot_step=snapshot.step)
    return SearchResult.of_model(
        "pep",
        task.metric,
        search.budgets[index],
        layout.total_rows * dim,
        final,
        dims,
        fit.valid,
        test,
        pruned=pruned,
        search_seconds=search.seconds,
        retrain_seconds=time.perf_counter() - started,
        train_epochs=len(fit.history),
        epoch_cap_hit=fit.capped,
        history=search.history,
    )


@register_method("pep", PepConfig)
def pep_method(job: Job, config: PepConfig) -> list[SearchResult]:
    """One soft-threshold pruning run, then a lottery-ticket retrain per budget."""
    search = pep_search(
        job.make_model,
        job.dataset,
        budgets=job.budgets,
        dim=job.dim,
        train=job.train,
        config=config,
        phases=job.phases,
    )
    return [
        pep_retrain(search, job.make_model, i, job.train, job.phases)
        for i in range(len(job.budgets))
    ]
