"""Materialised search results: embeddings whose memory really shrinks to the budget.

- `BlockMixedEmbedding` (block granularity): every frequency block k keeps its own set of dims
  D_k, stored as a dense [n_k, |D_k|] table; all blocks live in one flat buffer.
- `RaggedEmbedding` (element granularity): every row keeps its own dims, stored as CSR (values,
  int16 dim indices, int32 row pointers); its memory counts those indices.

Both return vectors padded to the full width d, zeros at pruned dims, so any model built for
width d reads them unchanged, and predictions equal the masked soft-selected model's. A lookup is
a fixed number of vectorised gathers per batch (per chunk of rows, for BlockMixedEmbedding's
inference on the CPU), never a Python loop over fields or blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.windows import exporting, read_windows

_MAX_STEPS = 1
_TABLE_SHARE = 16
_TABLE_FLOOR = 2**16
_CHUNK_BYTES = 2**20  # output bytes per chunk of an eager lookup: a chunk's work stays in cache


def block_finder(
    starts: torch.Tensor, total: int, stored_bytes: int
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Tables that find the block of any of `total` rows (blocks starting at `starts`) in a
    fixed number of steps: (shift, steps, coarse, following). A row's block is read from
    `coarse` (one int32 entry per 2**shift rows) and moved past the block starts inside its
    bucket by `steps` passes of `block += row >= following[block]`. The bucket is the widest whose
    buckets hold at most _MAX_STEPS interior starts, but not so narrow that `coarse` outgrows
    1/_TABLE_SHARE of the table's `stored_bytes` (or _TABLE_FLOOR bytes, for small tables): a
    count of every block start at or below a row is the same lookup in one step, but costs rows
    x blocks compares."""
    table_bytes = max(stored_bytes // _TABLE_SHARE, _TABLE_FLOOR)
    narrowest = (4 * total // table_bytes).bit_length()  # 4 * (total >> it) <= table_bytes
    for shift in range(max(total.bit_length(), narrowest), narrowest - 1, -1):
        inside = starts[starts % (1 << shift) != 0] >> shift
        steps = int(torch.bincount(inside).max()) if len(inside) else 0
        if steps <= _MAX_STEPS:
            break
    buckets = torch.arange(0, max(total, 1), 1 << shift)
    coarse = (torch.searchsorted(starts, buckets, right=True) - 1).clamp(min=0).int()
    following = torch.cat([starts[1:], torch.tensor([torch.iinfo(torch.long).max])])
    return shift, steps, coarse, following


class BlockMixedEmbedding(FieldEmbedding):
    """Saved: `values` (every block's [n_k, |D_k|] table in block order, a row's kept dims
    ascending) and `keep`; the lookup's tables are derived from them at construction.

    Lookup: a row's stored values are read as one window of V consecutive values (V: the widest
    block's width); all windows are the rows of one overlapping [positions, V] view of `values`,
    so N rows take one gather of N rows. One `scatter_` puts them at their dims in the zeroed
    [N, dim] output, the dims coming from a [blocks, V] table: work in N * V, nothing stored per
    row. Window slots past a row's width hold a neighbour's values; they go to one pruned dim of
    the row's block (`dump`), which a fill of N zeros then clears. A block whose last windows
    would pass the end of `values` reads windows that end where its rows end (the widest block,
    V values or more, lies before it). On the CPU rows go in chunks of _CHUNK_BYTES of output, so
    each chunk's work stays in cache. With autograd, and under export, the same runs out of
    place: windows gathered through a flat index (the strided view has no cheap gradient and no
    ONNX form), the extra slots sent to a spare column that is cut off.
    """

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
        sizes = torch.tensor(blocks.size, dtype=torch.long)
        base = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes * widths]), 0)
        self.values = nn.Parameter(torch.zeros(int(base[-1])))
        self.register_buffer("keep", keep)  # the structure: saved with the values
        # Derived tables (not saved). For `_row_index` (every dim of a row, as load_dense needs):
        # where dim j of a block-k row sits inside the row (0 when pruned; `keep_weight` zeroes it).
        position = torch.where(keep, torch.cumsum(keep.long(), dim=1) - 1, 0)
        starts = torch.tensor(blocks.start, dtype=torch.long)
        derived = {"position": position.int(), "keep_weight": keep.float(), "widths": widths,
                   "base": base[:-1], "block_start": starts}  # fmt: skip
        derived.update(self._lookup_tables(keep, sizes, base, starts))
        for name, tensor in derived.items():
            self.register_buffer(name, tensor, persistent=False)

    def _lookup_tables(
        self, keep: torch.Tensor, sizes: torch.Tensor, base: torch.Tensor, starts: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The lookup's tables and Python constants (which a trace keeps), built once."""
        num_blocks, dim = keep.shape
        widths = keep.sum(dim=1) * (sizes > 0)  # a block without rows is never read
        stored = int(base[-1])
        window = int(widths.max()) if num_blocks else 0
        self.full_blocks = bool((widths == dim).any())  # blocks without a pruned dim
        self.chunk = max(1, _CHUNK_BYTES // (4 * dim))  # rows per chunk of an eager lookup
        total = int(sizes.sum())
        self.shift, self.steps, coarse, following = block_finder(starts, total, 4 * stored)
        # a row's window starts at row * width + offset: at the row's first value, or `lead`
        # slots before it when fewer than `window - width` values are stored after the block
        end_aligned = stored - base[1:] < window - widths
        lead = torch.where(end_aligned, window - widths, 0)
        offset = torch.where(widths > 0, base[:-1] - starts * widths - lead, 0)
        # the dim of every window slot; the extra slots go to the block's first pruned dim
        # (`dump`; a block without one has no extra slots) or to the spare column `dim`
        targets = torch.zeros(num_blocks, max(window, 1), dtype=torch.long)
        spare_targets = torch.full_like(targets, dim)
        dump = torch.full((num_blocks,), torch.iinfo(torch.long).max // 2)  # past any output
        for k in range(num_blocks):
            kept, pruned = keep[k].nonzero().flatten(), (~keep[k]).nonzero().flatten()
            if len(pruned):
                targets[k] = dump[k] = pruned[0]
            if widths[k] > 0:
                slots = slice(int(lead[k]), int(lead[k]) + len(kept))
                targets[k, slots] = spare_targets[k, slots] = kept
        return {"coarse": coarse, "following": following, "row_width": widths,
                "row_offset": offset, "targets": targets, "spare_targets": spare_targets,
                "dump": dump, "slots": torch.arange(max(window, 1))}  # fmt: skip

    def _row_index(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat value index [..., dim] of every dim of every row, and the 0/1 keep weights."""
        block = torch.searchsorted(self.block_start, rows, right=True) - 1
        first = self.base[block] + (rows - self.block_start[block]) * self.widths[block]
        first = first.clamp_max(
            max(self.values.numel() - 1, 0)
        ).int()  # width-0 rows point anywhere
        return first.unsqueeze(-1) + self.position[block], self.keep_weight[block]

    def _locate(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block of every row and the position in `values` where its window starts."""
        block = self.coarse.index_select(0, flat >> self.shift)
        for _ in range(self.steps):
            block += flat >= self.following.index_select(0, block)
        start = flat * self.row_width.index_select(0, block)
        return block, start.add_(self.row_offset.index_select(0, block))

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.values.numel() == 0:
            return torch.zeros(*rows.shape, self.dim, device=rows.device)
        flat = rows.reshape(-1)
        block, start = self._locate(flat)
        values, dim = self.values, self.dim
        grad = values.requires_grad and torch.is_grad_enabled()
        if grad or exporting():
            stored = read_windows(values, start, self.slots, strided=False)
            out = stored.new_zeros(stored.shape[0], dim + 1)
            out = out.scatter(1, self.spare_targets.index_select(0, block), stored)
            return out[:, :dim].contiguous().view(*rows.shape, dim)
        count = flat.shape[0] * dim
        dump = torch.arange(0, count, dim, device=flat.device)  # flat position of each dump dim
        dump += self.dump.index_select(0, block)
        if self.full_blocks:
            dump.clamp_max_(count)  # onto the spare value after the output
        buffer = values.new_empty(count + 1)
        out, targets = buffer[:-1].view(-1, dim), self.targets
        chunk = self.chunk if flat.device.type == "cpu" else max(flat.shape[0], 1)
        parts = (t.split(chunk) for t in (out, block, start, dump))
        for part, part_block, part_start, part_dump in zip(*parts, strict=True):
            stored = read_windows(values, part_start, self.slots, strided=True)
            part.zero_().scatter_(1, targets.index_select(0, part_block), stored)
            buffer.index_fill_(0, part_dump, 0.0)
        return out.view(*rows.shape, dim)

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
        # the lookup's derived tables (not saved): every row's width, the window (the widest
        # row's width) and where the last window starts
        self.window = int(counts.max()) if len(counts) else 0
        self.last_window = len(rows) - self.window
        self.register_buffer("row_width", counts, persistent=False)
        self.register_buffer("slots", torch.arange(max(self.window, 1)), persistent=False)

    def _entries(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in `flat`, index into `values`) of every stored entry of the given rows."""
        starts = self.indptr[flat].long()
        lengths = self.indptr[flat + 1].long() - starts
        device = flat.device
        owner = torch.repeat_interleave(torch.arange(len(flat), device=device), lengths)
        shift = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
        return owner, shift + torch.arange(int(lengths.sum()), device=device)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's stored values and their dims read as one window of the widest row's width
        starting at the row's first value (windows that would pass the end of `values` end
        where it ends, the row `lead` slots into them); slots outside the row go to a spare
        column that is cut off. Work in rows x window, no per-entry index built."""
        if self.values.numel() == 0:
            return torch.zeros(*rows.shape, self.dim, device=rows.device)
        flat = rows.reshape(-1)
        start = self.indptr.index_select(0, flat).long()
        first = start.clamp_max(self.last_window)
        lead = (start - first).unsqueeze(1)
        width = self.row_width.index_select(0, flat).unsqueeze(1)
        strided = not ((self.values.requires_grad and torch.is_grad_enabled()) or exporting())
        stored = read_windows(self.values, first, self.slots, strided)
        dims = read_windows(self.dims, first, self.slots, strided)
        inside = (self.slots >= lead) & (self.slots < lead + width)
        target = torch.where(inside, dims.long(), self.dim)
        out = stored.new_zeros(stored.shape[0], self.dim + 1).scatter(1, target, stored)
        return out[:, : self.dim].contiguous().view(*rows.shape, self.dim)

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
