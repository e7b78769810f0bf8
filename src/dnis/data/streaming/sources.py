"""Data files read in chunks of rows, each chunk a pyarrow table of the columns asked for.

CSV/TSV files are parsed by pyarrow's streaming reader (`pyarrow.csv.open_csv`), one record batch
per block of `block_bytes`, from the file itself. `CsvFile.scan` (pass A) first reads the file
through a `TextStream`, which checks every byte as `read_csv` does, and checks its lines the way
`read_csv` does (`readers.scan_plain`, for a file without quotes); a file that is not UTF-8 or
has a multi-character delimiter is copied on the way as pyarrow is to parse it. Then pyarrow
counts the rows and the records with the wrong number of fields. pyarrow does not say on which
file line a row is, so when an error must name it (a ragged record in a file with quotes, a bad
label or time) the records are read again up to that row with the in-memory reader's own scanner
(`readers.records`, the csv module): slow, but only on the way to an error.

Parquet files are read in row batches.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dnis.data import readers
from dnis.data.streaming.text import text_stream
from dnis.errors import DataError

log = logging.getLogger("dnis.data.streaming")


@dataclass
class Chunk:
    table: pa.Table  # the asked-for columns of this chunk's rows
    first_row: int  # position of its first row among the file's data rows
    lines: Callable[[], np.ndarray | None]  # file line of every row, computed for error messages
    source: Path


# pyarrow 26 loses rows when its blocks are 1 byte long (a file ending "0\r\n1" gives one row):
# no block is shorter than this.
_MIN_BLOCK_BYTES = 64


@dataclass
class _PlainLines:
    """The non-blank lines of a file and their field counts, as `read_csv` checks them in a file
    without quotes: how many, the first, and the ones whose count differs from the first's."""

    quoted: bool = False  # whether the file has a quote character after all
    lines: int = 0
    first: tuple[int, int] | None = None  # (file line, fields)
    ragged: int = 0
    bad: tuple[int, int] | None = None  # (file line, fields) of the first ragged line

    def add(self, lines: np.ndarray, counts: np.ndarray, quoted: bool) -> None:
        self.quoted = self.quoted or quoted
        if not len(lines):
            return
        if self.first is None:
            self.first = int(lines[0]), int(counts[0])
        bad = np.flatnonzero(counts != self.first[1])
        if len(bad) and self.bad is None:
            self.bad = int(lines[bad[0]]), int(counts[bad[0]])
        self.ragged += len(bad)
        self.lines += len(lines)


class _RecordTooLong(Exception):
    """A record does not fit in one block of pyarrow's reader."""


class _Ragged:
    """pyarrow's invalid-row handler: counts and skips the records with the wrong number of
    fields (the error is raised once the whole file is read, with their number)."""

    def __init__(self) -> None:
        self.count = 0
        self.found: int | None = None  # fields of one of them

    def __call__(self, row: Any) -> str:
        self.count += 1
        self.found = row.actual_columns
        return "skip"


