"""Fit-on-train encoders that turn raw columns into frequency-sorted embedding ids.

Id 0 of every field is the out-of-vocabulary id: unseen values, values below `min_count`, missing
values and sequence padding all map to it. Ids 1..n are the training values by descending training
frequency (ties broken by value), which frequency blocks, MDE and pruning rely on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dnis.data.schema import FeatureSpec, Schema
from dnis.data.split import file_lines
from dnis.errors import DataError
from dnis.io import write_json

OOV = 0


def as_strings(values: pd.Series) -> pd.Series:
    """Canonical string form of categorical values, so 7, 7.0 and "7" are one category."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if len(finite) and np.all(np.mod(finite.to_numpy(), 1) == 0):
            values = values.astype("Int64")
    out = values.astype("string")
    return out.mask(out.str.len() == 0)


def explode_sequence(values: pd.Series, spec: FeatureSpec) -> pd.Series:
    """One row per element; the index repeats the row position. Strings are split on the separator."""
    values = values.reset_index(drop=True)
    if values.map(lambda v: isinstance(v, str)).any():
        values = values.astype("string").str.split(spec.separator, regex=False)
    exploded = values.explode()
    return as_strings(exploded)


@dataclass
class FieldEncoder:
    """The fitted encoder of one feature: a vocabulary (categorical/sequence) or bucket edges."""

    spec: FeatureSpec
    vocabulary: list[str] | None = None
    counts: list[int] | None = None
    edges: list[float] | None = None

    @property
    def cardinality(self) -> int:
        """Number of ids including the OOV id 0."""
        if self.spec.kind == "numeric":
            assert self.edges is not None
            return len(self.edges) + 2
        assert self.vocabulary is not None
        return len(self.vocabulary) + 1

    def frequencies(self) -> np.ndarray:
        """Training count of every id (OOV's count is 0: it is what the training data lacked)."""
        if self.counts is None:
            return np.zeros(self.cardinality, dtype=np.int64)
        return np.concatenate([[0], np.asarray(self.counts, dtype=np.int64)])

    @classmethod
    def fit(cls, spec: FeatureSpec, values: pd.Series) -> FieldEncoder:
        if spec.kind == "numeric":
            numbers = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=np.float64)
            finite = numbers[np.isfinite(numbers)]  # +-inf would make the quantiles NaN
            if len(finite) == 0:
                raise DataError(
                    f"numeric feature {spec.name!r} has no finite number in the training split "
                    f"({len(numbers)} infinite, {len(values) - len(numbers)} missing or "
                    "non-numeric), so it has no bucket edges",
                    path=values.attrs.get("source"),
                    column=spec.source,
                    fix="clean the column, declare it `kind: categorical`, or remove the feature",
                )
            qs = np.quantile(finite, np.linspace(0, 1, spec.buckets + 1)[1:-1])
            edges = np.unique(qs)  # infinite values fall into the first or the last bucket
            ids = np.searchsorted(edges, numbers, side="right") + 1
            counts = np.bincount(ids, minlength=len(edges) + 2)[1:]
            return cls(spec, edges=edges.tolist(), counts=counts.tolist())
        strings = explode_sequence(values, spec) if spec.kind == "sequence" else as_strings(values)
        freq = strings.dropna().value_counts(sort=False)
        freq = freq[freq >= spec.min_count]
        values = freq.index.to_numpy(dtype=str)
        counts = freq.to_numpy(dtype=np.int64)
        order = np.lexsort((values, -counts))  # by descending count, then by value
        return cls(spec, vocabulary=values[order].tolist(), counts=counts[order].tolist())

    def transform(self, values: pd.Series) -> np.ndarray:
        """Ids of shape [N, width] (width = max_len for sequences, else 1)."""
        n = len(values)
        if self.spec.kind == "numeric":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            ids = np.searchsorted(np.asarray(self.edges), numbers, side="right") + 1
            ids[np.isnan(numbers)] = OOV
            return ids.astype(np.int64).reshape(n, 1)
        index = pd.Index(self.vocabulary, dtype="string")
        if self.spec.kind == "categorical":
            ids = index.get_indexer(as_strings(values)) + 1
            return ids.astype(np.int64).reshape(n, 1)
        exploded = explode_sequence(values, self.spec)
        rows = exploded.index.to_numpy()
        ids = index.get_indexer(exploded) + 1
        # Unknown, missing and empty values are dropped before positions are assigned, so known values
        # fill the max_len slots; a row without any known value stays all padding (id 0).
        keep = ids > OOV
        rows, ids = rows[keep], ids[keep]
        position = pd.Series(rows).groupby(rows).cumcount().to_numpy()
        inside = position < self.spec.max_len
        out = np.zeros((n, self.spec.max_len), dtype=np.int64)
        out[rows[inside], position[inside]] = ids[inside]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary, "counts": self.counts, "edges": self.edges}


