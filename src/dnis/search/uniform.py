"""The uniform-width baseline: every field gets the same width d (the Pareto line to beat)."""

from __future__ import annotations

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.errors import BudgetError
from dnis.search.methods import NoOptions, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, ModelFactory, Phases, train_compact
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
    init_std: float = INIT_STD,
    phases: Phases | None = None,
) -> SearchResult:
    """Train the model with every field at width `dim`; the budget is reported against `full_dim`.
    `phases`: where the training keeps its checkpoints (a grid cell's, so a kill resumes it)."""
    train = train or TrainConfig()
    layout = FieldLayout.from_dataset(dataset)
    task = make_task(dataset)
    trained = train_compact(
        make_model, lambda: FusedEmbedding(layout, dim, init_std), task, train, progress=progress,
        phases=phases,
    )  # fmt: skip
    full = layout.total_rows * full_dim
    budget = trained.embedding.num_parameters() / full
    dims = {name: {"block_dims": [dim]} for name in layout.names}
    return SearchResult.from_trained("uniform", task.metric, budget, full, trained, dims)


@register_method("uniform")
def uniform_method(job: Job, options: NoOptions) -> list[SearchResult]:
    """Every field at the widest uniform width that fits the budget: floor(budget * dim)."""
    results = []
    for b in job.budgets:
        if int(b * job.dim) < 1:
            raise BudgetError(
                f"uniform needs at least width 1 ({1 / job.dim:.4g} of the width-{job.dim} "
                f"embedding), the budget is {b}"
            )
        result = uniform(
            job.make_model, job.dataset, dim=int(b * job.dim), full_dim=job.dim, train=job.train,
            phases=job.phases,
        )  # fmt: skip
        result.budget = b
        results.append(result)
    return results
