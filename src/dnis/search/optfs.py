"""OptFS (Lyu, Tang, Liu, Chen, He, Liu, "Optimizing Feature Set for Click-Through Rate
Prediction", WWW 2023; reference code github.com/fuyuanlyu/OptFS).

OptFS selects feature values, not dims: every row of the table (every value of every field) has
a gate. Lifecycle, as the reference code:
1. Search: train the model, the table and the gate logits g jointly on training batches with
   loss = task loss + reg_lambda * sum_i sigmoid(beta * g_i) (an L1 on the gates; the reference
   sums over every feature value, not only the batch's), the embedding of row i being
   `e_i * sigmoid(beta * g_i) / sigmoid(gate_init)`. Learning by continuation: beta is 1 in the
   first epoch and multiplied by final_temperature ** (1 / (search_epochs - 1)) every epoch, so it
   reaches final_temperature in the last; the gates harden to 0/1. Gates use the model's
   optimizer and learning rate, without weight decay (the reference's second Adam, same lr).
2. Select: a value is kept when its gate is open (g > 0).
3. Retrain the kept values (lottery-ticket rewinding, as the reference): the weights (table and
   dense layers) are reset to their values at the start of epoch `rewind_epoch` (0: the
   initialisation) and the kept rows retrained with hard gates; dropped values read a shared
   zero vector. `retrain: scratch` re-initialises instead.

Defaults: search_epochs 10, final_temperature 1000, rewind_epoch 1 (the reference README's
FM/Criteo row), gate_init 0.5 (the reference's `mask_init`), and reg_lambda 1e-4, NOT the
reference's 2e-9. lambda multiplies a sum over every row and competes with per-row loss gradients
whose size depends on the table and batch size, so its useful value is data-dependent; 2e-9 was
tuned on Criteo (millions of values, batch 4096). Measured on MovieLens latest-small, FM, dim 16,
batch 1024, lr 1e-3, 10 search epochs: CTR with 2e-9 closes no gate (valid AUC 0.802); 1e-4
keeps user 61%, item 4%, year 75% of values open (AUC 0.801); 1e-3 closes nearly all (AUC 0.777).
Rating with 1e-4 keeps user 99.8%, item 81%. Gates move only while beta * |g| is small (later
the sigmoid saturates), so how many gates close also depends on the steps per epoch.

The budget (OptFS has none): a result may hold at most floor(budget / dim) rows. The open rows
are ranked by gate logit (largest first) and the top ones kept until kept_rows * dim <= budget;
when fewer are open, all open rows are kept and the result is under budget. embedding_params =
kept_rows * dim; memory_bytes adds the int32 index of the kept rows (4 bytes each).

Differences from the reference: the table is initialised N(0, init_std) as our other methods
(the reference: Xavier-uniform); the constant 1/sigmoid(gate_init) is folded into the rewound
rows at retraining (the reference keeps multiplying by it); our models' linear (wide) terms are
outside the searched embedding, so a dropped value keeps its one linear weight (the reference
FM has no linear term); the search evaluates every epoch only to log.

The search is a `Trainer` run with one hook (`GateSchedule`: beta, the gate L1 in the loss, the
rewind point), so it has the trainer's NaN guard, compile and multi-process training; its
history's `loss` is the whole objective (task loss, gate L1 and `embedding_l2`) as in every
Trainer run, `task_loss` the task loss alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from dnis import distributed
from dnis.data.dataset import EncodedDataset
from dnis.embeddings.gated import GatedEmbedding, KeptRowsEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.errors import BudgetError, DnisError
from dnis.models.base import Model
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import (
    INIT_STD,
    Job,
    ModelFactory,
    Phases,
    Trained,
    phase_config,
)
from dnis.tasks import make_task
from dnis.tasks.base import Task, model_device
from dnis.train.trainer import EpochContext, TrainConfig, TrainHook, valid_metrics


@dataclass
class OptFSConfig(Options):
    """OptFS's options (`compare.options.optfs`)."""

    search_epochs: int = 10
    final_temperature: float = 1000.0
    reg_lambda: float = 1e-4
    gate_init: float = 0.5
    rewind_epoch: int = 1
    retrain: str = "rewind"  # rewind | scratch
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.search_epochs >= 1, "search_epochs", "must be >= 1")
        self.require(
            0 <= self.rewind_epoch < self.search_epochs,
            "rewind_epoch",
            "must be in [0, search_epochs - 1]",
        )
        self.require(self.final_temperature >= 1, "final_temperature", "must be >= 1")
        self.require(self.reg_lambda >= 0, "reg_lambda", "must be >= 0")
        self.require(self.gate_init > 0, "gate_init", "must be > 0")
        self.require(
            self.retrain in ("rewind", "scratch"), "retrain", "must be 'rewind' or 'scratch'"
        )
        self.require(self.init_std > 0, "init_std", "must be > 0")


