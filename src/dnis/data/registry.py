"""Datasets by name: `dnis.data.load("movielens-latest-small", task="ctr")`.

A loader turns raw files into an `EncodedDataset` for one task. Bundled data ships in the package;
data whose licence forbids redistribution is read from a path the user gives.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnis.data.dataset import EncodedDataset
from dnis.errors import ConfigError
from dnis.registry import Registry, check_names

Loader = Callable[..., EncodedDataset]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Loader  # loader(task=..., path=..., seed=..., **options) -> EncodedDataset
    tasks: tuple[str, ...]
    description: str
    bundled: bool = False  # ships inside the package (licence allows it); else needs `path`


def _ensure_builtins() -> None:
    """Import the modules that register the built-in datasets (kept lazy to keep import fast)."""
    from dnis.data import criteo, lightgcn, movielens, synthetic, tabular  # noqa: F401


DATASETS: Registry[DatasetInfo] = Registry(
    "dataset",
    hint="(run `dnis datasets`); for your own files use "
    "dataset: {format: csv, path: ..., schema: ...}",
    load=_ensure_builtins,
)


def register(info: DatasetInfo) -> DatasetInfo:
    return DATASETS.register(info.name, info)


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
