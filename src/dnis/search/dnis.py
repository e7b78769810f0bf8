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

Checkpoints and resume (`run_dir`): every epoch of the warm-up, of the bilevel search and of each
budget's retrain is checkpointed atomically (checksum and config hash, `dnis.train.checkpoint`)::

    run_dir/search/warmup/checkpoint.pt    warm-up: a Trainer's checkpoint (+ metrics.jsonl)
    run_dir/search/checkpoint.pt           bilevel search: model (alpha included), both
                                           optimizers, epoch, best epoch's state, history
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnis import distributed
from dnis.data.dataset import EncodedDataset
from dnis.data.loader import batches, num_batches
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
    prune_blocks,
    prune_elements,
)
from dnis.search.result import SearchResult
from dnis.search.training import ModelFactory, block_report, endless_valid_batches
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.checkpoint import check_config_hash, read_checkpoint, save_checkpoint
from dnis.train.progress import Progress, SilentProgress
from dnis.train.trainer import (
    TrainConfig,
    Trainer,
    epoch_seed,
    make_optimizer,
    step_module,
    training_loss,
)

CONVERGE = "converge"  # search.warmup_epochs: train to early stopping before the search


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
    # searched: prune by the search; random: the control, a random structure of the same budget
    # through the same warm-up, search and fine-tune (`dnis compare --methods dnis dnis-random`)
    structure: str = "searched"
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
        if self.l1_step not in ("auto", "loss", "proximal"):
            raise ConfigError(
                f"search.l1_step must be 'auto', 'loss' or 'proximal', got {self.l1_step!r}"
            )
        if self.structure not in ("searched", "random"):
            raise ConfigError(
                f"search.structure must be 'searched' or 'random', got {self.structure!r}"
            )
        if self.rank not in ("alpha", "saliency"):
            raise ConfigError(f"search.rank must be 'alpha' or 'saliency', got {self.rank!r}")
        if self.alpha_optimizer not in ("sgd", "adam"):
            raise ConfigError("search.alpha_optimizer must be 'sgd' or 'adam'")
        for budget in self.budgets:
            budget_params(budget, 1 << 62)  # refuses 0, negatives and non-integral counts > 1
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
    block_field = torch.tensor(blocks.field, device=a.device)
    per_field = {n: round(float(a[block_field == f].mean()), 4) for f, n in enumerate(names)}
    return {
        "alpha_mean": round(float(a.mean()), 4),
        "alpha_below_0.01": round(float((a < 0.01).float().mean()), 4),
        "alpha_field_mean": per_field,
    }


