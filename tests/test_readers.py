"""Readers and bring-your-own-data loading: every bad input is refused naming file, line, column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dnis.data.dataset import build_dataset
from dnis.data.readers import check_numeric, read_csv, read_libfm, read_parquet
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.tabular import load_files
from dnis.errors import ConfigError, DataError

SCHEMA = Schema((FeatureSpec("user"), FeatureSpec("item")), label="rating")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def ratings_csv(tmp_path: Path, rows: int = 20, name: str = "r.csv") -> Path:
    lines = [f"u{i % 5},i{i % 7},{1 + i % 5},{1000 + i}" for i in range(rows)]
    return write(tmp_path, name, "user,item,rating,time\n" + "\n".join(lines) + "\n")


def test_read_csv_strings_missing_values_and_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "a,b,c\n1,,x\n2,NA,y\n")
    frame = read_csv(path)
    assert list(frame.columns) == ["a", "b", "c"]
    assert frame["a"].tolist() == ["1", "2"]
    assert pd.isna(frame["b"].iloc[0]) and frame["b"].iloc[1] == "NA"
    assert frame.attrs == {"source": str(path), "first_line": 2}


def test_read_csv_blank_lines_and_quotes_keep_file_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "q.csv", 'a,b\n1,"x,y"\n\n2,"two\nlines"\n3,z\n')
    frame = read_csv(path)
    assert frame["b"].tolist() == ["x,y", "two\nlines", "z"]
    assert frame.attrs["lines"].tolist() == [2, 4, 6]


def test_read_csv_names_override_header_and_headerless(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "x,y\n1,2\n")
    assert list(read_csv(path, names=["p", "q"]).columns) == ["p", "q"]
    frame = read_csv(path, header=False, names=["p", "q"])
    assert frame["p"].tolist() == ["x", "1"] and frame.attrs["first_line"] == 1


def test_read_csv_multichar_delimiter_and_usecols(tmp_path: Path) -> None:
    path = write(tmp_path, "r.dat", "1::10::5\n2::20::3\n")
    frame = read_csv(path, delimiter="::", header=False, names=["u", "i", "r"])
    assert frame.values.tolist() == [["1", "10", "5"], ["2", "20", "3"]]
    header = write(tmp_path, "h.csv", "a,b\n1,2\n")
    assert list(read_csv(header, usecols=["b"]).columns) == ["b"]
    with pytest.raises(DataError, match=r"missing column\(s\) \['zz'\]"):
        read_csv(header, usecols=["zz"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as info:
        read_csv(tmp_path / "nope.csv")
    assert info.value.path == str(tmp_path / "nope.csv")


@pytest.mark.parametrize("text", ["", "\n\n", "a,b\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "e.csv", text)
    with pytest.raises(DataError, match="empty|no data rows") as info:
        read_csv(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", ["4,5,6,7", "4,5"])
def test_ragged_line_names_line_and_counts(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, "r.csv", f"a,b,c\n1,2,3\n\n{bad}\n8,9,10\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    error = info.value
    assert error.path == str(path) and error.line == 4
    assert f"expected 3 fields (as on line 1), found {bad.count(',') + 1}" in str(error)


def test_ragged_line_in_quoted_file(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", 'a,b\n1,"x,y"\n2,y,z\n')
    with pytest.raises(DataError, match="found 3") as info:
        read_csv(path)
    assert info.value.line == 3


def test_latin1_file_refused_as_utf8_and_read_as_latin1(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes("name,city\nx,Bogota\ny,Malm\xf6\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8") as info:
        read_csv(path)
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert "latin-1" in str(info.value) and "byte 7" in str(info.value)
    assert read_csv(path, encoding="latin-1")["city"].tolist() == ["Bogota", "Malm\xf6"]


def test_check_numeric_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "n.csv", "v,w\n1.5,a\n\n2,b\nthree,c\n")
    frame = read_csv(path)
    with pytest.raises(DataError, match="'three' is not a number") as info:
        check_numeric(frame, "v")
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 5, "v")
    ok = read_csv(write(tmp_path, "m.csv", "v\n1\n\n"))
    assert check_numeric(ok, "v").tolist() == [1.0]


def test_check_numeric_missing_values(tmp_path: Path) -> None:
    frame = read_csv(write(tmp_path, "n.csv", "v,w\n1,a\n,b\n"))
    assert np.isnan(check_numeric(frame, "v", allow_missing=True)[1])
    with pytest.raises(DataError, match="missing value") as info:
        check_numeric(frame, "v")
    assert info.value.line == 3


def test_read_libsvm_and_libffm(tmp_path: Path) -> None:
    svm = read_libfm(write(tmp_path, "a.libfm", "1 3:1 5:1\n0 2:1\n\n1 7:1.0\n"))
    assert svm["label"].tolist() == [1.0, 0.0, 1.0]
    assert svm["features"].tolist() == [["3", "5"], ["2"], ["7"]]
    assert svm.attrs["lines"].tolist() == [1, 2, 4]
    ffm = read_libfm(write(tmp_path, "a.ffm", "1 0:3:1 1:5:1\n0 1:2:1 1:4:1\n"))
    assert list(ffm.columns) == ["label", "f0", "f1"]
    assert ffm["f0"].tolist() == [["3"], []] and ffm["f1"].tolist() == [["5"], ["2", "4"]]


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("1 3:1 5:1\n0 2:1 oops\n", 2, 3, r"token 3 \('oops'\) is not idx:val"),
        ("1 0:3:1\n0 0:2:1 4:1\n", 2, 3, "is not field:idx:val"),
        ("1 3:1\n0 2:1 4:0.5\n", 2, 3, "value other than 1"),
        ("1 3:1\nyes 2:1\n", 2, 1, "label 'yes' is not a number"),
    ],
)
def test_malformed_libfm(tmp_path: Path, text: str, line: int, column: int, message: str) -> None:
    path = write(tmp_path, "bad.libfm", text)
    with pytest.raises(DataError, match=message) as info:
        read_libfm(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), line, column)


def test_read_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame({"user": ["a", "b"], "rating": [1.0, 2.0]}).to_parquet(path)
    assert read_parquet(path, columns=["rating"])["rating"].tolist() == [1.0, 2.0]
    with pytest.raises(DataError, match=r"missing column\(s\) \['x'\]"):
        read_parquet(path, columns=["x"])
    with pytest.raises(DataError, match="file not found"):
        read_parquet(tmp_path / "none.parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_parquet(write(tmp_path, "fake.parquet", "a,b\n"))


def test_load_files_csv_tsv_parquet_libfm(tmp_path: Path) -> None:
    path = ratings_csv(tmp_path)
    ds = load_files(format="csv", path=path, schema=SCHEMA, task="rating")
    assert sum(len(ds.split(s)) for s in ("train", "valid", "test")) == 20
    tsv = write(tmp_path, "r.tsv", path.read_text().replace(",", "\t"))
    assert len(load_files(format="tsv", path=tsv, schema=SCHEMA, task="rating").train) == 16
    parquet = tmp_path / "r.parquet"
    read_csv(path).to_parquet(parquet)
    assert len(load_files(format="parquet", path=parquet, schema=SCHEMA, task="rating").train) == 16
    libfm = write(tmp_path, "c.libfm", "".join(f"{i % 2} {i % 3}:1 9:1\n" for i in range(10)))
    schema = Schema((FeatureSpec("features", "sequence", max_len=2),), label="label")
    ds = load_files(format="libfm", path=libfm, schema=schema, task="ctr")
    assert ds.train.ids.shape == (8, 2)


def test_load_files_presplit_and_topk_times(tmp_path: Path) -> None:
    files = {s: ratings_csv(tmp_path, name=f"{s}.csv") for s in ("train", "valid", "test")}
    ds = load_files(format="csv", path=files, schema=SCHEMA, task="rating")
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [20, 20, 20]
    schema = Schema(
        (FeatureSpec("user"), FeatureSpec("item")), user="user", item="item", time="time"
    )
    # As strings, "999" (item i0) would sort last; as numbers 1019 (item i2) is the last.
    text = "user,item,time\n" + "".join(f"u,i{t % 3},{t}\n" for t in range(998, 1020))
    path = write(tmp_path, "t.csv", text)
    ds = load_files(format="csv", path=path, schema=schema, task="topk", split="leave_last_out")
    item = ds.encoder.fields[1]
    assert item.vocabulary is not None
    assert item.vocabulary[ds.test.ids[0, 1] - 1] == "i2"


def test_load_files_missing_column_names_it(tmp_path: Path) -> None:
    path = ratings_csv(tmp_path)
    schema = Schema((FeatureSpec("user"), FeatureSpec("movie")), label="rating")
    with pytest.raises(DataError, match=r"missing column\(s\) \['movie'\]") as info:
        load_files(format="csv", path=path, schema=schema, task="rating")
    assert info.value.path == str(path)


def test_load_files_non_numeric_rating_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "user,item,rating\na,x,4\nb,y,4.5\nc,z,five\n")
    with pytest.raises(DataError, match="'five' is not a number") as info:
        load_files(format="csv", path=path, schema=SCHEMA, task="rating")
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 4, "rating")


def test_load_files_ctr_label_outside_01(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "user,item,click\na,x,1\nb,y,0\n\nc,z,2\n")
    schema = Schema((FeatureSpec("user"), FeatureSpec("item")), label="click")
    with pytest.raises(DataError, match="'2' is not a 0/1 click label") as info:
        load_files(format="csv", path=path, schema=schema, task="ctr")
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 5, "click")


def test_load_files_bad_time_and_bad_options(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", "user,item,time\na,x,2024-01-01\nb,y,yesterday\n")
    schema = Schema(
        (FeatureSpec("user"), FeatureSpec("item")), user="user", item="item", time="time"
    )
    with pytest.raises(DataError, match="'yesterday' is neither") as info:
        load_files(format="csv", path=path, schema=schema, task="topk")
    assert info.value.line == 3
    with pytest.raises(ConfigError, match="format"):
        load_files(format="xlsx", path=path, schema=schema, task="topk")
    with pytest.raises(ConfigError, match="keys"):
        load_files(format="csv", path={"train": path}, schema=schema, task="topk")


def test_unseen_category_at_evaluation_is_oov() -> None:
    parts = {
        "train": pd.DataFrame(
            {"user": ["a", "a", "b"], "item": ["x", "y", "x"], "rating": [1, 2, 3]}
        ),
        "valid": pd.DataFrame({"user": ["new"], "item": ["x"], "rating": [4]}),
        "test": pd.DataFrame({"user": ["b"], "item": ["unseen"], "rating": [5]}),
    }
    ds = build_dataset(parts, SCHEMA, "rating")
    assert ds.valid.ids.tolist() == [[0, 1]]
    assert ds.test.ids.tolist() == [[2, 0]]
    assert ds.cardinalities == [3, 3]


def test_non_ascii_compatible_encoding_is_refused_clearly(tmp_path):
    from dnis.data.readers import read_csv
    from dnis.errors import DataError

    path = tmp_path / "utf16.csv"
    path.write_bytes("a,b\n1,2\n".encode("utf-16"))
    with pytest.raises(DataError, match="not ASCII-compatible") as error:
        read_csv(path, encoding="utf-16")
    assert str(path) in str(error.value) and "UTF-8" in str(error.value)


@pytest.mark.parametrize(
    "content",
    [b"a,b\nx\ry,1\n", b"a\nx\ry\n", b"a\n \nx\n"],
    ids=["lone-cr-ragged", "lone-cr", "whitespace-line"],
)
def test_rows_are_never_lost_or_invented_silently(tmp_path, content):
    from dnis.data.readers import read_csv
    from dnis.errors import DataError

    path = tmp_path / "odd.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match="non-blank data lines"):
        read_csv(path)
