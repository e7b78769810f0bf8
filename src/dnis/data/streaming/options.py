"""The options of a streamed build, and which datasets can be streamed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnis.data.cache import DEFAULT_BLOCK_ROWS
from dnis.errors import ConfigError

VOCAB_MODES: tuple[str, ...] = ("two_pass", "count_min")
STREAM_FORMATS: tuple[str, ...] = ("csv", "tsv", "parquet")
STREAM_TASKS: tuple[str, ...] = ("rating", "ctr")


def check_streamable(format: str, task: str, split: str, one_file: bool) -> None:
    """Refuse, before any work, a dataset that streaming cannot build: another format or task, or
    one file split otherwise than at random (three files are used as given)."""
    if format not in STREAM_FORMATS:
        raise ConfigError(
            f"dataset.streaming reads your own csv, tsv or parquet files, not format {format!r}; "
            "convert the file (e.g. to Parquet) or set streaming: false"
        )
    if task not in STREAM_TASKS:
        raise ConfigError(
            f"dataset.streaming supports the tasks rating and ctr, not {task!r}; "
            "set streaming: false"
        )
    if one_file and split != "random":
        raise ConfigError(
            f"dataset.streaming splits one file with split: random, not {split!r}; "
            "give {train, valid, test} files or set streaming: false"
        )


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
