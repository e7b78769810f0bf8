"""`dnis evaluate`: score a finished run's saved models again, on data encoded as the run did.

A train run holds one model (`model.pt`); a search run one per budget (`model-<budget>.pt`), and
a train and a search of the same config share a folder. Every model is rebuilt from the files the
run wrote (safe loading, see `dnis.export.source`), so evaluating a folder never runs its code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dnis.app.config import Config, parse
from dnis.app.train import load_dataset
from dnis.errors import ConfigError, DnisError
from dnis.export.source import FULL, RUN_FIX, budgets_of, load_run, parse_budget, read_run_yaml
from dnis.tasks import make_task


def evaluate(
    run_dir: str | Path, split: str = "test", budget: float | str | None = None
) -> dict[str, Any]:
    """Metrics of the run's model on `split`.

    With `budget` (a search budget or "full"), or when the folder holds one model, the metrics of
    that model; otherwise {"full" or budget: metrics} for every model the folder holds. The data
    are read once for all of them.
    """
    run_dir = Path(run_dir)
    picks = _picks(run_dir, parse_budget(budget))
    runs = [load_run(run_dir, pick) for pick in picks]  # refuses missing, damaged, unsafe files
    config = read_run_config(run_dir)
    dataset = load_dataset(config.dataset, config.seed, run_dir.parent)  # its streaming cache
    if runs[0].encoder.cardinalities != dataset.cardinalities:
        raise DnisError(
            f"the data behind {run_dir} changed since the run (vocabulary sizes "
            f"{runs[0].encoder.cardinalities} then, {dataset.cardinalities} now); retrain instead"
        )
    task = make_task(dataset)
    metrics = [task.evaluate(run.model, split, config.train.eval_batch_size) for run in runs]
    if len(runs) == 1:
        return metrics[0]
    return {_label(pick): scores for pick, scores in zip(picks, metrics, strict=True)}


def read_run_config(run_dir: Path) -> Config:
    """The run's resolved config; the training device is set to cpu (the models are rebuilt there)."""
    data = read_run_yaml(run_dir)
    train = data.get("train")
    if isinstance(train, dict) and "device" in train:
        train["device"] = "cpu"  # a GPU-trained run is evaluated on a machine without one
    try:
        return parse(Config, data)
    except ConfigError as error:
        raise DnisError(f"{run_dir / 'config.yaml'}: {error}; {RUN_FIX}") from None


def _picks(run_dir: Path, budget: float | str | None) -> list[float | str | None]:
    """The models to evaluate: the one asked for, or every model of a folder holding several."""
    full = (run_dir / "model.pt").is_file()
    budgets = list(budgets_of(run_dir)) if run_dir.is_dir() else []
    if budget is not None or full + len(budgets) <= 1:
        return [budget]
    return ([FULL] if full else []) + budgets


def _label(pick: float | str | None) -> str:
    return pick if isinstance(pick, str) else f"{pick:g}"
