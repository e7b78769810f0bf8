"""`dnis compare`: methods x budgets x seeds on one dataset, split and model, resumable.

Each (method, seed) cell runs a method for all budgets (so DNIS searches once per seed) and is
cached as JSON in `<run>/cells/`; a rerun skips finished cells, and a cell that a kill cut short
continues from the last epoch its trainings checkpointed (in
`<run>/cells/<method>-seed<k>.checkpoints`, removed when the cell is done), so a killed grid
resumes where it stopped. The data split is the run's seed; the seeds of the grid vary
initialisation and shuffling. Inference cost (batch latency, peak memory in a fresh process, on
the CPU) is measured for the first seed of every method and budget.

With `compare.jobs` > 1, cells run in that many fresh processes (each loads the data itself), so a
16-core machine or one GPU shared by several processes runs the grid at once; latencies measured
then share the machine with the other cells. A budget below a method's structural floor (e.g. one
row per field for hashing) gives an `infeasible` row with the reason, not a stopped grid.

`compare.budget_unit: bytes` counts budgets in stored bytes: a fraction is of the full-width fp32
table's bytes (4 * rows * dim), and a budget may be a byte size ("2MB", down to whole fp32
parameters). The quantized methods (int8, int4, dnis-precision) keep everything they store
(codes, scales, biases, structure) within it; the others keep `fraction * rows * dim`
parameters, 4 bytes each, and their index structures come on top. The report ranks and plots
cells by bytes, and a cell whose stored bytes go over the budget is marked and left out of the
standings.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dnis.app import track
from dnis.app.config import CompareConfig, Config
from dnis.app.track import Tracker
from dnis.app.train import load_dataset, model_factory, start_run
from dnis.data.dataset import EncodedDataset
from dnis.errors import BudgetError, ConfigError
from dnis.io import write_json
from dnis.plugins import import_plugins, imported
from dnis.search.inference import batch_latency_ms, peak_memory_mb
from dnis.search.methods import method
from dnis.search.prune import FP32_BYTES, budget_params, resolve_budget
from dnis.search.result import SearchResult
from dnis.search.training import Phases


def cell_path(run_dir: Path, method_name: str, seed: int) -> Path:
    return run_dir / "cells" / f"{method_name}-seed{seed}.json"


def cell_checkpoints(run_dir: Path, method_name: str, seed: int) -> Path:
    """Where an unfinished cell's trainings keep their checkpoints (removed once it is done)."""
    return run_dir / "cells" / f"{method_name}-seed{seed}.checkpoints"


def run_cell(
    config: Config, dataset, method_name: str, seed: int, measure_inference: bool
) -> list[dict[str, Any]]:
    """One method at every budget for one seed. Its trainings checkpoint every epoch, so a cell
    cut by a kill continues from its last epoch when the grid is run again."""
    compare = config.compare
    train = replace(config.train, seed=config.seed + seed)
    checkpoints = cell_checkpoints(config.run_dir(), method_name, seed)

    def run(budgets: list[float], folder: Path = checkpoints) -> list[SearchResult]:
        return method(method_name)(
            model_factory(config, dataset),
            dataset,
            budgets=budgets,
            dim=config.embedding.dim,
            train=train,
            options=method_options(config, method_name),
            phases=Phases(folder, resume=True, config_hash=config.digest()),
        )

    rows: list[dict[str, Any]] = []
    full = sum(dataset.cardinalities) * config.embedding.dim
    budgets = grid_budgets(compare, full)
    try:
        results = run(budgets)
    except BudgetError:  # some budget is below the method's floor: run the budgets one by one
        results = []
        for budget in budgets:
            try:
                results += run([budget], checkpoints / f"budget-{budget}")
            except BudgetError as error:
                rows.append({"method": method_name, "budget": budget, "seed": seed,
                             "budget_unit": compare.budget_unit,
                             "infeasible": str(error)})  # fmt: skip
    unit = method(method_name).unit
    for result in results:
        allowed = budget_params(result.budget, full)
        spent = result.embedding_params
        if unit == "bytes":
            allowed, spent = FP32_BYTES * allowed, result.memory_bytes
        if spent > allowed:
            raise AssertionError(f"{method_name} broke its budget {result.budget}")  # a method bug
        row = {**result.to_dict(), "seed": seed, "budget_unit": compare.budget_unit}
        if compare.budget_unit == "bytes":
            row["budget_bytes"] = FP32_BYTES * budget_params(result.budget, full)
        if measure_inference and result.model is not None:
            ids, model = dataset.test.ids, result.model.cpu()  # serving cost is measured on CPU
            row["latency_ms"] = batch_latency_ms(model, ids, compare.inference_batch)
            row["peak_memory_mb"] = peak_memory_mb(model, ids, compare.inference_batch)
        rows.append(row)
    return rows


def grid_budgets(compare: CompareConfig, full_params: int) -> list[float]:
    """The grid's budgets as fractions of the full-width embedding (of its fp32 bytes, when the
    grid counts bytes): byte sizes ("2MB") are divided by those bytes."""
    return [
        resolve_budget(b, full_params, f"compare.budgets[{i}]")
        for i, b in enumerate(compare.budgets)
    ]


