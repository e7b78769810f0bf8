"""Data files read in chunks of rows: each chunk a pyarrow table of the columns asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dnis.data import readers
from dnis.errors import DataError


@dataclass
class Chunk:
    table: pa.Table  # the asked-for columns of this chunk's rows
    first_row: int  # position of its first row among the file's data rows
    lines: Callable[[], np.ndarray | None]  # file line of every row, computed for error messages
    source: Path


@dataclass
class _Span:
    start: int  # byte offsets of the chunk's data rows in the file
    stop: int
    newlines: int  # newlines in the file before `start`
    first_row: int
    rows: int
    quoted: bool


class CsvFile:
    """A delimited text file read in byte chunks that end at record boundaries."""

    quotechar = '"'

    def __init__(
        self,
        path: Path,
        delimiter: str,
        header: bool,
        names: list[str] | None,
        encoding: str,
        chunk_bytes: int,
    ) -> None:
        self.path, self.delimiter, self.header, self.names = path, delimiter, header, names
        self.encoding, self.chunk_bytes = encoding, chunk_bytes
        self.columns: list[str] = []
        self.spans: list[_Span] = []
        self.rows = 0

    def check_exists(self) -> None:
        if not self.path.is_file():
            hint = " (it is a folder)" if self.path.is_dir() else ""
            raise DataError(f"file not found{hint}", path=self.path, fix="check the path")

    def _separator(self) -> tuple[bytes, bool]:
        sep = self.delimiter.encode(self.encoding)
        return (sep, False) if len(sep) == 1 else (readers.UNIT_SEPARATOR, True)

    def _parsed(self, raw: bytes) -> bytes:
        """The chunk as the parser sees it: a multi-byte delimiter becomes one byte, as in
        `read_csv`."""
        sep, multi = self._separator()
        if not multi:
            return raw
        if sep in raw:
            raise DataError(
                "the file contains the byte 0x1f, which dnis uses to parse multi-character "
                f"delimiters like {self.delimiter!r}",
                path=self.path,
                fix="convert the file to a single-character delimiter such as a tab",
            )
        return raw.replace(self.delimiter.encode(self.encoding), sep)

    def _scan(self, parsed: bytes, newlines: int) -> tuple[np.ndarray, np.ndarray]:
        """File line and field count of every record of a chunk (the reader's own scanners)."""
        sep, _ = self._separator()
        quote = self.quotechar.encode(self.encoding)
        if quote in parsed:
            lines, counts = _shifted(
                lambda: readers._scan_quoted(
                    parsed, self.path, sep.decode(self.encoding), self.quotechar, self.encoding
                ),
                newlines,
            )
        else:
            lines, counts = readers._scan_plain(parsed, sep)
        return lines + newlines, counts

    def scan(self) -> None:
        """Pass A: check every byte and record of the file like `read_csv`, count its rows."""
        path, encoding = self.path, self.encoding
        if "\n,".encode(encoding, errors="replace") != b"\n,":
            raise DataError(
                f"encoding {encoding!r} is not ASCII-compatible (e.g. UTF-16), which the line and "
                "field checks rely on",
                path=path,
                fix="convert the file to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) and read it with "
                "the default encoding",
            )
        self.check_exists()
        quote = self.quotechar.encode(encoding)
        newlines, rows, expected, first_line, anything = 0, 0, None, 0, False
        self.spans = []
        with open(path, "rb") as handle:
            for start, raw in _byte_chunks(handle, self.chunk_bytes, quote):
                anything = anything or bool(raw.strip())
                _shifted(lambda raw=raw: readers._check_encoding(raw, path, encoding), newlines)
                parsed = self._parsed(raw)
                lines, counts = self._scan(parsed, newlines)
                skip = 0  # bytes of the header record at the start of the first chunk
                if expected is None and len(lines):
                    expected, first_line = int(counts[0]), int(lines[0])
                    sep, _ = self._separator()
                    self.columns = readers.column_names(
                        parsed,
                        sep,
                        self.quotechar,
                        encoding,
                        self.header,
                        self.names,
                        expected,
                        path,
                    )
                    if self.header:
                        skip = (
                            _line_start(raw, int(lines[1]) - newlines)
                            if len(lines) > 1
                            else len(raw)
                        )
                        lines = lines[1:]
                if len(lines):
                    readers.check_ragged(
                        np.r_[first_line, lines],
                        np.r_[expected, counts[len(counts) - len(lines) :]],
                        expected,
                        path,
                        self.delimiter,
                    )
                    self.spans.append(
                        _Span(
                            start=start + skip,
                            stop=start + len(raw),
                            newlines=newlines + raw.count(b"\n", 0, skip),
                            first_row=rows,
                            rows=len(lines),
                            quoted=quote in raw[skip:],
                        )
                    )
                    rows += len(lines)
                newlines += raw.count(b"\n")
        if not anything:
            raise DataError("the file is empty", path=path, fix="check the path and the file")
        if rows == 0:
            raise DataError(
                "the file has no data rows", path=path, fix="check the path and the file"
            )
        self.rows = rows

    def chunks(self, columns: list[str]) -> Iterator[Chunk]:
        import pyarrow.csv as pacsv

        sep, _ = self._separator()
        convert = pacsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.string() for c in columns},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        with open(self.path, "rb") as handle:
            for span in self.spans:
                handle.seek(span.start)
                parsed = self._parsed(handle.read(span.stop - span.start))
                parse = pacsv.ParseOptions(
                    delimiter=sep.decode(self.encoding),
                    quote_char=self.quotechar if span.quoted else False,
                    double_quote=True,
                    escape_char=False,
                    newlines_in_values=span.quoted,
                )
                read = pacsv.ReadOptions(column_names=self.columns, encoding=self.encoding)
                try:
                    table = pacsv.read_csv(
                        pa.py_buffer(parsed),
                        read_options=read,
                        parse_options=parse,
                        convert_options=convert,
                    )
                except pa.ArrowException as error:
                    raise DataError(f"could not parse the file: {error}", path=self.path) from None
                if table.num_rows != span.rows:  # never lose or invent rows silently
                    last = span.newlines + parsed.count(b"\n") + 1
                    raise DataError(
                        f"the parser read {table.num_rows} rows but the file has {span.rows} "
                        f"non-blank data lines between lines {span.newlines + 1} and {last}",
                        path=self.path,
                        fix="look for a lone carriage return (\\r) inside a line or a line holding "
                        "only spaces, and remove it (or save the file with \\n or \\r\\n line "
                        "endings)",
                    )
                yield Chunk(
                    table,
                    span.first_row,
                    lambda parsed=parsed, span=span: self._scan(parsed, span.newlines)[0],
                    self.path,
                )


