"""The trainer: epochs over seeded shuffles, early stopping with restore-best, checkpoint/resume.

It is the one training loop of the library: a method that needs more than plain training (DNIS's
alpha steps on validation batches, a pruning schedule, a temperature) plugs a `TrainHook` into it
instead of writing its own loop, and so gets the NaN guard, `train.compile`, multi-process
training and checkpoints like every other model.

Determinism: every epoch reseeds its shuffle, its sampling and torch's global RNG (dropout) from
(seed, epoch), so an uninterrupted run and a run resumed from any epoch's checkpoint take exactly
the same steps.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dnis import distributed
from dnis.data.loader import batches, num_batches
from dnis.embeddings.fused import FusedEmbedding
from dnis.errors import ConfigError, DnisError, did_you_mean
from dnis.io import write_text
from dnis.models.base import Model
from dnis.tasks.base import Task, model_device
from dnis.train.checkpoint import check_config_hash, read_checkpoint, save_checkpoint
from dnis.train.progress import Progress, SilentProgress
from dnis.train.rowwise import RowwiseAdam

OPTIMIZERS = ("adam", "sparse_adam", "adagrad", "sgd")
# optimizers that take sparse gradients: under them, the id tables that can look rows up sparsely do
SPARSE_OPTIMIZERS = ("sparse_adam", "adagrad")


@dataclass
class TrainConfig:
    """Training hyper-parameters (the `train:` section of a config)."""

    # a cap, rarely reached: training stops when validation stops improving (`patience`), and says
    # so when it reaches the cap first. 256 beat 1024 on validation on all three defaults configs
    # (docs/results.md, "Defaults on data nobody tuned for"); raise it for throughput on large data
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sparse_adam | adagrad | sgd
    weight_decay: float = 0.0  # L2 on the dense (non-embedding) weights, via the optimizer
    embedding_l2: float = 0.0  # L2 on the embedding rows looked up in each batch
    patience: int = 3  # epochs without validation improvement before stopping (0 = never stop)
    eval_batch_size: int = 8192
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    compile: bool = False  # torch.compile the training steps' forward (pays off on long runs)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                f"{self.optimizer!r}.{did_you_mean(self.optimizer, OPTIMIZERS)}"
            )
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        resolve_device(self.device)  # a bad or unavailable device fails before any work


@dataclass
class EpochContext:
    """What a hook sees of the running epoch."""

    trainer: Trainer
    epoch: int
    generator: torch.Generator  # the epoch's shuffle generator (a hook may draw from it)
    sampler: torch.Generator  # this rank's generator for sampling (negatives, dropout-free draws)
    batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's (ids, labels), this rank's
    rows: int = 0  # rows of the epoch's global batches so far (every rank's), the step's included
    # set by a hook to end the run: the epoch stops after this step (it is validated, recorded and
    # checkpointed as usual) and no epoch follows (e.g. PEP once every budget's mask is saved)
    stop: bool = False


class TrainHook:
    """A method's extension of the training loop; every method is optional.

    `state_dict`/`load_state_dict` carry the hook's own state (an optimizer, a schedule, the
    snapshots it took) through the Trainer's checkpoints, so a resumed run continues exactly.
    """

    def epoch_start(self, context: EpochContext) -> None: ...

    def before_step(self, context: EpochContext) -> None:
        """Before the forward pass of a training batch (`context.batch`), e.g. an architecture
        step that precedes the model step, or a schedule that sets a temperature."""

    def loss(self, context: EpochContext, loss: torch.Tensor) -> torch.Tensor:
        """The batch's task loss, to which the hook may add a term (a regulariser such as a
        gate L1); the trainer then adds `embedding_l2` and refuses a loss that is not finite."""
        return loss

    def after_backward(self, context: EpochContext) -> bool:
        """After the backward pass, before the model's optimizer step; return True when the hook
        changed the weights itself in place of that step (e.g. a mask update, as RigL's)."""
        return False

    def after_step(self, context: EpochContext) -> None:
        """After the model's optimizer step on a training batch (e.g. an architecture step)."""

    def epoch_end(self, context: EpochContext, record: dict[str, Any]) -> None:
        """After validation, before the checkpoint; may add entries to the epoch's `record`."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    best_epoch: int
    valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    # stopped by train.epochs while validation was still improving (not by patience)
    capped: bool = False


class SparseDenseOptimizer:
    """`train.optimizer: sparse_adam`: SparseAdam's update (`RowwiseAdam`, which makes it on the
    gradient's distinct rows directly) for the tables whose gradients are sparse, Adam for every
    other weight, stepped as one optimizer.

    It offers the part of `torch.optim.Optimizer` a training loop uses (`zero_grad`, `step`,
    `state_dict`, `load_state_dict`, `param_groups`, `state`), and its `state_dict` holds both
    optimizers' states, so a checkpoint of it resumes both.
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer | None) -> None:
        self.dense = dense
        self.sparse = sparse

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense] if self.sparse is None else [self.dense, self.sparse]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of both optimizers (the dicts themselves: setting a group's lr works)."""
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Per-parameter state of both (a merged view; each value is the optimizer's own dict)."""
        merged: dict[torch.Tensor, dict[str, Any]] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.state_dict(),
            "sparse": None if self.sparse is None else self.sparse.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"dense", "sparse"} or (state["sparse"] is None) != (self.sparse is None):
            raise DnisError(
                "cannot load the optimizer state: it was not saved by a sparse_adam optimizer "
                "over the same model"
            )
        self.dense.load_state_dict(state["dense"])
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])


