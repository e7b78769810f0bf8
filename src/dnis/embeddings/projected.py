"""Mixed-dimension embeddings with projections (Ginart et al., MDE): narrow tables, full-width output.

Every frequency block k stores its ids in a dense [n_k, d_k] table and owns a projection
P_k [d_k, dim], so id i of block k reads `e_i @ P_k` and every model sees width `dim`. All tables
live in one flat buffer (like `BlockMixedEmbedding`), all projections in one [sum_k d_k, dim]
matrix whose rows base_k .. base_k + d_k - 1 are P_k.

The lookup groups the batch's rows by block (one sort) and runs one small matmul per block that
the batch touches: `table_k[local ids] @ P_k`. The loop is over the few blocks (fields x
num_blocks), never over rows, and every op in it is dense, so forward and backward cost about what
a plain table's lookup plus a [rows, d_k] x [d_k, dim] matmul cost. (A single `embedding_bag` with
per-sample weights over the projection rows avoids the loop, but its backward sorts rows x max d_k
entries and was 40x slower than a plain lookup on MovieLens CTR batches.) The block sizes are
read back to the host once per lookup (`bincount().tolist()`), one sync on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout


class ProjectedBlockEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        blocks: BlockLayout,
        widths: Sequence[int],
        init_std: float = 0.01,
    ) -> None:
        """`widths[k]` (1..dim) is the table width d_k of block k."""
        super().__init__(layout, dim)
        widths_t = torch.as_tensor(list(widths), dtype=torch.long)
        if widths_t.shape != (blocks.num_blocks,):
            raise ValueError(f"widths must have {blocks.num_blocks} entries, got {len(widths_t)}")
        if bool((widths_t < 1).any()) or bool((widths_t > dim).any()):
            raise ValueError(f"every block width must be in [1, {dim}], got {widths_t.tolist()}")
        if sum(blocks.size) != layout.total_rows:
            raise ValueError("blocks must cover every row of the layout exactly once")
        self.blocks = blocks
        sizes = torch.tensor(blocks.size, dtype=torch.long)
        zero = torch.zeros(1, dtype=torch.long)
        base = torch.cumsum(torch.cat([zero, sizes * widths_t]), 0)
        projection_base = torch.cumsum(torch.cat([zero, widths_t]), 0)
        self.values = nn.Parameter(torch.empty(int(base[-1])))
        self.projection = nn.Parameter(torch.empty(int(projection_base[-1]), dim))
        self.max_width = int(widths_t.max())
        self.register_buffer("widths", widths_t)
        self.register_buffer("base", base[:-1])
        self.register_buffer("projection_base", projection_base[:-1])
        self.register_buffer("block_start", torch.tensor(blocks.start, dtype=torch.long))
        self.table_sizes = (sizes * widths_t).tolist()  # split sizes of `values`, one per block
        self.width_list = widths_t.tolist()
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.01) -> None:
        """Tables ~ N(0, std); every projection starts as [I_{d_k} | 0], a truncated embedding."""
        nn.init.normal_(self.values, std=std)
        self.projection.zero_()
        for k, width in enumerate(self.widths.tolist()):
            start = int(self.projection_base[k])
            self.projection[start : start + width, :width] = torch.eye(width)

    def _entries(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(table index, projection row, mask) of the max_width slots of every row, [N, w]."""
        block = torch.searchsorted(self.block_start, flat, right=True) - 1
        width = self.widths[block].unsqueeze(-1)
        j = torch.arange(self.max_width, device=flat.device)
        mask = j < width
        first = self.base[block] + (flat - self.block_start[block]) * self.widths[block]
        table = torch.where(mask, first.unsqueeze(-1) + j, 0)
        projection = torch.where(mask, self.projection_base[block].unsqueeze(-1) + j, 0)
        return table, projection, mask

    def narrow(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored (unprojected) vectors of rows, zero-padded to the widest block [..., w]."""
        table, _, mask = self._entries(rows.reshape(-1))
        return (self.values[table] * mask).view(*rows.shape, self.max_width)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        block = torch.searchsorted(self.block_start, flat, right=True) - 1
        order = torch.argsort(block)
        local = (flat - self.block_start[block])[order]
        counts = torch.bincount(block, minlength=len(self.width_list)).tolist()
        tables = self.values.split(self.table_sizes)
        projections = self.projection.split(self.width_list)
        parts = [
            functional.embedding(ids, table.view(-1, width)) @ projection
            for ids, table, projection, width in zip(
                local.split(counts), tables, projections, self.width_list, strict=True
            )
            if len(ids)
        ]
        grouped = torch.cat(parts) if parts else self.values.new_zeros((0, self.dim))
        out = grouped.new_empty(grouped.shape).index_copy(0, order, grouped)
        return out.view(*rows.shape, self.dim)

    def num_parameters(self) -> int:
        return self.values.numel() + self.projection.numel()

    def dims_per_block(self) -> list[int]:
        return self.widths.tolist()
