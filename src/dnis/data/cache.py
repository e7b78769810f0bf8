"""The on-disk columnar cache of a streamed dataset, and the split that reads from it.

A cache entry is one folder, ``<cache_dir>/<key>/``, named by the sha256 of everything that decides
its content (see `cache_key`):

```
meta.json            key material, rows per split, label range per split, format version
encoder.json         the fitted Encoder (same format as a run's encoder.json)
train.ids.npy        int32 [rows, slots]  field-local ids, 0 = OOV/padding
train.labels.npy     float32 [rows]
valid.ids.npy ...    and the same for valid and test
```

The arrays are plain ``.npy`` files, so ``numpy.load(path, mmap_mode="r")`` opens them. An entry is
built in a temporary folder beside it and renamed into place when complete, so a run killed while
building leaves no entry (only a ``.tmp-*`` folder that the next build ignores).

`DiskSplit` reads those files in blocks with plain file reads (`read`), never through a mapping of
the whole file: pages of a memory mapping stay in the process' resident set once touched, so
iterating a mapped split would make peak RSS grow with the number of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnis.data.dataset import Split
from dnis.io import write_json

CACHE_VERSION = 1
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
DEFAULT_BLOCK_ROWS = 65_536


def cache_key(material: Mapping[str, Any]) -> str:
    """sha256 (hex) of the JSON of `material` with sorted keys: the name of a cache entry."""
    text = json.dumps({"version": CACHE_VERSION, **material}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies a file's content cheaply: its resolved path, size and modification time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class DiskSplit(Split):
    """A split whose ids and labels live in ``.npy`` files of a cache entry.

    `ids` and `labels` are tensors over copy-on-write memory maps of those files (int32 ids, not
    int64), for code that slices a few rows; the loader (`dnis.data.loader.batches`) and the
    point-wise tasks' evaluation read it block by block with `read`, so their memory does not grow
    with the number of rows. `block_rows` is the loader's shuffle block: the order of blocks is
    shuffled, then the rows inside each block.
    """

    def __init__(
        self,
        folder: str | Path,
        name: str,
        rows: int,
        slots: int,
        *,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        label_range: tuple[float, float] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.name = name
        self.rows = int(rows)
        self.slots = int(slots)
        self.block_rows = int(block_rows)
        self.label_range = label_range
        self.ids_path = self.folder / f"{name}.ids.npy"
        self.labels_path = self.folder / f"{name}.labels.npy"
        self._ids_offset = _data_offset(self.ids_path)
        self._labels_offset = _data_offset(self.labels_path)
        self._mapped: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (
            f"DiskSplit({str(self.folder)!r}, {self.name!r}, rows={self.rows}, slots={self.slots})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiskSplit) and (other.folder, other.name, other.rows) == (
            self.folder,
            self.name,
            self.rows,
        )

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Callable[..., DiskSplit], tuple[Any, ...], dict[str, Any]]:
        """Pickles by path (a process that unpickles it reads the same files)."""
        state = {"block_rows": self.block_rows, "label_range": self.label_range}
        return (_reopen, (str(self.folder), self.name, self.rows, self.slots), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.block_rows = state["block_rows"]
        self.label_range = state["label_range"]

    def _maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mapped is None:
            ids = np.load(self.ids_path, mmap_mode="c")
            labels = np.load(self.labels_path, mmap_mode="c")
            self._mapped = (torch.from_numpy(ids), torch.from_numpy(labels))
        return self._mapped

    @property
    def ids(self) -> torch.Tensor:  # type: ignore[override]
        """int32 [rows, slots] over a memory map; prefer `read` or the loader for whole passes."""
        return self._maps()[0]

    @property
    def labels(self) -> torch.Tensor:  # type: ignore[override]
        return self._maps()[1]

    def label_mean(self, chunk_rows: int = 1 << 20) -> float:
        """The mean label, read in chunks of plain reads (no memory map), so the memory it takes
        does not grow with the number of rows."""
        total = 0.0
        for start in range(0, self.rows, chunk_rows):
            labels = np.fromfile(
                self.labels_path,
                dtype=np.float32,
                count=min(chunk_rows, self.rows - start),
                offset=self._labels_offset + start * 4,
            )
            total += float(labels.sum(dtype=np.float64))
        return total / max(self.rows, 1)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) as fresh arrays: ids int32 [m, slots] and labels float32 [m]."""
        start, stop = max(0, start), min(self.rows, stop)
        m = max(0, stop - start)
        ids = np.fromfile(
            self.ids_path,
            dtype=np.int32,
            count=m * self.slots,
            offset=self._ids_offset + start * self.slots * 4,
        )
        labels = np.fromfile(
            self.labels_path, dtype=np.float32, count=m, offset=self._labels_offset + start * 4
        )
        return ids.reshape(m, self.slots), labels


def _reopen(folder: str, name: str, rows: int, slots: int) -> DiskSplit:
    return DiskSplit(folder, name, rows, slots)


def _data_offset(path: Path) -> int:
    """Byte offset of the array data in a .npy file (after its header)."""
    mapped = np.load(path, mmap_mode="r")  # maps the file, touches no page of it
    offset = int(mapped.offset)
    del mapped
    return offset