class Encoder:
    """Encoders of all features of a schema, fitted on the training split only."""

    def __init__(self, schema: Schema, fields: list[FieldEncoder]) -> None:
        self.schema = schema
        self.fields = fields

    @classmethod
    def fit(cls, schema: Schema, frame: pd.DataFrame) -> Encoder:
        require_columns(frame, [f.source for f in schema.features])
        return cls(schema, [FieldEncoder.fit(f, frame[f.source]) for f in schema.features])

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        require_columns(frame, [f.source for f in self.schema.features])
        blocks = [enc.transform(frame[enc.spec.source]) for enc in self.fields]
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.int64)

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.fields]

    def save(self, path: str | Path) -> None:
        write_json(
            path,
            {
                "schema": self.schema.to_dict(),
                "fields": {f.spec.name: f.to_dict() for f in self.fields},
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> Encoder:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        schema = Schema.from_dict(data["schema"])
        return cls(
            schema, [FieldEncoder(spec, **data["fields"][spec.name]) for spec in schema.features]
        )


def check_values(frame: pd.DataFrame, schema: Schema) -> None:
    """Refuse list and struct values (e.g. from Parquet) in a feature column that takes scalars.

    Turned into strings they would silently become one category per distinct list ('[25  4]').
    Lists may feed only `sequence` features, structs none. Only object columns whose values are
    not all of one scalar kind are inspected value by value.
    """
    require_columns(frame, [f.source for f in schema.features])
    for spec in schema.features:
        values = frame[spec.source]
        if values.dtype != object or pd.api.types.infer_dtype(values, skipna=True) not in (
            "mixed",
            "mixed-integer",
        ):
            continue
        nested = (dict,) if spec.kind == "sequence" else (dict, list, tuple, set, np.ndarray)
        bad = np.flatnonzero(values.map(type, na_action="ignore").isin(nested).to_numpy())
        if len(bad) == 0:
            continue
        row = int(bad[0])
        value = values.iloc[row]
        what = "struct" if isinstance(value, dict) else "list"
        takes = "lists of values" if spec.kind == "sequence" else "one value per row"
        if what == "struct":
            fix = "flatten the struct into one column per field and declare those as features"
        elif spec.kind == "numeric":
            fix = "write one number per row"
        else:
            fix = (
                f"declare {spec.name!r} as `kind: sequence` (with `max_len:`) to use every "
                "value of the list, or write one value per row"
            )
        lines = file_lines(frame)
        raise DataError(
            f"{spec.kind} feature {spec.name!r} takes {takes}, but row {row + 1} holds a {what} "
            f"({str(value)[:60]}; {len(bad)} such row(s) in all)",
            path=frame.attrs.get("source"),
            line=None if lines is None else int(lines[row]),
            column=spec.source,
            fix=fix,
        )


def require_columns(frame: pd.DataFrame, columns: list[str], source: str | None = None) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        where = source or frame.attrs.get("source")
        raise DataError(
            f"missing column(s) {missing}; the file has {list(frame.columns)}",
            path=where,
            fix="rename the column in the file or point the feature's `column:` at the right one",
        )
