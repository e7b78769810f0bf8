"""One training, every budget: ordered (Matryoshka) embeddings.

A nested model is one full-width model whose every frequency block keeps a *prefix* of an order
of its dims at any budget, so a smaller budget keeps a subset of a larger one's dims and any
budget is served by truncation, without retraining. Two methods:

- `dnis-nested`: the DNIS search (static: the nested training replaces its gradual pruning phase)
  ranks the (block, dim) entries by alpha, ties broken by saliency (`search.rank` as in DNIS);
  each block's dims are ordered by that same ranking, so every prefix of the global ranking is a
  prefix of every block. With `placement: prefix` (the default) each block's dims are then
  renumbered so that it keeps its first w dims, w as that ranking gives it, so every field's dim
  j meets every other field's dim j. A new model is trained nested (`retrain: scratch`, the
  default: the search only orders the dims), or the searched weights, alpha folded in and moved
  with the renumbering (`finetune`).
- `matryoshka`: no search; every field (one block each) keeps its first w dims, the same w for
  every field (Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022).

A budget keeps the longest prefix of the order whose parameters fit (`NestedOrder.keep`): entries
of equal rank (matryoshka's columns) are kept together. There is no greedy fill with later, smaller
entries as `prune_blocks` does: a fill could keep at one budget an entry a larger budget drops,
and the budgets would no longer be nested; the price is less than one block's rows per budget.

Nested training (`OrderedDropout`): one `Trainer` run of the full-width model in which every step
masks each block to its prefix at a budget drawn log-uniformly between the smallest budget and 1
(ordered dropout, Rippel et al., ICML 2014), every `anchor_every` steps the full width and then the
smallest budget; with `budgets_per_step` > 1 the step's loss is the mean over that many budgets
(Matryoshka's sum over widths). Dense layers are shared by every budget. Batch norm (ARMNet) keeps
one set of running statistics, an average over the widths the steps drew; they are not
recalibrated per budget. Epochs stop when the mean validation metric over the requested budgets
stops improving (`train.patience`), and the best epoch's weights are kept.

Files: a nested result's `save` also writes `order.json` (the order) and `nested.pt` (the full
model's weights) into the run folder, so `dnis export RUN --budget B` and `dnis predict` serve a
budget that was not searched (`cut_state`); in Python, `truncate(result, budget)`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import BudgetError, DnisError
from dnis.io import atomic_write, write_json
from dnis.models.base import Model
from dnis.search.dnis import DnisConfig, search
from dnis.search.methods import Options, register_method
from dnis.search.plan import EmbeddingPlan, plan_of
from dnis.search.prune import block_saliency, budget_params
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, ModelFactory, block_report, phase_config
from dnis.tasks.base import Task
from dnis.train.trainer import EpochContext, TrainConfig, TrainHook, epoch_seed

ORDER_FILE = "order.json"  # the order of a nested run (beside its budgets' files)
NESTED_WEIGHTS = "nested.pt"  # the full nested model's state dict
ORDER_VERSION = 1


@dataclass(frozen=True)
class NestedOrder:
    """Which (block, dim) entries a budget keeps: those whose `rank` level is among the lowest
    levels that fit together; entries of one level are kept together."""

    blocks: BlockLayout
    rank: torch.Tensor  # [num_blocks, dim] long; lower is kept first, and in a block a prefix

    @property
    def dim(self) -> int:
        return self.rank.shape[1]

    @cached_property
    def _levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(level of every entry, parameters kept by the levels up to each one)."""
        _, level = torch.unique(self.rank, return_inverse=True)
        cost = torch.tensor(self.blocks.size).unsqueeze(1).expand_as(self.rank)
        total = torch.zeros(int(level.max()) + 1, dtype=torch.long)
        total.index_add_(0, level.reshape(-1), cost.reshape(-1))
        return level, torch.cumsum(total, 0)

    def keep(self, target: int) -> torch.Tensor:
        """bool [num_blocks, dim]: the longest prefix of the order within `target` parameters."""
        level, spent = self._levels
        return level < int(torch.searchsorted(spent, target, right=True))

    def to_json(self) -> dict[str, Any]:
        b = self.blocks
        layout = {"field": list(b.field), "start": list(b.start), "size": list(b.size)}
        return {"version": ORDER_VERSION, "blocks": layout, "rank": self.rank.tolist()}

    @classmethod
    def read(cls, path: Path) -> NestedOrder:
        """The order in `path`, or a DnisError saying why not."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["version"] != ORDER_VERSION:
                raise ValueError(f"order version {data['version']}, this dnis reads 1")
            b = data["blocks"]
            blocks = BlockLayout(
                tuple(b["field"]), tuple(b["start"]), tuple(b["size"]), (0,) * len(b["start"])
            )
            return cls(blocks, torch.tensor(data["rank"], dtype=torch.long))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DnisError(
                f"{path} is not a readable nested order ({type(error).__name__}: {error}); "
                "rerun the search that wrote it"
            ) from None


def descending(score: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Flat indices of `score` from largest to smallest, equal scores by larger `tiebreak`."""
    order = torch.argsort(tiebreak.reshape(-1), descending=True, stable=True)
    return order[torch.argsort(score.reshape(-1)[order], descending=True, stable=True)]


