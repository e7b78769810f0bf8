"""Fuzzing the readers: malformed CSV and libFM input parses consistently or raises DataError.

Nothing but `DataError` may escape `read_csv` / `read_libfm` or the streamed CSV reader of
`dnis.data.streaming`; a DataError names the file, and for ragged rows, undecodable bytes and bad
libFM tokens also the line. Well-formed input generated here must round-trip exactly (rows,
columns, values), and the streamed reader must read what `read_csv` reads, with its errors.
"""

from __future__ import annotations

import csv
import io
import math
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dnis.data.readers import read_csv, read_libfm
from dnis.data.streaming.sources import CsvFile
from dnis.errors import DataError

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DELIMITERS = [",", "\t", ";", "|"]
# plain field characters: no delimiter, quote, line break or blank-only trouble
PLAIN = st.text(alphabet="abcxyz019 ._-", min_size=1, max_size=6).filter(lambda s: s.strip())
# characters that make quoting necessary or tricky
# (no lone \r: such files are refused, see the notes at the end of this file)
NASTY = st.text(alphabet="ab1 ,;|\t\"\n'", max_size=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def put(folder: Path, data: bytes, name: str = "f.csv") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def read_or_refuse(reader, path: Path, **kwargs) -> pd.DataFrame | DataError:
    """Call the reader; a DataError is returned (after checking it names the file)."""
    try:
        return reader(path, **kwargs)
    except DataError as error:
        assert error.path == str(path) and str(path) in str(error), error
        return error


def line_of_byte(data: bytes, at: int) -> int:
    return data.count(b"\n", 0, at) + 1


# ---------------------------------------------------------------- CSV: well-formed round trip


@st.composite
def table(draw, fields=PLAIN):
    ncols = draw(st.integers(1, 4))
    header = draw(st.lists(PLAIN, min_size=ncols, max_size=ncols, unique_by=str.strip))
    rows = draw(
        st.lists(
            st.lists(st.one_of(st.just(""), fields), min_size=ncols, max_size=ncols),
            min_size=1,
            max_size=6,
        )
    )
    return header, rows


def render(header, rows, delimiter, newline, blanks, trailing) -> tuple[bytes, list[int]]:
    """CSV bytes via the csv module, blank lines inserted before rows; file line of each row."""
    out, lines, line = [], [], 1
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    for i, record in enumerate([header, *rows]):
        for _ in range(blanks[i % len(blanks)] if i else 0):
            out.append(newline)
            line += 1
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(record)
        text = buffer.getvalue()
        if i:
            lines.append(line)
        out.append(text)
        line += text.count("\n")
    text = "".join(out)
    if not trailing:
        text = text[: -len(newline)]
    return text.encode("utf-8"), lines


def expected_frame(header, rows) -> pd.DataFrame:
    columns = [name.strip() for name in header]
    values = [[None if v == "" else v for v in row] for row in rows]
    return pd.DataFrame(values, columns=columns, dtype=object)


@FUZZ
@given(
    data=table(),
    delimiter=st.sampled_from(DELIMITERS),
    newline=st.sampled_from(["\n", "\r\n"]),
    blanks=st.lists(st.integers(0, 2), min_size=1, max_size=4),
    trailing=st.booleans(),
)
def test_csv_plain_round_trip(folder, data, delimiter, newline, blanks, trailing) -> None:
    header, rows = data
    assume(any(v != "" for row in rows for v in row) or len(header) > 1)  # not all-blank lines
    raw, lines = render(header, rows, delimiter, newline, blanks, trailing)
    frame = read_csv(put(folder, raw), delimiter=delimiter)
    check_frame(frame, header, rows, lines)


@FUZZ
@given(
    data=table(fields=NASTY),
    delimiter=st.sampled_from(DELIMITERS),
    newline=st.sampled_from(["\n", "\r\n"]),
    trailing=st.booleans(),
)
def test_csv_quoted_round_trip(folder, data, delimiter, newline, trailing) -> None:
    header, rows = data
    assume(all(delimiter.join(row).strip() for row in rows))  # see the notes at the end
    raw, lines = render(header, rows, delimiter, newline, [0], trailing)
    frame = read_csv(put(folder, raw), delimiter=delimiter)
    check_frame(frame, header, rows, lines)


def check_frame(frame: pd.DataFrame, header, rows, lines) -> None:
    expected = expected_frame(header, rows)
    assert list(frame.columns) == list(expected.columns)
    assert len(frame) == len(rows)
    got = frame.astype(object).where(frame.notna(), None).values.tolist()
    assert got == expected.values.tolist()
    if "lines" in frame.attrs:
        assert frame.attrs["lines"].tolist() == lines
    else:
        assert frame.attrs["first_line"] == lines[0] and lines == list(
            range(lines[0], lines[0] + len(lines))
        )


# ---------------------------------------------------------------- CSV: ragged and undecodable


@FUZZ
@given(
    data=table(),
    delimiter=st.sampled_from(DELIMITERS),
    which=st.integers(0, 10),
    extra=st.sampled_from([-1, 1, 2]),
    blanks=st.lists(st.integers(0, 2), min_size=1, max_size=4),
)
def test_csv_ragged_row_names_its_line(folder, data, delimiter, which, extra, blanks) -> None:
    header, rows = data
    which %= len(rows)
    row = rows[which]
    assume(len(row) + extra >= 1)
    ragged = row[: len(row) + extra] if extra < 0 else row + ["z"] * extra
    assume(any(v != "" for v in ragged))
    rows = [*rows[:which], ragged, *rows[which + 1 :]]
    raw, lines = render(header, rows, delimiter, "\n", blanks, True)
    result = read_or_refuse(read_csv, put(folder, raw), delimiter=delimiter)
    assert isinstance(result, DataError), "a ragged row was accepted"
    assert result.line == lines[which], str(result)
    assert "expected" in str(result) and "fields" in str(result)


BAD_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\xc3", b"\x80", b"\xe2\x82", b"\xed\xa0\x80"])


@FUZZ
@given(data=table(fields=NASTY), bad=BAD_UTF8, where=st.floats(0, 1))
def test_csv_undecodable_bytes_name_the_line(folder, data, bad, where) -> None:
    header, rows = data
    raw, _ = render(header, rows, ",", "\n", [0], True)
    at = int(where * len(raw))
    raw = raw[:at] + bad + raw[at:]
    result = read_or_refuse(read_csv, put(folder, raw))
    assert isinstance(result, DataError), "undecodable bytes were accepted"
    assert result.line == line_of_byte(raw, at), str(result)
    assert "not valid utf-8" in str(result)


# ---------------------------------------------------------------- CSV: anything at all

GARBAGE_TEXT = st.text(alphabet="ab1 ,;|\t\"'\r\n\\#\x00\x1f\x0b\x0c\x1c\x85\u2028é", max_size=60)


@FUZZ
@given(
    raw=st.one_of(GARBAGE_TEXT.map(lambda s: s.encode("utf-8")), st.binary(max_size=60)),
    delimiter=st.sampled_from([*DELIMITERS, "::"]),
    header=st.booleans(),
    quoted=st.booleans(),
    names=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c d", ""]), max_size=3)),
    # ASCII-compatible encodings only: see the note on UTF-16 at the end of this file
    encoding=st.sampled_from(["utf-8", "latin-1", "cp1252", "ascii"]),
)
def test_csv_garbage_parses_or_raises_data_error(
    folder, raw, delimiter, header, quoted, names, encoding
) -> None:
    result = read_or_refuse(
        read_csv,
        put(folder, raw),
        delimiter=delimiter,
        header=header,
        names=names,
        encoding=encoding,
        quotechar='"' if quoted else None,
    )
    if isinstance(result, pd.DataFrame):
        assert len(result) >= 1 and len(result.columns) >= 1
        assert len(set(result.columns)) == len(result.columns)
        if names is not None:
            assert list(result.columns) == names
        if "lines" in result.attrs:
            assert len(result.attrs["lines"]) == len(result)


# ---------------------------------------------------------------- CSV: streamed like in memory


def read_streamed(path: Path, block_bytes: int, **kwargs) -> pd.DataFrame:
    """What `dnis.data.streaming` reads of a CSV file (pyarrow, in blocks), as a frame of strings
    with the file line of every row in `attrs`, like `read_csv` gives it."""
    source = CsvFile(
        path,
        kwargs.get("delimiter", ","),
        kwargs.get("header", True),
        kwargs.get("names"),
        kwargs.get("encoding", "utf-8"),
        block_bytes,
    )
    source.scan()
    chunks = list(source.chunks(source.columns))
    frame = pa.concat_tables([chunk.table for chunk in chunks]).to_pandas()
    frame.attrs["lines"] = source.lines(0, source.rows)
    return frame


def same_rows(streamed: pd.DataFrame, memory: pd.DataFrame) -> None:
    assert list(streamed.columns) == list(memory.columns)
    values = [f.astype(object).where(f.notna(), None).values.tolist() for f in (streamed, memory)]
    assert values[0] == values[1]
    first = memory.attrs.get("first_line")
    lines = memory.attrs["lines"] if first is None else first + np.arange(len(memory))
    assert streamed.attrs["lines"].tolist() == list(lines)


@FUZZ
@given(
    data=table(fields=NASTY),
    delimiter=st.sampled_from([*DELIMITERS, "::"]),
    newline=st.sampled_from(["\n", "\r\n"]),
    blanks=st.lists(st.integers(0, 2), min_size=1, max_size=4),
    trailing=st.booleans(),
    encoding=st.sampled_from(["utf-8", "latin-1"]),
    block_bytes=st.integers(1, 100),
)
def test_streamed_csv_reads_like_read_csv(
    folder, data, delimiter, newline, blanks, trailing, encoding, block_bytes
) -> None:
    """Any block size (records cut anywhere, longer than a block, a "::" cut in two): the rows,
    values and file lines of `read_csv`."""
    header, rows = data
    assume(all((delimiter if delimiter != "::" else ",").join(row).strip() for row in rows))
    sep = "\x00" if delimiter == "::" else delimiter  # csv.writer writes one-character delimiters
    raw, _ = render(header, rows, sep, newline, blanks, trailing)
    raw = raw.replace(b"\x00", b"::").decode("utf-8").encode(encoding)
    path = put(folder, raw)
    memory = read_or_refuse(read_csv, path, delimiter=delimiter, encoding=encoding)
    assume(isinstance(memory, pd.DataFrame))  # a field holding "::" is ragged: both refuse it
    same_rows(read_streamed(path, block_bytes, delimiter=delimiter, encoding=encoding), memory)


@FUZZ
@given(
    raw=st.one_of(GARBAGE_TEXT.map(lambda s: s.encode("utf-8")), st.binary(max_size=60)),
    delimiter=st.sampled_from([*DELIMITERS, "::"]),
    header=st.booleans(),
    names=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c d", ""]), max_size=3)),
    encoding=st.sampled_from(["utf-8", "latin-1", "cp1252"]),
    block_bytes=st.integers(1, 100),
)
def test_streamed_csv_garbage_reads_like_read_csv_or_is_refused(
    folder, raw, delimiter, header, names, encoding, block_bytes
) -> None:
    """Only a DataError naming the file escapes the streamed reader, and what `read_csv` reads it
    reads the same. Where the two parsers differ, on files nobody writes, it may refuse or read
    otherwise: a lone \\r next to white space (pandas drops a row of spaces that pyarrow keeps),
    a quote left open at the end of the file (pyarrow closes it), a line of spaces in a one-column
    file with quotes."""
    path = put(folder, raw)
    kwargs = dict(delimiter=delimiter, header=header, names=names, encoding=encoding)
    memory = read_or_refuse(read_csv, path, **kwargs)
    streamed = read_or_refuse(partial(read_streamed, block_bytes=block_bytes), path, **kwargs)
    if isinstance(memory, pd.DataFrame) and b"\r" not in raw.replace(b"\r\n", b""):
        assert isinstance(streamed, pd.DataFrame), str(streamed)
        same_rows(streamed, memory)


@FUZZ
@given(
    data=table(fields=NASTY),
    bad=BAD_UTF8,
    where=st.floats(0, 1),
    block_bytes=st.integers(1, 100),
    extra=st.sampled_from([0, -1, 1]),
    which=st.integers(0, 10),
)
def test_streamed_csv_errors_equal_read_csv(
    folder, data, bad, where, block_bytes, extra, which
) -> None:
    """An undecodable byte anywhere (a block edge too) or a ragged row: the very error of
    `read_csv` (message, line, fix)."""
    header, rows = data
    which %= len(rows)
    if extra:  # a ragged row instead of a bad byte
        row = rows[which]
        assume(len(row) + extra >= 1)
        rows = [
            *rows[:which],
            row[: len(row) + extra] if extra < 0 else [*row, "z"],
            *rows[which + 1 :],
        ]
        assume(all(",".join(row).strip() for row in rows))
    raw, _ = render(header, rows, ",", "\n", [0], True)
    if not extra:
        at = int(where * len(raw))
        raw = raw[:at] + bad + raw[at:]
    path = put(folder, raw)
    memory = read_or_refuse(read_csv, path)
    streamed = read_or_refuse(partial(read_streamed, block_bytes=block_bytes), path)
    assert isinstance(memory, DataError) == isinstance(streamed, DataError)
    if isinstance(memory, DataError):
        assert str(streamed) == str(memory)


# ---------------------------------------------------------------- libFM / libFFM

LABEL = st.sampled_from(["0", "1", "-1", "0.5", "+1", "1e0", "3"])
ID = st.text(alphabet="abz0189_-.", min_size=1, max_size=4)
FIELD = st.text(alphabet="0123ab", min_size=1, max_size=2)
BAD_LABEL = st.sampled_from(["x", "nan", "inf", "-inf", "1e999", "1..0", "--1", "1:1"])
BAD_TOKEN = st.sampled_from(["1", "1:", ":1", "1::1", "a:b:c:d", "1:x", "1:2", "1:0", "1:nan"])


@st.composite
def libfm_file(draw, ffm: bool):
    n = draw(st.integers(1, 6))
    lines = []
    for _ in range(n):
        k = draw(st.integers(0, 4))
        if ffm:
            tokens = [
                f"{draw(FIELD)}:{draw(ID)}:{draw(st.sampled_from(['1', '1.0']))}" for _ in range(k)
            ]
        else:
            tokens = [f"{draw(ID)}:{draw(st.sampled_from(['1', '1.0', '1e0']))}" for _ in range(k)]
        lines.append([draw(LABEL), *tokens])
    assume(any(len(line) > 1 for line in lines))
    blanks = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    sep = draw(st.sampled_from([" ", "\t", "  "]))
    return lines, blanks, sep


def render_libfm(lines, blanks, sep, newline="\n") -> tuple[bytes, list[int]]:
    out, numbers, line = [], [], 1
    for tokens, blank in zip(lines, blanks, strict=True):
        out.extend([""] * blank)
        line += blank
        numbers.append(line)
        out.append(sep.join(tokens))
        line += 1
    return (newline.join(out) + newline).encode("utf-8"), numbers


@FUZZ
@given(spec=st.booleans().flatmap(lambda ffm: st.tuples(st.just(ffm), libfm_file(ffm))))
def test_libfm_round_trip(folder, spec) -> None:
    ffm, (lines, blanks, sep) = spec
    raw, numbers = render_libfm(lines, blanks, sep)
    frame = read_libfm(put(folder, raw, "f.libfm"))
    assert frame["label"].tolist() == [float(tokens[0]) for tokens in lines]
    if not ffm:
        assert frame["features"].tolist() == [[t.split(":")[0] for t in tk[1:]] for tk in lines]
    else:
        fields = sorted({t.split(":")[0] for tk in lines for t in tk[1:]})
        assert sorted(c[1:] for c in frame.columns if c != "label") == fields
        for field in fields:
            want = [[t.split(":")[1] for t in tk[1:] if t.split(":")[0] == field] for tk in lines]
            assert frame[f"f{field}"].tolist() == want
    if "lines" in frame.attrs:
        assert frame.attrs["lines"].tolist() == numbers
    else:
        assert (
            list(range(frame.attrs["first_line"], frame.attrs["first_line"] + len(lines)))
            == numbers
        )


def first_problem(lines, numbers) -> tuple[int, int] | None:
    """(file line, token position) of the first problem the libFM docstring promises to report:
    a non-numeric label, else a token not shaped like the file's first feature token, else a
    value other than 1."""
    for tokens, line in zip(lines, numbers, strict=True):
        try:
            ok = math.isfinite(float(tokens[0]))
        except ValueError:
            ok = False
        if not ok:
            return line, 1
    feats = [
        (n, i + 1, t) for tk, n in zip(lines, numbers, strict=True) for i, t in enumerate(tk) if i
    ]
    arity = feats[0][2].count(":")
    if arity not in (1, 2):
        return feats[0][:2]
    for line, position, token in feats:
        parts = token.split(":")
        if len(parts) != arity + 1 or not all(parts):
            return line, position
    for line, position, token in feats:
        try:
            one = float(token.split(":")[-1]) == 1.0
        except ValueError:
            one = False
        if not one:
            return line, position
    return None


@FUZZ
@given(
    spec=st.booleans().flatmap(lambda ffm: st.tuples(st.just(ffm), libfm_file(ffm))),
    which=st.integers(0, 10),
    bad_label=st.booleans(),
    label=BAD_LABEL,
    token=BAD_TOKEN,
    position=st.integers(0, 5),
)
def test_libfm_bad_token_names_line_and_position(
    folder, spec, which, bad_label, label, token, position
) -> None:
    _, (lines, blanks, sep) = spec
    which %= len(lines)
    tokens = list(lines[which])
    if bad_label:
        tokens[0] = label
    else:
        tokens.insert(1 + position % len(tokens), token)
    lines = [*lines[:which], tokens, *lines[which + 1 :]]
    raw, numbers = render_libfm(lines, blanks, sep)
    expected = first_problem(lines, numbers)
    assert expected is not None
    result = read_or_refuse(read_libfm, put(folder, raw, "f.libfm"))
    assert isinstance(result, DataError), f"a bad {'label' if bad_label else 'token'} was accepted"
    assert (result.line, result.column) == expected, str(result)


@FUZZ
@given(spec=libfm_file(False), bad=BAD_UTF8, where=st.floats(0, 1))
def test_libfm_undecodable_bytes_name_the_line(folder, spec, bad, where) -> None:
    raw, _ = render_libfm(*spec)
    at = int(where * len(raw))
    raw = raw[:at] + bad + raw[at:]
    result = read_or_refuse(read_libfm, put(folder, raw, "f.libfm"))
    assert isinstance(result, DataError), "undecodable bytes were accepted"
    assert result.line == line_of_byte(raw, at) and "not valid utf-8" in str(result)


LIBFM_GARBAGE = st.text(alphabet="01ab:. \t\n\r-+e\x0b\x1c\x85\u2028é#", max_size=60)


@FUZZ
@given(raw=st.one_of(LIBFM_GARBAGE.map(lambda s: s.encode("utf-8")), st.binary(max_size=40)))
def test_libfm_garbage_parses_or_raises_data_error(folder, raw) -> None:
    result = read_or_refuse(read_libfm, put(folder, raw, "f.libfm"))
    if isinstance(result, pd.DataFrame):
        assert "label" in result.columns and len(result) >= 1


# ---------------------------------------------------------------- notes: reader findings
#
# The fuzzers found three bugs in readers.py, all fixed: a non-ASCII-compatible encoding
# (UTF-16/32) crashed instead of being refused; a lone \r and a whitespace-only line made pandas
# and the line scan disagree on the row count, losing or adding rows silently. All three are now
# refused with a DataError naming the file and the fix (tests in test_readers.py).
