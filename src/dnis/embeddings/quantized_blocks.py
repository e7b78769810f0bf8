"""Precision in the plan: every frequency block keeps its own dims and its own storage precision.

`QuantizedBlockEmbedding` is `BlockMixedEmbedding` (block k keeps the dims D_k of a `keep`
[num_blocks, dim] mask, a row's kept values in ascending dim order) whose block k also stores its
rows at its own precision p_k in fp32, fp16, int8 or int4, row-wise quantized as `quantize_rows`
does (int8/int4: an fp16 scale and bias per row, int4 packed two codes a byte). A row of block k
stores `row_bytes(|D_k|, p_k)` bytes; a block of width 0 stores nothing, not even a scale.

Saved (`memory_bytes` is their size, exactly): per precision p present, the rows of its blocks
back to back in one flat buffer `codes_<p>` (uint8 codes for int8/int4, float16/float32 values)
and, for int8/int4, `scale_<p>` and `bias_<p>` (fp16, one entry per stored row); `keep` and
`block_precision` (a uint8 index into PRECISIONS per block). Nothing is trainable.

The lookup reads the dense [N, dim] vectors of N rows with a fixed number of vectorised ops per
precision present, no loop over blocks or rows. A row's block comes from a small bucket table and
at most one compare-and-step pass (a count of all block starts at or below the row, rows x blocks
compares, was most of the lookup with 130 blocks). Per precision, every row gathers a window of
the widest row's units (bytes or values) from its first unit (rows of other precisions read the
buffer's first window; slots past a row's end read a neighbour; neither is ever used; a block
ending less than a window before the buffer's end reads windows that end where its rows end), and
dequantizes it as `dequantize_rows` does (float arithmetic for the nibbles under a trace or an
export), giving every row a few value slots; one `gather` then picks, for every output dim, the
slot of that dim in the row's block, or a zero column where the block prunes it. No scatter, no
searchsorted: it traces and exports to ONNX (opset 17). Eagerly the windows are gathered as the rows of one
overlapping view of the buffer; traced, through a flat index (the view has no ONNX form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import block_finder
from dnis.embeddings.quantized import (
    PRECISIONS,
    check_precision,
    code_bytes,
    dequantize_rows,
    is_integer,
    quantize_rows,
)
from dnis.embeddings.windows import exporting, read_windows

FLOATS = {"fp32": torch.float32, "fp16": torch.float16}


class QuantizedBlockEmbedding(FieldEmbedding):
    def __init__(
        self,
        layout: FieldLayout,
        dim: int,
        blocks: BlockLayout,
        keep: torch.Tensor,
        precisions: Sequence[str],
    ) -> None:
        """Empty storage for `keep` [num_blocks, dim] (bool) and one precision per block."""
        super().__init__(layout, dim)
        keep = keep.bool().cpu()
        if keep.shape != (blocks.num_blocks, dim):
            raise ValueError(f"keep must be [{blocks.num_blocks}, {dim}], got {list(keep.shape)}")
        if isinstance(precisions, str) or len(precisions) != blocks.num_blocks:
            raise ValueError(f"precisions must name one precision per block ({blocks.num_blocks})")
        self.blocks = blocks
        self.precisions = [check_precision(p) for p in precisions]
        self.widths = keep.sum(dim=1).tolist()
        self.register_buffer("keep", keep)
        codes = torch.tensor([PRECISIONS.index(p) for p in self.precisions], dtype=torch.uint8)
        self.register_buffer("block_precision", codes)
        # where each stored block's rows sit in its precision's buffers: (units a row, first unit,
        # first scale/bias entry); units are bytes (int8, int4) or values (fp16, fp32)
        self.placement: dict[int, tuple[int, int, int]] = {}
        self.groups: list[str] = []  # the precisions stored, in PRECISIONS order
        for p in PRECISIONS:
            units, rows = 0, 0
            for k in range(blocks.num_blocks):
                if self.precisions[k] != p or self.widths[k] == 0 or blocks.size[k] == 0:
                    continue
                step = code_bytes(self.widths[k], p) if is_integer(p) else self.widths[k]
                self.placement[k] = (step, units, rows)
                units, rows = units + step * blocks.size[k], rows + blocks.size[k]
            if rows == 0:
                continue
            self.groups.append(p)
            dtype = FLOATS.get(p, torch.uint8)
            self.register_buffer(f"codes_{p}", torch.zeros(units, dtype=dtype))
            if is_integer(p):
                self.register_buffer(f"scale_{p}", torch.zeros(rows, dtype=torch.float16))
                self.register_buffer(f"bias_{p}", torch.zeros(rows, dtype=torch.float16))
        for name, tensor in self._lookup_tables().items():
            self.register_buffer(name, tensor, persistent=False)

    def _lookup_tables(self) -> dict[str, torch.Tensor]:
        """The lookup's index tables (not saved) and its Python constants (which a trace keeps).

        Per stored precision p, `window_p` counts the units of its widest row, whose values fill
        `slot_counts[p]` value slots. A block-k row r reads the window starting at unit
        `r * step_p[k] + first_p[k]` of `codes_p` (0 for blocks of other precisions): its first
        unit, or `lead` units before it when the block ends less than a window before the end
        of the buffer, so every window lies inside the buffer (a block with a lead is stored
        after the widest row's block, which is a window or more long, so its first window does
        not start before the buffer). Its scale and bias are entry `r + row_p[k]`.
        `slot_of[k, d]` is the column of dim d of a block-k row among every precision's slots
        side by side, or the zero column after them where block k prunes d."""
        num_blocks, starts = self.blocks.num_blocks, self.blocks.start
        tables = self._block_finder()
        self.slot_counts: dict[str, int] = {}
        slot_of = torch.zeros(num_blocks, self.dim, dtype=torch.long)
        column = 0
        for p in self.groups:
            ours = {k: place for k, place in self.placement.items() if self.precisions[k] == p}
            window = max(units for units, _, _ in ours.values())
            stored = getattr(self, f"codes_{p}").numel()
            per_unit = 2 if p == "int4" else 1  # value slots a unit holds
            step, first, row = (torch.zeros(num_blocks, dtype=torch.long) for _ in range(3))
            for k, (units, unit, entry) in ours.items():
                last = unit + (self.blocks.size[k] - 1) * units  # the block's last row
                lead = max(0, last + window - stored)
                step[k], first[k] = units, unit - starts[k] * units - lead
                row[k] = entry - starts[k]
                kept = self.keep[k].nonzero().flatten()
                slot_of[k, kept] = column + per_unit * lead + torch.arange(len(kept))
            self.slot_counts[p] = per_unit * window
            tables.update(
                {f"step_{p}": step, f"first_{p}": first, f"window_{p}": torch.arange(window)}
            )
            if is_integer(p):
                tables[f"row_{p}"] = row
            column += self.slot_counts[p]
        for k in range(num_blocks):
            slot_of[k, ~self.keep[k]] = column
        tables["slot_of"] = slot_of
        return tables

    def _block_finder(self) -> dict[str, torch.Tensor]:
        """`coarse` and `following` of `block_finder` (its bucket width kept as `bucket`)."""
        starts = torch.tensor(self.blocks.start, dtype=torch.long)
        total = max(self.layout.total_rows, 1)
        shift, self.steps, coarse, following = block_finder(starts, total, self.memory_bytes())
        self.bucket = 1 << shift
        return {"coarse": coarse, "following": following}

    @classmethod
    def from_dense(
        cls,
        layout: FieldLayout,
        dim: int,
        blocks: BlockLayout,
        keep: torch.Tensor,
        precisions: Sequence[str],
        table: torch.Tensor,
    ) -> QuantizedBlockEmbedding:
        """The module storing the kept values of a dense [total_rows, dim] float table, each
        block quantized at its precision."""
        if tuple(table.shape) != (layout.total_rows, dim):
            raise ValueError(f"table must be [{layout.total_rows}, {dim}], got {list(table.shape)}")
        module, device = cls(layout, dim, blocks, keep, precisions), table.device
        table = table.detach().cpu().float()
        for k, (step, unit, entry) in module.placement.items():
            p, start, size = module.precisions[k], blocks.start[k], blocks.size[k]
            kept = table[start : start + size][:, module.keep[k]]
            codes, scale, bias = quantize_rows(kept, p)
            getattr(module, f"codes_{p}")[unit : unit + step * size] = codes.reshape(-1)
            if scale is not None and bias is not None:
                getattr(module, f"scale_{p}")[entry : entry + size] = scale
                getattr(module, f"bias_{p}")[entry : entry + size] = bias
        return module.to(device)

    def _block(self, flat: torch.Tensor) -> torch.Tensor:
        """The block of every row (see `_block_finder`)."""
        bucket = torch.div(flat, self.bucket, rounding_mode="trunc")
        block = self.coarse.index_select(0, bucket).long()
        for _ in range(self.steps):
            block = block + (flat >= self.following.index_select(0, block)).long()
        return block

    def _slots(self, p: str, flat: torch.Tensor, block: torch.Tensor, eager: bool) -> torch.Tensor:
        """float32 [N, slot_counts[p]]: the dequantized window of every row at precision p."""
        codes = getattr(self, f"codes_{p}")
        start = flat * getattr(self, f"step_{p}").index_select(0, block)
        start = start + getattr(self, f"first_{p}").index_select(0, block)
        values = read_windows(codes, start, getattr(self, f"window_{p}"), strided=eager)
        if not is_integer(p):
            return dequantize_rows(values, None, None, p, self.slot_counts[p])
        scale, bias = getattr(self, f"scale_{p}"), getattr(self, f"bias_{p}")
        entry = flat + getattr(self, f"row_{p}").index_select(0, block)
        entry = entry.clamp(0, scale.numel() - 1)  # rows of other precisions read any entry
        scale, bias = scale.index_select(0, entry), bias.index_select(0, entry)
        return dequantize_rows(values, scale, bias, p, self.slot_counts[p])

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        block = self._block(flat)
        eager = not exporting()
        slots = [self._slots(p, flat, block, eager) for p in self.groups]
        slots.append(torch.zeros_like(flat, dtype=torch.float32).unsqueeze(1))  # pruned dims
        values = torch.cat(slots, dim=1) if len(slots) > 1 else slots[0]
        out = values.gather(1, self.slot_of.index_select(0, block))
        return out.view(*rows.shape, self.dim)

    def dequantized(self) -> torch.Tensor:
        """The whole table as it is served, float32 [total_rows, dim] (zeros at pruned dims)."""
        return self.lookup(torch.arange(self.layout.total_rows, device=self.keep.device))

    def num_parameters(self) -> int:
        """Stored values: every block's rows times its width."""
        return sum(n * w for n, w in zip(self.blocks.size, self.widths, strict=True))

    def dims_per_block(self) -> list[int]:
        return list(self.widths)

    def block_precisions(self) -> list[str]:
        return list(self.precisions)
