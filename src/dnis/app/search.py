"""A search run from a config: any registered method (`dnis search --method M`, default DNIS),
then a compact retrained model per budget.

The run folder receives config.yaml, encoder.json, and per budget `model-<budget>.pt` (the compact
model's state dict: its compact tables and dense weights), `plan-<budget>.json` (its
`EmbeddingPlan`: per field and block the rows and kept widths, from which `dnis export` rebuilds
the compact embedding) and `result-<budget>.json` (its metrics), plus the report: dims.json,
results.json, report.md, dims.png, metric.png. A DNIS run also writes search.json (per-epoch log
and alpha). The folder is `runs/<name>-<config hash>/` for DNIS and
`runs/<name>-<method>-<config hash>/` for another method, so methods run on one config never
overwrite each other's models.

Method options: DNIS reads the `search:` section. Every other method reads
`compare.options.<method>` (as `dnis compare` does; `dnis-random` starts from the `search:`
section too), checked before any data is loaded; the budgets are `search.budgets` (`--budget`).

Resume: the run also keeps its checkpoints (every epoch, atomically, with checksum and config
hash; see `dnis.search.dnis`) in `search/warmup/`, `search/` and `retrain-<budget>/`. With
`resume=True` a killed run continues from them: a finished search is loaded, a finished budget
(`model-<budget>.pt` and `result-<budget>.json`) is reloaded, not retrained, and the final results
equal those of an uninterrupted run. Without `resume` (like `dnis train`), the old checkpoints of
the run folder are removed and the run starts afresh. Another method keeps the checkpoints of
its trainings in `checkpoints/phase-NN/` (numbered in the order they run; `dnis-nested` also
`checkpoints/search/`), and `resume=True` runs it again through them: a finished training is
loaded, the cut one continues from its last epoch (`dnis.search.training.Phases`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dnis.app import track
from dnis.app.compare import method_options
from dnis.app.config import Config
from dnis.app.train import model_factory, start_run
from dnis.data.dataset import EncodedDataset
from dnis.errors import ConfigError, DnisError
from dnis.io import write_json
from dnis.search.dnis import (
    SearchState,
    clear_checkpoints,
    compact_model,
    finished_result,
    resolved_budgets,
    retrain,
    retrain_dir,
    search,
    uniform_model,
)
from dnis.search.methods import method as registered_method
from dnis.search.result import SearchResult, budget_file
from dnis.search.training import ModelFactory, Phases
from dnis.train.checkpoint import UnsafeFileError, safe_load
from dnis.train.progress import Progress

CHECKPOINTS = "checkpoints"  # a method's (not DNIS's) training checkpoints, in its run folder


def model_path(run_dir: Path, budget: float) -> Path:
    return budget_file(run_dir, "model", budget)


def result_path(run_dir: Path, budget: float) -> Path:
    return budget_file(run_dir, "result", budget)


def method_run_dir(config: Config, method: str = "dnis") -> Path:
    """The run folder of `method` on `config` (see the module docstring)."""
    if method == "dnis":
        return config.run_dir()
    return Path(config.output_dir) / f"{config.base_name()}-{method}-{config.digest()}"


def search_run(
    config: Config,
    budgets: Sequence[float | str] | None = None,
    progress: Progress | None = None,
    *,
    resume: bool = False,
    method: str = "dnis",
) -> tuple[EncodedDataset, list[SearchResult]]:
    """The dataset it loaded (callers reuse it) and one result per budget.

    `method`: a registered search method (`dnis.search.methods`). `resume` continues a killed
    DNIS run from its checkpoints (see the module docstring).
    """
    budgets = list(config.search.budgets if budgets is None else budgets)
    if not budgets:
        raise ConfigError(
            "search.budgets is empty, so the search would prune to nothing: give at least one "
            "budget (--budget 0.25, or search.budgets: [0.1, 0.25] in the config); to train "
            "without a search, run `dnis train`"
        )
    if method != "dnis":
        return _method_run(config, budgets, method, resume=resume)
    run_dir = config.run_dir()
    if not resume:
        clear_checkpoints(run_dir)  # a fresh run must not inherit an old resume point
        _clear_budgets(run_dir)
    track.check(config.tracking)  # a missing tracker package fails before any work
    dataset = start_run(config, run_dir)
    budgets, asked = resolve_asked(budgets, dataset, config.embedding.dim)
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
            budgets=budgets,  # a gradual search prunes to these (an argument may override)
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
        for budget in budgets:
            finished = (
                model_path(run_dir, budget).exists() and result_path(run_dir, budget).exists()
            )
            if resume and finished:
                results.append(reload_budget(config, state, make_model, budget))
                results[-1].asked = asked.get(budget)
                tracker.log_metrics(
                    0, track.result_metrics(results[-1].to_dict()), f"budget-{budget}"
                )
                continue
            fallback_progress = tracked
            if isinstance(tracked, track.TrackingProgress):
                tracked.prefix = retrain_dir(run_dir, budget).name  # retrain-<budget>/valid_auc
                fallback_progress = track.TrackingProgress(
                    tracked.inner, tracked.tracker, f"{tracked.prefix}/uniform"
                )
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
                fallback_progress=fallback_progress,
            )
            assert result.model is not None
            result.asked = asked.get(budget)
            result.save(run_dir, config_hash=digest)
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


ARTIFACTS = ("config.yaml", "report.md", "results.json", "dims.json", "search.json", "*.png",
             "plan-*.json")  # fmt: skip


def resolve_asked(
    budgets: Sequence[float | str], dataset: EncodedDataset, dim: int
) -> tuple[list[float], dict[float, str]]:
    """The budgets as fractions (`resolved_budgets`), and the byte size each came from, so a
    result says "256kB" where the user wrote it, not only the fraction it resolved to."""
    resolved = resolved_budgets(budgets, dataset, dim)
    asked = {r: b for b, r in zip(budgets, resolved, strict=True) if isinstance(b, str)}
    return resolved, asked


def _clear_budgets(run_dir: Path) -> None:
    """Remove the finished budgets of an earlier run in this folder."""
    for pattern in ("result-*.json", "plan-*.json"):
        for old in run_dir.glob(pattern):
            old.unlink()


def _method_run(
    config: Config, budgets: list[float | str], name: str, *, resume: bool
) -> tuple[EncodedDataset, list[SearchResult]]:
    """A search run of method `name` (not DNIS): the method's results saved per budget."""
    chosen = registered_method(name)  # an unknown name fails here, with a "did you mean"
    options = chosen.parse(method_options(config, name))  # bad options fail before any work
    run_dir = method_run_dir(config, name)
    _clear_budgets(run_dir)
    checkpoints = run_dir / CHECKPOINTS
    if not resume and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # a fresh run must not inherit an old resume point
    track.check(config.tracking)
    dataset = start_run(config, run_dir)
    budgets, asked = resolve_asked(budgets, dataset, config.embedding.dim)
    digest = config.digest()
    with track.open_tracker(config, "search", fresh=True) as tracker:
        results = chosen(
            model_factory(config, dataset),
            dataset,
            budgets=budgets,
            dim=config.embedding.dim,
            train=config.train,
            options=options,
            phases=Phases(checkpoints, resume, digest),
        )
        for result in results:
            result.asked = asked.get(result.budget)
            result.save(run_dir, config_hash=digest, method_options=asdict(options))
            tracker.log_metrics(
                0, track.result_metrics(result.to_dict()), f"budget-{result.budget}"
            )
        from dnis.app.report import write_search_report  # matplotlib: imported when it is needed

        write_search_report(
            results,
            run_dir,
            metric=results[0].metric,
            dim=config.embedding.dim,
            title=f"{name} on {dataset.name} ({dataset.task}, {config.model.name})",
        )
        track.log_files(tracker, run_dir, ARTIFACTS)
    return dataset, results


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
    choice = saved.get("choice") or {}
    if choice.get("structure") == "uniform":  # the fallback was kept (`search.fallback`)
        model = uniform_model(state, make_model, budget, config.train)
    else:
        _, model = compact_model(
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
        state, budget, model, pruned, metrics["valid"], metrics["test"], seconds
    )
    result.train_epochs = int(saved.get("train_epochs", 0))
    result.epoch_cap_hit = bool(saved.get("epoch_cap_hit", False))
    result.choice = choice
    return result