class CsvFile:
    """A delimited text file read in blocks by pyarrow's streaming CSV reader."""

    quotechar = '"'

    def __init__(
        self,
        path: Path,
        delimiter: str,
        header: bool,
        names: list[str] | None,
        encoding: str,
        block_bytes: int,
    ) -> None:
        self.path, self.delimiter, self.header, self.names = path, delimiter, header, names
        self.encoding = encoding
        self.block_bytes = max(block_bytes, _MIN_BLOCK_BYTES)
        self.multi = len(delimiter.encode("utf-8")) != 1
        self.sep = readers.UNIT_SEPARATOR.decode() if self.multi else delimiter  # for the parser
        self.columns: list[str] = []
        self.rows = 0
        self.quoted = True  # whether the file has quote characters (found by `scan`)
        self.copy: Path | None = None  # the file in UTF-8 with 0x1f delimiters, if it is not so
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def check_exists(self) -> None:
        readers.check_file(self.path)

    def _stream(self, block_bytes: int = 1 << 16) -> io.BufferedReader:
        return text_stream(self.path, self.encoding, self.delimiter, block_bytes)

    def _records(self) -> Iterator[tuple[int, int]]:
        """(file line, field count) of every record, the header too, as `read_csv` finds them:
        with the csv module if the file has quotes (`readers.records`), else line by line."""
        if self.quoted:
            with io.TextIOWrapper(self._stream(), encoding="utf-8", newline="") as text:
                yield from readers.records(text, self.path, self.sep, self.quotechar)
            return
        for lines, counts, _ in self._lines(1 << 16):
            yield from zip(lines.tolist(), counts.tolist(), strict=True)

    def _lines(
        self, block_bytes: int, copy: BinaryIO | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
        """(file line, field count) of the non-blank lines of each block, found as `read_csv`
        finds them in a file without quotes (`readers.scan_plain`), and whether the block has a
        quote character. Reading them checks every byte (`TextStream`); what pyarrow is to parse
        is written to `copy`."""
        carry, newlines, sep = b"", 0, self.sep.encode()
        with self._stream(block_bytes) as stream:
            while True:
                block = stream.read(block_bytes)
                if copy is not None:
                    copy.write(block)
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if cut:
                    lines, counts = readers.scan_plain(data[:cut], sep)
                    yield lines + newlines, counts, self.quotechar.encode() in block
                    newlines += data.count(b"\n", 0, cut)
                carry = data[cut:]
                if not block:
                    return

    def _head(self) -> bytes:
        """The file's first bytes, up to the end of its first non-blank line (or all of it)."""
        head = b""
        with self._stream() as stream:
            while piece := stream.read(1 << 16):
                head += piece
                lines = head.decode("utf-8", errors="ignore").splitlines()
                if any(line.strip() for line in lines[:-1]):
                    break
        return head

    def scan(self, folder: Path | None = None) -> None:
        """Pass A: check every byte and record of the file like `read_csv`, count its rows.

        A file that is not UTF-8, or has a multi-character delimiter, is copied on the way into
        `folder` (by default a temporary one) as pyarrow is to parse it: UTF-8 with 0x1f for the
        delimiter. (pyarrow could read it through Python, but its streaming reader then makes the
        interpreter abort at exit now and then: "terminate called without an active exception".)

        As in `read_csv`, a file with quote characters is read record by record (the csv module:
        only to name the line of an error; pyarrow counts the rows and the ragged records), one
        without line by line; and the checks come in `read_csv`'s order, so a file with several
        faults gets the same error: bytes, records (none, ragged ones), column names, rows."""
        self.encoding = readers.text_codec(self.encoding, self.path)
        self.check_exists()
        head = self._head()
        if not head.strip():
            raise DataError("the file is empty", path=self.path, fix="check the path and the file")
        plain = _PlainLines()
        with self._copy(folder) as copy:
            for lines, counts, quoted in self._lines(self.block_bytes, copy):
                plain.add(lines, counts, quoted)
        self.quoted = plain.quoted
        if self.quoted:
            records = self._records()
            first_line, expected = next(records, (0, 0))
            records.close()
        else:
            first_line, expected = plain.first or (0, 0)
            if plain.lines - self.header <= 0:
                self._refuse_no_rows()
            if plain.ragged:
                line, found = plain.bad or (0, 0)
                raise readers.ragged_error(
                    expected, first_line, line, found, plain.ragged, self.path, self.delimiter
                )
        rows, ragged = self._count([str(i) for i in range(expected)])
        if self.quoted and rows + ragged.count == 0:
            self._refuse_no_rows()
        if self.quoted and ragged.count:
            self._refuse_ragged(first_line, expected, ragged)
        self.columns = readers.column_names(
            head,
            self.sep.encode(),
            self.quotechar,
            "utf-8",
            self.header,
            self.names,
            expected,
            self.path,
        )
        parsed, lines = rows + ragged.count, plain.lines - self.header
        if not self.quoted and (ragged.count or parsed != lines):  # e.g. a lone \r in a line
            raise readers.rows_lost(parsed, lines, self.path)
        self.rows = rows

    def _count(self, names: list[str]) -> tuple[int, _Ragged]:
        """pyarrow's count of the data rows, and of the ragged records it skipped."""
        while True:
            ragged = _Ragged()
            try:
                batches = self._batches(names, names[:1], ragged, binary=True)
                return sum(batch.num_rows for batch in batches), ragged
            except _RecordTooLong:
                self.block_bytes *= 4
                log.info("streaming: a record of %s is long: reading blocks of %d bytes",
                         self.path, self.block_bytes)  # fmt: skip

    def _refuse_no_rows(self) -> None:
        raise DataError(
            "the file has no data rows", path=self.path, fix="check the path and the file"
        )

    def _refuse_ragged(self, first_line: int, expected: int, ragged: _Ragged) -> None:
        """Raise the error of `read_csv` for the first record with the wrong number of fields."""
        records = self._records()
        bad = next(((line, found) for line, found in records if found != expected), None)
        records.close()
        line, found = bad or (None, ragged.found)  # no line if the scanner disagrees with pyarrow
        raise readers.ragged_error(
            expected, first_line, line, found or 0, ragged.count, self.path, self.delimiter
        )

    def _copy(self, folder: Path | None) -> contextlib.AbstractContextManager[BinaryIO | None]:
        """Where `scan` writes the file as pyarrow is to parse it (nothing if it already is so:
        UTF-8, whose byte-order mark pyarrow drops, with a one-byte delimiter)."""
        self.close()
        if codecs.lookup(self.encoding).name in ("utf-8", "ascii") and not self.multi:
            return contextlib.nullcontext()  # ASCII checked is UTF-8 already
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dnis-")
            folder = Path(self._tmp.name)
        handle, name = tempfile.mkstemp(prefix="utf8-", suffix=".txt", dir=folder)
        self.copy = Path(name)
        return open(handle, "wb")  # noqa: SIM115 (closed by the caller's `with`)

    def close(self) -> None:
        """Delete the copy `scan` made, if any."""
        if self.copy is not None:
            self.copy.unlink(missing_ok=True)
            self.copy = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _batches(
        self,
        names: list[str],
        columns: list[str],
        on_ragged: _Ragged | None = None,
        binary: bool = False,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of the data rows (the header dropped) of the file's columns `names`,
        with `columns` of them (one at least: none would mean all) as strings (or bytes)."""
        read = pacsv.ReadOptions(column_names=names, block_size=self.block_bytes, encoding="utf8")
        parse = pacsv.ParseOptions(
            delimiter=self.sep,
            quote_char=self.quotechar,
            double_quote=True,
            escape_char=False,
            newlines_in_values=True,
            ignore_empty_lines=True,
            invalid_row_handler=on_ragged,
        )
        convert = pacsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.binary() if binary else pa.string() for c in columns},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        header = self.header
        with pa.OSFile(str(self.copy or self.path)) as source:
            try:
                reader = pacsv.open_csv(
                    source, read_options=read, parse_options=parse, convert_options=convert
                )
                for batch in reader:
                    if header and batch.num_rows:
                        batch, header = batch.slice(1), False
                    if batch.num_rows:
                        yield batch
            except pa.ArrowInvalid as error:
                if "straddl" in str(error):  # "straddling object straddles two block boundaries"
                    raise _RecordTooLong from None
                raise DataError(f"could not parse the file: {error}", path=self.path) from None

    def lines(self, first_row: int, rows: int) -> np.ndarray:
        """The file line of data rows `first_row` .. `first_row + rows - 1`, found by reading the
        records from the start of the file (for error messages only)."""
        found: list[int] = []
        records = self._records()
        for index, (line, _) in enumerate(records, start=-int(self.header)):
            if index >= first_row + rows:
                break
            if index >= first_row:
                found.append(line)
        records.close()
        return np.asarray(found, dtype=np.int64)

    def chunks(self, columns: list[str]) -> Iterator[Chunk]:
        first = 0
        for batch in self._batches(self.columns, columns):
            rows = batch.num_rows
            yield Chunk(
                pa.Table.from_batches([batch]), first, partial(self.lines, first, rows), self.path
            )
            first += rows
        if first != self.rows:  # never lose or invent rows silently
            raise DataError(
                f"the file has {first} data rows but had {self.rows} when it was scanned",
                path=self.path,
                fix="leave the file unchanged while dnis reads it, then run again",
            )


class ParquetFile:
    """A Parquet file read in row batches (column types kept, as `read_parquet` keeps them)."""

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self.path, self.chunk_rows = path, chunk_rows
        self.columns: list[str] = []
        self.rows = 0

    def check_exists(self) -> None:
        readers.check_file(self.path)

    def _open(self) -> Any:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"not a readable Parquet file: {error}", path=self.path) from None

    def scan(self, folder: Path | None = None) -> None:
        self.check_exists()
        handle = self._open()
        self.columns = list(handle.schema_arrow.names)
        self.rows = int(handle.metadata.num_rows)
        if self.rows == 0:
            raise DataError("the file has no rows", path=self.path)

    def close(self) -> None:
        pass

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
