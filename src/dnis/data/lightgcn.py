"""LightGCN-style implicit-feedback folders (Gowalla, Yelp2018, Amazon-Book ...), for the topk task.

Each file holds one line per user: ``user_id item_id item_id ...`` (whitespace-separated
non-negative integers; the first is the user, the rest the items the user interacted with). A
folder holds ``train.txt``, ``valid.txt`` and ``test.txt``, used as the dataset's own split. A
folder with only ``train.txt`` and ``test.txt`` (as the original LightGCN release ships) gets its
validation split from ``train.txt``: for every user with at least two training items, one of them,
drawn with the seed, is held out (users with one training item keep it). The files may be gzip,
bzip2 or xz compressed (told by their first bytes, as every dnis reader does).

Parsing is vectorised: a file is read whole and parsed as one byte array by NumPy (no Python loop
over lines or ids), so Gowalla's 1M interactions load in about a second. A malformed file is
refused with its path and line: a token that is not a non-negative integer, an id of more than 18
digits, a file without any interaction, or a user with two lines in one file.

Ids are encoded as every dnis dataset's are (fit on the training split, frequency-sorted, id 0 =
OOV): an item that appears only in valid/test maps to the OOV item id 0, which the top-k task
counts as a miss; a user that appears only in valid/test maps to the OOV user id 0 and is kept
(ranked with the OOV user's embedding), so the metrics stay over every given interaction. The
counts of such rows are in ``meta["oov_rows"]``. Items within a line carry no order in these
files (Gowalla's train lines are sorted by item id), so no split uses their position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.readers import read_bytes
from dnis.data.registry import DatasetInfo, register
from dnis.data.schema import FeatureSpec, Schema
from dnis.errors import ConfigError, DataError

SPLIT_FILES: dict[str, str] = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
MAX_DIGITS = 18  # every id of at most 18 digits fits int64
_POW10 = 10 ** np.arange(MAX_DIGITS, dtype=np.int64)
_NEWLINE, _ZERO, _NINE = ord("\n"), ord("0"), ord("9")
_SPACES = np.frombuffer(b" \t\r\n\v\f", dtype=np.uint8)


class Interactions:
    """One parsed file: (user, item) id pairs with the file line of each, and the user lines."""

    def __init__(
        self, path: Path, users: np.ndarray, items: np.ndarray, lines: np.ndarray, n_lines: int
    ) -> None:
        self.path = path
        self.users = users  # int64 [N]: the user of each interaction
        self.items = items  # int64 [N]
        self.lines = lines  # int64 [N]: 1-based file line of each interaction
        self.n_lines = n_lines  # user lines (lines holding at least one id)

    def __len__(self) -> int:
        return len(self.users)

    def frame(self) -> pd.DataFrame:
        """The interactions as a frame (user, item) that names its file and lines in `attrs`."""
        frame = pd.DataFrame({"user": self.users, "item": self.items})
        frame.attrs = {"source": str(self.path), "lines": self.lines}
        return frame

    def take(self, rows: np.ndarray) -> Interactions:
        return Interactions(
            self.path, self.users[rows], self.items[rows], self.lines[rows], self.n_lines
        )


def read_lightgcn(path: str | Path) -> Interactions:
    """Parse one ``user item item ...`` file into interactions, vectorised over its bytes.

    Blank lines are skipped; a line holding only a user id has no interaction. Raises DataError
    naming the file and line of the first malformed token, or the file when it has no interaction.
    """
    path = Path(path)
    data = np.frombuffer(read_bytes(path, "utf-8"), dtype=np.uint8)
    digit = (data >= _ZERO) & (data <= _NINE)
    bad = ~digit & ~np.isin(data, _SPACES)
    newlines = np.flatnonzero(data == _NEWLINE)
    if bad.any():
        at = int(np.argmax(bad))
        line, column, token = _locate(data, newlines, at)
        raise DataError(
            f"{token!r} is not a non-negative integer id",
            path=path,
            line=line,
            column=column,
            fix="each line must be `user_id item_id item_id ...`: integers separated by spaces",
        )
    before = np.concatenate([[False], digit[:-1]])
    after = np.concatenate([digit[1:], [False]])
    starts = np.flatnonzero(digit & ~before)  # first byte of every token
    ends = np.flatnonzero(digit & ~after) + 1  # one past its last byte
    token_line = np.searchsorted(newlines, starts) + 1  # 1-based line of every token
    lengths = ends - starts
    if len(lengths) and lengths.max() > MAX_DIGITS:
        at = int(starts[np.argmax(lengths > MAX_DIGITS)])
        line, column, token = _locate(data, newlines, at)
        raise DataError(
            f"id {token[:30]!r} has more than {MAX_DIGITS} digits",
            path=path,
            line=line,
            column=column,
            fix="ids must fit a 64-bit integer; re-index them from 0",
        )
    values = _token_values(data, digit, ends, lengths)
    first = np.ones(len(values), dtype=bool)  # the first token of a line is its user
    first[1:] = token_line[1:] != token_line[:-1]
    line_users, user_lines = values[first], token_line[first]
    _refuse_repeated_users(path, line_users, user_lines)
    owner = np.cumsum(first) - 1  # index of the line (among user lines) of every token
    items = ~first
    out = Interactions(
        path,
        users=line_users[owner[items]],
        items=values[items],
        lines=token_line[items].astype(np.int64),
        n_lines=len(line_users),
    )
    if len(out) == 0:
        what = "is empty" if len(line_users) == 0 else "has user ids but no item id on any line"
        raise DataError(
            f"the file {what}: it holds no interaction",
            path=path,
            fix="each line must be `user_id item_id item_id ...` with at least one item somewhere",
        )
    return out


def _token_values(
    data: np.ndarray, digit: np.ndarray, ends: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """The integer value of every token: each digit times its power of ten, summed per token."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    where = np.flatnonzero(digit)
    token = np.repeat(np.arange(len(lengths)), lengths)
    place = ends[token] - 1 - where  # 0 for the last digit of a token
    terms = (data[where].astype(np.int64) - _ZERO) * _POW10[place]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.add.reduceat(terms, offsets)


