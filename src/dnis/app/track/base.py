"""The tracker interface, its fan-out, and the Progress wrapper that feeds it epoch records.

A `Tracker` receives what a run already computes: the resolved config (`log_params`), every epoch
record the Progress callback sees (`log_metrics`, one step per epoch), the final metrics, the
run folder's files (`log_artifact`) and, for `dnis compare`, one result row per method x budget x
seed (`log_child`). The base class does nothing, so a run without tracking pays nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dnis.train.progress import Progress, SilentProgress


class Tracker:
    """Does nothing; MLflow and TensorBoard trackers override what they support."""

    active = False  # False: nothing is logged anywhere (the wrapper is skipped)

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def log_child(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """One finished unit of a grid (a compare row): a child run, or an hparams session."""

    def close(self, status: str = "FINISHED") -> None:
        """`status`: FINISHED, FAILED (an exception ended the run) or KILLED (interrupted)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


class MultiTracker(Tracker):
    """Fans every call out to several trackers (MLflow and TensorBoard at once)."""

    active = True

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics, prefix)

    def log_artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path)

    def log_child(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_child(name, params, metrics)

    def close(self, status: str = "FINISHED") -> None:
        errors = []
        for tracker in self.trackers:  # close every one, even when another fails
            try:
                tracker.close(status)
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]


class TrackingProgress(Progress):
    """Forwards every epoch record to a tracker (step = the record's epoch), and every call to
    the progress it wraps (the CLI's renderer, or nothing).

    `prefix` names the metrics' group (`retrain-0.25` gives `retrain-0.25/valid_auc`); a callable
    picks it per record. The caller may change it between phases.
    """

    def __init__(
        self,
        inner: Progress | None,
        tracker: Tracker,
        prefix: str | Callable[[dict[str, Any]], str] = "",
    ) -> None:
        self.inner = inner or SilentProgress()
        self.tracker = tracker
        self.prefix = prefix

    def epoch_start(self, epoch: int, batches: int) -> None:
        self.inner.epoch_start(epoch, batches)

    def batch_end(self) -> None:
        self.inner.batch_end()

    def note(self, message: str) -> None:
        self.inner.note(message)

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.inner.epoch_end(record)
        prefix = self.prefix(record) if callable(self.prefix) else self.prefix
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        self.tracker.log_metrics(int(record.get("epoch", 0)), metrics, prefix)


def flatten(data: Mapping[str, Any], sep: str = ".", parent: str = "") -> dict[str, Any]:
    """Nested mappings as one level: {"train": {"lr": 0.01}} -> {"train.lr": 0.01}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{parent}{sep}{key}" if parent else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def param_text(value: Any) -> str:
    """A param's value as text: strings as they are, anything else as JSON (null, [0.1, 0.5])."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def numbers(metrics: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """The numeric leaves of (nested) metrics; text, flags and None are left out."""
    return {
        key: float(value)
        for key, value in flatten(metrics, sep).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(name: str, prefix: str = "") -> str:
    """`prefix/name`, with characters the stores refuse replaced by `_`."""
    return _UNSAFE.sub("_", f"{prefix}/{name}" if prefix else name)


def log_files(tracker: Tracker, folder: Path, names: Iterable[str]) -> None:
    """Log what exists in `folder` of `names` (glob patterns; a folder goes whole), sorted."""
    if not tracker.active:
        return
    seen: set[Path] = set()
    for pattern in names:
        for path in sorted(folder.glob(pattern)):
            if path not in seen:
                seen.add(path)
                tracker.log_artifact(path)


def result_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A search result's numbers (`SearchResult.to_dict()`, or a compare row): valid_auc,
    test_auc, before_valid_auc, pruned_valid_auc, embedding_params, memory_bytes, latency_ms, ...;
    the per-field dims and the row's coordinates (budget, seed) are left out."""
    kept = {k: v for k, v in row.items() if k not in ("dims", "budget", "seed", "metrics")}
    if isinstance(kept.get("pruned"), Mapping):  # the pruned model's validation metrics
        kept["pruned"] = {"valid": kept["pruned"]}
    return numbers({**row.get("metrics", {}), **kept}, sep="_")


def require(module: str, option: str) -> Any:
    """Import an optional tracking package, or say which extra installs it."""
    import importlib

    from dnis.errors import ConfigError

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"tracking.{option} is on, but {module} cannot be imported ({error}); install the "
            "tracking extra: pip install 'dnis[tracking]'"
        ) from None
