"""Train/validation/test splits: random (seeded), temporal, and per-user leave-last-out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from dnis.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dnis.data.dataset import EncodedDataset

SplitMethod = Literal["random", "temporal", "leave_last_out"]
SPLITS: tuple[str, ...] = ("random", "temporal", "leave_last_out")
SPLIT_LABELS: dict[str, str] = {"train": "training", "valid": "validation", "test": "test"}
RATIOS: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/valid/test shares of a random split


def split_frame(
    frame: pd.DataFrame,
    method: str,
    *,
    ratios: tuple[float, float, float] = RATIOS,
    seed: int = 0,
    user: str | None = None,
    time: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Row positions of each split, returned as frames with a fresh index."""
    if method not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {method!r}")
    if method == "random":
        parts = random_split(len(frame), ratios, seed)
    elif method == "temporal":
        parts = temporal_split(_required(frame, time, "time", method), ratios)
    else:
        parts = leave_last_out(
            _required(frame, user, "user", method), _required(frame, time, "time", method)
        )
    lines = file_lines(frame)
    out = {}
    for name, rows in parts.items():
        part = frame.iloc[rows].reset_index(drop=True)
        part.attrs = {"source": frame.attrs.get("source")}
        if lines is not None:
            part.attrs["lines"] = lines[rows]  # errors found later still name the right file line
        out[name] = part
    return out


def file_lines(frame: pd.DataFrame) -> np.ndarray | None:
    """File line of every row, from what the reader recorded (see dnis.data.readers)."""
    if frame.attrs.get("lines") is not None:
        return np.asarray(frame.attrs["lines"])
    if frame.attrs.get("first_line") is not None:
        return int(frame.attrs["first_line"]) + np.arange(len(frame))
    return None


def _required(frame: pd.DataFrame, column: str | None, role: str, method: str) -> np.ndarray:
    if column is None or column not in frame.columns:
        raise ConfigError(
            f"split {method!r} needs the schema's `{role}` column (got {column!r}); "
            f"set `{role}:` in the schema or use split: random"
        )
    return frame[column].to_numpy()


def _cuts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int]:
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(
            f"split ratios must be three non-negative numbers summing to 1, got {ratios}"
        )
    a = int(round(n * ratios[0]))
    b = int(round(n * (ratios[0] + ratios[1])))
    return a, b


def random_split(n: int, ratios: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    a, b = _cuts(n, ratios)
    return {"train": order[:a], "valid": order[a:b], "test": order[b:]}


def temporal_split(times: np.ndarray, ratios: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Oldest rows train, newest test (stable sort keeps file order among equal times)."""
    order = np.argsort(times, kind="stable")
    a, b = _cuts(len(order), ratios)
    return {"train": order[:a], "valid": order[a:b], "test": order[b:]}


def leave_last_out(users: np.ndarray, times: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's last interaction is test, the one before is validation, the rest is training.

    Users with fewer than three interactions keep all of them in training, so every evaluated user
    has history to learn from.
    """
    order = np.lexsort((np.arange(len(users)), times, users))
    sorted_users = users[order]
    counts = pd.Series(sorted_users).groupby(sorted_users, sort=False).transform("size").to_numpy()
    from_end = (
        counts - 1 - pd.Series(sorted_users).groupby(sorted_users, sort=False).cumcount().to_numpy()
    )
    eligible = counts >= 3
    test = eligible & (from_end == 0)
    valid = eligible & (from_end == 1)
    train = ~(test | valid)
    return {"train": order[train], "valid": order[valid], "test": order[test]}


def check_splits(
    dataset: EncodedDataset, *, source: str | Mapping[str, str], method: str | None
) -> None:
    """Refuse, before any training, splits a run cannot use: an empty split (DNIS would wait
    forever for a validation batch; metrics of no rows are NaN) or a CTR split of one class (no
    click model to learn; AUC undefined, so early stopping could never improve).

    `source` is the file (or dataset name) that was split, or the {train, valid, test} files;
    `method` the split that cut it (None for a registered dataset's own split), for the fix.
    """
    from dnis.data.loader import label_range  # here: the loader's imports lead back to this module

    sizes = {name: len(dataset.split(name)) for name in SPLIT_LABELS}
    empty = [name for name, rows in sizes.items() if rows == 0]
    if empty:
        given = ", ".join(f"{name} {rows}" for name, rows in sizes.items())
        if isinstance(source, Mapping):
            origin = f"the files {dict(source)} hold {given} rows"
        else:
            total = sum(sizes.values())
            cut = f"split: {method}" if method else "its split"
            origin = f"{source} has {total} row{'s' * (total != 1)}; {cut} gives {given}"
        are = "s are" if len(empty) > 1 else " is"
        raise DataError(
            f"the {' and '.join(SPLIT_LABELS[n] for n in empty)} split{are} empty ({origin})",
            fix=_more_rows_fix(source, method),
        )
    if dataset.task != "ctr":
        return
    for name, rows in sizes.items():
        low, high = label_range(dataset.split(name))  # a split on disk: from its cache's meta
        if low == high:
            ones = rows if low == 1 else 0
            raise DataError(
                f"every label of the {SPLIT_LABELS[name]} split is {low:g} ({rows} rows: "
                f"{rows - ones} of class 0, {ones} of class 1): {_ONE_CLASS[name]}",
                path=source[name] if isinstance(source, Mapping) else source,
                fix="give every split both labels: more rows (clicks and non-clicks), or your "
                "own {train, valid, test} files that each hold both",
            )


_ONE_CLASS = {
    "train": "a click model cannot learn from one class",
    "valid": "AUC is undefined on it (NaN), so early stopping would never see an improvement",
    "test": "its AUC would be undefined (NaN)",
}


def _more_rows_fix(source: str | Mapping[str, str], method: str | None) -> str:
    """What to change so that every split gets rows."""
    if isinstance(source, Mapping):
        return "put rows in every file"
    files = "give your own split as files (dataset.path: {train: ..., valid: ..., test: ...})"
    if method == "leave_last_out":
        return (
            "each user needs 3 or more interactions to give one to validation and one to test: "
            f"add interactions, use split: random, or {files}"
        )
    if method in ("random", "temporal"):
        shares = "/".join(f"{100 * r:g}" for r in RATIOS)
        return f"supply more rows ({shares} leaves no split empty from {_fewest_rows()} rows on), or {files}"
    return f"supply more rows, or {files}"


def _fewest_rows() -> int:
    """The fewest rows from which a split by `RATIOS` leaves no split empty: from 2 / (smallest
    ratio) rows on none is, and rounding can empty one below that."""
    bound = math.ceil(2 / min(RATIOS))
    for m in range(bound - 1, 0, -1):
        a, b = _cuts(m, RATIOS)
        if min(a, b - a, m - b) == 0:
            return m + 1
    return 1
