"""DNIS: differentiable neural input search (Cheng, Shen, Huang, arXiv:2006.04466).

Lifecycle: warm up (plain training) -> search (bilevel: model and embedding steps on training
batches alternate with alpha steps on validation batches, first-order as in DARTS) -> prune to a
budget -> materialise compact tables -> retrain. One search serves many budgets.

Choices where the paper is open, and why:
- Blocks are per field (alpha is [field blocks, d]), so fields compete for the budget.
- alpha's gradient is divided, row by row, by its mean absolute value: rare blocks get tiny raw
  gradients and would otherwise never move (as in the authors' AutoSrh code).
- alpha is clamped to [0, 1] after each step; an L1 term on alpha pushes useless dims to 0.
- The model keeps its best validation epoch of the search. `schedule: static` (the paper) then
  prunes it to each budget in one shot. `schedule: gradual` adds a pruning phase that knows the
  budgets: one epoch per budget, largest first, masks the lowest-ranked dims along a cubic path
  (as in gradual magnitude pruning) while the model and alpha keep training, and ends at the
  budget with a snapshot; the soft model is then already at the budget, so pruning it to a
  compact table changes nothing, and the retrain starts from that snapshot.

The bilevel search is a `Trainer` run with one hook (`AlphaSearch`: the alpha step after every
model step, the schedule, the snapshots), so it has the trainer's NaN guard, compile,
multi-process training and checkpoints. Checkpoints and resume (`run_dir`): every epoch of the
warm-up, of the bilevel search and of each budget's retrain is checkpointed atomically (checksum
and config hash, `dnis.train.checkpoint`)::

    run_dir/search/warmup/checkpoint.pt    warm-up: a Trainer's checkpoint (+ metrics.jsonl)
    run_dir/search/checkpoint.pt           bilevel search: a Trainer's checkpoint, the hook's
                                           state (alpha optimizer, mean alpha) in it
    run_dir/search/prune/checkpoint.pt     gradual pruning phase: the same, with the kept dims
                                           and the budgets' snapshots
    run_dir/retrain-<budget>/checkpoint.pt retrain of one budget: a Trainer's checkpoint

Every epoch draws its randomness (shuffles, sampling, dropout) from (seed, epoch) alone, so no RNG
state crosses an epoch boundary and a run resumed from any checkpoint takes exactly the steps of an
uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dnis import distributed
from dnis.data.dataset import EncodedDataset, Split, hold_out
from dnis.data.loader import num_batches
from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BLOCK_MODES, BlockLayout, dataset_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import ConfigError, DnisError
from dnis.models.base import Model
from dnis.search.prune import (
    GRANULARITIES,
    block_saliency,
    budget_params,
    check_budget,
    prune_blocks,
    prune_elements,
    resolve_budget,
)
from dnis.search.result import SearchResult
from dnis.search.training import ModelFactory, block_report, endless_batches, phase_config
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.progress import Progress, SilentProgress
from dnis.train.trainer import (
    EpochContext,
    TrainConfig,
    Trainer,
    TrainHook,
    TrainResult,
    valid_metrics,
)

CONVERGE = "converge"  # search.warmup_epochs: train to early stopping before the search
SCHEDULES = ("auto", "gradual", "static")
PRUNES_PER_EPOCH = 50  # how often the gradual schedule moves within an epoch


@dataclass
class DnisConfig:
    """Hyper-parameters of the search (the `search:` section of a config)."""

    num_blocks: int = 6  # frequency blocks per field
    # count: equal id counts; mass: equal training frequency mass; or explicit edges as fractions
    # of each field's ids, e.g. [0.05, 0.2, 0.5] (then num_blocks is ignored)
    block_mode: str | list[float] = "count"
    # plain training before alpha starts to move: a number of epochs, or "converge" (train until
    # validation stops improving: train.patience, capped at train.epochs); with batch 256, one
    # epoch was better on validation in 4 of 6 cells (docs/results.md, "Search options")
    warmup_epochs: int | str = 1
    # bilevel epochs; 6 as in our benchmarks: 10 gave no better DeepFM AUC (docs/performance.md)
    search_epochs: int = 6
    # stop the bilevel search after this many epochs without a better validation metric (the best
    # epoch is kept either way); 0: run all search_epochs
    patience: int = 0
    alpha_lr: float = 0.01
    alpha_optimizer: str = "sgd"  # sgd | adam
    # an alpha step after every k-th model step (1: after every one, the paper). An alpha step
    # costs about 0.6 of a model step (a forward and a backward to the embedding on a validation
    # batch), so 2 makes a bilevel epoch about a fifth cheaper; alpha then takes k times fewer
    # steps at the same alpha_lr (docs/performance.md, "DNIS search time vs plain training")
    alpha_every: int = 1
    alpha_l1: float = 1e-4  # L1 penalty on alpha in the alpha step
    normalize_alpha_grad: bool = True  # per-block gradient normalisation
    # alpha_l1 as a loss term (its gradient is normalised with the loss's) or as a proximal
    # step after the normalised gradient step (the same shrinkage for every entry); auto:
    # proximal for ctr, loss otherwise. Validation did not agree across settings (docs/results.md,
    # "Search options"), so the default is the paper's loss term
    l1_step: str = "loss"  # loss | proximal | auto
    # how block pruning ranks dims: alpha (ties broken by saliency) or saliency, the block's mean
    # |weight * alpha| per dim, which does not depend on how scale splits between the two
    rank: str = "alpha"  # alpha | saliency
    # static: search, then prune each budget from the searched alpha in one shot; gradual: after
    # the search, a pruning phase that knows the budgets, one epoch per budget (largest first)
    # masking the lowest-ranked dims along a cubic path while alpha and the model keep training,
    # so the soft model ends each epoch at a budget and pruning it changes nothing. auto: gradual
    # at block granularity (it won on validation in all 6 cells of the defaults configs,
    # docs/results.md, "Search options"), static at element granularity (gradual masks block dims)
    schedule: str = "auto"  # auto | gradual | static
    # which alpha static pruning ranks: the best validation epoch's (whose weights are kept), or
    # alpha's mean over the steps of the last epoch run (less noisy than one step's value)
    alpha_from: str = "best_epoch"  # best_epoch | last_epoch_mean
    # searched: prune by the search; random: the control, a random structure of the same budget
    # through the same warm-up, search and fine-tune (`dnis compare --methods dnis dnis-random`)
    structure: str = "searched"
    granularity: str = "block"  # block | element
    retrain: str = "finetune"  # finetune: start from the searched weights; scratch: re-initialise
    # fractions of the full table, parameter counts, or byte sizes ("2MB": the fraction of the
    # fp32 full-width table's bytes they hold; `dnis search` resolves them once the data is read)
    budgets: list[float | str] = field(default_factory=lambda: [0.25])
    # where the alpha steps' batches come from: valid (the paper) or holdout, a seeded
    # `holdout_fraction` of the training rows that the model does not train on during the search
    # (the retrain uses them all), so the validation split stays unseen by the search that its
    # early stopping, snapshots and the choice of defaults read
    alpha_data: str = "valid"  # valid | holdout
    # a floor under the gradual pruning: every block keeps at least this fraction of the width a
    # uniform structure of the same budget would give it (0: the search alone decides)
    min_width: float = 0.0
    holdout_fraction: float = 0.1
    # where a block's kept dims sit in the compact model: `searched` (those the search kept) or
    # `prefix` (the first w of them, w as searched; the weights move along), so every field's
    # dim j meets every other's dim j in a dot product (block granularity only)
    placement: str = "searched"
    # uniform: after retraining the searched structure of a budget, train every field at the
    # widest uniform width that fits the budget from a fresh start too, and keep whichever is
    # better on validation (the result's `choice` says which, with both metrics); the test split
    # is read once, by the kept model. It never loses to uniform on validation and costs one
    # more training per budget. none: the searched structure only (the control's setting)
    fallback: str = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.block_mode, str) and self.block_mode not in BLOCK_MODES:
            raise ConfigError(
                f"search.block_mode must be one of {BLOCK_MODES} or a list of edge fractions"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"search.granularity must be one of {GRANULARITIES}")
        if self.retrain not in ("finetune", "scratch"):
            raise ConfigError("search.retrain must be 'finetune' or 'scratch'")
        if self.l1_step not in ("auto", "loss", "proximal"):
            raise ConfigError(
                f"search.l1_step must be 'auto', 'loss' or 'proximal', got {self.l1_step!r}"
            )
        if self.structure not in ("searched", "random"):
            raise ConfigError(
                f"search.structure must be 'searched' or 'random', got {self.structure!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"search.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.schedule == "gradual" and self.granularity != "block":
            raise ConfigError(
                "search.schedule: gradual prunes whole block dims; use granularity: block, or "
                "schedule: static (or auto) with granularity: element"
            )
        if self.alpha_from not in ("best_epoch", "last_epoch_mean"):
            raise ConfigError(
                "search.alpha_from must be 'best_epoch' or 'last_epoch_mean', got "
                f"{self.alpha_from!r}"
            )
        if self.alpha_data not in ("valid", "holdout"):
            raise ConfigError(
                f"search.alpha_data must be 'valid' or 'holdout', got {self.alpha_data!r}"
            )
        if self.placement not in ("searched", "prefix"):
            raise ConfigError(
                f"search.placement must be 'searched' or 'prefix', got {self.placement!r}"
            )
        if self.fallback not in ("none", "uniform"):
            raise ConfigError(f"search.fallback must be 'none' or 'uniform', got {self.fallback!r}")
        if not 0 <= self.min_width <= 1:
            raise ConfigError(f"search.min_width must be in [0, 1], got {self.min_width}")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(
                f"search.holdout_fraction must be in (0, 1), got {self.holdout_fraction}"
            )
        if self.rank not in ("alpha", "saliency"):
            raise ConfigError(f"search.rank must be 'alpha' or 'saliency', got {self.rank!r}")
        if self.alpha_optimizer not in ("sgd", "adam"):
            raise ConfigError("search.alpha_optimizer must be 'sgd' or 'adam'")
        if not isinstance(self.alpha_every, int) or self.alpha_every < 1:
            raise ConfigError(f"search.alpha_every must be an integer >= 1, got {self.alpha_every}")
        for i, budget in enumerate(self.budgets):
            check_budget(budget, f"search.budgets[{i}]")
        if (
            self.search_epochs < 1
            or self.num_blocks < 1
            or (self.warmup_epochs != CONVERGE and not isinstance(self.warmup_epochs, int))
            or (isinstance(self.warmup_epochs, int) and self.warmup_epochs < 0)
            or self.patience < 0
        ):
            raise ConfigError(
                "search: search_epochs and num_blocks must be >= 1, patience >= 0, warmup_epochs "
                f">= 0 or {CONVERGE!r}"
            )


@dataclass
class Snapshot:
    """The soft model when the gradual schedule reached a budget: its kept dims and weights."""

    keep: torch.Tensor  # [num_blocks, dim] bool
    state: dict[str, torch.Tensor]  # the model's state dict (alpha included, zero where dropped)
    epoch: int
    valid: dict[str, float]  # the soft model's validation metrics then


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
    snapshots: dict[float, Snapshot] = field(default_factory=dict)  # gradual schedule only
    init_std: float = 0.01  # the searched table's initialisation, which fresh tables repeat


def alpha_stats(alpha: torch.Tensor, blocks: BlockLayout, names: Sequence[str]) -> dict[str, Any]:
    a = alpha.detach()
    block_field = torch.tensor(blocks.field, device=a.device)
    per_field = {n: round(float(a[block_field == f].mean()), 4) for f, n in enumerate(names)}
    return {
        "alpha_mean": round(float(a.mean()), 4),
        "alpha_below_0.01": round(float((a < 0.01).float().mean()), 4),
        "alpha_field_mean": per_field,
    }


def search_settings(
    dim: int,
    config: DnisConfig,
    train: TrainConfig,
    init_std: float = 0.01,
    budgets: Sequence[float] = (),
) -> dict[str, Any]:
    """Everything a search's result depends on. The budgets count only for a gradual schedule:
    a static search serves any budget."""
    search = {k: v for k, v in asdict(config).items() if k != "budgets"}
    if gradual(config):
        search["budgets"] = list(budgets)
    return {"dim": dim, "init_std": init_std, "search": search, "train": asdict(train)}


def settings_hash(settings: dict[str, Any]) -> str:
    """The default config hash of a search's checkpoints (a run passes its `Config.digest()`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove the resume state a search and its retrains left in `run_dir` (a fresh start)."""
    run_dir = Path(run_dir)
    for folder in [run_dir / "search", *run_dir.glob("retrain-*")]:
        if folder.is_dir():
            shutil.rmtree(folder)


