"""Raw file readers: CSV/TSV, Parquet and libFM/libFFM to DataFrames, with errors a user can act on.

Every reader records where its rows came from in ``frame.attrs``: ``source`` (the file path) and
either ``first_line`` (the 1-based file line of row 0, rows being consecutive lines) or ``lines``
(the file line of every row). `check_numeric` and `dnis.data.dataset.check_labels` use them to name
the exact line of a bad value. Malformed input raises `DataError`, never a parser stack trace.

Text files may be gzip, bzip2 or xz compressed, or a zip archive of one file: the format is told by
the file's first bytes, not its name. A UTF-8 byte-order mark is dropped.

`TableFiles` names the file(s) of a table and how to read them (the file options of
`dnis.data.tabular.load_files`). The checks and scanners below `read_csv` are public because
`dnis.data.streaming` reads files in chunks through the very same ones, so both give the same
errors.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import lzma
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dnis.data.cache import SPLIT_NAMES
from dnis.data.dataset import line_of
from dnis.data.encode import require_columns
from dnis.errors import ConfigError, DataError

# Stands in for a multi-byte delimiter (such as MovieLens-1M's "::"), which pandas' C parser lacks.
UNIT_SEPARATOR = b"\x1f"
# The formats of `TableFiles` and their default delimiter.
TABLE_FORMATS: dict[str, str | None] = {"csv": ",", "tsv": "\t", "parquet": None, "libfm": None}

# First bytes of each compressed format; bzip2's magic is followed by a block or end-of-stream mark
# so that a header such as "BZh1..." stays text.
_COMPRESSED: dict[str, re.Pattern[bytes]] = {
    "gzip": re.compile(rb"\x1f\x8b"),
    "bzip2": re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"),
    "xz": re.compile(rb"\xfd7zXZ\x00"),
    "zip": re.compile(rb"PK(\x03\x04|\x05\x06)"),
    "zstd": re.compile(rb"\x28\xb5\x2f\xfd"),
}
_DECOMPRESS = {"gzip": gzip.decompress, "bzip2": bz2.decompress, "xz": lzma.decompress}
# Byte-order marks of UTF-16/32, which ASCII-compatible decoding would turn into garbage.
_WIDE_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


@dataclass(frozen=True)
class TableFiles:
    """Which file(s) hold a table and how to read them: the file options of `load_files`.

    `path` is one file (to be split) or a mapping with ``train``, ``valid`` and ``test`` files
    (used as given). `delimiter` defaults to "," for csv and a tab for tsv; `header`, `names` and
    `encoding` apply to csv/tsv (and `encoding` to libfm).
    """

    format: str
    path: str | Path | Mapping[str, str | Path]
    delimiter: str | None = None
    header: bool = True
    names: list[str] | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.format not in TABLE_FORMATS:
            raise ConfigError(
                f"dataset format must be one of {sorted(TABLE_FORMATS)}, got {self.format!r}"
            )
        if isinstance(self.path, Mapping) and set(self.path) != set(SPLIT_NAMES):
            raise ConfigError(
                f"dataset path: a mapping needs the keys {list(SPLIT_NAMES)}, got "
                f"{sorted(self.path)}"
            )

    @property
    def files(self) -> dict[str, Path]:
        """{"all": file} for a single file, or the train/valid/test files of a mapping."""
        if not isinstance(self.path, Mapping):
            return {"all": Path(self.path)}
        return {split: Path(self.path[split]) for split in SPLIT_NAMES}

    @property
    def separator(self) -> str | None:
        """The delimiter of a csv/tsv file (given, or the format's); None for the others."""
        return self.delimiter or TABLE_FORMATS[self.format]

    def read(self, file: Path) -> pd.DataFrame:
        """One of the files, read into memory."""
        if self.format == "parquet":
            return read_parquet(file)
        if self.format == "libfm":
            return read_libfm(file, encoding=self.encoding)
        sep = self.separator
        assert sep is not None
        return read_csv(
            file, delimiter=sep, header=self.header, names=self.names, encoding=self.encoding
        )


def read_csv(
    path: str | Path,
    *,
    delimiter: str = ",",
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    usecols: list[str] | None = None,
    quotechar: str | None = '"',
) -> pd.DataFrame:
    """Read a delimited text file with every column as strings (empty fields are missing).

    `names` overrides the header row's names when `header` is true and names the columns of a
    headerless file otherwise. `quotechar=None` turns quoting off (for files such as MovieLens'
    whose titles contain stray quotes). A delimiter longer than one byte is supported.
    The file is checked before parsing: undecodable bytes and rows with the wrong number of fields
    are refused naming the line. The check is vectorised (numpy) unless the file contains quote
    characters, in which case the csv module walks it record by record.
    """
    path = Path(path)
    encoding = text_codec(encoding, path)
    raw = read_bytes(path, encoding)
    _check_encoding(raw, path, encoding)
    sep = delimiter.encode(encoding)
    if len(sep) != 1:
        if UNIT_SEPARATOR in raw:
            raise separator_in_file(path, delimiter)
        raw, sep = raw.replace(sep, UNIT_SEPARATOR), UNIT_SEPARATOR
    quoted = quotechar is not None and quotechar.encode(encoding) in raw
    if quoted:
        lines, counts = _scan_quoted(raw, path, sep.decode(encoding), quotechar, encoding)
    else:
        lines, counts = scan_plain(raw, sep)
    if len(lines) == 0 or (header and len(lines) == 1):
        raise DataError("the file has no data rows", path=path, fix="check the path and the file")
    expected = int(counts[0])
    check_ragged(lines, counts, expected, path, delimiter)
    columns = column_names(raw, sep, quotechar, encoding, header, names, expected, path)
    if usecols is not None:
        missing = [c for c in usecols if c not in columns]
        if missing:
            raise DataError(f"missing column(s) {missing}; the file has {columns}", path=path)
    try:
        frame = pd.read_csv(
            io.BytesIO(raw),
            sep=sep.decode(encoding),
            header=0 if header else None,
            names=columns,
            usecols=usecols,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding=encoding,
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
            quotechar=quotechar or '"',
            engine="c",
        )
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"could not parse the file: {error}", path=path) from None
    data_lines = lines[1:] if header else lines
    if len(frame) != len(data_lines):  # never lose or invent rows silently
        raise rows_lost(len(frame), len(data_lines), path)
    return _with_lines(frame, path, data_lines)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file (optionally only `columns`) with pyarrow; column types are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    check_file(path)
    try:
        available = pq.read_schema(path).names
        _check_unique(available, path, None, "rename the column where the file is written")
        missing = [c for c in columns or [] if c not in available]
        if missing:
            raise DataError(f"missing column(s) {missing}; the file has {available}", path=path)
        frame = pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"not a readable Parquet file: {error}", path=path) from None
    if len(frame) == 0:
        raise DataError("the file has no rows", path=path)
    frame.attrs["source"] = str(path)
    return frame


