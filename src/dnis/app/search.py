"""A search run from a config: DNIS once, then a compact retrained model per budget.

`runs/<name>-<config hash>/` receives config.yaml, encoder.json, search.json (per-epoch log and
alpha), and per budget `model-<budget>.pt` (only the compact tables and the dense weights) and
`result-<budget>.json` (its metrics), plus the report: dims.json, results.json, report.md,
dims.png, metric.png.

Resume: the run also keeps its checkpoints (every epoch, atomically, with checksum and config
hash; see `dnis.search.dnis`) in `search/warmup/`, `search/` and `retrain-<budget>/`. With
`resume=True` a killed run continues from them: a finished search is loaded, a finished budget
(`model-<budget>.pt` and `result-<budget>.json`) is reloaded, not retrained, and the final results
equal those of an uninterrupted run. Without `resume` (like `dnis train`), the old checkpoints of
the run folder are removed and the run starts afresh.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dnis.app import track
from dnis.app.config import Config
from dnis.app.train import model_factory, start_run
from dnis.data.dataset import EncodedDataset
from dnis.errors import ConfigError, DnisError
from dnis.io import atomic_write, write_json
from dnis.search.dnis import (
    SearchState,
    clear_checkpoints,
    compact_model,
    finished_result,
    retrain,
    retrain_dir,
    search,
)
from dnis.search.result import SearchResult
from dnis.search.training import ModelFactory
from dnis.train.checkpoint import UnsafeFileError, safe_load
from dnis.train.progress import Progress


def model_path(run_dir: Path, budget: float) -> Path:
    return run_dir / f"model-{budget}.pt"


def result_path(run_dir: Path, budget: float) -> Path:
    return run_dir / f"result-{budget}.json"


def search_run(
    config: Config,
    budgets: Sequence[float] | None = None,
    progress: Progress | None = None,
    *,
    resume: bool = False,
) -> tuple[EncodedDataset, list[SearchResult]]:
    """The dataset it loaded (callers reuse it) and one result per budget.

    `resume` continues a killed run from its checkpoints (see the module docstring).
    """
    if not (config.search.budgets if budgets is None else budgets):
        raise ConfigError(
            "search.budgets is empty, so the search would prune to nothing: give at least one "
            "budget (--budget 0.25, or search.budgets: [0.1, 0.25] in the config); to train "
            "without a search, run `dnis train`"
        )
    run_dir = config.run_dir()
    if not resume:
        clear_checkpoints(run_dir)  # a fresh run must not inherit an old resume point
        for old in run_dir.glob("result-*.json"):
            old.unlink()
    track.check(config.tracking)  # a missing tracker package fails before any work
    dataset = start_run(config, run_dir)
    with track.open_tracker(config, "search", fresh=not resume) as tracker:
        tracked = track.track_progress(progress, tracker, _search_phase)
        make_model = model_factory(config, dataset)
        digest = config.digest()
        state = search(
            make_model,
            dataset,
            dim=config.embedding.dim,
            init_std=config.embedding.init_std,
            config=config.search,
            train=config.train,
            progress=tracked,
            run_dir=run_dir / "search",
            resume=resume,
            config_hash=digest,
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
            finished = (
                model_path(run_dir, budget).exists() and result_path(run_dir, budget).exists()
            )
            if resume and finished:
                results.append(reload_budget(config, state, make_model, budget))
                tracker.log_metrics(
                    0, track.result_metrics(results[-1].to_dict()), f"budget-{budget}"
                )
                continue
            if isinstance(tracked, track.TrackingProgress):
                tracked.prefix = retrain_dir(run_dir, budget).name  # retrain-<budget>/valid_auc
            result = retrain(
                state,
                make_model,
                budget,
                config=config.search,
                train=config.train,
                progress=tracked,
                run_dir=retrain_dir(run_dir, budget),
                resume=resume,
                config_hash=digest,
            )
            assert result.model is not None
            atomic_write(
                model_path(run_dir, budget),
                lambda handle, m=result.model: torch.save(m.state_dict(), handle),
            )
            # written last: its presence marks the budget finished
            write_json(result_path(run_dir, budget), {**result.to_dict(), "config_hash": digest})
            results.append(result)
            tracker.log_metrics(0, track.result_metrics(result.to_dict()), f"budget-{budget}")
        from dnis.app.report import write_search_report  # matplotlib: imported when it is needed

        write_search_report(
            results,
            run_dir,
            metric=state.task.metric,
            dim=config.embedding.dim,
            title=f"DNIS on {dataset.name} ({dataset.task}, {config.model.name})",
        )
        track.log_files(tracker, run_dir, ARTIFACTS)
    return dataset, results


ARTIFACTS = ("config.yaml", "report.md", "results.json", "dims.json", "search.json", "*.png")


def _search_phase(record: dict[str, Any]) -> str:
    """The metrics' group of a search epoch: the pruning phase names itself, the bilevel epochs
    report alpha, warm-up's don't."""
    return record.get("phase", "search" if "alpha_mean" in record else "warmup")


def reload_budget(
    config: Config, state: SearchState, make_model: ModelFactory, budget: float
) -> SearchResult:
    """A finished budget's result: its structure rebuilt from the search, its weights from
    `model-<budget>.pt`, its metrics from `result-<budget>.json`."""
    run_dir = config.run_dir()
    path, weights = result_path(run_dir, budget), model_path(run_dir, budget)
    fix = "delete it and rerun with --resume to retrain this budget"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        metrics, pruned, seconds = saved["metrics"], saved["pruned"], saved["retrain_seconds"]
        found = saved["config_hash"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DnisError(f"{path} is not a finished budget's result ({error}); {fix}") from None
    if found != config.digest() or saved.get("budget") != budget:
        raise DnisError(
            f"{path} was written by another run (config hash {found}, budget "
            f"{saved.get('budget')}; this run's are {config.digest()}, {budget}); {fix}"
        )
    compact, model = compact_model(
        state, make_model, budget, config=config.search, train=config.train
    )
    try:
        model.load_state_dict(safe_load(weights))
    except UnsafeFileError:
        raise
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise DnisError(
            f"{weights} cannot be loaded into this budget's compact model ({error}); "
            f"delete it and {path}, and rerun with --resume to retrain this budget"
        ) from None
    model.eval()
    result = finished_result(
        state, budget, compact, model, pruned, metrics["valid"], metrics["test"], seconds
    )
    result.train_epochs = int(saved.get("train_epochs", 0))
    result.epoch_cap_hit = bool(saved.get("epoch_cap_hit", False))
    return result
