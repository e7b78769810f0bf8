"""Frequency blocks: each field's ids, sorted by training frequency, cut into contiguous blocks.

DNIS gives every block its own row of selection weights, so frequent ids can keep more dims than
rare ones. Ids are frequency-sorted by the encoder (id 1 most frequent), so a block is a
contiguous range of rows of the fused table. The OOV id 0 joins its field's first block. Edges
are moved to the end of a run of equal frequencies, so ids seen equally often never straddle a
block edge; a field with few distinct frequencies may therefore get fewer blocks than asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.layout import FieldLayout
from dnis.errors import ConfigError

BLOCK_MODES: tuple[str, ...] = ("count", "mass")


@dataclass(frozen=True)
class BlockLayout:
    """Blocks over the rows of a fused table: block b is rows [start[b], start[b] + size[b])."""

    field: tuple[int, ...]  # field of each block
    start: tuple[int, ...]  # first global row
    size: tuple[int, ...]  # number of rows
    frequency: tuple[int, ...]  # total training count of the block's ids

    @property
    def num_blocks(self) -> int:
        return len(self.start)

    def row_block(self) -> torch.Tensor:
        """Block index of every row [total_rows]."""
        return torch.repeat_interleave(torch.arange(self.num_blocks), torch.tensor(self.size))

    def blocks_of(self, field: int) -> list[int]:
        return [b for b, f in enumerate(self.field) if f == field]


def block_edges(counts: np.ndarray, num_blocks: int, mode: str) -> list[int]:
    """Cut points (exclusive ends) in 0..n over ids sorted by descending `counts`."""
    n = len(counts)
    if n == 0:
        return []
    if mode == "count":
        targets = np.ceil(np.arange(1, num_blocks) * n / num_blocks).astype(int)
    elif mode == "mass":
        cumulative = np.cumsum(counts, dtype=np.float64)
        total = cumulative[-1] if cumulative[-1] > 0 else 1.0
        targets = np.searchsorted(cumulative / total, np.arange(1, num_blocks) / num_blocks) + 1
    else:
        raise ConfigError(
            f"block mode must be one of {BLOCK_MODES} or a list of fractions, got {mode!r}"
        )
    return _snap(counts, targets)


def explicit_edges(counts: np.ndarray, fractions: Sequence[float]) -> list[int]:
    """Cut points at given fractions of the ids, e.g. [0.05, 0.2, 0.5] -> 4 blocks."""
    if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(fractions):
        raise ConfigError(
            f"explicit block edges must be increasing fractions in (0, 1), got {fractions}"
        )
    return _snap(counts, np.ceil(np.asarray(fractions) * len(counts)).astype(int))


def _snap(counts: np.ndarray, targets: np.ndarray) -> list[int]:
    """Move each cut to the end of its run of equal counts; drop empty and duplicate blocks."""
    n = len(counts)
    run_end = np.r_[np.flatnonzero(counts[1:] != counts[:-1]) + 1, n]  # end of each equal run
    edges = []
    for target in targets:
        if target <= 0 or target >= n:
            continue
        # the run containing id `target - 1` ends at the first run end >= target
        cut = int(run_end[np.searchsorted(run_end, target)])
        if cut < n and (not edges or cut > edges[-1]):
            edges.append(cut)
    return edges + [n]


def frequency_blocks(
    layout: FieldLayout,
    frequencies: Sequence[np.ndarray],
    num_blocks: int = 6,
    mode: str | Sequence[float] = "count",
) -> BlockLayout:
    """Blocks of every field from its ids' training counts (index 0 = OOV, count ignored)."""
    if num_blocks < 1:
        raise ConfigError(f"num_blocks must be >= 1, got {num_blocks}")
    offsets = layout.field_offsets().tolist()
    field, start, size, freq = [], [], [], []
    for f, counts in enumerate(frequencies):
        counts = np.asarray(counts)[1:]  # ids 1..n, sorted by descending count
        if isinstance(mode, str):
            edges = block_edges(counts, num_blocks, mode)
        else:
            edges = explicit_edges(counts, mode)
        previous = 0
        for k, end in enumerate(edges):
            first = offsets[f] + (0 if k == 0 else 1 + previous)  # block 0 also holds OOV row
            last = offsets[f] + 1 + end
            field.append(f)
            start.append(first)
            size.append(last - first)
            freq.append(int(counts[previous:end].sum()))
            previous = end
        if not edges:  # a field with only the OOV id
            field.append(f)
            start.append(offsets[f])
            size.append(1)
            freq.append(0)
    return BlockLayout(tuple(field), tuple(start), tuple(size), tuple(freq))


def dataset_blocks(
    dataset: EncodedDataset, num_blocks: int = 6, mode: str | Sequence[float] = "count"
) -> BlockLayout:
    layout = FieldLayout.from_dataset(dataset)
    frequencies = [enc.frequencies() for enc in dataset.encoder.fields]
    return frequency_blocks(layout, frequencies, num_blocks, mode)
