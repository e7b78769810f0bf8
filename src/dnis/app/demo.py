"""The `make demo` job: DNIS next to the uniform-width grid on each example config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dnis.app.config import Config, load_config
from dnis.app.search import search_run
from dnis.app.train import model_factory, train
from dnis.search.result import SearchResult
from dnis.search.uniform import uniform
from dnis.train.progress import Progress


@dataclass
class DemoSection:
    title: str
    rows: list[dict[str, Any]]
    truth: list[dict[str, Any]] = field(default_factory=list)  # planted vs found, synthetic only
    report: Path | None = None


def _row(method: str, setting: str, result: SearchResult | dict[str, Any]) -> dict[str, Any]:
    if isinstance(result, SearchResult):
        test, params, seconds = (
            result.metrics["test"],
            result.embedding_params,
            result.search_seconds + result.retrain_seconds,
        )
    else:
        test, params, seconds = (
            result["test"],
            result["params"]["embedding"],
            result["wall_seconds"],
        )
    return {
        "method": method,
        "setting": setting,
        "embedding params": params,
        **{k: v for k, v in test.items() if k != "users"},
        "seconds": round(seconds, 1),
    }


def dnis_label(result: SearchResult) -> str:
    """DNIS's row, marked where the uniform width beat the searched structure on validation
    (`search.fallback`) and was kept instead."""
    return "DNIS (uniform kept)" if result.choice.get("structure") == "uniform" else "DNIS"


def planted_vs_found(result: SearchResult, true_rank: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {
            "field": name,
            "true rank": rank,
            "found dims per block": result.dims[name]["block_dims"],
            "mean dims": round(float(np.mean(result.dims[name]["block_dims"])), 2),
        }
        for name, rank in true_rank.items()
    ]


def run_demo(
    paths: Sequence[Path],
    grid: Sequence[int],
    overrides: Sequence[str] = (),
    progress: Callable[[str], Progress] | None = None,
) -> list[DemoSection]:
    sections = []
    for path in paths:
        config: Config = load_config(path, list(overrides))
        label = config.run_name()
        bar = progress(label) if progress else None
        title = f"{config.dataset.name} · {config.dataset.task} · {config.model.name}"
        if config.dataset.task == "topk" or not config.search.budgets:
            run = train(config, progress=bar)
            sections.append(
                DemoSection(title, [_row("uniform", f"d={config.embedding.dim}", run.metrics)])
            )
            continue
        dataset, results = search_run(config, progress=bar)
        rows = [_row(dnis_label(r), f"budget {r.budget:g}", r) for r in results]
        make = model_factory(config, dataset)
        for dim in (d for d in grid if d <= config.embedding.dim):
            base = uniform(
                make,
                dataset,
                dim=dim,
                full_dim=config.embedding.dim,
                train=replace(config.train),
                progress=bar,
            )
            rows.append(_row("uniform", f"d={dim}", base))
        truth = dataset.meta.get("true_rank")
        sections.append(
            DemoSection(
                title,
                rows,
                planted_vs_found(results[-1], truth) if truth else [],
                config.run_dir() / "report.md",
            )
        )
    return sections
