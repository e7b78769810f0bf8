"""Bounded-memory summaries for one streaming pass: a count-min sketch and a reservoir sample.

**Count-min sketch** (Cormode and Muthukrishnan, 2005): `depth` rows of `width` counters; a value
adds its count to one counter per row (chosen by a hash) and its estimate is the minimum of its
counters. The estimate never underestimates, and with N the total of all counts added,

    estimate <= true count + e * N / width   with probability at least 1 - exp(-depth)

(e = 2.718...). Memory is 8 * width * depth bytes, whatever the number of distinct values. One
sketch serves all fields (the field index is mixed into the hash), so N counts every field's
values.

**Reservoir sample**: every value gets an independent uniform key from a seeded generator and the
`size` values with the smallest keys are kept, a uniform sample without replacement of everything
seen. Keys are drawn per value in arrival order from one generator per sample, so the sample does
not depend on how the stream was chunked. While at most `size` values have been seen the sample is
all of them, and quantiles computed from it are exact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnis.errors import ConfigError

_KEYS = ("dnis-countmin-a1", "dnis-countmin-b2")  # siphash keys (16 bytes each)


class CountMinSketch:
    """Approximate counts of string values in `width * depth` int64 counters."""

    def __init__(self, width: int = 1 << 21, depth: int = 4) -> None:
        if width < 1 or depth < 1:
            raise ConfigError(f"count-min sketch needs width and depth >= 1, got {width}, {depth}")
        self.width, self.depth = int(width), int(depth)
        self.table = np.zeros((self.depth, self.width), dtype=np.int64)
        self.total = 0

    def _columns(self, values: np.ndarray, field: int) -> np.ndarray:
        """Counter index of every value in every row, [depth, n] (double hashing)."""
        objects = np.asarray(values, dtype=object)
        h1 = pd.util.hash_array(objects, hash_key=_KEYS[0], categorize=False)
        h2 = pd.util.hash_array(objects, hash_key=_KEYS[1], categorize=False) | np.uint64(1)
        salt = np.uint64((field + 1) * 0x9E3779B97F4A7C15 % (1 << 64))
        h1 = h1 ^ salt
        rows = np.arange(self.depth, dtype=np.uint64)[:, None]
        with np.errstate(over="ignore"):
            mixed = h1[None, :] + rows * h2[None, :]
        return (mixed % np.uint64(self.width)).astype(np.int64)

    def add(self, values: np.ndarray, counts: np.ndarray, field: int = 0) -> None:
        """Add `counts[i]` occurrences of `values[i]` (distinct values of one chunk, say)."""
        if len(values) == 0:
            return
        counts = np.asarray(counts, dtype=np.int64)
        columns = self._columns(values, field)
        for row in range(self.depth):
            np.add.at(self.table[row], columns[row], counts)
        self.total += int(counts.sum())

    def estimate(self, values: np.ndarray, field: int = 0) -> np.ndarray:
        """Estimated count of every value (never below its true count)."""
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        columns = self._columns(values, field)
        return np.min(self.table[np.arange(self.depth)[:, None], columns], axis=0)

    def error_bound(self) -> float:
        """The additive error e * N / width that holds with probability 1 - exp(-depth)."""
        return float(np.e * self.total / self.width)


class Reservoir:
    """A uniform sample of at most `size` floats from a stream (bottom-k of seeded random keys)."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ConfigError(f"the quantile sample needs size >= 1, got {size}")
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self._values: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._held = 0
        self.seen = 0

    @property
    def exact(self) -> bool:
        """True while the sample holds every value seen."""
        return self.seen <= self.size

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if len(values) == 0:
            return
        self._keys.append(self.rng.random(len(values)))
        self._values.append(values)
        self.seen += len(values)
        self._held += len(values)
        if self._held > 2 * self.size:  # compact now and then: amortised linear time
            self._compact()

    def _compact(self) -> None:
        values, keys = np.concatenate(self._values), np.concatenate(self._keys)
        if len(values) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            values, keys = values[keep], keys[keep]
        self._values, self._keys, self._held = [values], [keys], len(values)

    @property
    def values(self) -> np.ndarray:
        """The sample (every value seen while `exact`)."""
        if not self._values:
            return np.zeros(0, dtype=np.float64)
        self._compact()
        return self._values[0]
