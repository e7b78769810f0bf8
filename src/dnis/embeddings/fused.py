"""FusedEmbedding: all fields in one dense table, one gather per batch, per-field offsets."""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.base import FieldEmbedding
from dnis.embeddings.layout import FieldLayout


class FusedEmbedding(FieldEmbedding):
    """One [sum of cardinalities, dim] table: the uniform-width input layer (the baseline).

    `sparse`: look rows up with `F.embedding(..., sparse=True)`, so the table's gradient is a
    sparse tensor holding only the rows of the batch (for `torch.optim.SparseAdam` / `Adagrad` on
    large tables). It is set by the trainer from `train.optimizer` (see
    `dnis.train.trainer.make_optimizer`), never by models; only a table whose lookup is this plain
    gather can honour it (`supports_sparse_grad`).
    """

    def __init__(
        self, layout: FieldLayout, dim: int, init_std: float = 0.01, sparse: bool = False
    ) -> None:
        super().__init__(layout, dim)
        self.weight = nn.Parameter(torch.empty(layout.total_rows, dim))
        nn.init.normal_(self.weight, std=init_std)
        self.sparse = sparse

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(rows, self.weight, sparse=self.sparse)

    def supports_sparse_grad(self) -> bool:
        """True when `weight` is read only through the plain gather above, so `sparse` makes its
        gradient sparse. Subclasses that override `lookup` (scaling rows by alpha, gating them)
        make dense gradients and answer False; they keep `sparse` off."""
        return type(self).lookup is FusedEmbedding.lookup

    def num_parameters(self) -> int:
        return self.weight.numel()
