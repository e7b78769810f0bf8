"""Checks that a loaded dataset can be trained on, run before any training."""

from __future__ import annotations

from collections.abc import Mapping

from dnis.data.dataset import EncodedDataset
from dnis.data.loader import label_range
from dnis.data.split import RATIOS, SPLIT_LABELS, fewest_rows
from dnis.errors import DataError


def check_splits(
    dataset: EncodedDataset, *, source: str | Mapping[str, str], method: str | None
) -> None:
    """Refuse, before any training, splits a run cannot use: an empty split (DNIS would wait
    forever for a validation batch; metrics of no rows are NaN) or a CTR split of one class (no
    click model to learn; AUC undefined, so early stopping could never improve).

    `source` is the file (or dataset name) that was split, or the {train, valid, test} files;
    `method` the split that cut it (None for a registered dataset's own split), for the fix.
    """
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
        return f"supply more rows ({shares} leaves no split empty from {fewest_rows()} rows on), or {files}"
    return f"supply more rows, or {files}"
