"""The table of named datasets: a loader registers itself here (`register`); looking a name up
is `dnis.data.catalog`, which imports the built-in loaders first.

A loader turns raw files into an `EncodedDataset` for one task. Bundled data ships in the package;
data whose licence forbids redistribution is read from a path the user gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dnis.data.dataset import EncodedDataset
from dnis.registry import Registry

Loader = Callable[..., EncodedDataset]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Loader  # loader(task=..., path=..., seed=..., **options) -> EncodedDataset
    tasks: tuple[str, ...]
    description: str
    bundled: bool = False  # ships inside the package (licence allows it); else needs `path`


DATASETS: Registry[DatasetInfo] = Registry(
    "dataset",
    hint="(run `dnis datasets`); for your own files use "
    "dataset: {format: csv, path: ..., schema: ...}",
)


def register(info: DatasetInfo) -> DatasetInfo:
    return DATASETS.register(info.name, info)