def _locate(data: np.ndarray, newlines: np.ndarray, at: int) -> tuple[int, int, str]:
    """(1-based line, 1-based column, the whitespace-delimited token) of byte position `at`."""
    line = int(np.searchsorted(newlines, at)) + 1
    line_start = int(newlines[line - 2]) + 1 if line > 1 else 0
    space = np.isin(data, _SPACES)
    left = np.flatnonzero(space[line_start:at])
    start = line_start + (int(left[-1]) + 1 if len(left) else 0)
    right = np.flatnonzero(space[at:])
    end = at + int(right[0]) if len(right) else len(data)
    token = bytes(data[start:end]).decode("utf-8", errors="replace")
    return line, start - line_start + 1, token


def _refuse_repeated_users(path: Path, users: np.ndarray, lines: np.ndarray) -> None:
    """One line per user: a second line of a user is refused (two files concatenated, say)."""
    order = np.argsort(users, kind="stable")
    repeated = np.flatnonzero(users[order][1:] == users[order][:-1])
    if len(repeated):
        second = order[repeated + 1]
        row = int(second[np.argmin(lines[second])])
        earlier = int(lines[order[np.searchsorted(users[order], users[row])]])
        raise DataError(
            f"user {int(users[row])} has a second line (its first is line {earlier}; "
            f"{len(repeated)} repeated user line(s) in all)",
            path=path,
            line=int(lines[row]),
            fix="the format has one line per user: merge the user's items into one line",
        )