class SplitWriter:
    """Writes one split's ids and labels into .npy files at given row positions, in chunks.

    Rows may arrive in any order: a random split sends each file row to a random position. Rows
    that continue the file in order are appended directly. Others are staged: appended, with
    their position, to the staging file of their bucket of `bucket_rows` positions; `close` then
    reads one bucket at a time, puts its rows in place in memory and writes the bucket out
    sequentially. Memory holds one chunk or one bucket, and the files are written with plain file
    I/O, never through a memory map (pages of a mapping count as the process' resident memory,
    and a kernel maps large page-cache folios whole, so scattering through a map grows the
    resident set with the file).
    """

    def __init__(
        self, folder: Path, name: str, rows: int, slots: int, bucket_rows: int = 65_536
    ) -> None:
        self.rows, self.slots, self.bucket_rows = rows, slots, bucket_rows
        self.ids_path = folder / f"{name}.ids.npy"
        self.labels_path = folder / f"{name}.labels.npy"
        self.staging = folder / f".{name}.staging"
        for path, dtype, shape in (
            (self.ids_path, np.int32, (rows, slots)),
            (self.labels_path, np.float32, (rows,)),
        ):
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del array  # the header is written and the file has its full (sparse) size
        self.ids_offset = _data_offset(self.ids_path)
        self.labels_offset = _data_offset(self.labels_path)
        self.record = np.dtype([("position", "<i8"), ("label", "<f4"), ("ids", "<i4", (slots,))])
        self.appended = 0  # rows written in order from position 0
        self.staged: set[int] = set()  # buckets with a staging file
        self.written = 0
        self.label_min = float("inf")
        self.label_max = float("-inf")

    def write(self, positions: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        m = len(positions)
        if m == 0:
            return
        self.written += m
        self.label_min = min(self.label_min, float(labels.min()))
        self.label_max = max(self.label_max, float(labels.max()))
        in_order = positions[0] == self.appended and np.array_equal(
            positions, np.arange(self.appended, self.appended + m)
        )
        if in_order and not self.staged:
            self._write_at(self.ids_path, self.ids_offset + self.appended * self.slots * 4, ids)
            self._write_at(self.labels_path, self.labels_offset + self.appended * 4, labels)
            self.appended += m
            return
        records = np.empty(m, dtype=self.record)
        records["position"], records["label"], records["ids"] = positions, labels, ids
        records = records[np.argsort(positions, kind="stable")]
        buckets = records["position"] // self.bucket_rows
        edges = np.flatnonzero(np.diff(buckets)) + 1
        self.staging.mkdir(exist_ok=True)
        for part in np.split(records, edges):
            bucket = int(part["position"][0] // self.bucket_rows)
            with open(self.staging / f"{bucket}.bin", "ab") as handle:
                handle.write(part.tobytes())
            self.staged.add(bucket)

    def _place(self, bucket: int) -> None:
        """Put one bucket's staged rows in place (in memory) and write them out."""
        path = self.staging / f"{bucket}.bin"
        records = np.fromfile(path, dtype=self.record)
        start = bucket * self.bucket_rows
        stop = min(self.rows, start + self.bucket_rows)
        offsets = records["position"] - start
        ids = np.zeros((stop - start, self.slots), dtype=np.int32)
        labels = np.zeros(stop - start, dtype=np.float32)
        ids[offsets], labels[offsets] = records["ids"], records["label"]
        first, last = int(offsets.min()), int(offsets.max()) + 1
        self._write_at(
            self.ids_path, self.ids_offset + (start + first) * self.slots * 4, ids[first:last]
        )
        self._write_at(
            self.labels_path, self.labels_offset + (start + first) * 4, labels[first:last]
        )
        path.unlink()

    @staticmethod
    def _write_at(path: Path, offset: int, array: np.ndarray) -> None:
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(np.ascontiguousarray(array).tobytes())

    def close(self) -> tuple[float, float] | None:
        """Place the staged rows, fsync both files; the label range written (None if empty)."""
        for bucket in sorted(self.staged):
            self._place(bucket)
        if self.staged:
            self.staging.rmdir()
        for path in (self.ids_path, self.labels_path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return (self.label_min, self.label_max) if self.written else None


def open_entry(folder: Path, expected_key: str, block_rows: int) -> dict[str, DiskSplit] | None:
    """The splits of a complete cache entry, or None when it is missing or not this key's."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != expected_key or meta.get("version") != CACHE_VERSION:
            return None
        splits = {}
        for name in SPLIT_NAMES:
            info = meta["splits"][name]
            split = DiskSplit(
                folder,
                name,
                info["rows"],
                meta["slots"],
                block_rows=block_rows,
                label_range=None if info["label_range"] is None else tuple(info["label_range"]),
            )
            ids_bytes = split._ids_offset + split.rows * split.slots * 4
            labels_bytes = split._labels_offset + split.rows * 4
            if (split.ids_path.stat().st_size, split.labels_path.stat().st_size) != (
                ids_bytes,
                labels_bytes,
            ):
                return None
            splits[name] = split
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, truncated or foreign: rebuilt
    return splits


def publish(tmp: Path, final: Path, key: str) -> Path:
    """Rename a finished entry into place. If another process got there first with a complete
    entry of this key, keep theirs; an incomplete or outdated folder in the way is replaced."""
    try:
        os.rename(tmp, final)
    except OSError:
        if open_entry(final, key, DEFAULT_BLOCK_ROWS) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    return final


def temp_folder(cache_dir: Path, key: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def write_meta(
    folder: Path, key: str, material: Mapping[str, Any], splits: dict, slots: int
) -> None:
    write_json(
        folder / "meta.json",
        {
            "version": CACHE_VERSION,
            "key": key,
            "material": material,
            "slots": slots,
            "splits": splits,
        },
    )
