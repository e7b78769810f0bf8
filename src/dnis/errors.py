"""Errors a user can act on: each names where the problem is and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class DnisError(Exception):
    """Base class of every error dnis raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(DnisError):
    """A config file or an option is wrong: unknown key, wrong type, impossible value.

    `key` is the dotted config key at fault (e.g. "train.lr"), when known: `load_config` turns it
    into the line and column of the YAML file."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BudgetError(ConfigError):
    """A method cannot build any model within the asked budget (below its structural floor).

    `compare` records such a cell as infeasible instead of stopping the grid.
    """


class DataError(DnisError):
    """An input file is malformed. Carries the file, line and column so the user can find it."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | int | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        self.fix = fix
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}" if isinstance(column, str) else f"column {column}")
        text = (", ".join(where) + ": " if where else "") + message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """ " Did you mean 'x'?" for the closest known name, or "" when none is close."""
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    return f" Did you mean {hint[0]!r}?" if hint else ""