def searched_order(embedding: SoftSelectionEmbedding, rank_by: str) -> NestedOrder:
    """Entries ranked as DNIS prunes them (alpha, ties by saliency; or saliency): one ranking for
    all blocks, so each block meets its dims in the same order at every budget."""
    saliency = block_saliency(embedding.selected_weight(), embedding.blocks)
    score = saliency if rank_by == "saliency" else embedding.alpha.detach().cpu()
    rank = torch.empty(score.numel(), dtype=torch.long)
    rank[descending(score, saliency)] = torch.arange(score.numel())
    return NestedOrder(embedding.blocks, rank.view_as(score))


def with_floor(order: NestedOrder, floor: int) -> NestedOrder:
    """`order` with every block's first `floor` dims (in the block's own order) ahead of every
    other entry, their relative order kept: budgets up to `floor` dims everywhere grow every block
    alike, larger ones add dims in the searched order. Still one ranking, so still nested."""
    if floor <= 0:
        return order
    place = torch.argsort(torch.argsort(order.rank, dim=1), dim=1)  # position within its block
    shifted = torch.where(place < floor, order.rank, order.rank + order.rank.numel())
    rank = torch.empty(shifted.numel(), dtype=torch.long)
    rank[torch.argsort(shifted.reshape(-1))] = torch.arange(shifted.numel())
    return NestedOrder(order.blocks, rank.view_as(order.rank))


def as_prefixes(order: NestedOrder) -> tuple[NestedOrder, torch.Tensor]:
    """(`order` with every block's dims renumbered so that it keeps a prefix, the permutation):
    the block's k-th ranked dim becomes its dim k, so every budget keeps the same number of dims
    per block as `order` does, at positions 0..w-1. `permutation[b, k]` is the old dim that moves
    to k (for the weights that move with it)."""
    ranks, permutation = torch.sort(order.rank, dim=1)
    return NestedOrder(order.blocks, ranks), permutation


def uniform_order(blocks: BlockLayout, dim: int) -> NestedOrder:
    """Every block's dim j at level j: a budget keeps the same first w dims everywhere."""
    return NestedOrder(blocks, torch.arange(dim).expand(blocks.num_blocks, dim).clone())


@dataclass
class MatryoshkaOptions(Options):
    """The nested training's options (`compare.options.matryoshka`; `dnis-nested` has them too)."""

    budgets_per_step: int = 1  # budgets whose losses each step averages (>1: Matryoshka's sum)
    anchor_every: int = 4  # every n-th step trains the full width, the next the smallest budget
    min_budget: float = 0.0  # smallest budget the steps draw (0: the smallest requested)
    init_std: float = INIT_STD  # matryoshka's table initialisation (dnis-nested: the search's)

    def __post_init__(self) -> None:
        self.require(self.budgets_per_step >= 1, "budgets_per_step", "must be >= 1")
        self.require(self.anchor_every >= 2, "anchor_every", "must be >= 2")
        self.require(0 <= self.min_budget <= 1, "min_budget", "must be a fraction in [0, 1]")
        self.require(self.init_std > 0, "init_std", "must be > 0")


