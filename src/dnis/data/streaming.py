"""Out-of-core loading of CSV/TSV/Parquet files: a few streaming passes and an on-disk cache.

`load_streaming` gives the same dataset as `dnis.data.tabular.load_files` (same vocabularies, same
split, same encoded ids in the same order) without ever holding the file in memory:

- **Pass A (scan)**: the file is read in chunks of `chunk_bytes` cut at record boundaries. Each
  chunk goes through the in-memory CSV reader's own checks (`dnis.data.readers`: encoding, field
  counts, header), so a bad line gives the very same `DataError` (file, line, column, fix). Rows
  are counted, which the split needs. Parquet: the row count comes from the file's metadata.
- **Split**: `split: random` draws the same seeded permutation as the in-memory split
  (`dnis.data.split.random_split`) and stages its inverse (each file row's place) to disk, read
  back chunk by chunk. Drawing it holds 4 bytes a row (int32) for a moment: the one part of the
  build whose memory grows with rows (40 MB for 10M rows). Three files (`{train, valid, test}`)
  are used as given.
- **Pass B (fit)**: chunks are parsed with pyarrow and checked like the in-memory path (labels,
  times). Categorical and sequence ids of the training rows are counted exactly (pyarrow group-by;
  memory grows with distinct ids, not rows) and numeric values feed a fixed-size reservoir sample
  per field (`quantile_sample` values; quantiles are exact while a field has at most that many
  training values). With `vocab: count_min`, counting is a count-min sketch pass and then an exact
  count of only the ids whose sketch estimate reaches `min_count` (see `dnis.data.sketch`): the
  vocabulary is the same as `two_pass`, and memory holds the kept ids instead of all distinct ids.
- **Pass C (encode)**: every chunk is encoded with the fitted vocabularies into int32 ids and
  float32 labels, written into per-split ``.npy`` files at each row's split position.

The result is a cache entry (`dnis.data.cache`) keyed by a sha256 of the files (paths, sizes,
modification times), the schema, the split settings and these options; a second load with the same
key opens it without reading the data files at all. Its splits are `DiskSplit`s, which the loader
reads block by block.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dnis.data import readers
from dnis.data.cache import (
    DEFAULT_BLOCK_ROWS,
    SPLIT_NAMES,
    SplitWriter,
    cache_key,
    file_identity,
    open_entry,
    publish,
    temp_folder,
    write_meta,
)
from dnis.data.dataset import EncodedDataset, check_labels
from dnis.data.encode import Encoder, FieldEncoder, as_strings, explode_sequence, require_columns
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.sketch import CountMinSketch, Reservoir
from dnis.data.split import RATIOS, _cuts
from dnis.errors import ConfigError, DataError

log = logging.getLogger("dnis.data.streaming")

VOCAB_MODES: tuple[str, ...] = ("two_pass", "count_min")
STREAM_FORMATS: dict[str, str | None] = {"csv": ",", "tsv": "\t", "parquet": None}
STREAM_TASKS: tuple[str, ...] = ("rating", "ctr")


@dataclass(frozen=True)
class StreamingOptions:
    """How a streamed dataset is built and read (the `dataset:` keys of the same names)."""

    cache_dir: str | Path = Path("runs") / ".cache"
    vocab: str = "two_pass"  # two_pass | count_min
    sketch_width: int = 1 << 21  # count_min: counters per row (memory 8 * width * depth bytes)
    sketch_depth: int = 4  # count_min: rows (hash functions)
    quantile_sample: int = 100_000  # numeric fields: reservoir size for the quantile edges
    shuffle_block: int = DEFAULT_BLOCK_ROWS  # rows per shuffle block of the loader
    chunk_bytes: int = 8 << 20  # CSV/TSV bytes parsed at a time
    chunk_rows: int = 131_072  # Parquet rows read at a time

    def __post_init__(self) -> None:
        if self.vocab not in VOCAB_MODES:
            raise ConfigError(f"dataset.vocab must be one of {VOCAB_MODES}, got {self.vocab!r}")
        for key in (
            "sketch_width",
            "sketch_depth",
            "quantile_sample",
            "shuffle_block",
            "chunk_bytes",
            "chunk_rows",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"dataset.{key} must be >= 1, got {getattr(self, key)}")

    def key_material(self) -> dict[str, Any]:
        """The options that a cache entry depends on (chunk and block sizes change nothing)."""
        out: dict[str, Any] = {"vocab": self.vocab, "quantile_sample": self.quantile_sample}
        if self.vocab == "count_min":
            out["sketch"] = [self.sketch_width, self.sketch_depth]
        return out


def load_streaming(
    *,
    format: str,
    path: str | Path | Mapping[str, str | Path],
    schema: Schema,
    task: str,
    split: str = "random",
    ratios: tuple[float, float, float] = RATIOS,
    seed: int = 0,
    delimiter: str | None = None,
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    name: str = "custom",
    options: StreamingOptions | None = None,
) -> EncodedDataset:
    """The dataset of `load_files` with the same arguments, built through the on-disk cache."""
    from dnis.data.tabular import _paths  # tabular imports this module lazily

    options = options or StreamingOptions()
    if format not in STREAM_FORMATS:
        raise ConfigError(
            f"dataset.streaming reads {sorted(STREAM_FORMATS)} files, not {format!r}; "
            "convert the file (e.g. to Parquet) or set streaming: false"
        )
    if task not in STREAM_TASKS:
        raise ConfigError(
            f"dataset.streaming supports the tasks {STREAM_TASKS}, not {task!r}; "
            "set streaming: false"
        )
    if schema.label is None:
        raise ConfigError(f"task {task!r} needs a `label` column in the schema")
    files = _paths(path)
    if "all" in files and split != "random":
        raise ConfigError(
            f"dataset.streaming splits one file with split: random only, not {split!r}; "
            "give {train, valid, test} files or set streaming: false"
        )
    _cuts(0, ratios)  # refuse bad ratios before any work
    sep = delimiter or STREAM_FORMATS[format]
    sources = {
        key: _ParquetFile(file, options.chunk_rows)
        if format == "parquet"
        else _CsvFile(file, sep or ",", header, names, encoding, options.chunk_bytes)
        for key, file in files.items()
    }
    for source in sources.values():
        source.check_exists()
    material = {
        "files": {key: file_identity(file) for key, file in files.items()},
        "format": format,
        "reader": {"delimiter": sep, "header": header, "names": names, "encoding": encoding},
        "schema": schema.to_dict(),
        "task": task,
        "split": {"method": split, "ratios": list(ratios), "seed": seed}
        if "all" in files
        else "files",
        **options.key_material(),
    }
    key = cache_key(material)
    cache_dir = Path(options.cache_dir)
    folder = cache_dir / key[:32]
    splits = open_entry(folder, key, options.shuffle_block)
    if splits is not None:
        log.info("streaming: reusing cache %s", folder)
    else:
        started = time.perf_counter()
        tmp = temp_folder(cache_dir, key)
        try:
            info = _Builder(sources, schema, task, ratios, seed, options).build(tmp)
            write_meta(tmp, key, material, info["splits"], info["slots"])  # last: marks it complete
            publish(tmp, folder, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("streaming: built cache %s in %.1f s", folder, time.perf_counter() - started)
        splits = open_entry(folder, key, options.shuffle_block)
        assert splits is not None
    encoder = Encoder.load(folder / "encoder.json")
    return EncodedDataset(
        name=name,
        task=task,
        schema=schema,
        encoder=encoder,
        meta={"cache": str(folder)},
        **splits,
    )


# ---------------------------------------------------------------------------------------------
# Sources: a file read in chunks of rows, each a pyarrow table of the columns asked for.


@dataclass
class _Chunk:
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


class _CsvFile:
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
        return (sep, False) if len(sep) == 1 else (readers._UNIT_SEPARATOR, True)

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
                    self.columns = readers._column_names(
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
                    readers._check_ragged(
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

    def chunks(self, columns: list[str]) -> Iterator[_Chunk]:
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
                yield _Chunk(
                    table,
                    span.first_row,
                    lambda parsed=parsed, span=span: self._scan(parsed, span.newlines)[0],
                    self.path,
                )


class _ParquetFile:
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

    def chunks(self, columns: list[str]) -> Iterator[_Chunk]:
        first = 0
        try:
            for batch in self._open().iter_batches(batch_size=self.chunk_rows, columns=columns):
                yield _Chunk(pa.Table.from_batches([batch]), first, lambda: None, self.path)
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


# ---------------------------------------------------------------------------------------------
# Columns of a chunk as canonical values.


def _strings(column: pa.ChunkedArray | pa.Array, integral: bool | None) -> pa.Array:
    """Categorical values as strings with nulls for missing, exactly as `as_strings` gives them.

    `integral` is whether every value of a float column in the whole file is a whole number
    (`as_strings` decides that over the whole column, so it is found in a pass first).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        empty = pc.equal(pc.utf8_length(column), 0)
        if pc.any(empty).as_py():
            column = pc.if_else(empty, pa.scalar(None, column.type), column)
        return column
    values = column.to_pandas()
    if pd.api.types.is_float_dtype(values):
        if integral:
            values = values.astype("Int64")
        else:  # as_strings without its own whole-column decision
            out = values.astype("string")
            values = out.mask(out.str.len() == 0)
    strings = as_strings(values)
    return pa.array(strings.to_numpy(dtype=object, na_value=None), type=pa.string())


