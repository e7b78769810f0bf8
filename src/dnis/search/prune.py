"""Pruning a searched soft-selection layer to a parameter budget.

- `block` granularity: entry alpha[k, j] costs the n_k rows of block k; entries are taken by
  descending alpha while they fit the budget (greedy knapsack by value per parameter), so every
  id of a block keeps the same dims.
- `element` granularity (AutoSrh's fine-grained rule): keep the `budget` entries of largest
  |e_i * alpha[block(i)]| over the whole table, so every id gets its own width. The reference
  implementation binary-searches a global threshold; taking the top-`budget` magnitudes is the
  same rule and hits the budget exactly even with ties.
Padding rows of sequence fields are never read by a model, so they get no dims.
"""

from __future__ import annotations

import math

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


def padding_rows(layout: FieldLayout) -> torch.Tensor:
    """Global rows that hold sequence padding (id 0 of a sequence field)."""
    offsets = layout.field_offsets()
    return offsets[torch.tensor(layout.sequence_fields, dtype=torch.bool)]


def prune_blocks(alpha: torch.Tensor, blocks: BlockLayout, budget: int) -> torch.Tensor:
    """keep [num_blocks, dim]: the entries of largest alpha whose total rows fit `budget`."""
    sizes = torch.tensor(blocks.size, dtype=torch.long)
    cost = sizes.unsqueeze(1).expand_as(alpha).reshape(-1)
    value = alpha.detach().cpu().reshape(-1)  # a structure decision: made on the CPU
    order = torch.argsort(value, descending=True, stable=True)
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
    return keep.view_as(alpha)


def prune_elements(table: torch.Tensor, layout: FieldLayout, budget: int) -> torch.Tensor:
    """keep [rows, dim]: the `budget` entries of largest magnitude."""
    magnitude = table.detach().abs().cpu()  # a copy: padding rows are overwritten below
    magnitude[padding_rows(layout)] = -1.0
    budget = min(budget, int((magnitude >= 0).sum()))
    keep = torch.zeros(magnitude.numel(), dtype=torch.bool)
    keep[torch.topk(magnitude.reshape(-1), budget, sorted=False).indices] = True
    return keep.view_as(table)