@dataclass
class OptFSState:
    """What one search leaves behind: gate logits and the rewind point."""

    gate: torch.Tensor  # logits [total_rows] (CPU)
    open: torch.Tensor  # open and not padding [total_rows] (bool, CPU)
    rewind: dict[str, torch.Tensor]  # model state at the start of epoch `rewind_epoch`
    gate_scale: float
    valid: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float


def temperature(epoch: int, config: OptFSConfig) -> float:
    """beta in epoch `epoch` (0-based): final_temperature ** (epoch / (search_epochs - 1))."""
    if config.search_epochs == 1:
        return 1.0
    return float(config.final_temperature ** (epoch / (config.search_epochs - 1)))


def open_fraction(open_rows: torch.Tensor, layout: FieldLayout) -> dict[str, float]:
    """Share of every field's rows whose gate is open."""
    counts = _per_field(open_rows, layout)
    return {
        name: round(counts[f] / layout.cardinalities[f], 4) for f, name in enumerate(layout.names)
    }


def _per_field(rows: torch.Tensor, layout: FieldLayout) -> list[int]:
    field = torch.repeat_interleave(
        torch.arange(layout.num_fields), torch.tensor(layout.cardinalities)
    )
    return torch.bincount(field[rows.cpu()], minlength=layout.num_fields).tolist()


class GateSchedule(TrainHook):
    """OptFS's part of the training loop: beta for the epoch (learning by continuation), the
    gate L1 added to every batch's loss, and the weights saved at the start of epoch
    `rewind_epoch` (the lottery-ticket rewind point)."""

    def __init__(self, model: Model, embedding: GatedEmbedding, config: OptFSConfig) -> None:
        self.model, self.embedding, self.config = model, embedding, config
        self.rewind: dict[str, torch.Tensor] = {}
        self.task_total = torch.zeros((), dtype=torch.float64)  # the epoch's task loss x rows

    def epoch_start(self, context: EpochContext) -> None:
        epoch = context.epoch - 1  # the schedule counts epochs from 0
        self.embedding.temperature = temperature(epoch, self.config)
        if epoch == self.config.rewind_epoch:
            self.rewind = copy.deepcopy(self.model.state_dict())
        self.task_total = torch.zeros((), dtype=torch.float64, device=model_device(self.model))

    def loss(self, context: EpochContext, loss: torch.Tensor) -> torch.Tensor:
        assert context.batch is not None
        self.task_total += loss.detach().double() * len(context.batch[0])
        return loss + self.config.reg_lambda * self.embedding.gate_l1()

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        task_loss = distributed.all_reduce_sum(self.task_total) / max(context.rows, 1)
        record.update(
            task_loss=float(task_loss),
            temperature=round(self.embedding.temperature, 4),
            open_fraction=open_fraction(self.embedding.open_rows(), self.embedding.layout),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rewind": self.rewind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind = state["rewind"]


def search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int,
    config: OptFSConfig,
    train: TrainConfig,
    phases: Phases | None = None,
) -> OptFSState:
    """Train table, gates and model jointly with the gate L1, hardening the gates every epoch
    (`phases`: where the training keeps checkpoints)."""
    started = time.perf_counter()
    layout = FieldLayout.from_dataset(dataset)
    torch.manual_seed(train.seed)
    embedding = GatedEmbedding(layout, dim, config.init_std, config.gate_init)
    model = make_model(embedding)
    task = make_task(dataset)
    hook = GateSchedule(model, embedding, config)
    fit = (phases or Phases()).fit(
        model,
        task,
        phase_config(train, config.search_epochs),
        hooks=[hook],
        phase="optfs search epoch",
        seed_offset=2999,  # epoch e (from 1) seeds as the former 0-based loop's epoch e - 1
        restore_best=False,  # the gates are read where the search ends
    )
    return OptFSState(
        embedding.gate.detach().cpu().clone(),
        embedding.open_rows().cpu(),
        hook.rewind,
        embedding.gate_scale,
        valid_metrics(fit.history[-1]),  # the gated model's, where the search ended
        fit.history,
        time.perf_counter() - started,
    )