def _numbers(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric values as float64, NaN for missing or non-numeric (`pd.to_numeric`, coerce)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        encoded = column.dictionary_encode()  # parse each distinct string once
        distinct = pd.Series(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
        table = np.append(pd.to_numeric(distinct, errors="coerce").to_numpy(np.float64), np.nan)
        codes = pc.fill_null(encoded.indices, len(distinct)).to_numpy()
        return table[codes]
    return pd.to_numeric(column.to_pandas(), errors="coerce").to_numpy(dtype=np.float64)


def _value_counts(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Distinct non-null values and their counts."""
    counted = pc.value_counts(values)
    distinct, counts = counted.field("values"), counted.field("counts")
    valid = pc.is_valid(distinct)
    if not pc.all(valid).as_py():
        distinct, counts = distinct.filter(valid), counts.filter(valid)
    return distinct, counts.to_numpy().astype(np.int64)


class _Counts:
    """Exact counts of string values, merged with pyarrow group-by as chunks arrive."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.merged = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.parts.append(pa.table({"v": values.cast(pa.string()), "c": pa.array(counts)}))
        self.pending += len(values)
        if self.pending > max(1 << 16, self.merged):  # amortised linear, bounded memory
            self._merge()

    def _merge(self) -> None:
        if not self.parts:
            return
        table = pa.concat_tables(self.parts)
        if len(self.parts) > 1:
            table = table.group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])
        self.parts, self.pending, self.merged = [table], 0, table.num_rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values as a numpy str array, counts)."""
        self._merge()
        if not self.parts:
            return np.zeros(0, dtype=str), np.zeros(0, dtype=np.int64)
        table = self.parts[0]
        values = table.column("v").to_numpy().astype(str)
        return values, table.column("c").to_numpy().astype(np.int64)


def _vocabulary(spec: FeatureSpec, counts: _Counts) -> FieldEncoder:
    """The field's encoder from exact training counts, as `FieldEncoder.fit` orders it."""
    values, freq = counts.result()
    keep = freq >= spec.min_count
    values, freq = values[keep], freq[keep]
    order = np.lexsort((values, -freq))  # by descending count, then by value
    return FieldEncoder(spec, vocabulary=values[order].tolist(), counts=freq[order].tolist())


