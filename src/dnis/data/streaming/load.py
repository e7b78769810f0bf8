"""`load_streaming`: a dataset built through the on-disk cache, or opened from it."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from dnis.data.cache import cache_key, file_identity, open_entry, publish, temp_folder, write_meta
from dnis.data.dataset import EncodedDataset
from dnis.data.encode import Encoder
from dnis.data.readers import TableFiles
from dnis.data.schema import Schema
from dnis.data.split import RATIOS, split_cuts
from dnis.data.streaming.builder import Builder
from dnis.data.streaming.options import StreamingOptions, check_streamable
from dnis.data.streaming.sources import CsvFile, ParquetFile
from dnis.errors import ConfigError

log = logging.getLogger("dnis.data.streaming")


def load_streaming(
    files: TableFiles,
    schema: Schema,
    task: str,
    *,
    split: str = "random",
    ratios: tuple[float, float, float] = RATIOS,
    seed: int = 0,
    name: str = "custom",
    options: StreamingOptions | None = None,
) -> EncodedDataset:
    """The dataset of `load_files` with the same arguments, built through the on-disk cache."""
    options = options or StreamingOptions()
    paths = files.files
    check_streamable(files.format, task, split, one_file="all" in paths)
    if schema.label is None:
        raise ConfigError(f"task {task!r} needs a `label` column in the schema")
    split_cuts(0, ratios)  # refuse bad ratios before any work
    sep = files.separator
    sources = {
        key: ParquetFile(file, options.chunk_rows)
        if files.format == "parquet"
        else CsvFile(
            file, sep or ",", files.header, files.names, files.encoding, options.chunk_bytes
        )
        for key, file in paths.items()
    }
    for source in sources.values():
        source.check_exists()
    material = {
        "files": {key: file_identity(file) for key, file in paths.items()},
        "format": files.format,
        "reader": {
            "delimiter": sep,
            "header": files.header,
            "names": files.names,
            "encoding": files.encoding,
        },
        "schema": schema.to_dict(),
        "task": task,
        "split": {"method": split, "ratios": list(ratios), "seed": seed}
        if "all" in paths
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
