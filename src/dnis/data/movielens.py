"""MovieLens datasets: latest-small (bundled), 100K and 1M (read from a folder the user gives).

Each supports three tasks:

- ``rating``: the rating as label; features user and item; random 80/10/10 split.
- ``ctr``: label 1 for a rating >= 4, else 0; user, item and side features (genres, release year,
  hour of the week of the rating, plus tags for latest-small and demographics for 100K/1M);
  random split.
- ``topk``: every rating is an implicit interaction; features user and item; per-user
  leave-last-out split by timestamp.

Options: ``min_count`` (default 1) applies to every categorical and sequence feature.
``history_len`` (ctr only, ignored by the other tasks; default None: no history field) adds the
sequence field ``history``: the user's ``history_len`` most recent items rated *before* the
current rating, most recent first (see `user_history`); DIN reads it as its behaviour sequence.
Typical: ``history_len=20``. It is off by default so the ctr fields stay what they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.encode import as_strings
from dnis.data.readers import check_numeric, read_csv
from dnis.data.registry import DatasetInfo, register
from dnis.data.schema import FeatureSpec, Schema, check_keys
from dnis.errors import ConfigError, DataError

TASKS: tuple[str, ...] = ("rating", "ctr", "topk")
BUNDLED = Path(__file__).parent / "bundled" / "movielens-latest-small"
MAX_GENRES = 10
MAX_TAGS = 10
CTR_THRESHOLD = 4.0
# Column order of the genre flags in MovieLens-100K's u.item (u.genre lists the same names).
GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
RATING_COLUMNS = ["user", "item", "rating", "timestamp"]


def load_latest_small(
    *, task: str, path: Path | None = None, seed: int = 0, **options: Any
) -> EncodedDataset:
    """MovieLens latest-small (100,836 ratings, 0.5-5 stars); `path` overrides the bundled copy."""
    min_count, history_len = _options(options, "movielens-latest-small")
    folder = _folder(path or BUNDLED, ["ratings.csv", "movies.csv", "tags.csv"])
    ratings = _ratings(
        read_csv(folder / "ratings.csv").rename(columns={"userId": "user", "movieId": "item"})
    )
    extra: list[FeatureSpec] = []
    if task == "ctr":
        movies = read_csv(folder / "movies.csv").rename(columns={"movieId": "item"})
        movies["genres"] = movies["genres"].mask(movies["genres"] == "(no genres listed)")
        movies["year"] = title_year(movies["title"])
        tags = read_csv(folder / "tags.csv").rename(columns={"userId": "user", "movieId": "item"})
        ratings = ratings.merge(movies[["item", "genres", "year"]], on="item", how="left")
        ratings["hour_of_week"] = hour_of_week(ratings["timestamp"])
        ratings["user_tags"] = ratings["user"].map(tag_lists(tags, "user"))
        ratings["item_tags"] = ratings["item"].map(tag_lists(tags, "item"))
        extra = [
            FeatureSpec("genres", "sequence", min_count=min_count, max_len=MAX_GENRES),
            FeatureSpec("year", min_count=min_count),
            FeatureSpec("hour_of_week", min_count=min_count),
            FeatureSpec("user_tags", "sequence", min_count=min_count, max_len=MAX_TAGS),
            FeatureSpec("item_tags", "sequence", min_count=min_count, max_len=MAX_TAGS),
        ]
    return build_task(
        ratings,
        task,
        extra,
        name="movielens-latest-small",
        seed=seed,
        min_count=min_count,
        history_len=history_len,
    )


def load_100k(
    *, task: str, path: Path | None = None, seed: int = 0, **options: Any
) -> EncodedDataset:
    """MovieLens-100K from a folder holding u.data, u.item and u.user (ratings 1-5)."""
    min_count, history_len = _options(options, "movielens-100k")
    folder = _folder(path, ["u.data", "u.item", "u.user"])
    ratings = _ratings(
        read_csv(folder / "u.data", delimiter="\t", header=False, names=RATING_COLUMNS)
    )
    extra: list[FeatureSpec] = []
    if task == "ctr":
        genres = _genre_names_100k(folder)
        items = read_csv(
            folder / "u.item",
            delimiter="|",
            header=False,
            names=["item", "title", "release", "video_release", "url", *genres],
            encoding="latin-1",
            quotechar=None,
        )
        items["genres"] = genre_flags(items, [g for g in genres if g != "unknown"])
        items["year"] = title_year(items["title"]).fillna(items["release"].str[-4:])
        users = read_csv(
            folder / "u.user",
            delimiter="|",
            header=False,
            names=["user", "age", "gender", "occupation", "zip"],
            quotechar=None,
        )
        users["zip"] = users["zip"].str[:3]
        ratings = _join_side(ratings, items[["item", "genres", "year"]], users)
        extra = _side_specs(min_count, FeatureSpec("age", "numeric"))
    return build_task(
        ratings,
        task,
        extra,
        name="movielens-100k",
        seed=seed,
        min_count=min_count,
        history_len=history_len,
    )


def load_1m(
    *, task: str, path: Path | None = None, seed: int = 0, **options: Any
) -> EncodedDataset:
    """MovieLens-1M from a folder holding ratings.dat, movies.dat and users.dat (`::`, Latin-1)."""
    min_count, history_len = _options(options, "movielens-1m")
    folder = _folder(path, ["ratings.dat", "movies.dat", "users.dat"])
    dat = {"delimiter": "::", "header": False, "encoding": "latin-1", "quotechar": None}
    ratings = _ratings(read_csv(folder / "ratings.dat", names=RATING_COLUMNS, **dat))
    extra: list[FeatureSpec] = []
    if task == "ctr":
        movies = read_csv(folder / "movies.dat", names=["item", "title", "genres"], **dat)
        movies["year"] = title_year(movies["title"])
        users = read_csv(
            folder / "users.dat", names=["user", "gender", "age", "occupation", "zip"], **dat
        )
        users["zip"] = users["zip"].str[:3]
        ratings = _join_side(ratings, movies[["item", "genres", "year"]], users)
        extra = _side_specs(min_count, FeatureSpec("age", min_count=min_count))
    return build_task(
        ratings,
        task,
        extra,
        name="movielens-1m",
        seed=seed,
        min_count=min_count,
        history_len=history_len,
    )


def build_task(
    ratings: pd.DataFrame,
    task: str,
    extra: list[FeatureSpec],
    *,
    name: str,
    seed: int,
    min_count: int,
    history_len: int | None = None,
) -> EncodedDataset:
    """Encode and split a ratings frame (user, item, numeric rating and timestamp) for `task`.

    For ctr with `history_len`, the sequence field ``history`` (see `user_history`) comes last.
    """
    base = [FeatureSpec("user", min_count=min_count), FeatureSpec("item", min_count=min_count)]
    if task == "topk":
        schema = Schema(tuple(base), user="user", item="item", time="timestamp")
        return build_dataset(ratings, schema, task, name=name, split="leave_last_out", seed=seed)
    if task == "ctr":
        ratings = ratings.assign(label=(ratings["rating"] >= CTR_THRESHOLD).astype(np.float32))
        if history_len:
            ratings = ratings.assign(history=user_history(ratings, history_len))
            extra = [
                *extra,
                FeatureSpec("history", "sequence", min_count=min_count, max_len=history_len),
            ]
        schema = Schema(tuple(base + extra), label="label")
    else:
        schema = Schema(tuple(base), label="rating")
    return build_dataset(ratings, schema, task, name=name, split="random", seed=seed)


def user_history(ratings: pd.DataFrame, history_len: int) -> pd.Series:
    """Per rating, the items its user rated before it: most recent first, at most `history_len`.

    Ratings are ordered per user by (timestamp, row order of the file), so ties in the timestamp
    are broken by file order; a rating's history holds only ratings strictly before it in that
    order, never itself or a later one. Vectorised: one sort by (user, timestamp, row), then one
    gather of the L previous rows of the sorted order, masked where they lie before the user's
    first rating. Each value is a list of item strings (None where the user has fewer earlier
    ratings; the encoder skips those), the same canonical strings the ``item`` field is encoded
    from. The split is random, so a history may name items whose rating landed in another split:
    only the items, never their ratings or labels.
    """
    n = len(ratings)
    users = pd.factorize(ratings["user"])[0]
    position = np.arange(n)
    order = np.lexsort((position, ratings["timestamp"].to_numpy(), users))
    sorted_users = users[order]
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = sorted_users[1:] != sorted_users[:-1]
    rank = position - np.maximum.accumulate(np.where(new_user, position, 0))  # index in user
    items = as_strings(ratings["item"]).to_numpy(dtype=object, na_value=None)[order]
    back = np.arange(1, history_len + 1)
    source = position[:, None] - back[None, :]  # [n, L]: k-th previous rating, k = 1..L
    history = np.where(rank[:, None] >= back[None, :], items[np.maximum(source, 0)], None)
    out = np.empty((n, history_len), dtype=object)
    out[order] = history
    return pd.Series(out.tolist(), index=ratings.index, dtype=object)


def title_year(titles: pd.Series) -> pd.Series:
    """Release year from a title ending in "(1995)" (or a range "(2006-2007)"); else missing."""
    return titles.str.extract(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*$", expand=False)


def hour_of_week(timestamps: pd.Series) -> pd.Series:
    """Hour of the week (Monday 00h = 0 .. Sunday 23h = 167, UTC) of Unix timestamps."""
    when = pd.to_datetime(timestamps, unit="s", utc=True)
    return when.dt.day_of_week * 24 + when.dt.hour


def tag_lists(tags: pd.DataFrame, key: str, max_len: int = MAX_TAGS) -> pd.Series:
    """Per `key` value, its `max_len` most applied tags (lower-cased; ties by name) as a list."""
    tag = tags["tag"].str.strip().str.lower()
    applied = pd.DataFrame({key: tags[key], "tag": tag}).dropna()
    applied = applied[applied["tag"].str.len() > 0]
    counts = applied.groupby([key, "tag"]).size().rename("n").reset_index()
    counts = counts.sort_values([key, "n", "tag"], ascending=[True, False, True])
    return counts.groupby(key).head(max_len).groupby(key)["tag"].agg(list)


def genre_flags(items: pd.DataFrame, genres: list[str]) -> pd.Series:
    """`|`-joined names of the genres whose 0/1 flag column is 1 (missing when none is)."""
    flags = pd.DataFrame({g: check_numeric(items, g) for g in genres}).astype(np.int64)
    joined = flags.dot(pd.Series([g + "|" for g in genres], index=genres)).str.rstrip("|")
    return joined.mask(joined == "")


def _genre_names_100k(folder: Path) -> list[str]:
    """Genre flag names from u.genre when present, else the published 19 names."""
    if not (folder / "u.genre").is_file():
        return list(GENRES_100K)
    table = read_csv(folder / "u.genre", delimiter="|", header=False, names=["genre", "index"])
    return table.sort_values("index", key=lambda s: s.astype(int))["genre"].tolist()


def _ratings(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric rating and integer timestamp columns, refusing bad values with their file line."""
    frame["rating"] = check_numeric(frame, "rating")
    frame["timestamp"] = check_numeric(frame, "timestamp").astype(np.int64)
    return frame


