"""Training a model around a compact embedding, shared by the search methods."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import batches
from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.errors import DnisError
from dnis.models.base import Model
from dnis.tasks.base import Task
from dnis.train.progress import Progress
from dnis.train.trainer import TrainConfig, Trainer

ModelFactory = Callable[[FieldEmbedding], Model]

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


def train_compact(
    make_model: ModelFactory,
    build_embedding: Callable[[], FieldEmbedding],
    task: Task,
    train: TrainConfig,
    *,
    test: bool = True,
    progress: Progress | None = None,
) -> Trained:
    """Seed, build the embedding and the model around it, train, and evaluate (test optional)."""
    started = time.perf_counter()
    torch.manual_seed(train.seed)
    embedding = build_embedding()
    model = make_model(embedding)
    fit = Trainer(model, task, train, progress=progress).fit()
    metrics = task.evaluate(model, "test", train.eval_batch_size) if test else None
    return Trained(
        model, embedding, fit.valid, metrics, time.perf_counter() - started,
        epochs=len(fit.history), capped=fit.capped,
    )  # fmt: skip


def phase_config(train: TrainConfig, epochs: int, patience: int = 0) -> TrainConfig:
    """`train` for one phase of a method (a warm-up, a search): its own epoch count and patience
    (0: run every epoch)."""
    return TrainConfig(**{**vars(train), "epochs": epochs, "patience": patience})


def valid_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The validation metrics of an epoch's history record (its `valid_*` entries)."""
    return {k[len("valid_") :]: v for k, v in record.items() if k.startswith("valid_")}


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


def endless_valid_batches(
    dataset: EncodedDataset, batch_size: int, generator: torch.Generator, steps: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled validation batches without end, for a bilevel method's architecture steps
    (`steps` names them in the error). An empty validation split would make the loop spin
    forever without yielding, so it is refused; runs refuse it earlier, in `check_splits`."""
    if len(dataset.valid) == 0:
        raise DnisError(
            f"{steps} take validation batches, but the validation split is empty; give it rows "
            "(more data, or your own valid file)"
        )
    while True:
        yield from batches(dataset.valid, batch_size, shuffle=True, generator=generator)
