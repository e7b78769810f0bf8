"""Columns of a chunk (pyarrow) as the in-memory path sees them, and exact counts of their values.

`strings`, `numbers` and `series` give a chunk's column the very values that `dnis.data.encode`
gives the whole column in memory (so the vocabularies and ids match); `Counts` merges per-chunk
value counts with pyarrow group-by, in memory that grows with the distinct values, not the rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dnis.data.encode import FieldEncoder, as_strings
from dnis.data.schema import FeatureSpec


def strings(column: pa.ChunkedArray | pa.Array, integral: bool | None) -> pa.Array:
    """Categorical values as strings with nulls for missing, exactly as `as_strings` gives them.

    `integral` is whether every value of a float column in the whole file is a whole number
    (`as_strings` decides that over the whole column, so it is found in a pass first).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        empty = pc.equal(pc.utf8_length(column), 0)
        if pc.any(empty).as_py():
            column = pc.if_else(empty, pa.scalar(None, column.type), column)
        return column
    values = column.to_pandas()
    if pd.api.types.is_float_dtype(values):
        if integral:
            values = values.astype("Int64")
        else:  # as_strings without its own whole-column decision
            out = values.astype("string")
            values = out.mask(out.str.len() == 0)
    strings = as_strings(values)
    return pa.array(strings.to_numpy(dtype=object, na_value=None), type=pa.string())


def numbers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric values as float64, NaN for missing or non-numeric (`pd.to_numeric`, coerce)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = column.dictionary_encode()  # parse each distinct string once
        distinct = pd.Series(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
        table = np.append(pd.to_numeric(distinct, errors="coerce").to_numpy(np.float64), np.nan)
        codes = pc.fill_null(encoded.indices, len(distinct)).to_numpy()
        return table[codes]
    return pd.to_numeric(column.to_pandas(), errors="coerce").to_numpy(dtype=np.float64)


def value_counts(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Distinct non-null values and their counts."""
    counted = pc.value_counts(values)
    distinct, counts = counted.field("values"), counted.field("counts")
    valid = pc.is_valid(distinct)
    if not pc.all(valid).as_py():
        distinct, counts = distinct.filter(valid), counts.filter(valid)
    return distinct, counts.to_numpy().astype(np.int64)


class Counts:
    """Exact counts of string values, merged with pyarrow group-by as chunks arrive."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.merged = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.parts.append(pa.table({"v": values.cast(pa.string()), "c": pa.array(counts)}))
        self.pending += len(values)
        if self.pending > max(1 << 16, self.merged):  # amortised linear, bounded memory
            self._merge()

    def _merge(self) -> None:
        if not self.parts:
            return
        table = pa.concat_tables(self.parts)
        if len(self.parts) > 1:
            table = table.group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])
        self.parts, self.pending, self.merged = [table], 0, table.num_rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values as a numpy str array, counts)."""
        self._merge()
        if not self.parts:
            return np.zeros(0, dtype=str), np.zeros(0, dtype=np.int64)
        table = self.parts[0]
        values = table.column("v").to_numpy().astype(str)
        return values, table.column("c").to_numpy().astype(np.int64)


def vocabulary(spec: FeatureSpec, counts: Counts) -> FieldEncoder:
    """The field's encoder from exact training counts, as `FieldEncoder.fit` orders it."""
    values, freq = counts.result()
    keep = freq >= spec.min_count
    values, freq = values[keep], freq[keep]
    order = np.lexsort((values, -freq))  # by descending count, then by value
    return FieldEncoder(spec, vocabulary=values[order].tolist(), counts=freq[order].tolist())


def series(column: pa.ChunkedArray | pa.Array) -> pd.Series:
    """A column as the in-memory reader gives it: text as pandas strings with NaN for missing."""
    values = column.to_pandas()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pd.Series(values, dtype="str")
    return values
