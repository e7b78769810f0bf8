"""`load_streaming`: a dataset built through the on-disk cache, or opened from it."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from dnis.data.cache import cache_key, file_identity, open_entry, publish, temp_folder, write_meta
from dnis.data.dataset import EncodedDataset
from dnis.data.encode import Encoder
from dnis.data.schema import Schema
from dnis.data.split import RATIOS, _cuts
from dnis.data.streaming.builder import Builder
from dnis.data.streaming.options import STREAM_FORMATS, STREAM_TASKS, StreamingOptions
from dnis.data.streaming.sources import CsvFile, ParquetFile
from dnis.errors import ConfigError

log = logging.getLogger("dnis.data.streaming")


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
        key: ParquetFile(file, options.chunk_rows)
        if format == "parquet"
        else CsvFile(file, sep or ",", header, names, encoding, options.chunk_bytes)
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
            info = Builder(sources, schema, task, ratios, seed, options).build(tmp)
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
