"""The uniform-width baseline: every field gets the same width d (the Pareto line to beat)."""

from __future__ import annotations

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.search.dnis import ModelFactory
from dnis.search.result import SearchResult
from dnis.search.training import train_compact
from dnis.tasks import make_task
from dnis.train.progress import Progress
from dnis.train.trainer import TrainConfig


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
    layout = FieldLayout.from_dataset(dataset)
    task = make_task(dataset)
    trained = train_compact(
        make_model, lambda: FusedEmbedding(layout, dim, init_std), task, train, progress=progress
    )
    embedding = trained.embedding
    full = layout.total_rows * full_dim
    return SearchResult(
        method="uniform",
        metric=task.metric,
        budget=embedding.num_parameters() / full,
        full_params=full,
        embedding_params=embedding.num_parameters(),
        memory_bytes=embedding.memory_bytes(),
        dims={name: {"block_dims": [dim]} for name in layout.names},
        metrics={"valid": trained.valid, "test": trained.test},
        retrain_seconds=trained.seconds,
        train_epochs=trained.epochs,
        epoch_cap_hit=trained.capped,
        model=trained.model,
    )