def check_units(compare: CompareConfig) -> None:
    """Refuse a method that keeps bytes within its budgets (the quantized ones) in a grid that
    counts parameters: its cells would not be comparable."""
    for name in compare.methods:
        if method(name).unit == "bytes" and compare.budget_unit != "bytes":
            raise ConfigError(
                f"{name} spends its budgets as stored bytes, but compare.budget_unit is "
                f"{compare.budget_unit!r}; set compare.budget_unit: bytes (every method's budget "
                "then counts bytes, 4 a parameter at fp32)",
                key="compare.budget_unit",
            )


def method_options(config: Config, method_name: str) -> dict[str, Any]:
    """A method's options from `compare.options`; DNIS's family (`Method.search_section`:
    dnis, its random-structure control, dnis-precision) starts from the `search:` section."""
    options = dict(config.compare.options.get(method_name, {}))
    if method(method_name).search_section:
        fixed = {"budgets", *method(method_name).fixed}  # what the method sets itself
        search = {k: v for k, v in asdict(config.search).items() if k not in fixed}
        options = {**search, **options}
    return options


def compare(
    config: Config,
    on_cell: Callable[[str, int, float], None] | None = None,
    tracker: Tracker | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the grid; returns one row per method x budget x seed, in grid order.

    Every row is logged to `tracker` (`dnis.app.track`) once its cell is done, from this process
    (cells cached by an earlier run first). Without a tracker, the config's `tracking:` section
    opens one here, which also receives config.yaml and the cells.
    """
    run_dir = config.run_dir()
    if tracker is None:
        track.check(config.tracking)  # a missing tracker package fails before any work
    check_units(config.compare)
    dataset = start_run(config, run_dir)
    for name in config.compare.methods:
        method(name).parse(method_options(config, name))  # unknown names, bad options fail here
    grid_budgets(config.compare, sum(dataset.cardinalities) * config.embedding.dim)
    if tracker is not None:
        return _grid(config, dataset, on_cell, tracker)
    with track.open_tracker(config, "compare") as tracker:
        rows = _grid(config, dataset, on_cell, tracker)
        track.log_files(tracker, run_dir, ["config.yaml", "cells"])
    return rows


def _grid(
    config: Config,
    dataset: EncodedDataset,
    on_cell: Callable[[str, int, float], None] | None,
    tracker: Tracker,
) -> list[dict[str, Any]]:
    run_dir = config.run_dir()
    grid = [(name, seed) for name in config.compare.methods for seed in range(config.compare.seeds)]
    todo = [cell for cell in grid if not cell_path(run_dir, *cell).exists()]
    for cell in grid:
        if cell not in todo:
            log_rows(tracker, json.loads(cell_path(run_dir, *cell).read_text(encoding="utf-8")))
    if config.compare.jobs == 1:
        for name, seed in todo:
            if cell_path(run_dir, name, seed).exists():
                continue  # another `dnis compare` on this folder finished it meanwhile
            _finish(
                run_dir, name, seed, *_timed_cell(config, dataset, name, seed), on_cell, tracker
            )
    elif todo:
        # spawn: a forked child must not inherit torch's threads or a CUDA context
        context = multiprocessing.get_context("spawn")
        workers = {"initializer": import_plugins, "initargs": (imported(),)}  # --import again
        with ProcessPoolExecutor(config.compare.jobs, mp_context=context, **workers) as pool:
            futures = {pool.submit(_cell_process, config, *cell): cell for cell in todo}
            for future in as_completed(futures):  # rows come back here: logged by this process
                _finish(run_dir, *futures[future], *future.result(), on_cell, tracker)
    rows: list[dict[str, Any]] = []
    for cell in grid:
        rows += json.loads(cell_path(run_dir, *cell).read_text(encoding="utf-8"))
    return rows


def log_rows(tracker: Tracker, rows: list[dict[str, Any]]) -> None:
    """One child run (MLflow) / hparams session (TensorBoard) per method x budget x seed row."""
    if not tracker.active:
        return
    for row in rows:
        params = {"method": row["method"], "budget": row["budget"], "seed": row["seed"]}
        params["status"] = "infeasible" if "infeasible" in row else "ok"
        if "infeasible" in row:
            params["reason"] = row["infeasible"]
        name = f"{row['method']} budget={row['budget']} seed={row['seed']}"
        tracker.log_child(name, params, track.result_metrics(row))


def _timed_cell(
    config: Config, dataset: EncodedDataset, name: str, seed: int
) -> tuple[list[dict[str, Any]], float]:
    started = time.perf_counter()
    rows = run_cell(config, dataset, name, seed, measure_inference=seed == 0)
    return rows, time.perf_counter() - started


def _cell_process(config: Config, name: str, seed: int) -> tuple[list[dict[str, Any]], float]:
    """One cell in a worker process: it loads the data itself (the same seed gives the same split)."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    # a streamed dataset opens the cache that `start_run` built in the main process
    dataset = load_dataset(config.dataset, config.seed, config.output_dir)
    return _timed_cell(config, dataset, name, seed)


def _finish(
    run_dir: Path,
    name: str,
    seed: int,
    rows: list[dict[str, Any]],
    seconds: float,
    on_cell: Callable[[str, int, float], None] | None,
    tracker: Tracker,
) -> None:
    write_json(cell_path(run_dir, name, seed), rows)
    shutil.rmtree(cell_checkpoints(run_dir, name, seed), ignore_errors=True)  # done: not needed
    log_rows(tracker, rows)
    if on_cell:
        on_cell(name, seed, seconds)
