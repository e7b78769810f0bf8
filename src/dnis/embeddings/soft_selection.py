"""The DNIS soft selection layer: a dense table whose every row is scaled by its block's alpha."""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout


class SoftSelectionEmbedding(FusedEmbedding):
    """Row i of the table is returned as `weight[i] * alpha[block(i)]`.

    `alpha` [num_blocks, dim] starts at 1 and is kept in [0, 1] by the search: a value near 0
    means that dim is useless for that block's ids.
    """

    def __init__(
        self, layout: FieldLayout, dim: int, blocks: BlockLayout, init_std: float = 0.01
    ) -> None:
        super().__init__(layout, dim, init_std)
        self.blocks = blocks
        self.alpha = nn.Parameter(torch.ones(blocks.num_blocks, dim))
        self.register_buffer("row_block", blocks.row_block(), persistent=False)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(rows, self.weight) * self.alpha[self.row_block[rows]]

    def selected_weight(self) -> torch.Tensor:
        """The table as the model sees it, alpha folded in [rows, dim]."""
        return self.weight * self.alpha[self.row_block]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """What the model step updates (alpha has its own optimizer)."""
        return [self.weight]
