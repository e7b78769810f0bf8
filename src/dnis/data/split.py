"""Train/validation/test splits: random (seeded), temporal, and per-user leave-last-out."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd

from dnis.errors import ConfigError

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


def split_cuts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int]:
    """Where a split of `n` rows by `ratios` cuts: rows [0, a) train, [a, b) valid, [b, n) test."""
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(
            f"split ratios must be three non-negative numbers summing to 1, got {ratios}"
        )
    a = int(round(n * ratios[0]))
    b = int(round(n * (ratios[0] + ratios[1])))
    return a, b


def random_split(n: int, ratios: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    a, b = split_cuts(n, ratios)
    return {"train": order[:a], "valid": order[a:b], "test": order[b:]}


def temporal_split(times: np.ndarray, ratios: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Oldest rows train, newest test (stable sort keeps file order among equal times)."""
    order = np.argsort(times, kind="stable")
    a, b = split_cuts(len(order), ratios)
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


def fewest_rows() -> int:
    """The fewest rows from which a split by `RATIOS` leaves no split empty: from 2 / (smallest
    ratio) rows on none is, and rounding can empty one below that."""
    bound = math.ceil(2 / min(RATIOS))
    for m in range(bound - 1, 0, -1):
        a, b = split_cuts(m, RATIOS)
        if min(a, b - a, m - b) == 0:
            return m + 1
    return 1
