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

import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset, check_labels
from dnis.data.encode import require_columns
from dnis.data.readers import TableFiles, check_times
from dnis.data.schema import Schema
from dnis.data.split import RATIOS
from dnis.data.streaming import StreamingOptions, load_streaming


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

    The file options (`format` to `encoding`) are those of `dnis.data.readers.TableFiles`:
    `delimiter` defaults to "," for csv and a tab for tsv; `header`, `names` and `encoding` apply
    to csv/tsv (and `encoding` to libfm). For rating/ctr the label must be numeric (ctr: 0/1);
    for a `time` column, values must be numbers or ISO-8601 date-times.

    `streaming` (True, or `dnis.data.streaming.StreamingOptions` for its cache folder and
    options) reads csv/tsv/parquet files in chunks into an on-disk cache and returns splits that
    are read from disk block by block: the same vocabularies, split and ids, for files larger
    than memory (rating and ctr tasks, `split: random` or three files).
    """
    files = TableFiles(format, path, delimiter, header, names, encoding)
    if streaming is not False:
        return load_streaming(
            files,
            schema,
            task,
            split=split,
            ratios=ratios,
            seed=seed,
            name=name,
            options=StreamingOptions() if streaming is True else streaming,
        )
    frames = {key: _checked(files.read(file), schema, task) for key, file in files.files.items()}
    data = frames.get("all", frames)
    return build_dataset(data, schema, task, name=name, split=split, ratios=ratios, seed=seed)


def _checked(frame: pd.DataFrame, schema: Schema, task: str) -> pd.DataFrame:
    """Refuse missing columns, bad labels and bad times while the rows still know their line."""
    require_columns(frame, [f.source for f in schema.features])
    if task in ("rating", "ctr") and schema.label is not None:
        check_labels(frame, schema.label, task)
    if schema.time is not None:
        frame[schema.time] = check_times(frame, schema.time)
    return frame
