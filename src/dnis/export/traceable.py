"""Export-friendly twins of the input-layer pieces whose eager code does not trace or export.

The eager modules are written for speed in PyTorch; some of their operations do not survive
`torch.jit.trace` or the ONNX exporter, so the export swaps in twins that compute the same thing
with the same stored tensors (the artifact's bytes are the compact model's, nothing is densified):

- `FieldPooling` pools sequence slots with `index_add_`, which the ONNX exporter turns into a
  scatter that overwrites duplicate indices instead of summing them. `ExportPooling` pools with a
  constant one-hot [slots, fields] matrix product instead.
- `BlockMixedEmbedding` finds each row's block with `searchsorted`, which ONNX lacks.
  `TraceableBlockMixed` counts the block starts at or below the row instead (a handful of
  comparisons per row).
- `ProjectedBlockEmbedding` (MDE, AutoDim) runs one matmul per block the batch touches, split by
  block counts read from the data. `TraceableProjected` gathers `max_width` entries and their
  projection rows per row instead, masked past the row's block width.
- `KeptRowsEmbedding` (OptFS) finds a row among the kept rows with `searchsorted`.
  `TraceableKeptRows` runs the same lower-bound search as a fixed number of halving steps
  (log2 of the kept rows, unrolled by the trace), on the same sorted kept-row list.
- `RaggedEmbedding` sizes its gathers from the data (`repeat_interleave` by row widths), which a
  trace freezes to the example batch. `TraceableRagged` gathers a fixed `max_width` entries per row
  (the widest stored row), masks the ones past the row's end and scatter-adds them into place.

`traceable(model)` returns a copy of the model with these swaps made; the original is untouched.
The export then checks the traced graph against the eager model on fresh inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dnis.embeddings.base import FieldPooling
from dnis.embeddings.gated import KeptRowsEmbedding
from dnis.embeddings.layout import FieldLayout, interval_of
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding, ragged_keep
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.models.base import Model


class ExportPooling(FieldPooling):
    """`FieldPooling` as matrix products: exact sums, no scatter with duplicate indices."""

    def __init__(self, layout: FieldLayout) -> None:
        super().__init__(layout)
        assign = nn.functional.one_hot(self.slot_fields, layout.num_fields).float()
        self.register_buffer("assign", assign, persistent=False)  # [S, F]

    def forward(self, vectors: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return vectors
        weighted = vectors * weights.unsqueeze(-1)  # [B, S, d]
        pooled = torch.matmul(weighted.transpose(1, 2), self.assign).transpose(1, 2)  # [B, F, d]
        counts = torch.matmul(weights, self.assign)  # [B, F]
        divisor = torch.where(self.mean_field, counts.clamp(min=1.0), torch.ones_like(counts))
        return pooled / divisor.unsqueeze(-1)


class TraceableBlockMixed(BlockMixedEmbedding):
    """`BlockMixedEmbedding` (its lookup already traces: compare steps, no `searchsorted`) whose
    empty table gives zeros of the traced batch's shape."""

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.values.numel() == 0:  # nothing survived the budget: every vector is zero
            return (
                torch.zeros_like(rows, dtype=torch.float32)
                .unsqueeze(-1)
                .repeat_interleave(self.dim, dim=-1)
            )
        return super().lookup(rows)

    @classmethod
    def from_module(cls, module: BlockMixedEmbedding) -> TraceableBlockMixed:
        twin = cls(module.layout, module.dim, module.blocks, module.keep.cpu())
        twin.load_state_dict(module.state_dict())
        return twin


class TraceableRagged(RaggedEmbedding):
    """`RaggedEmbedding` with a fixed number of gathers per row (`max_width`), so it traces."""

    def __init__(self, layout: FieldLayout, dim: int, keep: torch.Tensor) -> None:
        super().__init__(layout, dim, keep)
        self.max_width = int(self.widths().max()) if layout.total_rows else 0

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        if self.values.numel() == 0:
            out = torch.zeros_like(flat, dtype=torch.float32).unsqueeze(-1)
            return out.repeat_interleave(self.dim, dim=-1).view(rows.shape + (self.dim,))
        start = self.indptr[flat].long()
        length = self.indptr[flat + 1].long() - start
        slot = torch.arange(self.max_width, device=flat.device)
        valid = slot.unsqueeze(0) < length.unsqueeze(1)  # [N, W]
        entry = torch.where(valid, start.unsqueeze(1) + slot, torch.zeros_like(start).unsqueeze(1))
        values = self.values[entry] * valid.to(self.values.dtype)
        columns = self.dims[entry].long()  # padding entries add 0 to some column
        out = torch.zeros_like(values[:, :1]).repeat_interleave(self.dim, dim=1)  # [N, d]
        out = out.scatter_add(1, columns, values)
        return out.view(rows.shape + (self.dim,))

    @classmethod
    def from_module(cls, module: RaggedEmbedding) -> TraceableRagged:
        keep = ragged_keep(
            module.indptr.cpu(), module.dims.cpu(), module.layout.total_rows, module.dim
        )
        twin = cls(module.layout, module.dim, keep)
        twin.load_state_dict(module.state_dict())
        return twin