class ParquetFile:
    """A Parquet file read in row batches (column types kept, as `read_parquet` keeps them)."""

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self.path, self.chunk_rows = path, chunk_rows
        self.columns: list[str] = []
        self.rows = 0

    def check_exists(self) -> None:
        if not self.path.is_file():
            raise DataError("file not found", path=self.path, fix="check the path")

    def _open(self) -> Any:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"not a readable Parquet file: {error}", path=self.path) from None

    def scan(self) -> None:
        self.check_exists()
        handle = self._open()
        self.columns = list(handle.schema_arrow.names)
        self.rows = int(handle.metadata.num_rows)
        if self.rows == 0:
            raise DataError("the file has no rows", path=self.path)

    def type_of(self, column: str) -> pa.DataType:
        return self._open().schema_arrow.field(column).type

    def chunks(self, columns: list[str]) -> Iterator[Chunk]:
        first = 0
        try:
            for batch in self._open().iter_batches(batch_size=self.chunk_rows, columns=columns):
                yield Chunk(pa.Table.from_batches([batch]), first, lambda: None, self.path)
                first += batch.num_rows
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"not a readable Parquet file: {error}", path=self.path) from None


def _byte_chunks(handle: Any, size: int, quote: bytes) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) pieces of about `size` bytes, each ending at a record boundary: after
    a newline outside quotes (quote characters before it come in pairs)."""
    offset, carry = 0, b""
    while True:
        block = handle.read(size)
        data = carry + block if carry else block
        if not block:
            if data:
                yield offset, data
            return
        cut = _record_end(data, quote)
        if cut == 0:  # no complete record yet: read more
            carry = data
            continue
        yield offset, data[:cut]
        offset += cut
        carry = data[cut:]


def _record_end(data: bytes, quote: bytes) -> int:
    """Offset just after the last newline of `data` that is outside quotes (0 if none)."""
    if quote not in data:
        return data.rfind(b"\n") + 1
    array = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(array == quote[0])
    newlines = np.flatnonzero(array == ord("\n"))
    even = np.flatnonzero(np.searchsorted(quotes, newlines) % 2 == 0)
    return int(newlines[even[-1]]) + 1 if len(even) else 0


def _line_start(raw: bytes, line: int) -> int:
    """Byte offset of 1-based `line` within `raw`."""
    if line <= 1:
        return 0
    newlines = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == ord("\n"))
    return int(newlines[line - 2]) + 1


def _shifted(check: Callable[[], Any], newlines: int) -> Any:
    """Run one of the reader's checks on a chunk; its error's line becomes the file's line."""
    try:
        return check()
    except DataError as error:
        if error.line is None or newlines == 0:
            raise
        bare = str(DataError("", path=error.path, line=error.line, column=error.column))
        message = str(error)[len(bare) :]
        if error.fix:
            message = message[: -len(f"\n  fix: {error.fix}")]
        raise DataError(
            message,
            path=error.path,
            line=error.line + newlines,
            column=error.column,
            fix=error.fix,
        ) from None