# ---------------------------------------------------------------------------------------------
# The build.


class _Assignment:
    """Which split, and which position in it, every data row of every file goes to.

    For one file split at random, the destination of every file row (its place in the seeded
    permutation) is written to `folder/inverse.bin` and read back chunk by chunk, so only the
    permutation itself (4 bytes a row) is ever in memory, and only while it is drawn.
    """

    def __init__(
        self, rows: dict[str, int], ratios: tuple[float, float, float], seed: int, folder: Path
    ) -> None:
        self.inverse: Path | None = None
        if "all" in rows:
            n = rows["all"]
            a, b = _cuts(n, ratios)
            # the permutation of `random_split` (numpy draws the same one for an int32 arange)
            self.dtype = np.dtype(np.int32 if n < 2**31 else np.int64)
            order = np.arange(n, dtype=self.dtype)
            np.random.default_rng(seed).shuffle(order)
            self.inverse = folder / "inverse.bin"
            _write_inverse(order, self.inverse)
            del order
            self.cuts = (a, b)
            self.sizes = {"train": a, "valid": b - a, "test": n - b}
        else:
            self.sizes = {name: rows[name] for name in SPLIT_NAMES}

    def __call__(self, key: str, first_row: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(split code 0/1/2 per row, position within that split per row)."""
        if self.inverse is None:
            code = np.full(m, SPLIT_NAMES.index(key), dtype=np.int8)
            return code, first_row + np.arange(m, dtype=np.int64)
        a, b = self.cuts
        offset = first_row * self.dtype.itemsize
        dest = np.fromfile(self.inverse, self.dtype, count=m, offset=offset).astype(np.int64)
        code = (dest >= a).astype(np.int8) + (dest >= b).astype(np.int8)
        starts = np.array([0, a, b], dtype=np.int64)
        return code, dest - starts[code]

    def close(self) -> None:
        if self.inverse is not None:
            self.inverse.unlink(missing_ok=True)


def _write_inverse(order: np.ndarray, path: Path, bucket_rows: int = 1 << 20) -> None:
    """Write the inverse permutation (`inverse[order[i]] = i`) to `path` as raw integers.

    Pairs (file row, place) are staged per bucket of `bucket_rows` file rows, then each bucket is
    inverted in memory and appended: memory beyond `order` is one bucket or one step of pairs.
    """
    n, dtype = len(order), order.dtype
    staging = path.with_suffix(".staging")
    staging.mkdir()
    step = 1 << 20
    for start in range(0, n, step):
        rows = order[start : start + step]
        places = np.arange(start, start + len(rows), dtype=dtype)
        by_row = np.argsort(rows, kind="stable")
        pairs = np.stack([rows[by_row], places[by_row]], axis=1)
        buckets = pairs[:, 0] // bucket_rows
        for part in np.split(pairs, np.flatnonzero(np.diff(buckets)) + 1):
            with open(staging / f"{int(part[0, 0]) // bucket_rows}.bin", "ab") as handle:
                handle.write(part.tobytes())
    with open(path, "wb") as out:
        for bucket in range((n + bucket_rows - 1) // bucket_rows):
            piece = staging / f"{bucket}.bin"
            pairs = np.fromfile(piece, dtype=dtype).reshape(-1, 2)
            inverse = np.empty(min(bucket_rows, n - bucket * bucket_rows), dtype=dtype)
            inverse[pairs[:, 0] - bucket * bucket_rows] = pairs[:, 1]
            out.write(inverse.tobytes())
            piece.unlink()
    staging.rmdir()


@dataclass
class _FieldState:
    spec: FeatureSpec
    slots: slice
    counts: _Counts = field(default_factory=_Counts)
    reservoir: Reservoir | None = None
    # Parquet float column of a categorical field: whether every value of a split is a whole number
    # (`as_strings` decides that per split frame in memory, so it is found in a pass first)
    integral: dict[str, bool] = field(default_factory=dict)
    encoder: FieldEncoder | None = None
    index: pd.Index | None = None  # vocabulary lookup, built once
    bucket_counts: np.ndarray | None = None  # numeric: training count per id


class _Builder:
    def __init__(
        self,
        sources: dict[str, Any],
        schema: Schema,
        task: str,
        ratios: tuple[float, float, float],
        seed: int,
        options: StreamingOptions,
    ) -> None:
        self.sources, self.schema, self.task = sources, schema, task
        self.ratios, self.seed, self.options = ratios, seed, options
        assert schema.label is not None
        self.label: str = schema.label
        self.fields = [_FieldState(spec, schema.slot_range(spec.name)) for spec in schema.features]
        extra = [self.label] + ([schema.time] if schema.time is not None else [])
        self.columns = list(dict.fromkeys([f.source for f in schema.features] + extra))

    def build(self, folder: Path) -> dict[str, Any]:
        """All passes; writes the split arrays and encoder.json into `folder`."""
        self._scan(folder)
        self._float_categoricals()
        self._fit()
        info = self._write(folder)
        self.assign.close()
        fields = []
        for state in self.fields:
            assert state.encoder is not None
            if state.spec.kind == "numeric":
                assert state.bucket_counts is not None
                state.encoder.counts = state.bucket_counts[1:].tolist()
            fields.append(state.encoder)
        Encoder(self.schema, fields).save(folder / "encoder.json")
        return info

    # pass A -----------------------------------------------------------------------------------
    def _scan(self, folder: Path) -> None:
        for source in self.sources.values():
            source.scan()
            frame = pd.DataFrame(columns=source.columns)
            frame.attrs["source"] = str(source.path)
            require_columns(frame, [f.source for f in self.schema.features])
            require_columns(frame, self.columns)  # the label (and time) column
        self.assign = _Assignment(
            {key: source.rows for key, source in self.sources.items()},
            self.ratios,
            self.seed,
            folder,
        )
        if self.assign.sizes["train"] == 0:
            raise DataError("dataset: the training split is empty", fix="supply more rows")

    def _parts(self, check: bool, only_train: bool) -> Iterator[tuple[str, pa.Table, _Chunk]]:
        """(split name, rows of that split, chunk) over every chunk of every file."""
        for key, source in self.sources.items():
            for chunk in source.chunks(self.columns):
                if check:
                    self._labels(chunk.table, chunk)
                    self._times(chunk)
                code, _ = self.assign(key, chunk.first_row, chunk.table.num_rows)
                for number, name in enumerate(SPLIT_NAMES[:1] if only_train else SPLIT_NAMES):
                    rows = code == number
                    if rows.all():
                        yield name, chunk.table, chunk
                    elif rows.any():
                        yield name, chunk.table.filter(pa.array(rows)), chunk

    def _float_categoricals(self) -> None:
        floats = [
            state
            for state in self.fields
            if state.spec.kind == "categorical"
            and any(
                isinstance(source, _ParquetFile)
                and pa.types.is_floating(source.type_of(state.spec.source))
                for source in self.sources.values()
            )
        ]
        if not floats:
            return
        seen: dict[tuple[int, str], bool] = {}
        for name, table, _ in self._parts(check=False, only_train=False):
            for i, state in enumerate(floats):
                values = table.column(state.spec.source).to_numpy()
                values = values[~np.isnan(values)]
                if len(values):
                    seen[i, name] = True
                    whole = bool(np.all(np.mod(values, 1) == 0))
                    state.integral[name] = state.integral.get(name, True) and whole
        for i, state in enumerate(floats):  # `as_strings` needs some value to call a column whole
            for name in SPLIT_NAMES:
                state.integral[name] = seen.get((i, name), False) and state.integral.get(
                    name, False
                )

    # checks of every chunk, as tabular._checked does on a whole frame -------------------------
    def _labels(self, table: pa.Table, chunk: _Chunk | None) -> np.ndarray:
        frame = _frame(table, [self.label], chunk)
        try:
            return check_labels(frame, self.label, self.task)
        except DataError:
            if chunk is None:
                raise
            _locate(frame, chunk)
            return check_labels(frame, self.label, self.task)  # raises, naming the line

    def _times(self, chunk: _Chunk) -> None:
        from dnis.data.tabular import _times

        if self.schema.time is None:
            return
        frame = _frame(chunk.table, [self.schema.time], chunk)
        try:
            _times(frame, self.schema.time)
        except DataError:
            _locate(frame, chunk)
            _times(frame, self.schema.time)

    # pass B -----------------------------------------------------------------------------------
    def _fit(self) -> None:
        sketch = None
        if self.options.vocab == "count_min":
            sketch = CountMinSketch(self.options.sketch_width, self.options.sketch_depth)
        for i, state in enumerate(self.fields):
            if state.spec.kind == "numeric":
                state.reservoir = Reservoir(self.options.quantile_sample, seed=self.seed * 7919 + i)
        for _, table, _ in self._parts(check=True, only_train=True):
            for i, state in enumerate(self.fields):
                column = table.column(state.spec.source)
                if state.spec.kind == "numeric":
                    numbers = _numbers(column)
                    assert state.reservoir is not None
                    state.reservoir.add(numbers[~np.isnan(numbers)])
                    continue
                values, counts = self._distinct(state, column)
                if sketch is None:
                    state.counts.add(values, counts)
                else:
                    sketch.add(values.to_numpy(zero_copy_only=False), counts, field=i)
        if sketch is not None:  # second pass: exact counts of the ids the sketch lets through
            for _, table, _ in self._parts(check=False, only_train=True):
                for i, state in enumerate(self.fields):
                    if state.spec.kind == "numeric":
                        continue
                    values, counts = self._distinct(state, table.column(state.spec.source))
                    estimate = sketch.estimate(values.to_numpy(zero_copy_only=False), field=i)
                    keep = estimate >= state.spec.min_count
                    state.counts.add(values.filter(pa.array(keep)), counts[keep])
            log.info("streaming: count-min error bound %.1f", sketch.error_bound())
        for state in self.fields:
            if state.spec.kind == "numeric":
                assert state.reservoir is not None
                fitted = FieldEncoder.fit(state.spec, pd.Series(state.reservoir.values))
                state.encoder = FieldEncoder(state.spec, edges=fitted.edges, counts=None)
                state.bucket_counts = np.zeros(len(fitted.edges or []) + 2, dtype=np.int64)
                state.reservoir = None
            else:
                state.encoder = _vocabulary(state.spec, state.counts)
                state.counts = _Counts()  # free the counts
                state.index = pd.Index(state.encoder.vocabulary, dtype=object)

    def _distinct(self, state: _FieldState, column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
        if state.spec.kind == "categorical":
            return _value_counts(_strings(column, state.integral.get("train")))
        exploded = explode_sequence(_series(column), state.spec).dropna()
        freq = exploded.value_counts(sort=False)
        strings = freq.index.to_numpy(dtype=object)
        return pa.array(strings, type=pa.string()), freq.to_numpy(dtype=np.int64)

    # pass C -----------------------------------------------------------------------------------
    def _encode(self, table: pa.Table, split: str) -> np.ndarray:
        ids = np.zeros((table.num_rows, self.schema.num_slots), dtype=np.int32)
        for state in self.fields:
            column = table.column(state.spec.source)
            assert state.encoder is not None
            if state.spec.kind == "numeric":
                encoded = state.encoder.transform(pd.Series(_numbers(column)))
            elif state.spec.kind == "sequence":
                encoded = state.encoder.transform(_series(column))
            else:
                strings = _strings(column, state.integral.get(split)).dictionary_encode()
                distinct = strings.dictionary.to_numpy(zero_copy_only=False)
                assert state.index is not None
                known = state.index.get_indexer(pd.Index(distinct, dtype=object)) + 1
                lookup = np.append(known, 0).astype(np.int32)
                codes = pc.fill_null(strings.indices, len(distinct)).to_numpy()
                encoded = lookup[codes].reshape(-1, 1)
            ids[:, state.slots] = encoded
        return ids

    def _write(self, folder: Path) -> dict[str, Any]:
        slots = self.schema.num_slots
        writers = {
            name: SplitWriter(folder, name, self.assign.sizes[name], slots) for name in SPLIT_NAMES
        }
        numeric = [s for s in self.fields if s.spec.kind == "numeric"]
        for key, source in self.sources.items():
            for chunk in source.chunks(self.columns):
                code, position = self.assign(key, chunk.first_row, chunk.table.num_rows)
                for number, name in enumerate(SPLIT_NAMES):
                    rows = code == number
                    if not rows.any():
                        continue
                    table = chunk.table if rows.all() else chunk.table.filter(pa.array(rows))
                    ids = self._encode(table, name)
                    writers[name].write(position[rows], ids, self._labels(table, None))
                    for state in numeric if name == "train" else []:
                        assert state.bucket_counts is not None
                        state.bucket_counts += np.bincount(
                            ids[:, state.slots.start], minlength=len(state.bucket_counts)
                        )
        splits = {}
        for name, writer in writers.items():
            if writer.written != writer.rows:
                raise DataError(
                    f"internal error: split {name!r} received {writer.written} of {writer.rows} "
                    "rows; delete the cache folder and retry"
                )
            splits[name] = {"rows": writer.rows, "label_range": writer.close()}
        return {"splits": splits, "slots": slots}


def _series(column: pa.ChunkedArray | pa.Array) -> pd.Series:
    """A column as the in-memory reader gives it: text as pandas strings with NaN for missing."""
    values = column.to_pandas()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pd.Series(values, dtype="str")
    return values


def _frame(table: pa.Table, columns: list[str], chunk: _Chunk | None) -> pd.DataFrame:
    frame = pd.DataFrame({c: _series(table.column(c)) for c in columns})
    if chunk is not None:
        frame.attrs["source"] = str(chunk.source)
    return frame


def _locate(frame: pd.DataFrame, chunk: _Chunk) -> None:
    """Give a chunk's frame the file line of every row, for the error message."""
    lines = chunk.lines()
    if lines is not None:
        frame.attrs["lines"] = lines
