"""Mini-batches sliced from tensors: one gather per batch, seeded shuffling, no per-row Python."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dnis.data.dataset import Split


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids [B, S], labels [B]); with `shuffle`, a permutation drawn from `generator`."""
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