@dataclass
class NestedOptions(DnisConfig, MatryoshkaOptions):
    """`dnis-nested`'s options: DNIS's search options and the nested training's."""

    # where a block's kept dims sit: `prefix`, its first w dims (the search decides w per block
    # and budget, and every field's dim j meets every other's dim j), or `searched`, the dims
    # the search ranked highest in that block (blocks of two fields may then keep disjoint dims,
    # which a dot product between them cannot use)
    placement: str = "prefix"
    # the nested training starts from a new model (the search only gives the order); with prefix
    # placement it was better on validation than `finetune` (docs/methods.md)
    retrain: str = "scratch"

    def __post_init__(self) -> None:
        DnisConfig.__post_init__(self)
        MatryoshkaOptions.__post_init__(self)
        self.require(
            self.placement in ("prefix", "searched"), "placement", "must be prefix or searched"
        )


# DNIS options `dnis-nested` sets itself: a static search at block granularity
NESTED_FIXED = ("budgets", "schedule", "granularity", "structure", "fallback")


class OrderedDropout(TrainHook):
    """Masks the soft-selection table to a budget's prefixes for each training step (its alpha
    holds the 0/1 mask and is never trained), and keeps the epoch whose mean validation metric
    over the requested budgets is best (early stopping on it with `train.patience`)."""

    def __init__(
        self,
        model: Model,
        order: NestedOrder,
        task: Task,
        budgets: list[float],
        options: MatryoshkaOptions,
        train: TrainConfig,
    ) -> None:
        embedding = model.embedding
        assert isinstance(embedding, SoftSelectionEmbedding)
        self.model, self.alpha, self.order, self.task = model, embedding.alpha, order, task
        self.options, self.train, self.budgets = options, train, budgets
        self.full = embedding.weight.numel()
        self.targets = [budget_params(b, self.full) for b in budgets]
        low = options.min_budget or min(self.targets) / self.full
        self.log_low = math.log(max(low, 1 / self.full))
        self.anchors = {0: self.full, 1: budget_params(low, self.full)}  # by step % anchor_every
        self.draws = torch.Generator()
        self.step = 0
        self.rest: list[int] = []  # the current step's other budgets
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "best", "best_state", "stale")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def mask(self, target: int) -> None:
        with torch.no_grad():
            self.alpha.copy_(self.order.keep(target).to(self.alpha))

    def _draw(self) -> int:
        u = float(torch.rand((), generator=self.draws))
        return budget_params(math.exp(self.log_low * (1 - u)), self.full)

    def epoch_start(self, context: EpochContext) -> None:
        self.draws.manual_seed(epoch_seed(self.train.seed, 2000 + context.epoch))

    def before_step(self, context: EpochContext) -> None:
        first = self.anchors.get(self.step % self.options.anchor_every) or self._draw()
        self.rest = [self._draw() for _ in range(self.options.budgets_per_step - 1)]
        self.mask(first)
        self.step += 1

    def loss(self, context: EpochContext, loss: torch.Tensor) -> torch.Tensor:
        assert context.batch is not None
        for target in self.rest:
            self.mask(target)  # the earlier forwards hold their masked rows already
            loss = loss + self.task.loss(context.trainer.net, *context.batch, context.sampler)
        return loss / (1 + len(self.rest))

    def after_step(self, context: EpochContext) -> None:
        self.mask(self.full)  # validation and evaluation see the full width

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        metric, scores = self.task.metric, []
        for budget, target in zip(self.budgets, self.targets, strict=True):
            self.mask(target)
            score = self.task.evaluate(self.model, "valid", self.train.eval_batch_size)[metric]
            record[f"budget{budget:g}_{metric}"] = score
            scores.append(score)
        self.mask(self.full)
        mean = sum(scores) / len(scores)
        record[f"budgets_mean_{metric}"] = mean
        if self.task.better(mean, self.best):
            self.best, self.stale = mean, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.stale += 1
        context.stop = bool(self.train.patience) and self.stale >= self.train.patience


@dataclass
class NestedModel:
    """The trained full-width nested model (alpha all ones, the mask of the full width), its
    order, and the factory that builds a model around a compact embedding."""

    model: Model
    order: NestedOrder
    make_model: ModelFactory

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / ORDER_FILE, self.order.to_json())
        atomic_write(
            Path(run_dir) / NESTED_WEIGHTS, lambda handle: torch.save(self.state(), handle)
        )


