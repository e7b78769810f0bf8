"""The uniform-width baseline: every field gets the same width d (the Pareto line to beat)."""

from __future__ import annotations

import time

import torch

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.search.dnis import ModelFactory
from dnis.search.result import SearchResult
from dnis.tasks import make_task
from dnis.train.progress import Progress
from dnis.train.trainer import TrainConfig, Trainer


def uniform(
    make_model: ModelFactory,
    dataset: EncodedDataset,
    *,
    dim: int,
    full_dim: int = 64,
    train: TrainConfig | None = None,
    progress: Progress | None = None,
    init_std: float = 0.01,
) -> SearchResult:
    """Train the model with every field at width `dim`; the budget is reported against `full_dim`."""
    train = train or TrainConfig()
    started = time.perf_counter()
    torch.manual_seed(train.seed)
    layout = FieldLayout.from_dataset(dataset)
    embedding = FusedEmbedding(layout, dim, init_std)
    model = make_model(embedding)
    task = make_task(dataset)
    fit = Trainer(model, task, train, progress=progress).fit()
    test = task.evaluate(model, "test", train.eval_batch_size)
    full = layout.total_rows * full_dim
    return SearchResult(
        method="uniform",
        metric=task.metric,
        budget=embedding.num_parameters() / full,
        full_params=full,
        embedding_params=embedding.num_parameters(),
        memory_bytes=embedding.memory_bytes(),
        dims={name: {"block_dims": [dim]} for name in layout.names},
        metrics={"valid": fit.valid, "test": test},
        retrain_seconds=time.perf_counter() - started,
        model=model,
    )