def select_rows(gate: torch.Tensor, open_rows: torch.Tensor, max_rows: int) -> torch.Tensor:
    """keep [rows]: the open rows, cut to the `max_rows` of largest gate logit (ties: lower row)."""
    if int(open_rows.sum()) <= max_rows:
        return open_rows.clone()
    score = torch.where(open_rows, gate, torch.full_like(gate, float("-inf")))
    order = torch.sort(score, descending=True, stable=True).indices
    keep = torch.zeros_like(open_rows)
    keep[order[:max_rows]] = True
    return keep


def retrain(
    state: OptFSState,
    make_model: ModelFactory,
    task: Task,
    keep: torch.Tensor,
    *,
    dim: int,
    config: OptFSConfig,
    train: TrainConfig,
    phases: Phases | None = None,
) -> Trained:
    """Build the kept-rows model, rewind (or re-initialise) it, train it, evaluate it."""
    started = time.perf_counter()
    layout = FieldLayout.from_dataset(task.dataset)
    torch.manual_seed(train.seed)
    compact = KeptRowsEmbedding(layout, dim, keep, config.init_std)
    if config.retrain == "rewind":
        compact.load_dense(state.rewind["embedding.weight"].cpu() * state.gate_scale)
    model = make_model(compact)
    if config.retrain == "rewind":
        dense = {k: v for k, v in state.rewind.items() if not k.startswith("embedding.")}
        model.load_state_dict(dense, strict=False)
    fit = (phases or Phases()).fit(model, task, train)
    test = task.evaluate(model, "test", train.eval_batch_size)
    return Trained(
        model, compact, fit.valid, test, time.perf_counter() - started,
        epochs=len(fit.history), capped=fit.capped,
    )  # fmt: skip


@register_method("optfs", OptFSConfig)
def optfs_method(job: Job, config: OptFSConfig) -> list[SearchResult]:
    """One gate search, then per budget: keep the open (top-gate) rows and retrain them."""
    make_model, dataset, dim, train = job.make_model, job.dataset, job.dim, job.train
    layout = job.layout
    targets = [job.target(b) for b in job.budgets]
    for target in targets:  # refuse infeasible budgets before the search, not after it
        if target < dim:
            raise BudgetError(
                f"optfs: a budget of {target} parameters cannot keep one row of width {dim}"
            )
    state = search(make_model, dataset, dim=dim, config=config, train=train, phases=job.phases)
    task = job.task
    open_counts = _per_field(state.open, layout)
    results = []
    for budget, target in zip(job.budgets, targets, strict=True):
        keep = select_rows(state.gate, state.open, target // dim)
        if not bool(keep.any()):
            raise DnisError(
                f"optfs: the gate search closed every gate of {layout.total_rows} rows (reg_lambda "
                f"{config.reg_lambda:g} outweighs the task loss on this data), so no row is left "
                f"to keep at budget {budget}; lower compare.options.optfs.reg_lambda (e.g. to "
                f"{config.reg_lambda / 100:g})"
            )
        trained = retrain(
            state, make_model, task, keep, dim=dim, config=config, train=train, phases=job.phases
        )
        assert isinstance(trained.embedding, KeptRowsEmbedding)
        kept = trained.embedding.rows_per_field()
        dims = {
            name: {
                "kept_rows": kept[f],
                "open_rows": open_counts[f],
                "cardinality": layout.cardinalities[f],
                "block_mean_width": [round(dim * kept[f] / layout.cardinalities[f], 3)],
            }
            for f, name in enumerate(layout.names)
        }
        results.append(
            job.result(
                budget,
                trained,
                dims,
                before={"valid": state.valid},
                search_seconds=state.seconds,
                history=state.history,
            )
        )
    return results
