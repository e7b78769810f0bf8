"""`dnis compare`: methods x budgets x seeds on one dataset, split and model, resumable.

Each (method, seed) cell runs a method for all budgets (so DNIS searches once per seed) and is
cached as JSON in `<run>/cells/`; a rerun skips finished cells, so a killed grid resumes where it
stopped. The data split is the run's seed; the seeds of the grid vary initialisation and
shuffling. Inference cost (batch latency, peak memory in a fresh process) is measured for the
first seed of every method and budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dnis.config import Config
from dnis.io import write_json
from dnis.search.inference import batch_latency_ms, peak_memory_mb
from dnis.search.methods import method
from dnis.search.prune import budget_params
from dnis.train.run import model_factory, start_run


def cell_path(run_dir: Path, method_name: str, seed: int) -> Path:
    return run_dir / "cells" / f"{method_name}-seed{seed}.json"


def run_cell(
    config: Config, dataset, method_name: str, seed: int, measure_inference: bool
) -> list[dict[str, Any]]:
    compare = config.compare
    train = replace(config.train, seed=config.seed + seed)
    results = method(method_name)(
        model_factory(config, dataset),
        dataset,
        budgets=compare.budgets,
        dim=config.embedding.dim,
        train=train,
        options=method_options(config, method_name),
    )
    rows = []
    full = sum(dataset.cardinalities) * config.embedding.dim
    for result in results:
        if result.embedding_params > budget_params(result.budget, full):
            raise AssertionError(f"{method_name} broke its budget {result.budget}")  # a method bug
        row = {**result.to_dict(), "seed": seed}
        if measure_inference and result.model is not None:
            ids = dataset.test.ids
            row["latency_ms"] = batch_latency_ms(result.model, ids, compare.inference_batch)
            row["peak_memory_mb"] = peak_memory_mb(result.model, ids, compare.inference_batch)
        rows.append(row)
    return rows


def method_options(config: Config, method_name: str) -> dict[str, Any]:
    """A method's options from `compare.options`; DNIS starts from the `search:` section."""
    options = dict(config.compare.options.get(method_name, {}))
    if method_name == "dnis":
        search = {k: v for k, v in asdict(config.search).items() if k != "budgets"}
        options = {**search, **options}
    return options


def compare(
    config: Config, on_cell: Callable[[str, int, float], None] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the grid; returns one row per method x budget x seed."""
    run_dir = config.run_dir()
    dataset = start_run(config, run_dir)
    for name in config.compare.methods:
        method(name)  # unknown names fail before any training
    rows: list[dict[str, Any]] = []
    for name in config.compare.methods:
        for seed in range(config.compare.seeds):
            path = cell_path(run_dir, name, seed)
            if path.exists():
                rows += json.loads(path.read_text(encoding="utf-8"))
                continue
            started = time.perf_counter()
            cell = run_cell(config, dataset, name, seed, measure_inference=seed == 0)
            write_json(path, cell)
            rows += cell
            if on_cell:
                on_cell(name, seed, time.perf_counter() - started)
    return rows