def hold_out_valid(train: Interactions, seed: int) -> tuple[Interactions, Interactions]:
    """(train, valid): one interaction drawn with `seed` per user with >= 2 training items."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(train)), train.users))
    users = train.users[order]
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    counts = np.diff(np.append(np.flatnonzero(first), len(users)))
    held = order[np.flatnonzero(first)[counts >= 2]]
    keep = np.ones(len(train), dtype=bool)
    keep[held] = False
    return train.take(np.flatnonzero(keep)), train.take(np.sort(held))


def split_files(path: Path | None) -> dict[str, Path]:
    """The folder's split files: train.txt, test.txt and, when present, valid.txt."""
    folder = Path(path) if path is not None else None
    if folder is None or not folder.is_dir():
        hint = " (it is a file: pass the folder that holds train.txt and test.txt)"
        raise DataError(
            "dataset folder not found" + (hint if folder is not None and folder.is_file() else ""),
            path=folder,
            fix="pass the folder holding train.txt, valid.txt and test.txt as `path`",
        )
    missing = [f for f in ("train.txt", "test.txt") if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"the folder lacks {missing}",
            path=folder,
            fix="pass a folder with train.txt, test.txt and (optionally) valid.txt, one line "
            "per user: `user_id item_id item_id ...`",
        )
    return {s: folder / f for s, f in SPLIT_FILES.items() if (folder / f).is_file()}


def load_folder(
    path: Path | None, *, name: str, task: str = "topk", seed: int = 0, min_count: int = 1
) -> EncodedDataset:
    """Read, split and encode a LightGCN-style folder for the topk task (see the module doc)."""
    if task != "topk":
        raise ConfigError(f"dataset {name!r} holds implicit feedback: task 'topk', not {task!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 1:
        raise ConfigError(
            f"dataset {name!r} option min_count must be a positive integer, got {min_count!r}"
        )
    files = split_files(path)
    parts = {split: read_lightgcn(file) for split, file in files.items()}
    if "valid" in parts:
        valid_from = "valid.txt"
    else:
        parts["train"], parts["valid"] = hold_out_valid(parts["train"], seed)
        valid_from = f"train.txt: one interaction per user with >= 2, drawn with seed {seed}"
        if len(parts["valid"]) == 0:
            raise DataError(
                "valid.txt is absent and no user has two training items to hold one out",
                path=files["train"],
                fix="add valid.txt (one line per user: `user_id item_id ...`)",
            )
    spec = [FeatureSpec("user", min_count=min_count), FeatureSpec("item", min_count=min_count)]
    schema = Schema(tuple(spec), user="user", item="item")
    frames = {split: part.frame() for split, part in parts.items()}
    dataset = build_dataset(frames, schema, "topk", name=name, seed=seed)
    dataset.meta.update(
        {
            "format": "lightgcn",
            "path": str(path),
            "valid_from": valid_from,
            "interactions": {s: len(parts[s]) for s in SPLIT_FILES},
            "users": {s: int(len(np.unique(parts[s].users))) for s in SPLIT_FILES},
            "items": {s: int(len(np.unique(parts[s].items))) for s in SPLIT_FILES},
            "oov_rows": {
                s: {
                    "user": int((dataset.split(s).ids[:, 0] == 0).sum()),
                    "item": int((dataset.split(s).ids[:, 1] == 0).sum()),
                }
                for s in ("valid", "test")
            },
        }
    )
    return dataset


def load_lightgcn(
    *, task: str, path: Path | None, seed: int = 0, min_count: int = 1
) -> EncodedDataset:
    """Any LightGCN-style folder (train.txt, valid.txt or not, test.txt); option `min_count`."""
    return load_folder(path, name="lightgcn", task=task, seed=seed, min_count=min_count)


def load_gowalla(
    *, task: str, path: Path | None, seed: int = 0, min_count: int = 1
) -> EncodedDataset:
    """Gowalla check-ins in LightGCN's format: 1,027,370 interactions, 29,858 users, 40,981
    items (train 719,081, valid 91,047, test 217,242 in the LightGCNpp split)."""
    return load_folder(path, name="gowalla", task=task, seed=seed, min_count=min_count)


register(
    DatasetInfo(
        "gowalla",
        load_gowalla,
        ("topk",),
        "Gowalla check-ins (LightGCN split): 1,027,370 interactions, 29,858 users, 40,981 items "
        "(path: folder)",
    )
)
register(
    DatasetInfo(
        "lightgcn",
        load_lightgcn,
        ("topk",),
        "any LightGCN-style folder: train/valid/test.txt, `user item item ...` (path: folder)",
    )
)