def read_libfm(path: str | Path, *, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a libSVM/libFM (``label idx:val ...``) or libFFM (``label field:idx:val ...``) file.

    Returns a float ``label`` column plus, for libSVM, one list column ``features`` of feature ids
    (strings), and for libFFM one list column ``f<field>`` per field; a row without a field gets an
    empty list. These map to ``sequence`` features. Only binary features are supported: a value
    other than 1 is refused (bucketise numeric values into separate feature ids first, the way
    Criteo-style pipelines do). Blank lines are skipped. Malformed tokens are refused naming the
    line and the token's position on it (the label is token 1).
    """
    path = Path(path)
    encoding = _codec(encoding, path)
    raw = read_bytes(path, encoding)
    _check_encoding(raw, path, encoding)
    text = pd.Series(raw.decode(encoding).splitlines(), dtype=object)
    lines = np.flatnonzero(text.str.strip().str.len().to_numpy() > 0) + 1
    if len(lines) == 0:
        raise DataError("the file has no data rows", path=path)
    tokens = text.iloc[lines - 1].str.split().reset_index(drop=True).explode()
    rows = tokens.index.to_numpy()
    position = pd.Series(rows).groupby(rows).cumcount().to_numpy() + 1
    labels = _libfm_labels(tokens[position == 1], path, lines)
    feats = tokens[position > 1].astype(str)
    if len(feats) == 0:
        raise DataError("no line has any feature token", path=path, fix="check the file format")
    where = (rows[position > 1], position[position > 1])
    parts, fields = _split_tokens(feats, where, path, lines)
    frame = pd.DataFrame({"label": labels})
    if fields is None:
        frame["features"] = _lists(parts[0], where[0], len(lines))
    else:
        for field in sorted(fields.unique(), key=_natural):
            mask = (fields == field).to_numpy()
            frame[f"f{field}"] = _lists(parts[0][mask], where[0][mask], len(lines))
    return _with_lines(frame, path, lines)


def check_numeric(frame: pd.DataFrame, column: str, *, allow_missing: bool = False) -> np.ndarray:
    """`column` as float64, or a DataError naming the file line of the first non-numeric value.

    Missing values become NaN when `allow_missing`, else they are refused like any non-number.
    """
    require_columns(frame, [column])
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if allow_missing:
        bad &= raw.notna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        shown = "a missing value" if pd.isna(raw.iloc[row]) else repr(raw.iloc[row])
        raise DataError(
            f"{shown} is not a number ({int(bad.sum())} bad row(s) in all)",
            path=frame.attrs.get("source"),
            line=line_of(frame, row),
            column=column,
            fix=f"clean the {column!r} column or declare it as a categorical feature",
        )
    return values


def check_times(frame: pd.DataFrame, column: str) -> pd.Series:
    """A time column as numbers (e.g. Unix seconds) or, failing that, ISO-8601 date-times; a value
    that is neither is refused naming its file line."""
    values = frame[column]
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers
    parsed = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        raise DataError(
            f"time {values.iloc[bad[0]]!r} is neither a number nor an ISO-8601 date-time",
            path=frame.attrs.get("source"),
            line=line_of(frame, int(bad[0])),
            column=column,
            fix="write times as Unix seconds or like 2024-01-31T12:00:00",
        )
    return parsed


def _codec(encoding: str, path: Path) -> str:
    """`encoding`, checked; any spelling of UTF-8 (utf-8-sig too) becomes "utf-8", since
    `read_bytes` drops the byte-order mark."""
    try:
        name = codecs.lookup(encoding).name
        "\n".encode(encoding)  # refuses codecs that are not text encodings, such as rot13
    except LookupError:
        raise DataError(
            f"{encoding!r} is not a known text encoding",
            path=path,
            fix="give a Python codec name, e.g. utf-8 or latin-1",
        ) from None
    return "utf-8" if name in ("utf-8", "utf-8-sig") else encoding


def text_codec(encoding: str, path: Path) -> str:
    """The encoding of a delimited text file, checked (see `_codec`): it must be ASCII-compatible,
    since the line and field checks look for newline and delimiter bytes."""
    encoding = _codec(encoding, path)
    if "\n,".encode(encoding, errors="replace") != b"\n,":
        raise DataError(
            f"encoding {encoding!r} is not ASCII-compatible (e.g. UTF-16), which the line and "
            "field checks rely on",
            path=path,
            fix="convert the file to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) and read it with the "
            "default encoding",
        )
    return encoding


def check_file(path: Path) -> None:
    """Refuse a path that is not a file."""
    if not path.is_file():
        hint = " (it is a folder)" if path.is_dir() else ""
        raise DataError(f"file not found{hint}", path=path, fix="check the path")


def without_bom(raw: bytes, path: Path, encoding: str) -> bytes:
    """The file's first bytes without a UTF-8 byte-order mark (Excel writes one); UTF-16 and
    UTF-32 files, told by their byte-order mark, are refused."""
    if encoding == "utf-8":
        raw = raw.removeprefix(codecs.BOM_UTF8)
    if "\n".encode(encoding) == b"\n" and raw.startswith(_WIDE_BOMS):
        raise DataError(
            "the file is UTF-16 or UTF-32 (it starts with their byte-order mark)",
            path=path,
            fix="convert the file to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) and read it with the "
            "default encoding",
        )
    return raw


def read_bytes(path: Path, encoding: str) -> bytes:
    """The file's bytes, decompressed and without a UTF-8 byte-order mark."""
    check_file(path)
    raw = without_bom(_decompressed(path.read_bytes(), path), path, encoding)
    if not raw.strip():
        raise DataError("the file is empty", path=path, fix="check the path and the file")
    return raw


def compression(raw: bytes) -> str | None:
    """The compressed format `raw` starts with, if any."""
    return next((name for name, magic in _COMPRESSED.items() if magic.match(raw)), None)


def _decompressed(raw: bytes, path: Path) -> bytes:
    """`raw` decompressed when its first bytes say it is gzip, bzip2, xz or a one-file zip."""
    kind = compression(raw)
    if kind is None:
        return raw
    if kind == "zstd":
        raise DataError(
            "the file is zstd-compressed, which dnis does not read",
            path=path,
            fix="decompress it first (zstd -d FILE) or recompress it with gzip",
        )
    try:
        return _unzipped(raw, path) if kind == "zip" else _DECOMPRESS[kind](raw)
    except (
        OSError,
        EOFError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        zlib.error,
        lzma.LZMAError,
        zipfile.BadZipFile,
    ) as error:
        raise DataError(
            f"the file is {kind}-compressed but does not decompress: {error}",
            path=path,
            fix="the file is probably truncated or corrupt: download or compress it again",
        ) from None


def _unzipped(raw: bytes, path: Path) -> bytes:
    """The one file in a zip archive; an archive of several files is ambiguous, so refused."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        members = [member for member in archive.infolist() if not member.is_dir()]
        if len(members) != 1:
            names = [member.filename for member in members[:5]]
            raise DataError(
                f"the file is a zip archive of {len(members)} files {names}; dnis reads an "
                "archive of exactly one file",
                path=path,
                fix="unzip it and point `path` at the file to read",
            )
        return archive.read(members[0])


def _check_encoding(raw: bytes, path: Path, encoding: str) -> None:
    """Refuse bytes that are not valid in `encoding`, naming the line and the byte within it."""
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as error:
        start = error.start
        kind = compression(raw)
        if kind is not None:  # a reader that does not decompress (streaming) got a compressed file
            raise compressed_error(kind, path) from None
        line_start = raw.rfind(b"\n", 0, start) + 1
        line = raw.count(b"\n", 0, start) + 1
        raise undecodable(raw[start], line, start - line_start + 1, path, encoding) from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}", path=path) from None


def rows_lost(rows: int, lines: int, path: Path) -> DataError:
    """The error for a parser that read `rows` rows from `lines` non-blank data lines."""
    return DataError(
        f"the parser read {rows} rows but the file has {lines} non-blank data lines",
        path=path,
        fix="look for a lone carriage return (\\r) inside a line or a line holding only spaces, "
        "and remove it (or save the file with \\n or \\r\\n line endings)",
    )


def undecodable(byte: int, line: int, column: int, path: Path, encoding: str) -> DataError:
    """The error for a byte that is not valid in `encoding`: byte `column` of file line `line`."""
    return DataError(
        f"byte 0x{byte:02x} at byte {column} of the line is not valid {encoding}",
        path=path,
        line=line,
        fix="pass the file's real encoding, e.g. latin-1 (or cp1252): dataset.encoding in a "
        "config, --encoding for dnis predict",
    )


def compressed_error(kind: str, path: Path) -> DataError:
    """The error for a compressed file given to a reader that does not decompress (streaming)."""
    return DataError(
        f"the file is {kind}-compressed, which this reader does not decompress",
        path=path,
        fix="decompress it first (e.g. gunzip -k FILE); streaming reads uncompressed files only",
    )


def separator_in_file(path: Path, delimiter: str) -> DataError:
    """The error for a file holding 0x1f, which stands in for a multi-character delimiter."""
    return DataError(
        "the file contains the byte 0x1f, which dnis uses to parse multi-character "
        f"delimiters like {delimiter!r}",
        path=path,
        fix="convert the file to a single-character delimiter such as a tab",
    )


def scan_plain(raw: bytes, sep: bytes) -> tuple[np.ndarray, np.ndarray]:
    """File line and field count of every non-blank line of a file without quoting (vectorised)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    carriage = lengths > 0
    carriage[carriage] = data[ends[carriage] - 1] == ord("\r")
    nonblank = (lengths - carriage) > 0
    seps = np.flatnonzero(data == sep[0])
    counts = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    return np.flatnonzero(nonblank) + 1, counts[nonblank]


def _scan_quoted(
    raw: bytes, path: Path, sep: str, quotechar: str, encoding: str
) -> tuple[np.ndarray, np.ndarray]:
    """File line where every record starts and its field count, honouring quotes (csv module)."""
    text = io.StringIO(raw.decode(encoding), newline="")
    found = list(records(text, path, sep, quotechar))
    lines = np.asarray([line for line, _ in found], dtype=np.int64)
    return lines, np.asarray([count for _, count in found], dtype=np.int64)


def records(text: Iterable[str], path: Path, sep: str, quotechar: str) -> Iterator[tuple[int, int]]:
    """(file line where it starts, field count) of every non-blank record of `text` (lines with
    their line endings, e.g. a file opened with ``newline=""``), honouring quotes (csv module)."""
    reader = csv.reader(text, delimiter=sep, quotechar=quotechar)
    previous = 0
    try:
        for record in reader:
            if record:
                yield previous + 1, len(record)
            previous = reader.line_num
    except csv.Error as error:
        raise DataError(f"malformed quoting: {error}", path=path, line=previous + 1) from None


def check_ragged(
    lines: np.ndarray, counts: np.ndarray, expected: int, path: Path, delimiter: str
) -> None:
    """Refuse records whose field count is not `expected` (that of the first, on `lines[0]`)."""
    bad = np.flatnonzero(counts != expected)
    if len(bad):
        first = int(bad[0])
        raise ragged_error(
            expected,
            int(lines[0]),
            int(lines[first]),
            int(counts[first]),
            len(bad),
            path,
            delimiter,
        )


def ragged_error(
    expected: int,
    first_line: int,
    line: int | None,
    found: int,
    ragged: int,
    path: Path,
    delimiter: str,
) -> DataError:
    """The error for a record of `found` fields on `line`, `ragged` such records in all."""
    return DataError(
        f"expected {expected} fields (as on line {first_line}), found {found} "
        f"({ragged} ragged line(s) in all)",
        path=path,
        line=line,
        fix=f"fix the line, quote fields that contain the delimiter {delimiter!r}, "
        "or check the delimiter",
    )


def column_names(
    raw: bytes,
    sep: bytes,
    quotechar: str | None,
    encoding: str,
    header: bool,
    names: list[str] | None,
    expected: int,
    path: Path,
) -> list[str]:
    """Column names: `names`, else the header row, else 0..n-1 as strings; all distinct."""
    if names is not None:
        if len(names) != expected:
            raise DataError(
                f"`names` lists {len(names)} columns but the file has {expected}", path=path
            )
        _check_unique(names, path, None, "give every column its own name in `names:`")
        return list(names)
    if not header:
        return [str(i) for i in range(expected)]
    first = next((line for line in raw.decode(encoding).splitlines() if line.strip()), None)
    if first is None:  # only characters such as \x1c that Python takes for white space
        raise DataError(
            "the file has no header line with column names",
            path=path,
            fix="write the column names on the first line, or set header: false and give names",
        )
    quoting = csv.QUOTE_MINIMAL if quotechar else csv.QUOTE_NONE
    row = next(
        csv.reader(
            [first], delimiter=sep.decode(encoding), quotechar=quotechar or '"', quoting=quoting
        )
    )
    columns = [name.strip() for name in row]
    line = raw.count(b"\n", 0, len(raw) - len(raw.lstrip())) + 1  # blank lines may come first
    _check_unique(
        columns,
        path,
        line,
        "rename the duplicated column in the header, or name all columns with `names:` "
        "(it replaces the header)",
    )
    return columns


def _check_unique(columns: list[str], path: Path, line: int | None, fix: str) -> None:
    """Refuse duplicated column names: a feature reading one of them would be ambiguous."""
    duplicated = [name for name, count in Counter(columns).items() if count > 1]
    if duplicated:
        raise DataError(
            f"column name(s) {duplicated} appear more than once in {columns}",
            path=path,
            line=line,
            column=duplicated[0],
            fix=fix,
        )


def _with_lines(frame: pd.DataFrame, path: Path, lines: np.ndarray) -> pd.DataFrame:
    """Record the source file and the file line of every row in `frame.attrs`."""
    frame.attrs["source"] = str(path)
    if len(lines) == len(frame) and np.array_equal(lines, lines[0] + np.arange(len(lines))):
        frame.attrs["first_line"] = int(lines[0])
    elif len(lines) == len(frame):
        frame.attrs["lines"] = np.asarray(lines, dtype=np.int64)
    return frame


def _libfm_labels(labels: pd.Series, path: Path, lines: np.ndarray) -> np.ndarray:
    values = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(
            f"label {labels.iloc[bad[0]]!r} is not a number",
            path=path,
            line=int(lines[bad[0]]),
            column=1,
            fix="each line must start with a numeric label",
        )
    return values


def _split_tokens(
    tokens: pd.Series, where: tuple[np.ndarray, np.ndarray], path: Path, lines: np.ndarray
) -> tuple[tuple[pd.Series, pd.Series], pd.Series | None]:
    """Split ``idx:val`` / ``field:idx:val`` tokens into (ids, values) and fields (libSVM: None)."""
    colons = tokens.str.count(":").to_numpy()
    arity = int(colons[0]) if len(colons) else 1
    pattern = r"[^:\s]+:[^:\s]+" if arity == 1 else r"[^:\s]+:[^:\s]+:[^:\s]+"
    wrong = ~tokens.str.fullmatch(pattern).to_numpy(dtype=bool) if arity in (1, 2) else None
    if wrong is None or wrong.any():
        at = 0 if wrong is None else int(np.flatnonzero(wrong)[0])
        form = "idx:val" if arity == 1 else "field:idx:val"
        _token_error(tokens, where, at, path, lines, f"is not {form} like the first token")
    parts = tokens.str.split(":", expand=True)
    fields = None if arity == 1 else parts[0]
    ids, values = parts[arity - 1], parts[arity]
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    not_one = np.flatnonzero(numbers != 1.0)
    if len(not_one):
        _token_error(
            tokens,
            where,
            int(not_one[0]),
            path,
            lines,
            "has a value other than 1; only binary features are supported",
            fix="bucketise numeric values into separate feature ids (one id per bucket, value 1)",
        )
    return (ids, values), fields


def _token_error(
    tokens: pd.Series,
    where: tuple[np.ndarray, np.ndarray],
    at: int,
    path: Path,
    lines: np.ndarray,
    problem: str,
    fix: str = "write features as idx:val (libSVM/libFM) or field:idx:val (libFFM)",
) -> None:
    rows, positions = where
    raise DataError(
        f"token {int(positions[at])} ({tokens.iloc[at]!r}) {problem}",
        path=path,
        line=int(lines[rows[at]]),
        column=int(positions[at]),
        fix=fix,
    )


def _lists(ids: pd.Series, rows: np.ndarray, n: int) -> pd.Series:
    """Group ids by row into python lists, with an empty list for rows that have none."""
    grouped = pd.Series(ids.to_numpy(), index=rows).groupby(level=0).agg(list)
    out = pd.Series([[] for _ in range(n)], dtype=object)
    out.iloc[grouped.index.to_numpy()] = grouped.to_numpy()
    return out


def _natural(field: str) -> tuple[int, int | str]:
    """Sort key that puts numeric field names in numeric order."""
    return (0, int(field)) if field.isdigit() else (1, field)


__all__ = ["TableFiles", "read_csv", "read_parquet", "read_libfm", "check_numeric", "check_times"]