def cubic_between(start: int, end: int, progress: float) -> int:
    """A parameter count on the cubic path from `start` (progress 0) to `end` (1): fast at first,
    slow at the end, so the model adapts to the last cuts before the epoch's snapshot."""
    return round(end + (start - end) * (1 - progress) ** 3)


class AlphaSearch(TrainHook):
    """DNIS's part of the search loop: an alpha step on a validation batch after every model step
    (first-order, as in DARTS; after every `alpha_every`-th with that option). Given `budgets`
    (the pruning phase of `schedule: gradual`), it also prunes: epoch i goes from the size of
    epoch i-1 to the i-th largest budget along a cubic path and ends with a snapshot of the
    model there."""

    def __init__(
        self,
        model: Model,
        embedding: SoftSelectionEmbedding,
        task: Task,
        config: DnisConfig,
        train: TrainConfig,
        budgets: Sequence[float] = (),
        alpha_rows: Split | None = None,
    ) -> None:
        """`alpha_rows`: the alpha steps' data (default: the task's validation split)."""
        self.model, self.embedding, self.task = model, embedding, task
        self.alpha_rows = task.dataset.valid if alpha_rows is None else alpha_rows
        self.config, self.train = config, train
        alpha = embedding.alpha
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.SGD([alpha], lr=config.alpha_lr)
            if config.alpha_optimizer == "sgd"
            else torch.optim.Adam([alpha], lr=config.alpha_lr)
        )
        self.proximal = l1_step(config, task) == "proximal"
        self.valid: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.alpha_sum = torch.zeros_like(alpha)
        self.steps = 0
        self.mean_alpha: torch.Tensor | None = None  # of the last epoch run
        # the pruning phase
        self.keep = torch.ones_like(alpha, dtype=torch.bool)
        self.snapshots: dict[float, Snapshot] = {}
        self.budgets: list[float] = []  # largest first: epoch i ends at budgets[i - 1]
        self.targets: list[int] = []  # their parameter counts
        self.random_score: torch.Tensor | None = None
        if budgets:
            full = embedding.weight.numel()
            by_size = sorted(((budget_params(b, full), b) for b in budgets), reverse=True)
            self.targets = [count for count, _ in by_size]
            self.budgets = [budget for _, budget in by_size]
            if len(set(self.targets)) < len(self.targets):
                raise ConfigError(f"search.budgets {list(budgets)} name the same size twice")
            if config.structure == "random":  # the control's order: one fixed random draw
                seeded = torch.Generator().manual_seed(train.seed)
                self.random_score = torch.rand(alpha.shape, generator=seeded)

    def epoch_start(self, context: EpochContext) -> None:
        self.valid = endless_batches(
            self.alpha_rows, self.train.batch_size, context.generator, "DNIS's alpha steps"
        )
        self.alpha_sum.zero_()
        self.steps = 0
        self.epoch_steps = num_batches(self.task.dataset.train, self.train.batch_size)

    def after_step(self, context: EpochContext) -> None:
        assert self.valid is not None
        if self.steps % self.config.alpha_every == 0:
            self._alpha_step(next(self.valid), context.sampler)
        self.steps += 1
        if self.targets:
            every = max(1, self.epoch_steps // PRUNES_PER_EPOCH)
            if self.steps % every == 0 or self.steps == self.epoch_steps:
                first = context.epoch == 1
                previous = (
                    self.embedding.weight.numel() if first else self.targets[context.epoch - 2]
                )
                target = cubic_between(
                    previous, self.targets[context.epoch - 1], self.steps / self.epoch_steps
                )
                self._prune_to(target)
        self.alpha_sum += self.embedding.alpha.detach()

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        alpha = self.embedding.alpha
        self.mean_alpha = self.alpha_sum / max(1, self.steps)
        record.update(alpha_stats(alpha, self.embedding.blocks, self.task.dataset.schema.names))
        if self.targets:
            record["phase"] = "prune"  # its own group in logs and trackers
            record["kept_params"] = self._kept_params()
            budget = self.budgets[context.epoch - 1]
            self.snapshots[budget] = Snapshot(
                self.keep.clone(),
                copy.deepcopy(self.model.state_dict()),
                context.epoch,
                valid_metrics(record),
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "keep": self.keep,
            "mean_alpha": self.mean_alpha,
            "snapshots": {
                repr(b): {"keep": s.keep, "state": s.state, "epoch": s.epoch, "valid": s.valid}
                for b, s in self.snapshots.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.keep = state["keep"]
        self.mean_alpha = state["mean_alpha"]
        self.snapshots = {
            float(b): Snapshot(s["keep"], s["state"], s["epoch"], s["valid"])
            for b, s in state["snapshots"].items()
        }

    def _kept_params(self) -> int:
        sizes = torch.tensor(self.embedding.blocks.size, dtype=torch.long)
        return int((self.keep.long() * sizes.unsqueeze(1)).sum())

    def _prune_to(self, target: int) -> None:
        """Drop the lowest-ranked dims still kept until `target` parameters are left (dropped
        dims stay dropped: their alpha is held at 0)."""
        if self._kept_params() <= target:
            return
        table = self.embedding.selected_weight().detach()
        saliency = block_saliency(table, self.embedding.blocks)
        if self.random_score is not None:
            score = self.random_score
        else:
            score = saliency if self.config.rank == "saliency" else self.embedding.alpha.cpu()
        # a new tensor (never written into alpha or the tie-break): dropped entries rank below
        # every kept one (scores are >= 0)
        score = torch.where(self.keep, score.detach(), -1.0)
        floor = int(self.config.min_width * target / self.embedding.layout.total_rows)
        if floor:  # every block keeps its `floor` best-ranked dims still kept
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
            score = torch.where((rank < floor) & self.keep, float("inf"), score)
        keep = prune_blocks(score, self.embedding.blocks, target, tiebreak=saliency)
        self.keep &= keep
        self._apply_keep()

    def _apply_keep(self) -> None:
        with torch.no_grad():
            self.embedding.alpha.mul_(self.keep.to(self.embedding.alpha.device))

    def _alpha_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
    ) -> None:
        """One first-order step on alpha with a validation batch, then clamp to [0, 1].

        Under torchrun each rank takes its share of the batch and the gradients are averaged,
        so alpha takes the step of the whole batch and stays identical on every rank.
        """
        config, alpha = self.config, self.embedding.alpha
        ids, labels = distributed.shard(*batch)
        alpha.requires_grad_(True)
        try:
            loss = self.task.loss(self.model, ids, labels, generator)
            if config.alpha_l1 and not self.proximal:
                loss = loss + config.alpha_l1 * alpha.abs().sum()
            (grad,) = torch.autograd.grad(loss, [alpha])
        finally:
            alpha.requires_grad_(False)
        distributed.all_reduce_mean_(grad)
        if config.normalize_alpha_grad:
            grad = grad / (grad.abs().mean(dim=1, keepdim=True) + 1e-12)
        alpha.grad = grad
        self.optimizer.step()
        with torch.no_grad():
            if config.alpha_l1 and self.proximal:
                # soft-thresholding after the normalised step: every entry shrinks by the same
                # lr * l1, however often its block appears in validation batches
                alpha.sub_(config.alpha_lr * config.alpha_l1)
            alpha.clamp_(0.0, 1.0)
        if self.targets:
            self._apply_keep()


def search(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int = 64,
    config: DnisConfig | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    config_hash: str | None = None,
    init_std: float = 0.01,
    budgets: Sequence[float | str] | None = None,
) -> SearchState:
    """Warm up, then alternate model steps (train batches) and alpha steps (valid batches).

    Under `schedule: gradual` a pruning phase follows, one epoch per budget of `budgets`
    (default `config.budgets`), and the state keeps a snapshot of the model at each budget.

    With `run_dir`, every epoch is checkpointed there (see the module docstring); with `resume`,
    the search continues from the furthest checkpoint found (none: from the start), and a
    finished search is loaded, not redone. Checkpoints carry `config_hash` (by default a hash of
    the search settings) and a checksum; a foreign or corrupt one is refused with a DnisError.
    """
    config = config or DnisConfig()
    train = train or TrainConfig()
    progress = progress or SilentProgress()
    budgets = resolved_budgets(config.budgets if budgets is None else budgets, dataset, dim)
    settings = search_settings(dim, config, train, init_std, budgets)
    config_hash = settings_hash(settings) if config_hash is None else config_hash
    folder = None if run_dir is None else Path(run_dir)
    started = time.perf_counter()
    blocks = dataset_blocks(dataset, config.num_blocks, config.block_mode)
    torch.manual_seed(train.seed)
    embedding = SoftSelectionEmbedding(FieldLayout.from_dataset(dataset), dim, blocks, init_std)
    model = make_model(embedding)
    task = search_task = make_task(dataset)  # the retrain's: every training row
    alpha_rows = None
    if config.alpha_data == "holdout":  # the search's model steps train on the other rows
        search_data, alpha_rows = hold_out(dataset, config.holdout_fraction, train.seed)
        search_task = make_task(search_data)
    embedding.alpha.requires_grad_(False)  # it takes gradients only in the alpha steps
    searching = folder is not None and resume and _exists(folder / "checkpoint.pt")
    if not searching and config.warmup_epochs:  # a search checkpoint supersedes the warm-up
        # converge: the run's own early stopping; a number: exactly that many epochs
        converge = config.warmup_epochs == CONVERGE
        warm = train if converge else phase_config(train, config.warmup_epochs)
        warmup = Trainer(
            model,
            search_task,
            warm,
            run_dir=None if folder is None else folder / "warmup",
            progress=progress,
            config_hash=config_hash,
            phase="warm-up epoch",
        )
        warmup.fit(resume=resume and _exists(warmup.checkpoint_path))
        del warmup  # its DistributedDataParallel (under torchrun) must not outlive the warm-up

    def phase(hook: AlphaSearch, epochs: int, patience: int, **options: Any) -> TrainResult:
        """One Trainer run with DNIS's alpha steps (`hook`); a resumed run counts the epochs of
        earlier processes in `seconds`, not the reloading."""
        nonlocal seconds
        settings = phase_config(train, epochs, patience)
        trainer = Trainer(
            model, search_task, settings, progress=progress, config_hash=config_hash, hooks=[hook],
            exclude=[embedding.alpha], **options,
        )  # fmt: skip
        started = time.perf_counter()
        fit = trainer.fit(resume=resume and _exists(trainer.checkpoint_path))
        seconds += fit.train_seconds - (time.perf_counter() - started)
        return fit  # the trainer (its DistributedDataParallel under torchrun) ends here

    seconds = 0.0
    hook = AlphaSearch(model, embedding, search_task, config, train, alpha_rows=alpha_rows)
    fit = phase(
        hook, config.search_epochs, config.patience, run_dir=folder, phase="search epoch",
        seed_offset=1000,
    )  # fmt: skip
    history = fit.history
    if hook.mean_alpha is not None and config.alpha_from == "last_epoch_mean":
        with torch.no_grad():
            embedding.alpha.copy_(hook.mean_alpha)
    before = {s: task.evaluate(model, s, train.eval_batch_size) for s in ("valid", "test")}
    snapshots: dict[float, Snapshot] = {}
    if gradual(config):
        pruning = AlphaSearch(model, embedding, search_task, config, train, budgets, alpha_rows)
        pruned = phase(
            pruning, len(budgets), 0, run_dir=None if folder is None else folder / "prune",
            phase="pruning epoch", seed_offset=1500,
            restore_best=False,  # each epoch's end is a budget's snapshot
        )  # fmt: skip
        history = history + pruned.history
        snapshots = pruning.snapshots
    return SearchState(
        model,
        embedding,
        blocks,
        task,
        before,
        history,
        time.perf_counter() - started + seconds,
        snapshots,
        init_std,
    )


def _exists(path: Path | None) -> bool:
    return path is not None and path.exists()


def gradual(config: DnisConfig) -> bool:
    """Whether the search ends with the gradual pruning phase (`schedule`, `auto` resolved)."""
    if config.schedule == "auto":
        return config.granularity == "block"
    return config.schedule == "gradual"


def l1_step(config: DnisConfig, task: Task) -> str:
    """The L1 step `config.l1_step` names; `auto` is proximal for ctr and loss otherwise."""
    if config.l1_step != "auto":
        return config.l1_step
    return "proximal" if task.name == "ctr" else "loss"


def block_mixed(
    soft: SoftSelectionEmbedding,
    blocks: BlockLayout,
    keep: torch.Tensor,
    table: torch.Tensor,
    placement: str,
) -> BlockMixedEmbedding:
    """The compact block embedding keeping `keep` of `table`; under `prefix` placement each
    block's kept dims move, in order, to its first dims (`keep` becomes a prefix per block)."""
    if placement == "prefix":
        # per block, the kept dims first (in their order), then the others
        permutation = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        table = table.gather(1, permutation.to(table.device)[soft.row_block.to(table.device)])
        keep = torch.arange(keep.shape[1], device=keep.device) < keep.sum(1, keepdim=True)
    compact = BlockMixedEmbedding(soft.layout, soft.dim, blocks, keep)
    compact.load_dense(table)
    return compact


def materialize(
    state: SearchState, budget: float, config: DnisConfig, seed: int = 0
) -> FieldEmbedding:
    """The compact embedding for one budget, holding the searched weights with alpha folded in.

    A gradual search's budget is its snapshot: the dims kept when the schedule reached it. A
    static search ranks the dims now (`config.rank`). With `config.structure: random` (the
    control), the kept dims are drawn at random (`seed`) with the same budget: what the pipeline
    gives without what the search found."""
    soft = state.embedding
    snapshot = snapshot_of(state, budget)
    if snapshot is not None:
        weight, alpha = snapshot.state["embedding.weight"], snapshot.state["embedding.alpha"]
        table = (weight * alpha[soft.row_block.to(alpha.device)]).detach()
        return block_mixed(soft, state.blocks, snapshot.keep, table, config.placement)
    target = budget_params(budget, soft.weight.numel())
    table = soft.selected_weight().detach()
    control = config.structure == "random"

    def noise(shape: tuple[int, ...]) -> torch.Tensor:  # the control's seeded random scores
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed))

    if config.granularity == "block":
        if control:
            keep = prune_blocks(noise(soft.alpha.shape), state.blocks, target)
        else:
            saliency = block_saliency(table, state.blocks)
            score = saliency if config.rank == "saliency" else soft.alpha
            keep = prune_blocks(score, state.blocks, target, tiebreak=saliency)
        return block_mixed(soft, state.blocks, keep, table, config.placement)
    else:
        keep = prune_elements(noise(table.shape) if control else table, soft.layout, target)
        compact = RaggedEmbedding(soft.layout, soft.dim, keep)
    compact.load_dense(table)
    return compact