class TraceableProjected(ProjectedBlockEmbedding):
    """`ProjectedBlockEmbedding` whose lookup gathers a fixed `max_width` entries per row and
    their projection rows (one [N, max_width, dim] product) instead of one matmul per block
    sized from the batch, which a trace would freeze; blocks are found by comparison counts."""

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        block = interval_of(flat, self.block_start)
        width = self.widths[block].unsqueeze(-1)
        slot = torch.arange(self.max_width, device=flat.device)
        valid = slot < width  # [N, W]
        first = self.base[block] + (flat - self.block_start[block]) * self.widths[block]
        table = torch.where(valid, first.unsqueeze(-1) + slot, 0)
        projection = torch.where(valid, self.projection_base[block].unsqueeze(-1) + slot, 0)
        values = self.values[table] * valid.to(self.values.dtype)  # [N, W]
        out = torch.matmul(values.unsqueeze(1), self.projection[projection]).squeeze(1)
        return out.view(rows.shape + (self.dim,))

    @classmethod
    def from_module(cls, module: ProjectedBlockEmbedding) -> TraceableProjected:
        twin = cls(module.layout, module.dim, module.blocks, module.width_list)
        twin.load_state_dict(module.state_dict())
        return twin


class TraceableKeptRows(KeptRowsEmbedding):
    """`KeptRowsEmbedding` whose position search is a branchless binary search: ceil(log2 K)
    gather-and-compare steps over the K sorted kept rows, the same result as `searchsorted`."""

    def __init__(self, layout: FieldLayout, dim: int, keep: torch.Tensor) -> None:
        super().__init__(layout, dim, keep)
        self.count = int(self.kept.numel())  # a Python int: the trace unrolls the steps by it

    def positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.count
        if count == 0:
            return torch.zeros_like(rows), torch.zeros_like(rows, dtype=torch.bool)
        query = rows.to(torch.int32)
        below = torch.zeros_like(rows)  # how many kept rows are < query, found bit by bit
        step = 1 << (count.bit_length() - 1)
        while step:
            candidate = below + step
            probe = self.kept[(candidate - 1).clamp(max=count - 1)]
            below = torch.where((candidate <= count) & (probe < query), candidate, below)
            step >>= 1
        position = below.clamp(max=count - 1)
        return position, self.kept[position] == query

    @classmethod
    def from_module(cls, module: KeptRowsEmbedding) -> TraceableKeptRows:
        keep = torch.zeros(module.layout.total_rows, dtype=torch.bool)
        keep[module.kept.long().cpu()] = True
        twin = cls(module.layout, module.dim, keep)
        twin.load_state_dict(module.state_dict())
        return twin


def traceable(model: Model) -> Model:
    """A CPU copy of `model` in eval mode with every non-exportable input-layer piece swapped."""
    model = copy.deepcopy(model).cpu().eval()
    embedding = model.embedding
    if isinstance(embedding, BlockMixedEmbedding) and not isinstance(
        embedding, TraceableBlockMixed
    ):
        model.embedding = TraceableBlockMixed.from_module(embedding)
    elif isinstance(embedding, RaggedEmbedding) and not isinstance(embedding, TraceableRagged):
        model.embedding = TraceableRagged.from_module(embedding)
    elif type(embedding) is ProjectedBlockEmbedding:
        model.embedding = TraceableProjected.from_module(embedding)
    elif type(embedding) is KeptRowsEmbedding:
        model.embedding = TraceableKeptRows.from_module(embedding)
    for name, module in list(model.named_modules()):
        if type(module) is FieldPooling:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            twin = ExportPooling(parent.layout).to(module.slot_fields.device)
            setattr(parent, attribute, twin)
    return model.eval()


def example_ids(layout: FieldLayout, rows: int, seed: int = 0) -> torch.Tensor:
    """Random encoded rows [rows, S] covering every field's ids, OOV and sequence padding.

    Row 0 is all OOV / padding (an empty history, unseen categories); sequence slots are real
    ids or padding at random, so the trace sees both and the check compares both.
    """
    generator = torch.Generator().manual_seed(seed)
    cardinality = torch.tensor(layout.cardinalities)[torch.tensor(layout.slot_fields)]
    ids = (torch.rand(rows, layout.num_slots, generator=generator) * cardinality).long()
    sequence = torch.tensor(layout.sequence_fields)[torch.tensor(layout.slot_fields)]
    padding = (torch.rand(rows, layout.num_slots, generator=generator) < 0.3) & sequence
    ids = ids.masked_fill(padding, 0)
    ids[0] = 0
    return ids
