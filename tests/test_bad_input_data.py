"""Bad input data (issue 15): each case loads as expected or raises a DataError a user can act on.

Compressed files are read by their first bytes (gzip, bzip2, xz, a one-file zip), a UTF-8
byte-order mark is dropped, and duplicated column names, nested Parquet values in a scalar feature
and numeric columns without one finite value are refused naming the file (the line and column
where there is one) and a fix, never with pandas' or pyarrow's own text.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnis.cli import main
from dnis.data.dataset import EncodedDataset
from dnis.data.readers import read_csv, read_libfm
from dnis.data.schema import Schema
from dnis.data.tabular import load_files
from dnis.errors import DataError

N_ROWS = 200
CSV = "user,item,age,label\n" + "".join(
    f"u{i % 7},i{i % 11},{i % 50},{i % 2}\n" for i in range(N_ROWS)
)
LIBFM = "".join(f"{i % 2} {i % 5}:1 {5 + i % 3}:1\n" for i in range(N_ROWS))
PLAIN = {"csv": CSV.encode(), "tsv": CSV.replace(",", "\t").encode(), "libfm": LIBFM.encode()}
FEATURES: dict[str, list[Any]] = {
    "csv": ["user", "item", {"name": "age", "kind": "numeric", "buckets": 4}],
    "libfm": [{"name": "features", "kind": "sequence", "max_len": 2}],
}
BOM = codecs.BOM_UTF8


def load(path: Path, format: str = "csv", features: list[Any] | None = None, **options: Any):
    """`load_files` for a CTR dataset with the label column `label`."""
    features = features or FEATURES["libfm" if format == "libfm" else "csv"]
    schema = Schema.from_dict({"features": features, "label": "label"})
    return load_files(format=format, path=path, schema=schema, task="ctr", **options)


def zipped(*members: str) -> Callable[[bytes], bytes]:
    """A zip archive holding the content under each member name."""

    def make(content: bytes) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for member in members:
                archive.writestr(member, content)
        return buffer.getvalue()

    return make


def same(a: EncodedDataset, b: EncodedDataset) -> bool:
    return a.cardinalities == b.cardinalities and all(
        torch.equal(a.split(s).ids, b.split(s).ids)
        and torch.equal(a.split(s).labels, b.split(s).labels)
        for s in ("train", "valid", "test")
    )


def check_refusal(
    error: DataError, path: Path, match: str, line: int | None, column: str | None, fix: str
) -> None:
    """The error names the file, line and column, says what is wrong and how to fix it."""
    text = str(error)
    assert error.path == str(path) and text.startswith(str(path)), text
    assert re.search(match, text), text
    assert (error.line, error.column) == (line, column), text
    assert error.fix is not None and fix in error.fix, text
    assert "Traceback" not in text and "pyarrow" not in text and "pandas" not in text


# ---------------------------------------------------------------- files that must read as plain


@pytest.mark.parametrize(
    ("name", "format", "wrap", "options"),
    [
        pytest.param("data.csv", "csv", gzip.compress, {}, id="gzip-named-csv"),
        pytest.param("data.csv.gz", "csv", gzip.compress, {}, id="csv.gz"),
        pytest.param("data.gz", "csv", gzip.compress, {}, id="gz"),
        pytest.param("data.tsv.gz", "tsv", gzip.compress, {}, id="tsv.gz"),
        pytest.param("data.csv.bz2", "csv", bz2.compress, {}, id="bzip2"),
        pytest.param("data.csv.xz", "csv", lzma.compress, {}, id="xz"),
        pytest.param("data.zip", "csv", zipped("data.csv"), {}, id="zip-of-one-file"),
        pytest.param("data.csv.gz", "csv", lambda b: b, {}, id="plain-named-gz"),
        pytest.param("data.libfm", "libfm", gzip.compress, {}, id="libfm-gzip"),
        pytest.param("data.csv", "csv", lambda b: BOM + b, {}, id="bom-default-encoding"),
        pytest.param(
            "data.csv", "csv", lambda b: BOM + b, {"encoding": "utf-8-sig"}, id="bom-utf-8-sig"
        ),
        pytest.param("data.csv", "csv", lambda b: b, {"encoding": "UTF-8-SIG"}, id="no-bom-sig"),
        pytest.param("data.csv", "csv", lambda b: gzip.compress(BOM + b), {}, id="gzip-of-bom"),
        pytest.param("data.libfm", "libfm", lambda b: BOM + b, {}, id="libfm-bom"),
    ],
)
def test_compressed_and_bom_files_read_like_the_plain_file(
    tmp_path: Path, name: str, format: str, wrap: Callable[[bytes], bytes], options: dict
) -> None:
    plain = tmp_path / f"plain.{format}"
    plain.write_bytes(PLAIN[format])
    odd = tmp_path / name
    odd.write_bytes(wrap(PLAIN[format]))
    if format != "libfm":
        columns = read_csv(odd, delimiter="\t" if format == "tsv" else ",", **options).columns
        assert list(columns) == ["user", "item", "age", "label"]  # no '\ufeffuser'
    else:
        assert read_libfm(odd, **options)["features"].equals(read_libfm(plain)["features"])
    assert same(load(odd, format, **options), load(plain, format))


# ---------------------------------------------------------------- files that must be refused


def _two_column_parquet(path: Path) -> None:
    pq.write_table(pa.table([pa.array([1, 2]), pa.array([0, 1])], names=["user", "user"]), path)


@pytest.mark.parametrize(
    ("name", "content", "options", "match", "line", "column", "fix"),
    [
        pytest.param(
            "data.zip",
            zipped("a.csv", "b.csv")(CSV.encode()),
            {},
            r"zip archive of 2 files \['a.csv', 'b.csv'\]",
            None,
            None,
            "unzip it",
            id="zip-of-two-files",
        ),
        pytest.param(
            "data.csv.zst",
            b"\x28\xb5\x2f\xfd" + b"\x00" * 20,
            {},
            "zstd-compressed",
            None,
            None,
            "zstd -d",
            id="zstd",
        ),
        pytest.param(
            "data.csv.gz",
            gzip.compress(CSV.encode())[:60],
            {},
            "gzip-compressed but does not decompress",
            None,
            None,
            "truncated",
            id="truncated-gzip",
        ),
        pytest.param(
            "data.csv",
            CSV.encode("utf-16"),
            {},
            "UTF-16 or UTF-32",
            None,
            None,
            "iconv",
            id="utf-16-bom",
        ),
        pytest.param(
            "data.csv",
            CSV.encode(),
            {"encoding": "utf-9"},
            "'utf-9' is not a known text encoding",
            None,
            None,
            "codec name",
            id="unknown-encoding",
        ),
        pytest.param(
            "data.csv",
            CSV.encode(),
            {"encoding": "rot13"},
            "'rot13' is not a known text encoding",
            None,
            None,
            "codec name",
            id="not-a-text-encoding",
        ),
        pytest.param(
            "data.csv",
            CSV.replace("age,label", "user,label", 1).encode(),
            {},
            r"\['user'\] appear more than once",
            1,
            "user",
            "`names:`",
            id="duplicate-header",
        ),
        pytest.param(
            "data.csv",
            b"\n\n" + CSV.replace("item,age", "item, user", 1).encode(),
            {},
            r"\['user'\] appear more than once",
            3,
            "user",
            "`names:`",
            id="duplicate-header-after-blank-lines",
        ),
        pytest.param(
            "data.csv.gz",
            gzip.compress(BOM + CSV.replace("user,item", "item,item", 1).encode()),
            {},
            r"\['item'\] appear more than once",
            1,
            "item",
            "`names:`",
            id="duplicate-header-gzip-bom",
        ),
        pytest.param(
            "data.csv",
            CSV.encode(),
            {"names": ["user", "item", "user", "label"]},
            r"\['user'\] appear more than once",
            None,
            "user",
            "`names:`",
            id="duplicate-names-option",
        ),
        pytest.param(
            "data.csv",
            re.sub(r",\d+,(\d)\n", r",,\1\n", CSV).encode(),
            {},
            "numeric feature 'age' has no finite number",
            None,
            "age",
            "kind: categorical",
            id="numeric-all-missing",
        ),
        pytest.param(
            "data.csv",
            re.sub(r",\d+,(\d)\n", r",inf,\1\n", CSV).encode(),
            {},
            r"no finite number .*\(160 infinite",
            None,
            "age",
            "kind: categorical",
            id="numeric-all-inf",
        ),
        pytest.param(
            "data.csv",
            re.sub(r",\d+,(\d)\n", r",n/a,\1\n", CSV).encode(),
            {},
            "numeric feature 'age' has no finite number",
            None,
            "age",
            "kind: categorical",
            id="numeric-all-text",
        ),
    ],
)
def test_bad_text_files_are_refused_clearly(
    tmp_path: Path,
    name: str,
    content: bytes,
    options: dict,
    match: str,
    line: int | None,
    column: str | None,
    fix: str,
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load(path, **options)
    check_refusal(error.value, path, match, line, column, fix)


LISTS = [[i % 3, 4] for i in range(N_ROWS)]
STRUCTS = [{"x": i % 3, "y": 1} for i in range(N_ROWS)]


@pytest.mark.parametrize(
    ("values", "feature", "match", "fix"),
    [
        pytest.param(LISTS, "tags", r"categorical .* row 1 holds a list \(\[0 4\]", "kind: sequence", id="list-categorical"),
        pytest.param(LISTS, {"name": "tags", "kind": "numeric"}, "numeric .* holds a list", "one number", id="list-numeric"),
        pytest.param(STRUCTS, "tags", "holds a struct", "flatten", id="struct-categorical"),
        pytest.param(STRUCTS, {"name": "tags", "kind": "sequence", "max_len": 2}, "sequence .* takes lists of values, .* struct", "flatten", id="struct-sequence"),
        pytest.param([None] + LISTS[1:], "tags", "row 2 holds a list", "kind: sequence", id="list-after-missing"),
        pytest.param(LISTS, {"name": "tags", "kind": "sequence", "max_len": 2}, None, None, id="list-sequence-ok"),
        pytest.param([str(i % 3) for i in range(N_ROWS)], "tags", None, None, id="scalar-ok"),
    ],
)  # fmt: skip
def test_nested_parquet_values_only_feed_sequence_features(
    tmp_path: Path, values: list, feature: Any, match: str | None, fix: str | None
) -> None:
    path = tmp_path / "data.parquet"
    table = {"user": [f"u{i % 7}" for i in range(N_ROWS)], "tags": values}
    pq.write_table(pa.table({**table, "label": [i % 2 for i in range(N_ROWS)]}), path)
    if match is None:
        distinct = {str(v) for row in values for v in (row if isinstance(row, list) else [row])}
        assert load(path, "parquet", ["user", feature]).cardinalities[1] == len(distinct) + 1
        return
    with pytest.raises(DataError) as error:
        load(path, "parquet", ["user", feature])
    check_refusal(error.value, path, match, None, "tags", fix)


def test_duplicate_parquet_columns_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.parquet"
    _two_column_parquet(path)
    with pytest.raises(DataError) as error:
        load(path, "parquet", ["user"])
    check_refusal(error.value, path, r"\['user'\] appear more than once", None, "user", "rename")


@pytest.mark.parametrize(
    "ages",
    [
        pytest.param([(np.inf, -np.inf, i)[i % 3] for i in range(N_ROWS)], id="many-inf"),
        pytest.param([np.nan if i % 3 else float(i) for i in range(N_ROWS)], id="some-missing"),
        pytest.param([np.inf if i % 2 else 5.0 for i in range(N_ROWS)], id="one-finite-value"),
    ],
)
def test_numeric_edges_come_from_finite_values(tmp_path: Path, ages: list[float]) -> None:
    path = tmp_path / "data.parquet"
    frame = pd.read_csv(io.StringIO(CSV)).assign(age=ages)
    frame.to_parquet(path)
    field = load(path, "parquet").encoder.fields[2]
    assert field.edges and np.all(np.isfinite(field.edges))
    ids = field.transform(pd.Series([-np.inf, np.inf, np.nan])).ravel().tolist()
    assert ids == [1, len(field.edges) + 1, 0]  # infinities in the outer buckets, NaN is OOV


@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        pytest.param(BOM + CSV.encode(), None, id="bom"),
        pytest.param(gzip.compress(CSV.encode()), "gzip-compressed", id="gzip"),
    ],
)
def test_streaming_reads_a_bom_and_names_compression(
    tmp_path: Path, content: bytes, refusal: str | None
) -> None:
    from dnis.data.streaming import StreamingOptions

    path = tmp_path / "data.csv"
    path.write_bytes(content)
    options = StreamingOptions(cache_dir=tmp_path / "cache")
    if refusal is None:
        assert load(path, streaming=options).cardinalities == load(path).cardinalities
        return
    with pytest.raises(DataError) as error:
        load(path, streaming=options)
    check_refusal(error.value, path, refusal, None, None, "gunzip")


# ---------------------------------------------------------------- through the command line


def _config(tmp_path: Path, data: Path, format: str = "csv") -> Path:
    config = {
        "name": "bad-input",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "dataset": {
            "format": format,
            "path": str(data),
            "task": "ctr",
            "schema": {"features": FEATURES["csv"], "label": "label"},
        },
        "model": {"name": "fm", "params": {}},
        "embedding": {"dim": 4, "init_std": 0.05},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "patience": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _write_nested_parquet(path: Path) -> None:
    frame = pd.read_csv(io.StringIO(CSV))
    frame["user"] = [[i % 3, 4] for i in range(N_ROWS)]
    frame.to_parquet(path)


@pytest.mark.parametrize(
    ("name", "write", "format", "refusal"),
    [
        pytest.param("data.csv", lambda p: p.write_bytes(gzip.compress(CSV.encode())), "csv", None, id="gzip-named-csv"),
        pytest.param("data.csv", lambda p: p.write_bytes(BOM + CSV.encode()), "csv", None, id="bom"),
        pytest.param("data.csv", lambda p: p.write_text(CSV.replace("item,age", "item,user", 1)), "csv", "line 1, column 'user'", id="duplicate-header"),
        pytest.param("data.csv", lambda p: p.write_text(re.sub(r",\d+,(\d)\n", r",,\1\n", CSV)), "csv", "column 'age': numeric feature", id="numeric-all-missing"),
        pytest.param("data.parquet", _write_nested_parquet, "parquet", "column 'user': categorical feature 'user'", id="parquet-list"),
    ],
)  # fmt: skip
def test_cli_train_reads_or_refuses_without_traceback(
    tmp_path: Path,
    capsys,
    name: str,
    write: Callable[[Path], Any],
    format: str,
    refusal: str | None,
) -> None:
    data = tmp_path / name
    write(data)
    code = main(["train", "--config", str(_config(tmp_path, data, format)), "--quiet"])
    out, err = capsys.readouterr()
    if refusal is None:
        assert code == 0, err
        assert Path(json.loads(out)["run_dir"]).is_dir()
        return
    assert code == 2
    assert str(data) in "".join(err.split())  # rich may wrap the path anywhere
    flat = " ".join(err.split())
    assert refusal in flat and "fix:" in flat and "Traceback" not in flat


# ---------------------------------------------------------------- fuzzing


FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELD = st.text(alphabet="abcxyz019._-", min_size=1, max_size=5)


@st.composite
def valid_csv(draw) -> bytes:
    """A well-formed CSV (distinct header names, no quoting needed) as bytes."""
    ncols = draw(st.integers(1, 4))
    header = draw(st.lists(FIELD, min_size=ncols, max_size=ncols, unique=True))
    rows = draw(st.lists(st.lists(FIELD, min_size=ncols, max_size=ncols), min_size=1, max_size=6))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(",".join(row) for row in [header, *rows]).encode() + newline.encode()


COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress, "zip": zipped("f")}
MAGIC = [b"\x1f\x8b", b"BZh91AY&SY", b"\xfd7zXZ\x00", b"PK\x03\x04", b"PK\x05\x06", b"(\xb5/\xfd"]
WRAPS = st.sampled_from(["gzip", "bzip2", "xz", "zip", "bom", "gzip+bom"])


def wrap(kind: str, content: bytes) -> bytes:
    if kind == "bom":
        return BOM + content
    if kind == "gzip+bom":
        return gzip.compress(BOM + content)
    return COMPRESS[kind](content)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-bad-input")


@FUZZ
@given(content=valid_csv(), kind=WRAPS)
def test_wrapped_valid_csv_reads_like_the_plain_file(
    folder: Path, content: bytes, kind: str
) -> None:
    plain, wrapped = folder / "plain.csv", folder / "wrapped.csv"
    plain.write_bytes(content)
    wrapped.write_bytes(wrap(kind, content))
    expected, got = read_csv(plain), read_csv(wrapped)
    pd.testing.assert_frame_equal(got, expected)
    assert got.attrs.get("first_line") == expected.attrs.get("first_line")


@st.composite
def damaged(draw) -> bytes:
    """Random bytes after a magic, or a compressed or BOM-prefixed valid file, cut or altered."""
    if draw(st.booleans()):
        prefix = draw(st.sampled_from([b"", BOM, b"\xff\xfe", *MAGIC]))
        return prefix + draw(st.binary(max_size=60))
    data = bytearray(wrap(draw(WRAPS), draw(valid_csv())))
    at = draw(st.integers(0, len(data) - 1))
    if draw(st.booleans()):
        return bytes(data[:at])
    data[at] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(raw=damaged(), libfm=st.booleans())
def test_damaged_input_parses_or_raises_data_error(folder: Path, raw: bytes, libfm: bool) -> None:
    path = folder / ("f.libfm" if libfm else "f.csv")
    path.write_bytes(raw)
    try:
        frame = (read_libfm if libfm else read_csv)(path)
    except DataError as error:
        assert error.path == str(path) and str(path) in str(error)
    else:
        assert len(frame) >= 1 and not any(str(c).startswith("\ufeff") for c in frame.columns)