def set_sparse_lookups(
    model: Model, config: TrainConfig, exclude: list[torch.nn.Parameter] | None = None
) -> list[torch.nn.Parameter]:
    """Switch the model's id tables to sparse lookups when `config.optimizer` takes sparse
    gradients (`sparse_adam`, `adagrad`), off otherwise; returns the tables' weights that now get
    sparse gradients.

    A table is switched on only if its lookup is a plain gather (`FusedEmbedding` itself: the
    model's embedding and the linear terms' width-1 table). Embeddings that scale, gate, hash or
    store rows compactly (DNIS's soft selection, OptFS gates, mixed-width, ragged, hashed, QR ...)
    keep dense gradients and are updated by the dense optimizer: under `sparse_adam` that is Adam,
    so such runs train as with `adam`. A table outside the embedding (the linear terms) stays dense
    when `weight_decay` > 0, since weight decay applies to it and sparse updates cannot decay it.
    Frozen tables and those in `exclude` (stepped elsewhere, if at all) stay dense. Under
    torchrun every table stays dense: DistributedDataParallel averages dense gradient buckets
    only, so `sparse_adam` trains there as `adam`.
    """
    wanted = config.optimizer in SPARSE_OPTIMIZERS and not distributed.active()
    skip = {id(p) for p in exclude or []}
    embedding_ids = {id(p) for p in model.embedding.parameters()}
    weights: list[torch.nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, FusedEmbedding):
            continue
        weight = module.weight
        decayed = config.weight_decay > 0 and id(weight) not in embedding_ids
        trained = weight.requires_grad and id(weight) not in skip
        module.sparse = wanted and trained and module.supports_sparse_grad() and not decayed
        if module.sparse:
            weights.append(module.weight)
    return weights


def adam(groups: list[dict[str, Any]], lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel per step, no temporaries) where torch has that kernel: on large
    tables the default implementation's per-step temporaries cost several times the update."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(groups, lr=lr, fused=fused or None)


def make_optimizer(
    model: Model, config: TrainConfig, exclude: list[torch.nn.Parameter] | None = None
) -> torch.optim.Optimizer | SparseDenseOptimizer:
    """Embedding rows are regularised per batch (`embedding_l2`), so weight decay skips them.

    Parameters that do not require grad (e.g. a frozen DNIS alpha) or are in `exclude` are left out.
    Under `sparse_adam` and `adagrad` the model's plain id tables are switched to sparse lookups
    first (`set_sparse_lookups`); `sparse_adam` gives a `SparseDenseOptimizer` (`RowwiseAdam`,
    the same update as `torch.optim.SparseAdam` and the same state, for those tables, Adam for the
    rest), `adagrad` one Adagrad (it takes sparse gradients itself).
    """
    skip = {id(p) for p in exclude or []}
    sparse_ids = {id(p) for p in set_sparse_lookups(model, config, exclude)}
    embedding_ids = {id(p) for p in model.embedding.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    if config.optimizer == "sparse_adam":
        sparse = [p for p in trainable if id(p) in sparse_ids]
        trainable = [p for p in trainable if id(p) not in sparse_ids]
    groups = [
        {"params": [p for p in trainable if id(p) in embedding_ids], "weight_decay": 0.0},
        {
            "params": [p for p in trainable if id(p) not in embedding_ids],
            "weight_decay": config.weight_decay,
        },
    ]
    if config.optimizer == "sparse_adam":
        return SparseDenseOptimizer(
            adam(groups, config.lr),
            RowwiseAdam(sparse, lr=config.lr) if sparse else None,
        )
    if config.optimizer == "adam":
        return adam(groups, config.lr)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr)