def snapshot_of(state: SearchState, budget: float) -> Snapshot | None:
    """The gradual search's snapshot at `budget`; None after a static search (no snapshots)."""
    if not state.snapshots:
        return None
    snapshot = state.snapshots.get(budget)
    if snapshot is None:
        raise DnisError(
            f"budget {budget} was not one of the gradual search's budgets "
            f"({', '.join(map(str, sorted(state.snapshots)))}): add it to search.budgets and run "
            "the search again (or use search.schedule: static, which serves any budget)"
        )
    return snapshot


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
    run_dir: str | Path | None = None,
    resume: bool = False,
    config_hash: str | None = None,
    fallback_progress: Progress | None = None,
) -> SearchResult:
    """Prune to `budget`, materialise, and retrain with the structure fixed; under
    `config.fallback: uniform`, also train the uniform structure of the budget (in `run_dir/uniform`,
    reporting to `fallback_progress`, by default `progress`) and keep the better of the two on
    validation. Only the kept model sees the test split.

    With `run_dir`, the retrain is a Trainer checkpointing every epoch there; with `resume`, it
    continues from that checkpoint if there is one (`config_hash` guards it as in `search`).
    """
    started = time.perf_counter()
    _, model = compact_model(state, make_model, budget, config=config, train=train)
    task = state.task
    pruned = task.evaluate(model, "valid", train.eval_batch_size)
    where = None if run_dir is None else Path(run_dir)
    fit, earlier = _fit(model, task, train, progress, where, resume, config_hash)
    choice: dict[str, Any] = {}
    width = uniform_width(state, budget)
    if config.fallback == "uniform" and width >= 1:
        uniform = uniform_model(state, make_model, budget, train)
        run = None if where is None else where / "uniform"
        uniform_fit, uniform_earlier = _fit(
            uniform, task, train, fallback_progress or progress, run, resume, config_hash
        )
        earlier += uniform_earlier
        metric = task.metric
        kept = (
            "uniform" if task.better(uniform_fit.valid[metric], fit.valid[metric]) else "searched"
        )
        choice = {"structure": kept, "uniform_width": width,
                  "valid": {"searched": fit.valid[metric], "uniform": uniform_fit.valid[metric]}}  # fmt: skip
        if progress is not None:
            progress.note(
                f"budget {budget}: searched structure valid {metric} {fit.valid[metric]:.4f}, "
                f"uniform width {width} {uniform_fit.valid[metric]:.4f}: keeping the {kept} one"
            )
        if kept == "uniform":
            model, fit = uniform, uniform_fit
    test = task.evaluate(model, "test", train.eval_batch_size)
    seconds = time.perf_counter() - started + earlier
    done = finished_result(state, budget, model, pruned, fit.valid, test, seconds)
    done.train_epochs, done.epoch_cap_hit = len(fit.history), fit.capped
    done.choice = choice
    return done


