"""Bring your own data: CSV, TSV, Parquet or libFM files plus a schema, for any task.

This is what a config such as ``dataset: {format: csv, path: data.csv, schema: {...}}`` runs.
`path` is one file (split by `split`) or a mapping with ``train``, ``valid`` and ``test`` files
(used as given). Columns are validated on the raw files, so errors name the file and the line.
With `streaming`, files larger than memory go through `dnis.data.streaming` and an on-disk cache
instead, giving the same dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset, check_labels, line_of
from dnis.data.encode import require_columns
from dnis.data.readers import read_csv, read_libfm, read_parquet
from dnis.data.schema import Schema
from dnis.data.split import RATIOS
from dnis.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dnis.data.streaming import StreamingOptions

FORMATS: dict[str, str | None] = {"csv": ",", "tsv": "\t", "parquet": None, "libfm": None}
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")


def load_files(
    *,
    format: str,
    path: str | Path | Mapping[str, str | Path],
    schema: Schema,
    task: str,
    split: str = "random",
    ratios: tuple[float, float, float] = RATIOS,
    seed: int = 0,
    delimiter: str | None = None,
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    name: str = "custom",
    streaming: bool | StreamingOptions = False,
) -> EncodedDataset:
    """Read the file(s), check the columns the schema uses, then encode and split.

    `delimiter` defaults to "," for csv and a tab for tsv; `header`, `names` and `encoding` apply
    to csv/tsv (and `encoding` to libfm). For rating/ctr the label must be numeric (ctr: 0/1);
    for a `time` column, values must be numbers or ISO-8601 date-times.

    `streaming` (True, or `dnis.data.streaming.StreamingOptions` for its cache folder and
    options) reads csv/tsv/parquet files in chunks into an on-disk cache and returns splits that
    are read from disk block by block: the same vocabularies, split and ids, for files larger
    than memory (rating and ctr tasks, `split: random` or three files).
    """
    if format not in FORMATS:
        raise ConfigError(f"dataset format must be one of {sorted(FORMATS)}, got {format!r}")
    if streaming is not False:
        from dnis.data.streaming import StreamingOptions, load_streaming

        return load_streaming(
            format=format,
            path=path,
            schema=schema,
            task=task,
            split=split,
            ratios=ratios,
            seed=seed,
            delimiter=delimiter,
            header=header,
            names=names,
            encoding=encoding,
            name=name,
            options=StreamingOptions() if streaming is True else streaming,
        )
    files = _paths(path)

    def read(file: Path) -> pd.DataFrame:
        if format == "parquet":
            return read_parquet(file)
        if format == "libfm":
            return read_libfm(file, encoding=encoding)
        sep = delimiter or FORMATS[format]
        assert sep is not None
        return read_csv(file, delimiter=sep, header=header, names=names, encoding=encoding)

    frames = {split_name: _checked(read(file), schema, task) for split_name, file in files.items()}
    data = frames.get("all", frames)
    return build_dataset(data, schema, task, name=name, split=split, ratios=ratios, seed=seed)


def _paths(path: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """{"all": file} for a single file, or the train/valid/test files of a mapping."""
    if not isinstance(path, Mapping):
        return {"all": Path(path)}
    keys = set(path)
    if keys != set(SPLIT_NAMES):
        raise ConfigError(
            f"dataset path: a mapping needs the keys {list(SPLIT_NAMES)}, got {sorted(keys)}"
        )
    return {split: Path(path[split]) for split in SPLIT_NAMES}


def _checked(frame: pd.DataFrame, schema: Schema, task: str) -> pd.DataFrame:
    """Refuse missing columns, bad labels and bad times while the rows still know their line."""
    require_columns(frame, [f.source for f in schema.features])
    if task in ("rating", "ctr") and schema.label is not None:
        check_labels(frame, schema.label, task)
    if schema.time is not None:
        frame[schema.time] = _times(frame, schema.time)
    return frame


def _times(frame: pd.DataFrame, column: str) -> pd.Series:
    """A time column as numbers (e.g. Unix seconds) or, failing that, ISO-8601 date-times."""
    values = frame[column]
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers
    parsed = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        raise DataError(
            f"time {values.iloc[bad[0]]!r} is neither a number nor an ISO-8601 date-time",
            path=frame.attrs.get("source"),
            line=line_of(frame, int(bad[0])),
            column=column,
            fix="write times as Unix seconds or like 2024-01-31T12:00:00",
        )
    return parsed