def search_settings(
    dim: int, config: DnisConfig, train: TrainConfig, init_std: float = 0.01
) -> dict[str, Any]:
    """Everything a search's result depends on (budgets excluded: one search serves them all)."""
    search = {k: v for k, v in asdict(config).items() if k != "budgets"}
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
) -> SearchState:
    """Warm up, then alternate model steps (train batches) and alpha steps (valid batches).

    With `run_dir`, every epoch is checkpointed there (see the module docstring); with `resume`,
    the search continues from the furthest checkpoint found (none: from the start), and a
    finished search is loaded, not redone. Checkpoints carry `config_hash` (by default a hash of
    the search settings) and a checksum; a foreign or corrupt one is refused with a DnisError.
    """
    config = config or DnisConfig()
    train = train or TrainConfig()
    progress = progress or SilentProgress()
    settings = search_settings(dim, config, train, init_std)
    config_hash = settings_hash(settings) if config_hash is None else config_hash
    folder = None if run_dir is None else Path(run_dir)
    started = time.perf_counter()
    blocks = dataset_blocks(dataset, config.num_blocks, config.block_mode)
    torch.manual_seed(train.seed)
    embedding = SoftSelectionEmbedding(FieldLayout.from_dataset(dataset), dim, blocks, init_std)
    model = make_model(embedding)
    task = make_task(dataset)
    alpha = embedding.alpha
    alpha.requires_grad_(False)
    saved = None
    if folder is not None and resume and (folder / "checkpoint.pt").exists():
        saved = _read_search_checkpoint(folder / "checkpoint.pt", settings, config_hash)
    if saved is None and config.warmup_epochs:  # a search checkpoint supersedes the warm-up
        fixed = {"epochs": config.warmup_epochs, "patience": 0}
        warm = TrainConfig(**{**vars(train), **({} if config.warmup_epochs == CONVERGE else fixed)})
        warmup = Trainer(
            model,
            task,
            warm,
            run_dir=None if folder is None else folder / "warmup",
            progress=progress,
            config_hash=config_hash,
        )
        warmup.fit(resume=resume and _exists(warmup.checkpoint_path))
        del warmup  # its DistributedDataParallel (under torchrun) must not outlive the warm-up
    # alpha stays frozen in the model steps (its gradient there would be thrown away) and takes
    # gradients only inside `_alpha_step`
    net = step_module(model, train)  # model steps run through it (DDP, compiled: as configured)
    model_opt = make_optimizer(model, train, exclude=[alpha])
    alpha_opt: torch.optim.Optimizer = (
        torch.optim.SGD([alpha], lr=config.alpha_lr)
        if config.alpha_optimizer == "sgd"
        else torch.optim.Adam([alpha], lr=config.alpha_lr)
    )
    best, best_state, history, done, earlier = None, None, [], 0, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        model_opt.load_state_dict(saved["model_optimizer"])
        alpha_opt.load_state_dict(saved["alpha_optimizer"])
        best, best_state, history = saved["best"], saved["best_state"], saved["history"]
        done, earlier = saved["epoch"], saved["seconds"]  # time spent before the interruption
    for epoch in range(done + 1, config.search_epochs + 1):
        if (
            config.patience
            and _stale_epochs(history, f"valid_{task.metric}", best) >= config.patience
        ):
            break  # early-stopped (checked first, so a search resumed at that point stops too)
        seed = epoch_seed(train.seed, 1000 + epoch)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        sampler = distributed.rank_generator(generator, seed)
        valid_stream = endless_valid_batches(
            dataset, train.batch_size, generator, "DNIS's alpha steps"
        )
        model.train()
        progress.epoch_start(epoch, num_batches(dataset.train, train.batch_size))
        total = torch.zeros((), dtype=torch.float64)
        for batch in batches(dataset.train, train.batch_size, shuffle=True, generator=generator):
            ids, labels = distributed.shard(*batch)  # this rank's rows of the global batch
            loss = training_loss(
                task, net, embedding, (ids, labels), sampler, train, f"search epoch {epoch}",
                "lower train.lr or search.alpha_lr, or add regularisation (the last good "
                "checkpoint is kept)",
            )  # fmt: skip
            value = float(loss.detach())
            model_opt.zero_grad(set_to_none=True)
            loss.backward()
            model_opt.step()
            total += value * len(ids)
            _alpha_step(model, task, alpha, next(valid_stream), config, alpha_opt, sampler)
            progress.batch_end()
        valid = task.evaluate(model, "valid", train.eval_batch_size)
        record = {
            "epoch": epoch,
            "loss": float(distributed.all_reduce_sum(total)) / len(dataset.train),
            **{f"valid_{k}": v for k, v in valid.items()},
            **alpha_stats(alpha, blocks, dataset.schema.names),
        }
        history.append(record)
        if task.better(valid[task.metric], best):
            best, best_state = valid[task.metric], copy.deepcopy(model.state_dict())
        if folder is not None:
            save_checkpoint(
                folder / "checkpoint.pt",
                {
                    "settings": settings,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "model_optimizer": model_opt.state_dict(),
                    "alpha_optimizer": alpha_opt.state_dict(),
                    "best": best,
                    "best_state": best_state,
                    "history": history,
                    "seconds": earlier + time.perf_counter() - started,
                },
                config_hash,
            )
        progress.epoch_end(record)
    assert best_state is not None
    model.load_state_dict(best_state)
    before = {s: task.evaluate(model, s, train.eval_batch_size) for s in ("valid", "test")}
    return SearchState(
        model, embedding, blocks, task, before, history, earlier + time.perf_counter() - started
    )


