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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import batches
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
from dnis.search.methods import check_options, register_method
from dnis.search.prune import budget_params
from dnis.search.result import SearchResult
from dnis.search.training import ModelFactory
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.trainer import (
    OPTIMIZERS,
    TrainConfig,
    Trainer,
    epoch_seed,
    make_optimizer,
    resolve_device,
    training_loss,
)

REPORT_BLOCKS = 6  # frequency blocks per field for the width report (not used by the method)


@dataclass
class PepConfig:
    """PEP's options (`compare.options.pep`)."""

    granularity: str = "feature_dim"
    threshold_init: float = -15.0
    threshold_lr: float | None = None  # None: train.lr
    threshold_decay: float = 1e-5
    search_epochs: int | None = None  # None: train.epochs
    extra_epochs: int = 10  # more epochs only while a budget is unreached
    check_every: int = 1  # steps between non-zero counts
    init_std: float = 0.01

    def __post_init__(self) -> None:
        if self.granularity not in THRESHOLD_GRANULARITIES:
            raise ConfigError(
                f"pep: granularity must be one of {THRESHOLD_GRANULARITIES}, got {self.granularity!r}"
            )
        if self.threshold_lr is not None and self.threshold_lr <= 0:
            raise ConfigError("pep: threshold_lr must be > 0")
        if self.threshold_decay < 0 or self.init_std <= 0:
            raise ConfigError("pep: threshold_decay must be >= 0 and init_std > 0")
        if self.search_epochs is not None and self.search_epochs < 1:
            raise ConfigError("pep: search_epochs must be >= 1")
        if self.extra_epochs < 0 or self.check_every < 1:
            raise ConfigError("pep: extra_epochs must be >= 0 and check_every >= 1")


PEP_OPTIONS = tuple(f.name for f in fields(PepConfig))


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


def train_device(train: TrainConfig) -> torch.device:
    """The device `train.device` names (models from a run's factory are already there)."""
    return resolve_device(train.device)


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


def pep_search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    config: PepConfig | None = None,
) -> PepSearch:
    """Train with soft thresholds and save the pruned mask when each budget is first reached."""
    config = config or PepConfig()
    started = time.perf_counter()
    layout = FieldLayout.from_dataset(dataset)
    full = layout.total_rows * dim
    device = train_device(train)
    torch.manual_seed(train.seed)
    embedding = SoftThresholdEmbedding(
        layout, dim, config.granularity, config.threshold_init, config.init_std
    )
    model = make_model(embedding).to(device)
    init_weight = embedding.weight.detach().clone()
    init_dense = dense_state(model)
    readable = int(embedding.readable.sum()) * dim
    targets = [min(budget_params(b, full), readable) for b in budgets]
    pending = sorted(range(len(budgets)), key=lambda i: -targets[i])  # largest budget first
    task = make_task(dataset)
    optimizer = make_optimizer(model, train, exclude=[embedding.threshold])
    threshold_optimizer = same_optimizer(
        train.optimizer,
        [embedding.threshold],
        config.threshold_lr or train.lr,
        config.threshold_decay,
    )
    snapshots: dict[int, PepSnapshot] = {}
    search_epochs = config.search_epochs or train.epochs
    history: list[dict[str, Any]] = []
    step = epoch = 0

    def take(epoch: int, reached: list[float]) -> None:
        nonzeros = embedding.num_nonzero()
        while pending and nonzeros <= targets[pending[0]]:
            i = pending.pop(0)
            mask = embedding.kept()
            snapshots[i] = PepSnapshot(
                targets[i], mask, embedding.sparse_table() * mask, dense_state(model), step,
                epoch, "threshold",
            )  # fmt: skip
            reached.append(budgets[i])

    while pending and epoch < search_epochs + config.extra_epochs:
        epoch += 1
        seed = epoch_seed(train.seed, epoch)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        reached: list[float] = []
        for ids, labels in batches(
            dataset.train, train.batch_size, shuffle=True, generator=generator
        ):
            loss = training_loss(
                task, model, embedding, (ids, labels), generator, train, f"pep epoch {epoch}",
                "lower train.lr or threshold_lr",
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            threshold_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            threshold_optimizer.step()
            total += loss.detach() * len(ids)
            seen += len(ids)
            step += 1
            if step % config.check_every == 0:
                take(epoch, reached)
                if not pending:
                    break  # every budget saved: the authors' run stops here too
        if pending:
            take(epoch, reached)  # the last steps of an epoch are checked whatever check_every
        valid = task.evaluate(model, "valid", train.eval_batch_size)
        nonzeros = embedding.num_nonzero()
        history.append(
            {
                "epoch": epoch,
                "extra": epoch > search_epochs,
                "loss": float(total) / max(seen, 1),
                "nonzeros": nonzeros,
                "fraction": round(nonzeros / full, 6),
                "threshold_mean": embedding.mean_threshold(),
                "reached": reached,
                **{f"valid_{k}": v for k, v in valid.items()},
            }
        )
    if pending:  # unreached within the bound: magnitude pruning to exactly the budget
        table = embedding.sparse_table()
        for i in pending:
            mask = top_magnitude(table, targets[i])
            snapshots[i] = PepSnapshot(
                targets[i], mask, table * mask, dense_state(model), step, epoch,
                "magnitude_fallback",
            )  # fmt: skip
        history.append(
            {
                "epoch": epoch,
                "nonzeros": embedding.num_nonzero(),
                "magnitude_fallback": [budgets[i] for i in pending],
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
        snapshots=[snapshots[i] for i in range(len(budgets))],
        history=history,
        seconds=time.perf_counter() - started,
    )


def pep_retrain(
    search: PepSearch, make_model: ModelFactory, index: int, train: TrainConfig
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
    fit = Trainer(model, task, train).fit()
    masked = model.embedding
    assert isinstance(masked, MaskedEmbedding)
    final: Model = swap_embedding(make_model, masked.to_ragged(), dense_state(model))
    test = task.evaluate(final, "test", train.eval_batch_size)
    dims = width_report(masked.row_widths(), layout, search.blocks, task.dataset.schema.names)
    for entry in dims.values():
        entry.update(snapshot=snapshot.source, snapshot_step=snapshot.step)
    return SearchResult(
        method="pep",
        metric=task.metric,
        budget=search.budgets[index],
        full_params=layout.total_rows * dim,
        embedding_params=final.embedding.num_parameters(),
        memory_bytes=final.embedding.memory_bytes(),
        dims=dims,
        metrics={"valid": fit.valid, "test": test},
        pruned=pruned,
        search_seconds=search.seconds,
        retrain_seconds=time.perf_counter() - started,
        train_epochs=len(fit.history),
        epoch_cap_hit=fit.capped,
        history=search.history,
        model=final,
    )


@register_method("pep")
def pep_method(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    budgets: Sequence[float],
    dim: int,
    train: TrainConfig,
    options: dict[str, Any],
) -> list[SearchResult]:
    """One soft-threshold pruning run, then a lottery-ticket retrain per budget."""
    check_options("pep", options, PEP_OPTIONS)
    config = PepConfig(**options)
    search = pep_search(make_model, dataset, budgets=budgets, dim=dim, train=train, config=config)
    return [pep_retrain(search, make_model, i, train) for i in range(len(budgets))]
