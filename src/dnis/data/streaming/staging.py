"""Which split, and which place in it, every row of a streamed file goes to (staged on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dnis.data.cache import SPLIT_NAMES
from dnis.data.split import split_cuts


class Assignment:
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
            a, b = split_cuts(n, ratios)
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
