"""Pruning a searched soft-selection layer to a parameter budget.

- `block` granularity: entry alpha[k, j] costs the n_k rows of block k; entries are taken by
  descending alpha while they fit the budget (then smaller blocks that still fit), so every id
  of a block keeps the same dims.
- `element` granularity (AutoSrh's fine-grained rule): keep the `budget` entries of largest
  |e_i * alpha[block(i)]| over the whole table, so every id gets its own width. The reference
  implementation binary-searches a global threshold; taking the top-`budget` magnitudes is the
  same rule and hits the budget exactly even with ties.
Padding rows of sequence fields are never read by a model, so they get no dims.
"""

from __future__ import annotations

import math
import re

import torch

from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.errors import ConfigError

GRANULARITIES: tuple[str, ...] = ("block", "element")


def budget_params(budget: float, full_params: int) -> int:
    """A budget as a parameter count: a fraction in (0, 1] of the full table, or a count > 1."""
    if not math.isfinite(budget):
        raise ConfigError(
            f"budget must be a finite number (a fraction of the full embedding, e.g. 0.25, or a "
            f"parameter count), got {budget}"
        )
    if budget <= 0:
        raise ConfigError(
            f"budget must be > 0 (a fraction of the full embedding or a count), got {budget}"
        )
    if budget <= 1:
        return max(1, int(round(budget * full_params)))
    if budget != int(budget) or budget > full_params:
        raise ConfigError(
            f"budget {budget} is neither a fraction in (0, 1] nor a parameter count <= {full_params}"
        )
    return int(budget)


# byte sizes a budget may be written in: decimal (kB = 1000) and binary (KiB = 1024) units
BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip
FP32_BYTES = 4  # bytes of a parameter stored at full precision
# a number and a unit: how a byte size is written (its unit is checked against BYTE_UNITS)
BYTE_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*")


def parse_byte_size(value: str, where: str = "budget") -> int:
    """`"2MB"`, `"1.5 MiB"`, `"300kB"`, `"4096B"` as a byte count (ConfigError when not one)."""
    match = BYTE_SIZE.fullmatch(value)
    unit = match and BYTE_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise ConfigError(
            f"{where} {value!r} is not a byte size: write a number and a unit, e.g. 2MB or "
            f"1.5MiB (units: {', '.join(['B', 'kB', 'MB', 'GB', 'KiB', 'MiB', 'GiB'])})"
        )
    size = float(match.group(1)) * unit
    if size < 1 or size != int(size):
        raise ConfigError(f"{where} {value!r} is not a whole number of bytes (at least 1)")
    return int(size)


def bytes_fraction(size: int, full_params: int, where: str = "budget") -> float:
    """A byte budget as a fraction of the full-width fp32 table: the whole parameters (4 bytes
    each) that fit in `size` bytes, over the full table's, so the budget never grows past `size`
    when it is turned back into parameters (`budget_params`) or bytes."""
    full = FP32_BYTES * full_params
    if size > full:
        raise ConfigError(
            f"{where}: {size:,} bytes is more than the full-width fp32 embedding ({full:,} bytes)"
        )
    if size < FP32_BYTES:
        raise ConfigError(f"{where}: {size} bytes is less than one fp32 parameter (4 bytes)")
    return (size // FP32_BYTES) / full_params


def resolve_budget(budget: float | str, full_params: int, where: str = "budget") -> float:
    """A budget as a fraction (or count) the methods take: a byte size ("2MB") becomes the
    fraction of the full-width fp32 table's bytes it holds (`bytes_fraction`); a number is
    returned as it is."""
    if isinstance(budget, str):
        return bytes_fraction(parse_byte_size(budget, where), full_params, where)
    return budget


def check_budget(budget: float | str, where: str = "budget") -> None:
    """Refuse what is no budget before any data is read: 0, negatives, non-integral counts > 1,
    and strings that are no byte size."""
    if isinstance(budget, str):
        try:
            parse_byte_size(budget, where)
        except ConfigError as error:
            raise ConfigError(f"{error}; or give a fraction in (0, 1], e.g. 0.25") from None
    else:
        budget_params(budget, 1 << 62)


def padding_rows(layout: FieldLayout) -> torch.Tensor:
    """Global rows that hold sequence padding (id 0 of a sequence field)."""
    offsets = layout.field_offsets()
    return offsets[torch.tensor(layout.sequence_fields, dtype=torch.bool)]


def block_saliency(table: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """[num_blocks, dim]: the mean |value| of each block's rows in each dim of `table` (alpha
    folded in), a score that does not change when scale moves between the weights and alpha."""
    row_block = blocks.row_block().to(table.device)
    total = torch.zeros(blocks.num_blocks, table.shape[1], dtype=table.dtype, device=table.device)
    total.index_add_(0, row_block, table.detach().abs())
    sizes = torch.tensor(blocks.size, dtype=table.dtype, device=table.device).clamp_min(1)
    return (total / sizes.unsqueeze(1)).cpu()


def prune_blocks(
    score: torch.Tensor, blocks: BlockLayout, budget: int, tiebreak: torch.Tensor | None = None
) -> torch.Tensor:
    """keep [num_blocks, dim]: the entries of largest `score` whose total rows fit `budget`.

    Equal scores (alpha clamped at exactly 0 or 1) are ordered by `tiebreak`, also larger first,
    so that a tie is decided by the data, not by which field comes first in the schema."""
    sizes = torch.tensor(blocks.size, dtype=torch.long)
    cost = sizes.unsqueeze(1).expand_as(score).reshape(-1)
    value = score.detach().cpu().reshape(-1)  # a structure decision: made on the CPU
    order = torch.arange(value.numel())
    if tiebreak is not None:  # lexicographic: sort by the tie-break, then stably by the score
        order = torch.argsort(tiebreak.detach().cpu().reshape(-1), descending=True, stable=True)
    order = order[torch.argsort(value[order], descending=True, stable=True)]
    keep = torch.zeros_like(value, dtype=torch.bool)
    cumulative = torch.cumsum(cost[order], 0)
    prefix = int((cumulative <= budget).sum())  # the largest-alpha entries that fit together
    keep[order[:prefix]] = True
    spent = int(cumulative[prefix - 1]) if prefix else 0
    for index in order[prefix:].tolist():  # then smaller blocks that still fit (few iterations)
        if spent + int(cost[index]) <= budget:
            keep[index] = True
            spent += int(cost[index])
        if spent == budget:
            break
    return keep.view_as(score)


def prune_elements(table: torch.Tensor, layout: FieldLayout, budget: int) -> torch.Tensor:
    """keep [rows, dim]: the `budget` entries of largest magnitude."""
    magnitude = table.detach().abs().cpu()  # a copy: padding rows are overwritten below
    magnitude[padding_rows(layout)] = -1.0
    budget = min(budget, int((magnitude >= 0).sum()))
    keep = torch.zeros(magnitude.numel(), dtype=torch.bool)
    keep[torch.topk(magnitude.reshape(-1), budget, sorted=False).indices] = True
    return keep.view_as(table)
