"""Datasets by name: `dnis.data.load("movielens-latest-small", task="ctr")`.

Importing this module registers the built-in datasets (their loaders import `dnis.data.registry`,
never this module, so the arrows point one way).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from dnis.data import criteo, lightgcn, movielens, synthetic  # noqa: F401  (they register)
from dnis.data.dataset import EncodedDataset
from dnis.data.registry import DATASETS, DatasetInfo
from dnis.errors import ConfigError
from dnis.registry import check_names


def datasets() -> list[DatasetInfo]:
    return sorted(DATASETS.values(), key=lambda d: d.name)


def info(name: str) -> DatasetInfo:
    return DATASETS[name]


def load(
    name: str, task: str, *, path: str | Path | None = None, seed: int = 0, **options: Any
) -> EncodedDataset:
    """Load a registered dataset, encoded and split, for `task` ("rating", "ctr" or "topk")."""
    entry = info(name)
    if task not in entry.tasks:
        raise ConfigError(f"dataset {name!r} supports tasks {entry.tasks}, not {task!r}")
    if not entry.bundled and path is None:
        raise ConfigError(
            f"dataset {name!r} may not be redistributed, so it is not bundled: download it yourself "
            f"and pass its folder, e.g. dnis.data.load({name!r}, task={task!r}, path='/data/{name}')"
        )
    check_options(entry, options)
    return entry.loader(task=task, path=None if path is None else Path(path), seed=seed, **options)


def check_options(entry: DatasetInfo, options: dict[str, Any]) -> None:
    """Refuse an option the loader does not take, with a "did you mean" (typos never pass)."""
    parameters = inspect.signature(entry.loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # the loader validates its own options
    allowed = sorted(set(parameters) - {"task", "path", "seed"})
    check_names(options, allowed, f"dataset {entry.name!r}")