@dataclass
class NestedResult(SearchResult):
    """A budget's result of a nested method, with the nested model it was cut from and the
    budget curve of that model (`budget_curve`; the same for every budget of one training)."""

    nested: NestedModel | None = field(default=None, repr=False)
    curve: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "curve": self.curve}

    def save(self, run_dir: Path, **extra: Any) -> None:
        if self.nested is not None:  # first: the result file, written last, marks a budget done
            self.nested.save(run_dir)
        super().save(run_dir, **extra)


def cut_state(
    order: NestedOrder, state: dict[str, torch.Tensor], layout: FieldLayout, budget: float
) -> tuple[dict[str, torch.Tensor], EmbeddingPlan]:
    """The compact model's state dict and plan at `budget`, cut from the nested model's `state`
    (its table `embedding.weight`, alpha all ones); BudgetError when the budget keeps nothing."""
    if sum(order.blocks.size) != layout.total_rows:
        raise DnisError(
            f"the nested order covers {sum(order.blocks.size)} rows, the encoders "
            f"{layout.total_rows}; rerun the search"
        )
    keep = order.keep(budget_params(budget, layout.total_rows * order.dim))
    if not keep.any():
        raise BudgetError(f"budget {budget} is below the nested model's smallest prefix")
    compact = BlockMixedEmbedding(layout, order.dim, order.blocks, keep)
    compact.load_dense(state["embedding.weight"].cpu())
    dense = {k: v for k, v in state.items() if not k.startswith("embedding.")}
    own = {f"embedding.{k}": v for k, v in compact.state_dict().items()}
    return {**dense, **own}, plan_of(compact)


def truncate(source: NestedResult | NestedModel, budget: float) -> Model:
    """The compact model of a nested result (or model) at any `budget`, cut, not retrained, on
    the CPU in eval mode. A run folder's: `dnis.export.load_run(run_dir, budget=budget)`."""
    nested = source.nested if isinstance(source, NestedResult) else source
    if nested is None:
        raise DnisError("this result holds no nested model (it was reloaded from its files)")
    layout = nested.model.embedding.layout
    state, _ = cut_state(nested.order, nested.state(), layout, budget)
    keep = state["embedding.keep"]
    model = nested.make_model(
        BlockMixedEmbedding(layout, nested.order.dim, nested.order.blocks, keep)
    )
    model.load_state_dict(state)
    return model.eval()


@dataclass
class Trained:
    """A nested training's outcome: the model and order, the per-epoch records, whether it
    stopped at the epoch cap while the budgets' mean still improved, and its seconds."""

    nested: NestedModel
    history: list[dict[str, Any]]
    capped: bool
    seconds: float


def train_nested(job: Job, model: Model, order: NestedOrder, options: MatryoshkaOptions) -> Trained:
    """Nested training of `model` (its embedding a `SoftSelectionEmbedding`) with the job's train
    config, from the weights it has; the best epoch's weights are loaded."""
    started = time.perf_counter()
    model.embedding.alpha.requires_grad_(False)
    hook = OrderedDropout(model, order, job.task, job.budgets, options, job.train)
    settings = phase_config(job.train, job.train.epochs)  # the hook stops early, on all budgets
    fit = job.phases.fit(model, job.task, settings, hooks=[hook], restore_best=False)
    assert hook.best_state is not None
    model.load_state_dict(hook.best_state)
    patience = job.train.patience
    capped = bool(patience) and len(fit.history) == job.train.epochs and hook.stale < patience
    nested = NestedModel(model, order, job.make_model)
    return Trained(nested, fit.history, capped, time.perf_counter() - started)


CURVE_POINTS = 20  # budgets of the curve, log-spaced from CURVE_LOW to the full width
CURVE_LOW = 0.01


def budget_curve(
    nested: NestedModel, task: Task, batch_size: int, points: int = CURVE_POINTS
) -> list[dict[str, Any]]:
    """The nested model cut to `points` budgets from 1% to 100% of the full embedding (log-spaced),
    each evaluated on valid and test: what a user gets at any budget from the one training. A
    report, not a choice: nothing is selected on these test metrics. Budgets below the smallest
    prefix (a block's rows are kept or dropped together) are left out."""
    device = next(nested.model.parameters()).device
    curve = []
    for budget in torch.logspace(math.log10(CURVE_LOW), 0.0, points, dtype=torch.float64).tolist():
        try:
            model = truncate(nested, budget).to(device)
        except BudgetError:
            continue
        curve.append({
            "budget": round(budget, 6), "params": model.embedding.num_parameters(),
            "valid": task.evaluate(model, "valid", batch_size),
            "test": task.evaluate(model, "test", batch_size),
        })  # fmt: skip
    return curve


