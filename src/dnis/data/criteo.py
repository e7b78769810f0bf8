"""Criteo (Kaggle Display Advertising Challenge) and Avazu click logs, for the ctr task.

`path` is one file (split randomly 80/10/10 with the seed) or a folder holding train.csv, dev.csv
and test.csv, which is used as the dataset's own train/valid/test split. Header rows are detected:
raw Kaggle files have none, while DeepCTR-style samples (and Avazu's train.csv) start with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset, check_labels
from dnis.data.readers import check_numeric, read_csv
from dnis.data.registry import DatasetInfo, register
from dnis.data.schema import FeatureSpec, Schema, check_keys
from dnis.errors import DataError

CRITEO_NUMERIC: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS: list[str] = ["label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL]
AVAZU_COLUMNS: list[str] = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", *(f"C{i}" for i in range(14, 22)),
]  # fmt: skip
SPLIT_FILES: dict[str, str] = {"train": "train.csv", "valid": "dev.csv", "test": "test.csv"}


def load_criteo(*, task: str, path: Path | None, seed: int = 0, **options: Any) -> EncodedDataset:
    """Criteo: label, 13 numeric fields I1..I13 (bucketised by training quantiles) and 26 hashed
    categorical fields C1..C26. Options: `buckets` (10), `min_count` (2), `header` (auto-detected).
    The delimiter (tab for raw Kaggle files, comma for CSV exports) is detected from the first line.
    """
    check_keys(options, {"buckets", "min_count", "header"}, "dataset 'criteo' options")
    buckets = int(options.get("buckets", 10))
    min_count = int(options.get("min_count", 2))
    features = [FeatureSpec(c, "numeric", buckets=buckets) for c in CRITEO_NUMERIC]
    features += [FeatureSpec(c, min_count=min_count) for c in CRITEO_CATEGORICAL]
    schema = Schema(tuple(features), label="label")
    parts = {
        split: _read(file, CRITEO_COLUMNS, options.get("header"), "label")
        for split, file in _files(path).items()
    }
    for frame in parts.values():
        for column in CRITEO_NUMERIC:
            check_numeric(frame, column, allow_missing=True)
    return _build(parts, schema, "criteo", seed)


def load_avazu(*, task: str, path: Path | None, seed: int = 0, **options: Any) -> EncodedDataset:
    """Avazu: label `click`, `hour` (YYMMDDHH) split into hour_of_day and weekday, and the other 21
    columns as categorical fields (`id` is dropped). Options: `min_count` (2), `header` (auto)."""
    check_keys(options, {"min_count", "header"}, "dataset 'avazu' options")
    min_count = int(options.get("min_count", 2))
    names = ["hour_of_day", "weekday", *AVAZU_COLUMNS[3:]]
    schema = Schema(tuple(FeatureSpec(c, min_count=min_count) for c in names), label="click")
    parts = {
        split: avazu_time(_read(file, AVAZU_COLUMNS, options.get("header"), "id"))
        for split, file in _files(path).items()
    }
    return _build(parts, schema, "avazu", seed)


def avazu_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `hour_of_day` and `weekday` (0 = Monday) from Avazu's YYMMDDHH `hour` column."""
    hour = frame["hour"].astype("string").str.strip()
    day = pd.to_datetime(hour.str[:6], format="%y%m%d", errors="coerce")
    frame["hour_of_day"] = hour.str[6:8].where(hour.str.len() == 8)
    frame["weekday"] = day.dt.day_of_week.astype("Int64")
    return frame


def _files(path: Path | None) -> dict[str, Path]:
    """{"all": file} for one file, or the train/valid/test files of a folder."""
    if path is None or not Path(path).exists():
        raise DataError("path not found", path=path, fix="pass a data file or a folder of splits")
    path = Path(path)
    if path.is_file():
        return {"all": path}
    missing = [f for f in SPLIT_FILES.values() if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"the folder lacks {missing}",
            path=path,
            fix="pass one data file, or a folder with train.csv, dev.csv and test.csv",
        )
    return {split: path / file for split, file in SPLIT_FILES.items()}


def _read(path: Path, columns: list[str], header: bool | None, first: str) -> pd.DataFrame:
    """Read a file with the given column names, detecting delimiter and header unless told.

    A header is detected when the first field of the first line is the name `first`.
    """
    with open(path, "rb") as handle:
        line = handle.readline().decode("utf-8", errors="replace")
    delimiter = "\t" if "\t" in line else ","
    if header is None:
        header = line.split(delimiter)[0].strip() == first
    return read_csv(path, delimiter=delimiter, header=header, names=columns)


def _build(parts: dict[str, pd.DataFrame], schema: Schema, name: str, seed: int) -> EncodedDataset:
    """Validate the 0/1 labels of every file (naming its line), then encode and split."""
    assert schema.label is not None
    for frame in parts.values():
        check_labels(frame, schema.label, "ctr")
    data = parts.get("all", parts)
    return build_dataset(data, schema, "ctr", name=name, split="random", seed=seed)


register(
    DatasetInfo(
        "criteo",
        load_criteo,
        ("ctr",),
        "Criteo Kaggle display ads: 13 numeric + 26 categorical fields (path: file or folder)",
    )
)
register(
    DatasetInfo(
        "avazu",
        load_avazu,
        ("ctr",),
        "Avazu mobile ads: 22 categorical fields incl. hour/weekday (path: file or split folder)",
    )
)
