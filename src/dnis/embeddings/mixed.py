"""Materialised search results: embeddings whose memory really shrinks to the budget.

- `BlockMixedEmbedding` (block granularity): every frequency block k keeps its own set of dims
  D_k, stored as a dense [n_k, |D_k|] table; all blocks live in one flat buffer.
- `RaggedEmbedding` (element granularity): every row keeps its own dims, stored as CSR (values,
  int16 dim indices, int32 row pointers); its memory counts those indices.

Both return vectors padded to the full width d, zeros at pruned dims, so any model built for
width d reads them unchanged, and predictions equal the masked soft-selected model's. A lookup is
a fixed number of vectorised gathers per batch, never a Python loop over fields or blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout


class BlockMixedEmbedding(FieldEmbedding):
    def __init__(
        self, layout: FieldLayout, dim: int, blocks: BlockLayout, keep: torch.Tensor
    ) -> None:
        """`keep` [num_blocks, dim] (bool) says which dims each block keeps."""
        super().__init__(layout, dim)
        keep = keep.bool()
        if keep.shape != (blocks.num_blocks, dim):
            raise ValueError(f"keep must be [{blocks.num_blocks}, {dim}], got {list(keep.shape)}")
        self.blocks = blocks
        widths = keep.sum(dim=1)
        sizes = torch.tensor(blocks.size)
        base = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes * widths]), 0)
        self.values = nn.Parameter(torch.zeros(int(base[-1])))
        self.register_buffer("keep", keep)  # the structure: saved with the values
        # Derived lookup tables (not saved): where dim j of a block-k row sits inside the row (0 when
        # pruned; `keep_weight` zeroes it), in int32 to halve the memory traffic of the gather.
        position = torch.where(keep, torch.cumsum(keep.long(), dim=1) - 1, 0)
        derived = {"position": position.int(), "keep_weight": keep.float(), "widths": widths,
                   "base": base[:-1], "block_start": torch.tensor(blocks.start)}  # fmt: skip
        for name, tensor in derived.items():
            self.register_buffer(name, tensor, persistent=False)

    def _row_index(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat value index [..., dim] of every dim of every row, and the 0/1 keep weights."""
        block = torch.searchsorted(self.block_start, rows, right=True) - 1
        first = self.base[block] + (rows - self.block_start[block]) * self.widths[block]
        first = first.clamp_max(
            max(self.values.numel() - 1, 0)
        ).int()  # width-0 rows point anywhere
        return first.unsqueeze(-1) + self.position[block], self.keep_weight[block]

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.values.numel() == 0:
            return torch.zeros(*rows.shape, self.dim, device=rows.device)
        index, weight = self._row_index(rows)
        return self.values.index_select(0, index.reshape(-1)).view(index.shape) * weight

    @torch.no_grad()
    def load_dense(self, table: torch.Tensor) -> None:
        """Copy the kept entries of a dense [rows, dim] table (e.g. alpha-folded weights)."""
        rows = torch.arange(table.shape[0], device=self.keep.device)
        index, weight = self._row_index(rows)
        kept = weight.bool()
        self.values[index[kept].long()] = table.to(self.values.device)[kept]

    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.values, std=std)

    def num_parameters(self) -> int:
        return self.values.numel()

    def dims_per_block(self) -> list[int]:
        return self.widths.tolist()


def ragged_keep(indptr: torch.Tensor, dims: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """The [rows, dim] keep mask behind a RaggedEmbedding's CSR structure."""
    widths = (indptr[1:] - indptr[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(rows), widths)
    keep = torch.zeros(rows, dim, dtype=torch.bool)
    keep[owner, dims.long()] = True
    return keep


class RaggedEmbedding(FieldEmbedding):
    def __init__(self, layout: FieldLayout, dim: int, keep: torch.Tensor) -> None:
        """`keep` [rows, dim] (bool) says which entries of every row survive."""
        super().__init__(layout, dim)
        keep = keep.bool()
        if keep.shape != (layout.total_rows, dim):
            raise ValueError(f"keep must be [{layout.total_rows}, {dim}], got {list(keep.shape)}")
        if dim > torch.iinfo(torch.int16).max:
            raise ValueError("RaggedEmbedding stores dim indices as int16: dim must be < 32768")
        rows, dims = keep.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=layout.total_rows)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        self.values = nn.Parameter(torch.zeros(len(rows)))
        self.register_buffer("dims", dims.to(torch.int16))
        self.register_buffer("indptr", indptr.to(torch.int32))

    def _entries(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in `flat`, index into `values`) of every stored entry of the given rows."""
        starts = self.indptr[flat].long()
        lengths = self.indptr[flat + 1].long() - starts
        device = flat.device
        owner = torch.repeat_interleave(torch.arange(len(flat), device=device), lengths)
        shift = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        return owner, shift + torch.arange(int(lengths.sum()), device=device)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        owner, entry = self._entries(flat)
        out = self.values.new_zeros(len(flat), self.dim)
        out = out.index_put((owner, self.dims[entry].long()), self.values[entry])
        return out.view(*rows.shape, self.dim)

    @torch.no_grad()
    def load_dense(self, table: torch.Tensor) -> None:
        owner, entry = self._entries(torch.arange(table.shape[0], device=self.indptr.device))
        table = table.to(self.values.device)
        self.values[entry] = table[owner, self.dims[entry].long()]

    def reset_parameters(self, std: float = 0.01) -> None:
        nn.init.normal_(self.values, std=std)

    def num_parameters(self) -> int:
        return self.values.numel()

    def widths(self) -> torch.Tensor:
        """Number of kept dims of every row."""
        return (self.indptr[1:] - self.indptr[:-1]).long()