def _stale_epochs(history: list[dict[str, Any]], key: str, best: float | None) -> int:
    """Epochs run since the best one (the first epoch that reached `best`)."""
    for index, record in enumerate(history):
        if record[key] == best:
            return len(history) - index - 1
    return 0


def _exists(path: Path | None) -> bool:
    return path is not None and path.exists()


def _read_search_checkpoint(
    path: Path, settings: dict[str, Any], config_hash: str
) -> dict[str, Any]:
    """A search checkpoint's state, refused unless its checksum, hash and settings match."""
    found, saved = read_checkpoint(path)  # refuses a torn, bit-flipped or foreign file
    check_config_hash(path, found, config_hash)
    keys = ("settings", "epoch", "model", "model_optimizer", "alpha_optimizer", "best_state")
    if any(key not in saved for key in keys):
        raise DnisError(
            f"checkpoint {path} is not a DNIS search checkpoint; delete it and start the run "
            "again without --resume"
        )
    if saved["settings"] != settings:
        raise DnisError(
            f"cannot resume from {path}: it was written with different search settings "
            f"({saved['settings']}, this run's are {settings}); resume with the config that "
            "wrote it, or delete it and start the run again without --resume"
        )
    return saved


def _alpha_step(
    model: Model,
    task: Task,
    alpha: nn.Parameter,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: DnisConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """One first-order step on alpha with a validation batch, then clamp to [0, 1].

    Under torchrun each rank takes its share of the batch and the gradients are averaged, so
    alpha takes the step of the whole batch and stays identical on every rank.
    """
    ids, labels = distributed.shard(*batch)
    proximal = l1_step(config, task) == "proximal"
    alpha.requires_grad_(True)
    try:
        loss = task.loss(model, ids, labels, generator)
        if config.alpha_l1 and not proximal:
            loss = loss + config.alpha_l1 * alpha.abs().sum()
        (grad,) = torch.autograd.grad(loss, [alpha])
    finally:
        alpha.requires_grad_(False)
    distributed.all_reduce_mean_(grad)
    if config.normalize_alpha_grad:
        grad = grad / (grad.abs().mean(dim=1, keepdim=True) + 1e-12)
    alpha.grad = grad
    optimizer.step()
    with torch.no_grad():
        if config.alpha_l1 and proximal:
            # soft-thresholding after the normalised step: every entry shrinks by the same
            # lr * l1, however often its block appears in validation batches
            alpha.sub_(config.alpha_lr * config.alpha_l1)
        alpha.clamp_(0.0, 1.0)


def l1_step(config: DnisConfig, task: Task) -> str:
    """The L1 step `config.l1_step` names; `auto` is proximal for ctr and loss otherwise."""
    if config.l1_step != "auto":
        return config.l1_step
    return "proximal" if task.name == "ctr" else "loss"


def materialize(
    state: SearchState, budget: float, config: DnisConfig, seed: int = 0
) -> FieldEmbedding:
    """The compact embedding for one budget, holding the searched weights with alpha folded in.

    With `config.structure: random` (the control), the kept dims are drawn at random (`seed`)
    with the same budget: what the pipeline gives without what the search found."""
    granularity = config.granularity
    soft = state.embedding
    full = soft.weight.numel()
    target = budget_params(budget, full)
    table = soft.selected_weight().detach()
    control = config.structure == "random"

    def noise(shape: tuple[int, ...]) -> torch.Tensor:  # the control's seeded random scores
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed))

    if granularity == "block":
        if control:
            keep = prune_blocks(noise(soft.alpha.shape), state.blocks, target)
        else:
            saliency = block_saliency(table, state.blocks)
            score = saliency if config.rank == "saliency" else soft.alpha
            keep = prune_blocks(score, state.blocks, target, tiebreak=saliency)
        compact: FieldEmbedding = BlockMixedEmbedding(soft.layout, soft.dim, state.blocks, keep)
    else:
        keep = prune_elements(noise(table.shape) if control else table, soft.layout, target)
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
    run_dir: str | Path | None = None,
    resume: bool = False,
    config_hash: str | None = None,
) -> SearchResult:
    """Prune to `budget`, materialise, and retrain with the structure fixed.

    With `run_dir`, the retrain is a Trainer checkpointing every epoch there; with `resume`, it
    continues from that checkpoint if there is one (`config_hash` guards it as in `search`).
    """
    started = time.perf_counter()
    compact, model = compact_model(state, make_model, budget, config=config, train=train)
    task = state.task
    pruned = task.evaluate(model, "valid", train.eval_batch_size)
    trainer = Trainer(
        model, task, train, run_dir=run_dir, progress=progress, config_hash=config_hash
    )
    resumed = resume and _exists(trainer.checkpoint_path)
    fit_started = time.perf_counter()
    result = trainer.fit(resume=resumed)
    fit_seconds = time.perf_counter() - fit_started
    test = task.evaluate(model, "test", train.eval_batch_size)
    seconds = time.perf_counter() - started
    if resumed:  # count the training epochs of earlier processes too, not the reloading
        seconds += result.train_seconds - fit_seconds
    done = finished_result(state, budget, compact, model, pruned, result.valid, test, seconds)
    done.train_epochs, done.epoch_cap_hit = len(result.history), result.capped
    return done


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
        dense = {
            k: v for k, v in state.model.state_dict().items() if not k.startswith("embedding.")
        }
        model.load_state_dict(dense, strict=False)
    else:
        compact.reset_parameters()
    return compact, model