def nested_results(job: Job, trained: Trained, **extra: Any) -> list[SearchResult]:
    """One result per requested budget: the nested model truncated to it. `extra` goes to every
    result (the search's time and history)."""
    task, batch, nested = job.task, job.train.eval_batch_size, trained.nested
    device = next(nested.model.parameters()).device
    full = task.evaluate(nested.model, "valid", batch)
    history = extra.pop("history", []) + trained.history
    curve = budget_curve(nested, task, batch)
    results: list[SearchResult] = []
    for budget in job.budgets:
        started = time.perf_counter()
        model = truncate(nested, budget).to(device)
        embedding = model.embedding
        assert isinstance(embedding, BlockMixedEmbedding)
        valid = task.evaluate(model, "valid", batch)
        test = task.evaluate(model, "test", batch)
        dims = block_report(embedding.dims_per_block(), embedding.blocks, job.layout.names)
        results.append(
            NestedResult(
                method=job.method, metric=task.metric, budget=budget, full_params=job.full,
                embedding_params=embedding.num_parameters(),
                memory_bytes=embedding.memory_bytes(), dims=dims,
                metrics={"valid": valid, "test": test}, before={"valid": full}, pruned=valid,
                retrain_seconds=trained.seconds + time.perf_counter() - started,
                train_epochs=len(trained.history), epoch_cap_hit=trained.capped,
                history=history, model=model, nested=nested, curve=curve, **extra,
            )
        )  # fmt: skip
    return results


def fresh_model(job: Job, blocks: BlockLayout, init_std: float) -> Model:
    """The job's model around a new full-width soft-selection table (alpha: the mask)."""
    torch.manual_seed(job.train.seed)
    return job.make_model(SoftSelectionEmbedding(job.layout, job.dim, blocks, init_std))


@register_method("matryoshka", MatryoshkaOptions)
def matryoshka(job: Job, options: MatryoshkaOptions) -> list[SearchResult]:
    """Nested training with the same prefix width for every field, no search; every budget is
    the one model truncated (the widest uniform width that fits it)."""
    blocks = dataset_blocks(job.dataset, num_blocks=1)
    model = fresh_model(job, blocks, options.init_std)
    return nested_results(job, train_nested(job, model, uniform_order(blocks, job.dim), options))


@register_method("dnis-nested", NestedOptions, fixed=NESTED_FIXED)
def dnis_nested(job: Job, options: NestedOptions) -> list[SearchResult]:
    """The DNIS search orders every block's dims; nested training from the searched weights;
    every budget is the one model truncated."""
    dnis = {f.name: getattr(options, f.name) for f in fields(DnisConfig)}
    config = DnisConfig(**{**dnis, "schedule": "static", "budgets": list(job.budgets)})
    root = job.phases.root
    state = search(
        job.make_model, job.dataset, dim=job.dim, config=config, train=job.train,
        init_std=options.init_std, budgets=job.budgets,
        run_dir=None if root is None else root / "search", resume=job.phases.resume,
        config_hash=job.phases.config_hash,
    )  # fmt: skip
    embedding, model = state.embedding, state.model
    # min_width: every block's first dims up to that fraction of the smallest budget's uniform
    # width come first (`with_floor`)
    floor = int(options.min_width * min(job.target(b) for b in job.budgets) / job.layout.total_rows)
    order = with_floor(searched_order(embedding, config.rank), floor)
    permutation = None
    if options.placement == "prefix":
        order, permutation = as_prefixes(order)
    if options.retrain == "scratch":
        model = fresh_model(job, state.blocks, options.init_std)
    else:
        with torch.no_grad():  # alpha folded into the weights; from here alpha is the mask
            weight = embedding.selected_weight()
            if permutation is not None:  # every row's dims move with its block's renumbering
                rows = embedding.row_block.to(weight.device)
                weight = weight.gather(1, permutation.to(weight.device)[rows])
            embedding.weight.copy_(weight)
            embedding.alpha.fill_(1.0)
    trained = train_nested(job, model, order, options)
    return nested_results(job, trained, search_seconds=state.seconds, history=state.history)
