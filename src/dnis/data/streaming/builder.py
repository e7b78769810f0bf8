"""The three passes of a streamed build (scan, fit, encode) into a cache folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dnis.data.cache import SPLIT_NAMES, SplitWriter
from dnis.data.dataset import check_labels
from dnis.data.encode import Encoder, FieldEncoder, explode_sequence, require_columns
from dnis.data.readers import check_times
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.sketch import CountMinSketch, Reservoir
from dnis.data.streaming import coerce
from dnis.data.streaming.options import StreamingOptions
from dnis.data.streaming.sources import Chunk, ParquetFile
from dnis.data.streaming.staging import Assignment
from dnis.errors import DataError

log = logging.getLogger("dnis.data.streaming")


@dataclass
class _FieldState:
    spec: FeatureSpec
    slots: slice
    counts: coerce.Counts = field(default_factory=coerce.Counts)
    reservoir: Reservoir | None = None
    # Parquet float column of a categorical field: whether every value of a split is a whole number
    # (`as_strings` decides that per split frame in memory, so it is found in a pass first)
    integral: dict[str, bool] = field(default_factory=dict)
    encoder: FieldEncoder | None = None
    index: pd.Index | None = None  # vocabulary lookup, built once
    bucket_counts: np.ndarray | None = None  # numeric: training count per id


class Builder:
    def __init__(
        self,
        sources: dict[str, Any],
        schema: Schema,
        task: str,
        ratios: tuple[float, float, float],
        seed: int,
        options: StreamingOptions,
    ) -> None:
        self.sources, self.schema, self.task = sources, schema, task
        self.ratios, self.seed, self.options = ratios, seed, options
        assert schema.label is not None
        self.label: str = schema.label
        self.fields = [_FieldState(spec, schema.slot_range(spec.name)) for spec in schema.features]
        extra = [self.label] + ([schema.time] if schema.time is not None else [])
        self.columns = list(dict.fromkeys([f.source for f in schema.features] + extra))

    def build(self, folder: Path) -> dict[str, Any]:
        """All passes; writes the split arrays and encoder.json into `folder`."""
        try:
            self._scan(folder)
            self._float_categoricals()
            self._fit()
            info = self._write(folder)
        finally:
            for source in self.sources.values():
                source.close()  # a copy a source made in `folder`
        self.assign.close()
        fields = []
        for state in self.fields:
            assert state.encoder is not None
            if state.spec.kind == "numeric":
                assert state.bucket_counts is not None
                state.encoder.counts = state.bucket_counts[1:].tolist()
            fields.append(state.encoder)
        Encoder(self.schema, fields).save(folder / "encoder.json")
        return info

    # pass A -----------------------------------------------------------------------------------
    def _scan(self, folder: Path) -> None:
        for source in self.sources.values():
            source.scan(folder)
            frame = pd.DataFrame(columns=source.columns)
            frame.attrs["source"] = str(source.path)
            require_columns(frame, [f.source for f in self.schema.features])
            require_columns(frame, self.columns)  # the label (and time) column
        self.assign = Assignment(
            {key: source.rows for key, source in self.sources.items()},
            self.ratios,
            self.seed,
            folder,
        )
        if self.assign.sizes["train"] == 0:
            raise DataError("dataset: the training split is empty", fix="supply more rows")

    def _parts(self, check: bool, only_train: bool) -> Iterator[tuple[str, pa.Table, Chunk]]:
        """(split name, rows of that split, chunk) over every chunk of every file."""
        for key, source in self.sources.items():
            for chunk in source.chunks(self.columns):
                if check:
                    self._labels(chunk.table, chunk)
                    self._times(chunk)
                code, _ = self.assign(key, chunk.first_row, chunk.table.num_rows)
                for number, name in enumerate(SPLIT_NAMES[:1] if only_train else SPLIT_NAMES):
                    rows = code == number
                    if rows.all():
                        yield name, chunk.table, chunk
                    elif rows.any():
                        yield name, chunk.table.filter(pa.array(rows)), chunk

    def _float_categoricals(self) -> None:
        floats = [
            state
            for state in self.fields
            if state.spec.kind == "categorical"
            and any(
                isinstance(source, ParquetFile)
                and pa.types.is_floating(source.type_of(state.spec.source))
                for source in self.sources.values()
            )
        ]
        if not floats:
            return
        seen: dict[tuple[int, str], bool] = {}
        for name, table, _ in self._parts(check=False, only_train=False):
            for i, state in enumerate(floats):
                values = table.column(state.spec.source).to_numpy()
                values = values[~np.isnan(values)]
                if len(values):
                    seen[i, name] = True
                    whole = bool(np.all(np.mod(values, 1) == 0))
                    state.integral[name] = state.integral.get(name, True) and whole
        for i, state in enumerate(floats):  # `as_strings` needs some value to call a column whole
            for name in SPLIT_NAMES:
                state.integral[name] = seen.get((i, name), False) and state.integral.get(
                    name, False
                )

    # checks of every chunk, as load_files does on a whole frame -------------------------------
    def _labels(self, table: pa.Table, chunk: Chunk | None) -> np.ndarray:
        frame = _frame(table, [self.label], chunk)
        try:
            return check_labels(frame, self.label, self.task)
        except DataError:
            if chunk is None:
                raise
            _locate(frame, chunk)
            return check_labels(frame, self.label, self.task)  # raises, naming the line

    def _times(self, chunk: Chunk) -> None:
        if self.schema.time is None:
            return
        frame = _frame(chunk.table, [self.schema.time], chunk)
        try:
            check_times(frame, self.schema.time)
        except DataError:
            _locate(frame, chunk)
            check_times(frame, self.schema.time)

    # pass B -----------------------------------------------------------------------------------
    def _fit(self) -> None:
        sketch = None
        if self.options.vocab == "count_min":
            sketch = CountMinSketch(self.options.sketch_width, self.options.sketch_depth)
        for i, state in enumerate(self.fields):
            if state.spec.kind == "numeric":
                state.reservoir = Reservoir(self.options.quantile_sample, seed=self.seed * 7919 + i)
        for _, table, _ in self._parts(check=True, only_train=True):
            for i, state in enumerate(self.fields):
                column = table.column(state.spec.source)
                if state.spec.kind == "numeric":
                    numbers = coerce.numbers(column)
                    assert state.reservoir is not None
                    state.reservoir.add(numbers[~np.isnan(numbers)])
                    continue
                values, counts = self._distinct(state, column)
                if sketch is None:
                    state.counts.add(values, counts)
                else:
                    sketch.add(values.to_numpy(zero_copy_only=False), counts, field=i)
        if sketch is not None:  # second pass: exact counts of the ids the sketch lets through
            for _, table, _ in self._parts(check=False, only_train=True):
                for i, state in enumerate(self.fields):
                    if state.spec.kind == "numeric":
                        continue
                    values, counts = self._distinct(state, table.column(state.spec.source))
                    estimate = sketch.estimate(values.to_numpy(zero_copy_only=False), field=i)
                    keep = estimate >= state.spec.min_count
                    state.counts.add(values.filter(pa.array(keep)), counts[keep])
            log.info("streaming: count-min error bound %.1f", sketch.error_bound())
        for state in self.fields:
            if state.spec.kind == "numeric":
                assert state.reservoir is not None
                fitted = FieldEncoder.fit(state.spec, pd.Series(state.reservoir.values))
                state.encoder = FieldEncoder(state.spec, edges=fitted.edges, counts=None)
                state.bucket_counts = np.zeros(len(fitted.edges or []) + 2, dtype=np.int64)
                state.reservoir = None
            else:
                state.encoder = coerce.vocabulary(state.spec, state.counts)
                state.counts = coerce.Counts()  # free the counts
                state.index = pd.Index(state.encoder.vocabulary, dtype=object)

    def _distinct(self, state: _FieldState, column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
        if state.spec.kind == "categorical":
            return coerce.value_counts(coerce.strings(column, state.integral.get("train")))
        exploded = explode_sequence(coerce.series(column), state.spec).dropna()
        freq = exploded.value_counts(sort=False)
        strings = freq.index.to_numpy(dtype=object)
        return pa.array(strings, type=pa.string()), freq.to_numpy(dtype=np.int64)

    # pass C -----------------------------------------------------------------------------------
    def _encode(self, table: pa.Table, split: str) -> np.ndarray:
        ids = np.zeros((table.num_rows, self.schema.num_slots), dtype=np.int32)
        for state in self.fields:
            column = table.column(state.spec.source)
            assert state.encoder is not None
            if state.spec.kind == "numeric":
                encoded = state.encoder.transform(pd.Series(coerce.numbers(column)))
            elif state.spec.kind == "sequence":
                encoded = state.encoder.transform(coerce.series(column))
            else:
                strings = coerce.strings(column, state.integral.get(split)).dictionary_encode()
                distinct = strings.dictionary.to_numpy(zero_copy_only=False)
                assert state.index is not None
                known = state.index.get_indexer(pd.Index(distinct, dtype=object)) + 1
                lookup = np.append(known, 0).astype(np.int32)
                codes = pc.fill_null(strings.indices, len(distinct)).to_numpy()
                encoded = lookup[codes].reshape(-1, 1)
            ids[:, state.slots] = encoded
        return ids

    def _write(self, folder: Path) -> dict[str, Any]:
        slots = self.schema.num_slots
        writers = {
            name: SplitWriter(folder, name, self.assign.sizes[name], slots) for name in SPLIT_NAMES
        }
        numeric = [s for s in self.fields if s.spec.kind == "numeric"]
        for key, source in self.sources.items():
            for chunk in source.chunks(self.columns):
                code, position = self.assign(key, chunk.first_row, chunk.table.num_rows)
                for number, name in enumerate(SPLIT_NAMES):
                    rows = code == number
                    if not rows.any():
                        continue
                    table = chunk.table if rows.all() else chunk.table.filter(pa.array(rows))
                    ids = self._encode(table, name)
                    writers[name].write(position[rows], ids, self._labels(table, None))
                    for state in numeric if name == "train" else []:
                        assert state.bucket_counts is not None
                        state.bucket_counts += np.bincount(
                            ids[:, state.slots.start], minlength=len(state.bucket_counts)
                        )
        splits = {}
        for name, writer in writers.items():
            if writer.written != writer.rows:
                raise DataError(
                    f"internal error: split {name!r} received {writer.written} of {writer.rows} "
                    "rows; delete the cache folder and retry"
                )
            splits[name] = {"rows": writer.rows, "label_range": writer.close()}
        return {"splits": splits, "slots": slots}


def _frame(table: pa.Table, columns: list[str], chunk: Chunk | None) -> pd.DataFrame:
    frame = pd.DataFrame({c: coerce.series(table.column(c)) for c in columns})
    if chunk is not None:
        frame.attrs["source"] = str(chunk.source)
    return frame


def _locate(frame: pd.DataFrame, chunk: Chunk) -> None:
    """Give a chunk's frame the file line of every row, for the error message."""
    lines = chunk.lines()
    if lines is not None:
        frame.attrs["lines"] = lines