def finished_result(
    state: SearchState,
    budget: float,
    compact: FieldEmbedding,
    model: Model,
    pruned: dict[str, float],
    valid: dict[str, float],
    test: dict[str, float],
    retrain_seconds: float,
) -> SearchResult:
    """The SearchResult of one retrained budget."""
    return SearchResult(
        method="dnis",
        metric=state.task.metric,
        budget=budget,
        full_params=state.embedding.weight.numel(),
        embedding_params=compact.num_parameters(),
        memory_bytes=compact.memory_bytes(),
        dims=dims_report(compact, state.blocks, state.task.dataset.schema.names),
        metrics={"valid": valid, "test": test},
        before=state.before,
        pruned=pruned,
        search_seconds=state.seconds,
        retrain_seconds=retrain_seconds,
        history=state.history,
        model=model,
    )


def retrain_dir(run_dir: str | Path, budget: float) -> Path:
    """Where the retrain of `budget` checkpoints inside a search's run folder."""
    return Path(run_dir) / f"retrain-{budget}"


def dnis(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int = 64,
    budget: float | Sequence[float] | None = None,
    config: DnisConfig | None = None,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    config_hash: str | None = None,
    init_std: float = 0.01,
) -> SearchResult | list[SearchResult]:
    """Search once, then prune and retrain for each budget (a list gives a list of results).

    `budget` defaults to `config.budgets` (a list of results); a number or a list given here
    replaces them. `init_std` is the std of the searched table's normal initialisation
    (`embedding.init_std` of a config).

    With `run_dir`, the search checkpoints into `run_dir/search/` and each budget's retrain into
    `run_dir/retrain-<budget>/`; with `resume`, all of them continue from their checkpoints (a
    finished stage only reloads and evaluates). Without `resume`, old checkpoints there are removed.
    """
    config = config or DnisConfig()
    train = train or TrainConfig()
    if config_hash is None:
        config_hash = settings_hash(search_settings(dim, config, train, init_std))
    if budget is None:
        budget = list(config.budgets)
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
    )
    budgets = [budget] if isinstance(budget, int | float) else list(budget)
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
    return results[0] if isinstance(budget, int | float) else results
