"""Out-of-core loading of CSV/TSV/Parquet files: a few streaming passes and an on-disk cache.

`load_streaming` gives the same dataset as `dnis.data.tabular.load_files` (same vocabularies, same
split, same encoded ids in the same order) without ever holding the file in memory:

- **Pass A (scan)**: CSV/TSV files go through the in-memory reader's own checks (bytes and
  encoding, field counts, header; `dnis.data.readers`), so a bad line gives the very same
  `DataError` (file, line, column, fix), then pyarrow's streaming CSV reader counts the rows,
  which the split needs (`sources`, `text`). Parquet: the row count comes from the file's
  metadata.
- **Split**: `split: random` draws the same seeded permutation as the in-memory split
  (`dnis.data.split.random_split`) and stages its inverse (each file row's place) to disk, read
  back chunk by chunk. Drawing it holds 4 bytes a row (int32) for a moment: the one part of the
  build whose memory grows with rows (40 MB for 10M rows). Three files (`{train, valid, test}`)
  are used as given.
- **Pass B (fit)**: pyarrow reads the file in chunks of `chunk_bytes` (a record batch each), checked
  like the in-memory path (labels, times). Categorical and sequence ids of the training rows are counted exactly (pyarrow group-by;
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

Modules, lowest first: `options` (what can be streamed, and how), `text` (a text file's bytes,
checked), `sources` (files read in chunks), `coerce` (a chunk's columns as the in-memory path sees
them, and their counts), `staging` (each row's split and place), `builder` (the passes), `load`
(the cache entry).
"""

from dnis.data.streaming.load import load_streaming
from dnis.data.streaming.options import (
    STREAM_FORMATS,
    STREAM_TASKS,
    VOCAB_MODES,
    StreamingOptions,
    check_streamable,
)

__all__ = [
    "STREAM_FORMATS",
    "STREAM_TASKS",
    "VOCAB_MODES",
    "StreamingOptions",
    "check_streamable",
    "load_streaming",
]
