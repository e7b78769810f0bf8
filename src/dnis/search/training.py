"""Training a model around a compact embedding, shared by the search methods."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from dnis.data.dataset import EncodedDataset, Split
from dnis.data.loader import batches
from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.errors import DnisError
from dnis.models.base import Model
from dnis.search.prune import FP32_BYTES, budget_params
from dnis.search.result import SearchResult
from dnis.tasks import make_task
from dnis.tasks.base import Task
from dnis.train.progress import Progress
from dnis.train.trainer import TrainConfig, Trainer, TrainResult

ModelFactory = Callable[[FieldEmbedding], Model]
Structure = TypeVar("Structure")

# the std of the normal(0, std) initialisation of every searched table, so all methods start alike
INIT_STD = 0.01
# frequency blocks per field in the width reports of methods that have no blocks of their own
REPORT_BLOCKS = 6


@dataclass
class Trained:
    model: Model
    embedding: FieldEmbedding
    valid: dict[str, float]
    test: dict[str, float] | None
    seconds: float
    epochs: int = 0  # training epochs run (early stopping included)
    capped: bool = False  # stopped by train.epochs while validation still improved


@dataclass
class Phases:
    """Checkpoint folders for a method's trainings, numbered in the order they run
    (`root/phase-01`, ...): a killed run, started again with the same config and `resume`, finds
    each one's checkpoint; a finished training returns at once with its weights (and the global
    RNG) restored, the one that was cut continues from its last epoch, later ones start fresh.
    Without a `root`, trainings keep no checkpoints. `config_hash` (the run's digest) must match
    the checkpoints' to resume."""

    root: Path | None = None
    resume: bool = False
    config_hash: str | None = None
    count: int = field(default=0, init=False)

    def fit(self, model: Model, task: Task, train: TrainConfig, **options: Any) -> TrainResult:
        """`Trainer(model, task, train, **options).fit()` in the next phase folder."""
        self.count += 1
        folder = None if self.root is None else self.root / f"phase-{self.count:02d}"
        trainer = Trainer(
            model, task, train, run_dir=folder, config_hash=self.config_hash, **options
        )
        found = folder is not None and (folder / "checkpoint.pt").is_file()
        return trainer.fit(resume=self.resume and found)


def train_compact(
    make_model: ModelFactory,
    build_embedding: Callable[[], FieldEmbedding],
    task: Task,
    train: TrainConfig,
    *,
    test: bool = True,
    progress: Progress | None = None,
    phases: Phases | None = None,
) -> Trained:
    """Seed, build the embedding and the model around it, train, and evaluate (test optional)."""
    started = time.perf_counter()
    torch.manual_seed(train.seed)
    embedding = build_embedding()
    model = make_model(embedding)
    fit = (phases or Phases()).fit(model, task, train, progress=progress)
    metrics = task.evaluate(model, "test", train.eval_batch_size) if test else None
    return Trained(
        model, embedding, fit.valid, metrics, time.perf_counter() - started,
        epochs=len(fit.history), capped=fit.capped,
    )  # fmt: skip


@dataclass
class Job:
    """What one call of a method is asked (`method(name)(make_model, dataset, budgets=..., dim=...,
    train=...)`), with what every method derives from it: the field layout, the task and the
    full-width (`dim`) embedding's parameter count that budgets are fractions of. `method` is the
    name the method was called by (its results carry it)."""

    method: str
    make_model: ModelFactory
    dataset: EncodedDataset
    budgets: list[float]
    dim: int
    train: TrainConfig
    phases: Phases = field(default_factory=Phases)  # where its trainings keep checkpoints

    @cached_property
    def layout(self) -> FieldLayout:
        return FieldLayout.from_dataset(self.dataset)

    @cached_property
    def task(self) -> Task:
        return make_task(self.dataset)

    @property
    def full(self) -> int:
        """Parameters of the full-width embedding (every field at `dim`)."""
        return self.layout.total_rows * self.dim

    def target(self, budget: float) -> int:
        """A budget as a parameter count."""
        return budget_params(budget, self.full)

    def target_bytes(self, budget: float) -> int:
        """A budget as stored bytes (for the methods that count bytes): its parameter count at
        fp32, 4 bytes each."""
        return FP32_BYTES * self.target(budget)

    def fit(
        self,
        build_embedding: Callable[[], FieldEmbedding],
        *,
        train: TrainConfig | None = None,
        test: bool = True,
    ) -> Trained:
        """`train_compact` for this job (its own `train` config for a short trial)."""
        return train_compact(
            self.make_model, build_embedding, self.task, train or self.train, test=test,
            phases=self.phases,
        )  # fmt: skip

    def result(
        self, budget: float, trained: Trained, dims: dict[str, Any], **extra: Any
    ) -> SearchResult:
        """The result of `budget`: a model trained around a compact embedding (`fit`)."""
        return SearchResult.from_trained(
            self.method, self.task.metric, budget, self.full, trained, dims, **extra
        )


def train_budgets(
    job: Job,
    structure: Callable[[int], Structure],
    build: Callable[[Structure], FieldEmbedding],
    report: Callable[[Structure, Any], dict[str, Any]],
    **extra: Any,
) -> list[SearchResult]:
    """The per-budget skeleton of the methods whose structure follows from the budget by a rule
    (hashing, qr, unified, outrank): per budget, the `structure` that fits its parameter count,
    its embedding (`build`) trained from scratch, and the result with its dims per field
    (`report(structure, trained embedding)`). `extra` goes to every result (search time,
    history)."""
    results = []
    for budget in job.budgets:
        chosen = structure(job.target(budget))
        trained = job.fit(partial(build, chosen))
        dims = report(chosen, trained.embedding)
        results.append(job.result(budget, trained, dims, **extra))
    return results


def phase_config(train: TrainConfig, epochs: int, patience: int = 0) -> TrainConfig:
    """`train` for one phase of a method (a warm-up, a search): its own epoch count and patience
    (0: run every epoch)."""
    return TrainConfig(**{**vars(train), "epochs": epochs, "patience": patience})


def block_report(
    widths: Sequence[int], blocks: BlockLayout, names: Sequence[str]
) -> dict[str, Any]:
    """Per field: the width and row count of each of its blocks."""
    return {
        name: {
            "block_dims": [int(widths[b]) for b in blocks.blocks_of(f)],
            "block_rows": [blocks.size[b] for b in blocks.blocks_of(f)],
        }
        for f, name in enumerate(names)
    }


def endless_batches(
    split: Split, batch_size: int, generator: torch.Generator, steps: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of `split` (the validation split, or rows held out of training) without
    end, for a bilevel method's architecture steps (`steps` names them in the error). An empty
    split would make the loop spin forever without yielding, so it is refused; runs refuse an
    empty validation split earlier, in `dnis.data.checks.check_splits`."""
    if len(split) == 0:
        raise DnisError(
            f"{steps} take validation batches, but the validation split is empty; give it rows "
            "(more data, or your own valid file)"
        )
    while True:
        yield from batches(split, batch_size, shuffle=True, generator=generator)