def _join_side(ratings: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    """Ratings with item and user side columns and the hour of the week (row order kept)."""
    out = ratings.merge(items, on="item", how="left").merge(users, on="user", how="left")
    out["hour_of_week"] = hour_of_week(out["timestamp"])
    return out


def _side_specs(min_count: int, age: FeatureSpec) -> list[FeatureSpec]:
    """Side features of MovieLens-100K/1M for the ctr task (age differs between them)."""
    return [
        FeatureSpec("genres", "sequence", min_count=min_count, max_len=MAX_GENRES),
        FeatureSpec("year", min_count=min_count),
        FeatureSpec("hour_of_week", min_count=min_count),
        age,
        FeatureSpec("gender", min_count=min_count),
        FeatureSpec("occupation", min_count=min_count),
        FeatureSpec("zip", min_count=min_count),
    ]


def _options(options: dict[str, Any], dataset: str) -> tuple[int, int | None]:
    """(min_count, history_len) from a MovieLens loader's options, refusing unknown keys."""
    return _min_count(options, dataset), _history_len(options, dataset)


def _min_count(options: dict[str, Any], dataset: str) -> int:
    check_keys(options, {"min_count", "history_len"}, f"dataset {dataset!r} options")
    return int(options.get("min_count", 1))


def _history_len(options: dict[str, Any], dataset: str) -> int | None:
    value = options.get("history_len")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(
            f"dataset {dataset!r} option history_len must be a positive integer "
            f"(the ctr task's history length, e.g. 20) or null, got {value!r}"
        )
    return int(value)


def _folder(path: Path | None, files: list[str]) -> Path:
    """The dataset folder, refusing one that lacks any of `files`."""
    folder = Path(path) if path is not None else None
    if folder is None or not folder.is_dir():
        raise DataError("dataset folder not found", path=folder, fix="pass the folder as `path`")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"the folder lacks {missing}",
            path=folder,
            fix=f"pass the unpacked folder that holds {', '.join(files)}",
        )
    return folder


register(
    DatasetInfo(
        "movielens-latest-small",
        load_latest_small,
        TASKS,
        "MovieLens latest-small: 100,836 ratings, 610 users, 9,742 movies, genres and tags",
        bundled=True,
    )
)
register(
    DatasetInfo(
        "movielens-100k",
        load_100k,
        TASKS,
        "MovieLens-100K: 100,000 ratings, 943 users, 1,682 movies, demographics (path: folder)",
    )
)
register(
    DatasetInfo(
        "movielens-1m",
        load_1m,
        TASKS,
        "MovieLens-1M: 1,000,209 ratings, 6,040 users, 3,706 movies, demographics (path: folder)",
    )
)
