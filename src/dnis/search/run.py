"""A search run from a config: DNIS once, then a compact retrained model per budget.

`runs/<name>-<config hash>/` receives config.yaml, encoder.json, search.json (per-epoch log and
alpha), and per budget `model-<budget>.pt` (only the compact tables and the dense weights), plus
the report: dims.json, results.json, report.md, dims.png, metric.png.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnis.config import Config
from dnis.data.dataset import EncodedDataset
from dnis.io import atomic_write, write_json
from dnis.report import write_search_report
from dnis.search.dnis import retrain, search
from dnis.search.result import SearchResult
from dnis.train.progress import Progress
from dnis.train.run import model_factory, start_run


def search_run(
    config: Config,
    budgets: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> tuple[EncodedDataset, list[SearchResult]]:
    """The dataset it loaded (callers reuse it) and one result per budget."""
    run_dir = config.run_dir()
    dataset = start_run(config, run_dir)
    make_model = model_factory(config, dataset)
    state = search(
        make_model,
        dataset,
        dim=config.embedding.dim,
        config=config.search,
        train=config.train,
        progress=progress,
    )
    write_json(
        run_dir / "search.json",
        {
            "history": state.history,
            "before": state.before,
            "seconds": state.seconds,
            "alpha": state.embedding.alpha.tolist(),
        },
    )
    results = []
    for budget in budgets or config.search.budgets:
        result = retrain(
            state, make_model, budget, config=config.search, train=config.train, progress=progress
        )
        assert result.model is not None
        atomic_write(
            run_dir / f"model-{budget}.pt",
            lambda handle, m=result.model: torch.save(m.state_dict(), handle),
        )
        results.append(result)
    write_search_report(
        results,
        run_dir,
        metric=state.task.metric,
        dim=config.embedding.dim,
        title=f"DNIS on {dataset.name} ({dataset.task}, {config.model.name})",
    )
    return dataset, results
