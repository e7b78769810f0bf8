"""The encoded dataset: int64 id tensors per split, ready for batching with no per-row Python."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from dnis.data.encode import Encoder, check_values, require_columns
from dnis.data.schema import Schema
from dnis.data.split import file_lines, split_frame
from dnis.errors import ConfigError, DataError

TASKS: tuple[str, ...] = ("rating", "ctr", "topk")


@dataclass
class Split:
    """One split: `ids` [N, num_slots] (field-local ids, 0 = OOV/padding) and `labels` [N]."""

    ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class EncodedDataset:
    name: str
    task: str
    schema: Schema
    encoder: Encoder
    train: Split
    valid: Split
    test: Split
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # e.g. the synthetic generator's ground truth

    @property
    def cardinalities(self) -> list[int]:
        """Ids per field, OOV included: the row count of each field's embedding table."""
        return self.encoder.cardinalities

    def split(self, name: str) -> Split:
        if name not in ("train", "valid", "test"):
            raise KeyError(f"unknown split {name!r}")
        return getattr(self, name)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "task": self.task,
            "rows": {s: len(self.split(s)) for s in ("train", "valid", "test")},
            "fields": dict(zip(self.schema.names, self.cardinalities, strict=True)),
        }


def build_dataset(
    data: pd.DataFrame | Mapping[str, pd.DataFrame],
    schema: Schema,
    task: str,
    *,
    name: str = "custom",
    split: str = "random",
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> EncodedDataset:
    """Split (unless the data comes pre-split), fit encoders on train, encode every split."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    if task == "topk" and (schema.user is None or schema.item is None):
        raise ConfigError("task 'topk' needs the schema's `user` and `item` fields")
    if task != "topk" and schema.label is None:
        raise ConfigError(f"task {task!r} needs a `label` column in the schema")
    if isinstance(data, Mapping):
        missing = {"train", "valid", "test"} - set(data)
        if missing:
            raise ConfigError(f"pre-split data lacks split(s) {sorted(missing)}")
        parts = {k: data[k] for k in ("train", "valid", "test")}
        for frame in parts.values():
            check_values(frame, schema)
    else:
        check_values(data, schema)  # before the split, so a bad row is named by its file position
        user_col = schema[schema.user].source if schema.user else None
        parts = split_frame(data, split, ratios=ratios, seed=seed, user=user_col, time=schema.time)
    if len(parts["train"]) == 0:
        raise DataError(f"dataset {name!r}: the training split is empty", fix="supply more rows")
    encoder = Encoder.fit(schema, parts["train"])
    encoded = {k: encode_split(encoder, frame, task) for k, frame in parts.items()}
    return EncodedDataset(
        name=name, task=task, schema=schema, encoder=encoder, meta=dict(meta or {}), **encoded
    )


def encode_split(encoder: Encoder, frame: pd.DataFrame, task: str) -> Split:
    ids = torch.from_numpy(encoder.transform(frame))
    label = encoder.schema.label
    if task == "topk" or label is None:
        labels = torch.ones(len(frame), dtype=torch.float32)
    else:
        labels = torch.from_numpy(check_labels(frame, label, task))
    return Split(ids=ids, labels=labels)


def check_labels(frame: pd.DataFrame, column: str, task: str) -> np.ndarray:
    """Labels as float32, or a DataError naming the first bad row's file line."""
    require_columns(frame, [column])
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) | np.isinf(values)
    problem = "is not a number"
    if task == "ctr" and not bad.any():
        bad = ~np.isin(values, (0.0, 1.0))
        problem = "is not a 0/1 click label"
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"label {raw.iloc[row]!r} {problem} ({int(bad.sum())} bad row(s) in all)",
            path=frame.attrs.get("source"),
            line=line_of(frame, row),
            column=column,
            fix="clean the label column"
            + (" or derive a 0/1 label (e.g. rating >= 4)" if task == "ctr" else ""),
        )
    return values.astype(np.float32)


def line_of(frame: pd.DataFrame, row: int) -> int | None:
    """File line of a row position, when the reader recorded where rows start (see readers)."""
    lines = file_lines(frame)
    return None if lines is None else int(lines[row])


def hold_out(dataset: EncodedDataset, fraction: float, seed: int) -> tuple[EncodedDataset, Split]:
    """(the dataset with a seeded `fraction` of its training rows removed, those rows): data for a
    search's architecture steps that neither the model's steps nor validation ever see."""
    train = dataset.train
    if type(train) is not Split:
        raise ConfigError(
            "search.alpha_data: holdout takes rows out of an in-memory training split, and this "
            "one is streamed from disk; use alpha_data: valid"
        )
    count = round(len(train) * fraction)
    if not 0 < count < len(train):
        raise ConfigError(
            f"search.holdout_fraction {fraction} of {len(train)} training rows holds out "
            f"{count}; give a fraction that leaves rows on both sides"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count].sort().values, order[count:].sort().values
    rest = dataclasses.replace(dataset, train=Split(train.ids[kept], train.labels[kept]))
    return rest, Split(train.ids[held], train.labels[held])