def _fit(
    model: Model,
    task: Task,
    train: TrainConfig,
    progress: Progress | None,
    run_dir: Path | None,
    resume: bool,
    config_hash: str | None,
) -> tuple[TrainResult, float]:
    """Train `model` to early stopping (resuming from `run_dir`'s checkpoint when asked); also
    the seconds earlier processes trained it, which the reloading does not show."""
    trainer = Trainer(
        model, task, train, run_dir=run_dir, progress=progress, config_hash=config_hash
    )
    resumed = resume and _exists(trainer.checkpoint_path)
    started = time.perf_counter()
    result = trainer.fit(resume=resumed)
    fitted = time.perf_counter() - started
    return result, (result.train_seconds - fitted) if resumed else 0.0


def uniform_width(state: SearchState, budget: float) -> int:
    """The widest width every row can have within `budget` (the uniform baseline's)."""
    rows = state.embedding.layout.total_rows
    return min(budget_params(budget, state.embedding.weight.numel()) // rows, state.embedding.dim)


def uniform_model(
    state: SearchState, make_model: ModelFactory, budget: float, train: TrainConfig
) -> Model:
    """The fallback candidate of `budget`: every block keeps its first `uniform_width` dims, the
    model initialised afresh (as the uniform baseline trains)."""
    soft = state.embedding
    keep = torch.arange(soft.dim) < uniform_width(state, budget)
    keep = keep.expand(state.blocks.num_blocks, soft.dim).contiguous()
    compact = BlockMixedEmbedding(soft.layout, soft.dim, state.blocks, keep)
    torch.manual_seed(train.seed)
    model = make_model(compact)
    compact.reset_parameters(state.init_std)
    return model


def compact_model(
    state: SearchState,
    make_model: ModelFactory,
    budget: float,
    *,
    config: DnisConfig,
    train: TrainConfig,
) -> tuple[FieldEmbedding, Model]:
    """The compact embedding for `budget` and the model around it, before retraining."""
    compact = materialize(state, budget, config, seed=train.seed)
    torch.manual_seed(train.seed)
    model = make_model(compact)
    if config.retrain == "finetune":
        snapshot = snapshot_of(state, budget)
        searched = state.model.state_dict() if snapshot is None else snapshot.state
        dense = {k: v for k, v in searched.items() if not k.startswith("embedding.")}
        model.load_state_dict(dense, strict=False)
    else:
        compact.reset_parameters(state.init_std)
    return compact, model


def finished_result(
    state: SearchState,
    budget: float,
    model: Model,
    pruned: dict[str, float],
    valid: dict[str, float],
    test: dict[str, float],
    retrain_seconds: float,
) -> SearchResult:
    """The SearchResult of one retrained budget (`model` around its compact embedding); under a
    gradual schedule, `before` is the soft model when the schedule reached the budget."""
    snapshot = snapshot_of(state, budget)
    names = state.task.dataset.schema.names
    return SearchResult.of_model(
        "dnis", state.task.metric, budget, state.embedding.weight.numel(), model,
        dims_report(model.embedding, state.blocks, names), valid, test,
        before=state.before if snapshot is None else {"valid": snapshot.valid}, pruned=pruned,
        search_seconds=state.seconds, retrain_seconds=retrain_seconds, history=state.history,
    )  # fmt: skip


def resolved_budgets(
    budgets: Sequence[float | str], dataset: EncodedDataset, dim: int
) -> list[float]:
    """`budgets` with byte sizes ("2MB") turned into fractions of the full-width table's fp32
    bytes (`dnis.search.prune.resolve_budget`)."""
    full = sum(dataset.cardinalities) * dim
    return [resolve_budget(b, full, f"budgets[{i}]") for i, b in enumerate(budgets)]


def retrain_dir(run_dir: str | Path, budget: float) -> Path:
    """Where the retrain of `budget` checkpoints inside a search's run folder."""
    return Path(run_dir) / f"retrain-{budget}"


def dnis(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int = 64,
    budget: float | str | Sequence[float | str] | None = None,
    config: DnisConfig | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    config_hash: str | None = None,
    init_std: float = 0.01,
) -> SearchResult | list[SearchResult]:
    """Search once, then prune and retrain for each budget (a list gives a list of results).

    `budget` defaults to `config.budgets` (a list of results); a number, a byte size ("2MB") or a
    list given here replaces them. `init_std` is the std of the searched table's normal initialisation
    (`embedding.init_std` of a config).

    With `run_dir`, the search checkpoints into `run_dir/search/` and each budget's retrain into
    `run_dir/retrain-<budget>/`; with `resume`, all of them continue from their checkpoints (a
    finished stage only reloads and evaluates). Without `resume`, old checkpoints there are removed.
    """
    config = config or DnisConfig()
    train = train or TrainConfig()
    if budget is None:
        budget = list(config.budgets)
    single = isinstance(budget, int | float | str)
    budgets = resolved_budgets([budget] if single else budget, dataset, dim)
    if config_hash is None:
        config_hash = settings_hash(search_settings(dim, config, train, init_std, budgets))
    if run_dir is not None and not resume:
        clear_checkpoints(run_dir)
    state = search(
        make_model,
        dataset,
        dim=dim,
        init_std=init_std,
        config=config,
        train=train,
        progress=progress,
        run_dir=None if run_dir is None else Path(run_dir) / "search",
        resume=resume,
        config_hash=config_hash,
        budgets=budgets,
    )
    results = [
        retrain(
            state,
            make_model,
            b,
            config=config,
            train=train,
            progress=progress,
            run_dir=None if run_dir is None else retrain_dir(run_dir, b),
            resume=resume,
            config_hash=config_hash,
        )
        for b in budgets
    ]
    return results[0] if single else results
