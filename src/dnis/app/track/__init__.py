"""Experiment tracking: optional MLflow and TensorBoard loggers for train, search and compare.

Off by default; the config's `tracking:` section (or `--track mlflow|tensorboard`) switches them
on. Both are imported only when asked for; a missing one is a ConfigError naming the extra
(`pip install 'dnis[tracking]'`). The library calls `open_tracker` at the start of a run; it
logs the resolved config as params, and the run logs its epochs (through `TrackingProgress`),
final metrics and files to what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnis.app.track.base import (
    MultiTracker,
    Tracker,
    TrackingProgress,
    flatten,
    log_files,
    numbers,
    require,
    result_metrics,
)

if TYPE_CHECKING:
    from dnis.app.config import Config, TrackingConfig
    from dnis.train.progress import Progress

__all__ = [
    "MultiTracker",
    "Tracker",
    "TrackingProgress",
    "check",
    "flatten",
    "log_files",
    "numbers",
    "open_tracker",
    "result_metrics",
    "tensorboard_dir",
    "track_progress",
]


def check(tracking: TrackingConfig) -> None:
    """Fail before any work when a tracker is switched on but its package is not installed."""
    if tracking.mlflow:
        require("mlflow", "mlflow")
    if tracking.tensorboard:
        require("tensorboard", "tensorboard")
        require("torch.utils.tensorboard", "tensorboard")


def tensorboard_dir(config: Config, command: str) -> Path:
    """`<run folder>/tensorboard/<command>`, or `<tracking.tensorboard_dir>/<run name>/<command>`."""
    root = config.tracking.tensorboard_dir
    base = config.run_dir() / "tensorboard" if root is None else Path(root) / config.run_name()
    return base / command


def open_tracker(config: Config, command: str, *, fresh: bool = True) -> Tracker:
    """The trackers the config switches on (a do-nothing Tracker if none), with the resolved
    config already logged as params. `command` (train, search, compare) names the MLflow run
    and the TensorBoard folder; `fresh=False` (a resumed run) keeps earlier event files."""
    tracking = config.tracking
    check(tracking)
    trackers: list[Tracker] = []
    try:
        if tracking.mlflow:
            from dnis.app.track.mlflow import MlflowTracker

            tags = {
                "dnis.command": command,
                "dnis.run_dir": str(config.run_dir().resolve()),
                "dnis.config_hash": config.digest(),
            }
            trackers.append(
                MlflowTracker(
                    uri=tracking.mlflow_uri,
                    experiment=tracking.experiment or config.base_name(),
                    run_name=f"{command} {config.run_name()}",
                    tags=tags,
                )
            )
        if tracking.tensorboard:
            from dnis.app.track.tensorboard import TensorBoardTracker

            trackers.append(TensorBoardTracker(tensorboard_dir(config, command), fresh=fresh))
        if not trackers:
            return Tracker()
        tracker = trackers[0] if len(trackers) == 1 else MultiTracker(trackers)
        tracker.log_params(flatten({k: v for k, v in config.to_dict().items() if k != "tracking"}))
    except BaseException:
        for opened in trackers:  # an MLflow run must not stay RUNNING when TensorBoard fails
            opened.close("FAILED")
        raise
    return tracker


def track_progress(
    progress: Progress | None,
    tracker: Tracker,
    prefix: str | Callable[[dict[str, Any]], str] = "",
) -> Progress | None:
    """`progress` wrapped to feed `tracker` (returned unchanged when nothing is tracked)."""
    return TrackingProgress(progress, tracker, prefix) if tracker.active else progress
