"""Mini-batches sliced from tensors: one gather per batch, seeded shuffling, no per-row Python.

In-memory splits are shuffled with one permutation of all rows. Splits on disk
(`dnis.data.cache.DiskSplit`) are read a block of `block_rows` rows at a time: the order of the
blocks is shuffled, then the rows inside each block, so memory holds about one block whatever the
number of rows. Batches run across block edges (the rows left at the end of a block open the next
batch), so both kinds give `num_batches` batches of `batch_size` rows (the last one shorter). A
split of a single block is shuffled with the same draw as in memory and gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dnis.data.cache import DiskSplit
from dnis.data.dataset import Split


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids [B, S] int64, labels [B]); with `shuffle`, an order drawn from `generator`."""
    if isinstance(split, DiskSplit):
        yield from _disk_batches(split, batch_size, shuffle, generator)
        return
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield split.ids[index], split.labels[index]
    else:
        for start in range(0, n, batch_size):
            yield split.ids[start : start + batch_size], split.labels[start : start + batch_size]


def num_batches(split: Split, batch_size: int) -> int:
    return (len(split) + batch_size - 1) // batch_size


def _disk_batches(
    split: DiskSplit, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n, size = len(split), split.block_rows
    blocks = (n + size - 1) // size
    order = torch.arange(blocks)
    block_generators: list[torch.Generator | None] = [generator] * blocks
    if shuffle and blocks > 1:
        # all draws up front, so the shuffle does not depend on what else uses `generator`
        order = torch.randperm(blocks, generator=generator)
        seeds = torch.randint(0, 2**62, (blocks,), generator=generator).tolist()
        block_generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    carry_ids = carry_labels = None
    for block in order.tolist():
        ids_np, labels_np = split.read(block * size, (block + 1) * size)
        ids, labels = torch.from_numpy(ids_np), torch.from_numpy(labels_np)
        if shuffle:
            rows = torch.randperm(len(ids), generator=block_generators[block])
            ids, labels = ids[rows], labels[rows]
        if carry_ids is not None:
            ids, labels = torch.cat([carry_ids, ids]), torch.cat([carry_labels, labels])
        full = len(ids) - len(ids) % batch_size
        for start in range(0, full, batch_size):
            yield ids[start : start + batch_size].long(), labels[start : start + batch_size]
        carry_ids, carry_labels = ids[full:], labels[full:]
    if carry_ids is not None and len(carry_ids):
        yield carry_ids.long(), carry_labels


def label_mean(split: Split) -> float:
    """The mean label of a split, without loading a split on disk."""
    if isinstance(split, DiskSplit):
        return split.label_mean()
    return float(split.labels.double().mean())


def label_range(split: Split) -> tuple[float, float]:
    """(min, max) of a split's labels, without loading a split on disk."""
    if isinstance(split, DiskSplit):
        if split.label_range is None:
            raise ValueError(f"split {split.name!r} is empty")
        return split.label_range
    return float(split.labels.min()), float(split.labels.max())
