"""Registered datasets: bundled MovieLens latest-small and the shared MovieLens/Criteo/Avazu."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dnis.data import catalog
from dnis.data.criteo import load_avazu, load_criteo
from dnis.data.dataset import EncodedDataset
from dnis.data.movielens import hour_of_week, load_100k, load_latest_small, title_year
from dnis.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = ("train", "valid", "test")


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"shared data {folder} is absent (internal data, not in a public clone)")
    return folder


def rows(ds: EncodedDataset) -> list[int]:
    return [len(ds.split(s)) for s in SPLITS]


def assert_frequency_sorted(ds: EncodedDataset) -> None:
    for field in ds.encoder.fields:
        if field.spec.kind != "numeric":
            counts = np.asarray(field.counts)
            assert np.all(np.diff(counts) <= 0), field.spec.name


@pytest.fixture(scope="module")
def latest_ctr() -> EncodedDataset:
    return load_latest_small(task="ctr")


def test_registry_lists_the_datasets() -> None:
    names = {d.name for d in catalog.datasets()}
    assert {"movielens-latest-small", "movielens-100k", "movielens-1m", "criteo", "avazu"} <= names
    assert catalog.info("movielens-latest-small").bundled
    assert not catalog.info("criteo").bundled


def test_latest_small_rating() -> None:
    ds = catalog.load("movielens-latest-small", task="rating", seed=1)
    assert sum(rows(ds)) == 100_836 and rows(ds)[0] == 80_669
    assert ds.schema.names == ["user", "item"]
    labels = ds.train.labels
    assert labels.min() == 0.5 and labels.max() == 5.0
    assert_frequency_sorted(ds)


def test_latest_small_ctr(latest_ctr: EncodedDataset) -> None:
    ds = latest_ctr
    assert sum(rows(ds)) == 100_836
    assert ds.schema.names == [
        "user", "item", "genres", "year", "hour_of_week", "user_tags", "item_tags"
    ]  # fmt: skip
    assert set(ds.train.labels.unique().tolist()) == {0.0, 1.0}
    genres = ds.train.ids[:, ds.schema.slot_range("genres")]
    assert (genres > 0).any(dim=1).float().mean() > 0.99
    assert (
        ds.cardinalities[ds.schema.index("genres")] == 20
    )  # 19 genres + OOV; "(no genres...)" dropped
    assert ds.cardinalities[ds.schema.index("hour_of_week")] == 169
    item_tags = ds.train.ids[:, ds.schema.slot_range("item_tags")]
    assert 0.2 < (item_tags > 0).any(dim=1).float().mean() < 0.9
    vocabulary = ds.encoder.fields[ds.schema.index("user_tags")].vocabulary
    assert vocabulary is not None and all(t == t.lower() for t in vocabulary)
    assert_frequency_sorted(ds)


def test_latest_small_topk_leave_last_out() -> None:
    ds = load_latest_small(task="topk")
    assert rows(ds) == [100_836 - 2 * 610, 610, 610]
    assert (ds.valid.ids[:, 0] > 0).all() and len(ds.test.ids[:, 0].unique()) == 610


def test_latest_small_options_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_cont"):
        load_latest_small(task="rating", min_cont=2)
    sparse = load_latest_small(task="rating", min_count=5)
    assert sparse.cardinalities[1] < 5000
    with pytest.raises(DataError, match="folder not found"):
        load_latest_small(task="rating", path=tmp_path / "nowhere")


def test_feature_helpers() -> None:
    import pandas as pd

    titles = pd.Series(["Toy Story (1995)", "Babylon 5", "Show (2006\u20132007)", "X (1999) "])
    assert title_year(titles).tolist()[::2] == ["1995", "2006"] and pd.isna(title_year(titles)[1])
    assert title_year(titles)[3] == "1999"
    # 1970-01-01 was a Thursday: 3 * 24 hours into the week, plus one hour.
    assert hour_of_week(pd.Series([3600])).tolist() == [3 * 24 + 1]


def test_movielens_100k_tasks() -> None:
    folder = shared("movielens-100k")
    rating = load_100k(task="rating", path=folder)
    assert sum(rows(rating)) == 100_000 and rating.train.labels.max() == 5.0
    ctr = load_100k(task="ctr", path=folder)
    assert ctr.schema.names == [
        "user", "item", "genres", "year", "hour_of_week", "age", "gender", "occupation", "zip"
    ]  # fmt: skip
    assert ctr.cardinalities[ctr.schema.index("gender")] == 3
    assert ctr.cardinalities[ctr.schema.index("occupation")] == 22
    assert ctr.schema["age"].kind == "numeric"
    assert abs(float(ctr.train.labels.mean()) - 55_375 / 100_000) < 0.01
    assert_frequency_sorted(ctr)
    topk = load_100k(task="topk", path=folder)
    assert rows(topk)[1:] == [943, 943]


def test_movielens_100k_non_numeric_rating(tmp_path: Path) -> None:
    folder = shared("movielens-100k")
    copy = tmp_path / "ml"
    shutil.copytree(folder, copy)
    lines = (copy / "u.data").read_text().splitlines()
    user, item, _, stamp = lines[41].split("\t")
    lines[41] = "\t".join([user, item, "four", stamp])
    (copy / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="'four' is not a number") as info:
        load_100k(task="rating", path=copy)
    assert info.value.path == str(copy / "u.data")
    assert (info.value.line, info.value.column) == (42, "rating")


def test_criteo_8k_own_split() -> None:
    ds = load_criteo(task="ctr", path=shared("criteo-8k"))
    assert rows(ds) == [7200, 409, 391]
    assert len(ds.schema.names) == 39 and ds.schema["I1"].kind == "numeric"
    assert abs(float(ds.train.labels.mean()) - 0.215) < 0.01
    assert_frequency_sorted(ds)
    c1 = ds.encoder.fields[ds.schema.index("C1")]
    assert c1.counts is not None and min(c1.counts) >= 2  # default min_count 2


def test_criteo_sample_with_header() -> None:
    ds = catalog.load("criteo", task="ctr", path=shared("criteo-sample") / "criteo_sample.txt")
    assert sum(rows(ds)) == 200
    assert float(ds.train.labels.sum() + ds.valid.labels.sum() + ds.test.labels.sum()) == 49


def test_criteo_bad_label_names_file_and_line(tmp_path: Path) -> None:
    source = shared("criteo-8k") / "dev.csv"
    lines = source.read_text().splitlines()
    lines[9] = "2" + lines[9][1:]
    path = tmp_path / "c.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="0/1") as info:
        load_criteo(task="ctr", path=path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 10, "label")


def test_avazu_8k_and_sample() -> None:
    ds = load_avazu(task="ctr", path=shared("avazu-8k"))
    assert rows(ds) == [8087, 480, 432]
    assert "id" not in ds.schema.names and ds.schema.names[:2] == ["hour_of_day", "weekday"]
    assert len(ds.schema.names) == 23
    assert_frequency_sorted(ds)
    # Every row is from 2014-10-21 00h, a Tuesday: one known value per time field.
    assert ds.encoder.fields[0].vocabulary == ["00"] and ds.encoder.fields[1].vocabulary == ["1"]
    sample = load_avazu(task="ctr", path=shared("avazu-sample") / "avazu_sample.txt")
    assert sum(rows(sample)) == 100


def test_movielens_1m_format(tmp_path: Path) -> None:
    """A tiny folder in the ML-1M layout: `::` separated, Latin-1, quotes left as they are."""
    ratings = "".join(
        f"{1 + i % 4}::{1 + i % 3}::{1 + i % 5}::{978300000 + i}\n" for i in range(40)
    )
    (tmp_path / "ratings.dat").write_text(ratings)
    movies = '1::"Great" Caf\xe9 (1999)::Comedy|Drama\n2::Heat (1995)::Action\n3::Odd::Horror\n'
    (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
    users = "".join(f"{u}::{'MF'[u % 2]}::25::{u}::{u}2345-678\n" for u in range(1, 5))
    (tmp_path / "users.dat").write_text(users)
    ds = catalog.load("movielens-1m", task="ctr", path=tmp_path)
    assert sum(rows(ds)) == 40
    assert ds.schema["age"].kind == "categorical"
    fields = {f.spec.name: f.vocabulary for f in ds.encoder.fields}
    assert set(fields["year"] or []) <= {"1999", "1995"} and set(fields["gender"] or []) == {
        "M",
        "F",
    }
    assert set(fields["zip"] or []) <= {"123", "223", "323", "423"}
    assert set(fields["genres"] or []) == {"Comedy", "Drama", "Action", "Horror"}
    assert rows(catalog.load("movielens-1m", task="topk", path=tmp_path))[1:] == [4, 4]