def step_module(model: Model, config: TrainConfig) -> torch.nn.Module:
    """What training steps call: the model, wrapped in DistributedDataParallel under torchrun,
    compiled with `torch.compile` when `config.compile` (evaluation always runs the model itself:
    its batch sizes differ and would compile again)."""
    net = distributed.wrap(model)
    return torch.compile(net) if config.compile else net


def training_loss(
    task: Task,
    net: torch.nn.Module,
    embedding: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    config: TrainConfig,
    where: str,
    fix: str = "lower train.lr or add regularisation",
    extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One batch's training loss plus `embedding_l2` on the embedding rows it looked up; `extra`
    maps the task loss to the task loss plus terms of its own (hooks' regularisers) first.

    A loss that is not finite stops the run with an error saying where (`where`, e.g.
    "epoch 3") and what to change (`fix`), instead of training on NaN weights.
    """
    ids, labels = batch
    loss = task.loss(net, ids, labels, generator)
    if extra is not None:
        loss = extra(loss)
    if config.embedding_l2:
        loss = loss + config.embedding_l2 * embedding.last_l2
    if not torch.isfinite(loss):
        raise DnisError(f"the training loss became {float(loss.detach())} in {where}; {fix}")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise DnisError(
            f"the training loss depends on no trainable parameter in {where}: the model has "
            "nothing to train (e.g. an embedding that kept no rows and a model without biases "
            "or dense layers); give it a larger budget"
        )
    return loss


def valid_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The validation metrics of an epoch's history record (its `valid_*` entries)."""
    return {k[len("valid_") :]: v for k, v in record.items() if k.startswith("valid_")}


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when one is visible; asking for a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device {name!r} is not a device; use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device {name!r}: only cpu, cuda, cuda:N and auto are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is {name!r} but torch sees no CUDA GPU; set train.device: cpu "
                "(or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


def train_config_hash(config: TrainConfig) -> str:
    """Short hash of a TrainConfig: the default config hash of a Trainer's checkpoints."""
    text = json.dumps(asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


class Trainer:
    def __init__(
        self,
        model: Model,
        task: Task,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        progress: Progress | None = None,
        config_hash: str | None = None,
        *,
        hooks: Sequence[TrainHook] = (),
        exclude: list[torch.nn.Parameter] | None = None,
        phase: str = "epoch",
        seed_offset: int = 0,
        restore_best: bool = True,
    ) -> None:
        """`config_hash` is stored in checkpoints and must match to resume (a run passes its
        `Config.digest()`); by default it is `train_config_hash(config)`.

        `hooks` extend the loop (`TrainHook`); `exclude` are parameters the model's optimizer
        leaves alone (a hook steps them); `phase` names the epochs in errors ("search epoch 3");
        `seed_offset` gives a phase its own per-epoch randomness; `restore_best: False` keeps
        the last epoch's weights (a hook's schedule decides what the result is)."""
        self.model = model
        self.task = task
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.progress = progress or SilentProgress()
        self.hooks = list(hooks)
        self.phase = phase
        self.seed_offset = seed_offset
        self.restore_best = restore_best
        self.optimizer = make_optimizer(model, config, exclude)
        self.net = step_module(model, config)  # training steps run through it
        self.config_hash = train_config_hash(config) if config_hash is None else config_hash

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def fit(self, resume: bool = False) -> TrainResult:
        cfg, task = self.config, self.task
        state: dict[str, Any] = {
            "epoch": 0,
            "best": None,
            "best_epoch": 0,
            "best_state": None,
            "history": [],
            "stale": 0,
            "seconds": 0.0,
            "stopped": False,  # a hook ended the run (`EpochContext.stop`)
        }
        if resume:
            state = {"stopped": False, **self._resume()}
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if (cfg.patience and state["stale"] >= cfg.patience) or state["stopped"]:
                break  # early- or hook-stopped (checked first: a run resumed there stops too)
            started = time.perf_counter()
            context = self._context(epoch)
            loss = self._train_epoch(context)
            valid = task.evaluate(self.model, "valid", cfg.eval_batch_size)
            score = valid[task.metric]
            seconds = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "loss": loss,
                "seconds": round(seconds, 3),
                **{f"valid_{k}": v for k, v in valid.items()},
            }
            for hook in self.hooks:
                hook.epoch_end(context, record)
            state["stopped"] = context.stop
            state["history"].append(record)
            state["seconds"] += seconds
            if task.better(score, state["best"]):
                # the best weights are copied only when they will be restored (tables are large)
                best_state = copy.deepcopy(self.model.state_dict()) if self.restore_best else None
                state.update(best=score, best_epoch=epoch, stale=0, best_state=best_state)
            else:
                state["stale"] += 1
            state["epoch"] = epoch
            self._save(state)
            self.progress.epoch_end(record)
        if state["best_state"] is not None and self.restore_best:
            self.model.load_state_dict(state["best_state"])
        best = state["history"][state["best_epoch"] - 1] if state["history"] else {}
        valid = valid_metrics(best)
        capped = (
            bool(cfg.patience)
            and state["epoch"] == cfg.epochs
            and state["stale"] < cfg.patience
            and not state["stopped"]
        )
        if capped:
            self.progress.note(
                f"stopped at the epoch cap (train.epochs={cfg.epochs}) while validation "
                f"{task.metric} was still improving (best epoch {state['best_epoch']}): raise "
                "train.epochs for a better model"
            )
        return TrainResult(
            state["best_epoch"], valid, state["history"], state["seconds"], capped=capped
        )

    def train_epoch(self, epoch: int) -> float:
        """One epoch of training steps (randomness from (seed, epoch)), without validation or
        checkpoint: the step loop of `fit`, which benchmarks time. Returns the mean loss."""
        return self._train_epoch(self._context(epoch))

    def _context(self, epoch: int) -> EpochContext:
        """The epoch's randomness, drawn from (seed, epoch) alone."""
        seed = epoch_seed(self.config.seed, self.seed_offset + epoch)
        torch.manual_seed(seed)  # dropout and any other global-RNG use
        generator = torch.Generator().manual_seed(seed)
        return EpochContext(self, epoch, generator, distributed.rank_generator(generator, seed))

    def _train_epoch(self, context: EpochContext) -> float:
        cfg = self.config
        self.model.train()
        split = self.task.dataset.train
        total = torch.zeros((), dtype=torch.float64, device=model_device(self.model))
        extra = functools.partial(self._hook_loss, context) if self.hooks else None
        for hook in self.hooks:
            hook.epoch_start(context)
        self.progress.epoch_start(context.epoch, num_batches(split, cfg.batch_size))
        for batch in batches(split, cfg.batch_size, shuffle=True, generator=context.generator):
            context.rows += len(batch[1])
            context.batch = distributed.shard(*batch)  # this rank's rows of the global batch
            for hook in self.hooks:
                hook.before_step(context)
            loss = training_loss(
                self.task, self.net, self.model.embedding, context.batch, context.sampler, cfg,
                f"{self.phase} {context.epoch}",
                "lower train.lr or add regularisation (the last good checkpoint is kept)",
                extra,
            )  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            replaced = [hook.after_backward(context) for hook in self.hooks]  # every hook runs
            if not any(replaced):
                self.optimizer.step()
            total += loss.detach() * len(context.batch[0])
            for hook in self.hooks:
                hook.after_step(context)
            self.progress.batch_end()
            if context.stop:
                break
        context.batch = None
        # the mean over the rows trained on (all of the split unless a hook stopped the epoch)
        return float(distributed.all_reduce_sum(total) / max(context.rows, 1))

    def _hook_loss(self, context: EpochContext, loss: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            loss = hook.loss(context, loss)
        return loss

    def _save(self, state: dict[str, Any]) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "config": asdict(self.config),
                "hooks": [hook.state_dict() for hook in self.hooks],
                # the global RNG after the epoch (dropout used it): what runs after a phase that
                # a resumed run finds finished draws what it would have drawn without the break
                "rng": torch.get_rng_state(),
                **state,
            },
            self.config_hash,
        )
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in state["history"])
        write_text(self.run_dir / "metrics.jsonl", lines)  # type: ignore[operator]

    def _resume(self) -> dict[str, Any]:
        path = self.checkpoint_path
        if path is None or not path.exists():
            raise DnisError(f"cannot resume: no checkpoint at {path}; start without --resume")
        found, saved = read_checkpoint(path)  # refuses a corrupt file
        if saved["config"] != asdict(self.config):
            raise DnisError(
                f"cannot resume from {path}: it was written with a different train config"
            )
        check_config_hash(path, found, self.config_hash)
        hooks = saved.pop("hooks", [])
        if len(hooks) != len(self.hooks):
            raise DnisError(
                f"cannot resume from {path}: it was written by a run with {len(hooks)} training "
                f"hook(s), this one has {len(self.hooks)}; resume with the config that wrote it"
            )
        self.model.load_state_dict(saved.pop("model"))
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        for hook, hook_state in zip(self.hooks, hooks, strict=True):
            hook.load_state_dict(hook_state)
        saved.pop("config")
        rng = saved.pop("rng", None)  # absent from checkpoints written before it was saved
        if rng is not None:
            torch.set_rng_state(rng)
        return saved
