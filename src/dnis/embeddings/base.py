"""The input-layer interface every model reads through, whatever stores the vectors."""

from __future__ import annotations

import torch
from torch import nn

from dnis.embeddings.layout import FieldLayout, interval_of


class FieldPooling(nn.Module):
    """Turns per-slot vectors [B, S, d] into per-field vectors [B, F, d] without a Python loop.

    Sequence slots holding id 0 are padding and are masked; categorical slots always count (their
    id 0 is the learned OOV row). Mean-pooled fields divide by the number of real ids (min 1).
    """

    def __init__(self, layout: FieldLayout) -> None:
        super().__init__()
        self.num_fields = layout.num_fields
        self.identity = not layout.has_sequences
        slot_fields = torch.tensor(layout.slot_fields, dtype=torch.long)
        sequence = torch.tensor(layout.sequence_fields)
        self.register_buffer("slot_fields", slot_fields, persistent=False)
        self.register_buffer("sequence_slot", sequence[slot_fields], persistent=False)
        self.register_buffer("mean_field", torch.tensor(layout.mean_pooled), persistent=False)

    def slot_weights(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """1 for a slot that counts, 0 for sequence padding; None when there are no sequences."""
        if self.identity:
            return None
        return ((ids != 0) | ~self.sequence_slot).to(dtype)  # [B, S]

    def forward(self, vectors: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return vectors
        batch, _, dim = vectors.shape
        pooled = vectors.new_zeros(batch, self.num_fields, dim)
        pooled.index_add_(1, self.slot_fields, vectors * weights.unsqueeze(-1))
        counts = weights.new_zeros(batch, self.num_fields).index_add_(1, self.slot_fields, weights)
        divisor = torch.where(self.mean_field, counts.clamp(min=1.0), torch.ones_like(counts))
        return pooled / divisor.unsqueeze(-1)


class FieldEmbedding(nn.Module):
    """Base of every input layer: ids [B, S] -> field vectors [B, F, dim].

    All fields live in one row space (field f's id i is row offset_f + i), so a batch is one
    `lookup` of global rows, then pooling of sequence slots. Subclasses decide how rows are stored
    (one dense table, a soft-selected table, compact mixed-width tables) by implementing `lookup`
    and `num_parameters`; models only ever see this interface.
    """

    def __init__(self, layout: FieldLayout, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.layout = layout
        self.dim = dim
        self.register_buffer("slot_offsets", layout.slot_offsets(), persistent=False)
        self.register_buffer("field_offsets", layout.field_offsets(), persistent=False)
        self.pooling = FieldPooling(layout)
        # what `last_l2` is computed from when first read: the last training batch's looked-up
        # vectors, their slot weights, the batch size and the vectors' version counter
        self._l2_of: tuple[torch.Tensor, torch.Tensor | None, int, int] | None = None
        self._last_l2 = torch.zeros(())

    @property
    def last_l2(self) -> torch.Tensor:
        """Squared norms of the last training batch's looked-up rows (padding excluded), summed
        and divided by the batch size: the per-batch L2 term that `TrainConfig.embedding_l2`
        weighs (differentiable; read it before that batch's backward).

        It is computed when first read after a training forward, not in the forward itself: a
        run with `embedding_l2` 0 never reads it and so never pays for it. Subclasses that
        regularise other tensors (the table rows under a gate, candidate vectors) assign it."""
        if self._l2_of is not None:
            vectors, weights, batch, version = self._l2_of
            self._l2_of = None
            if vectors._version != version:
                raise RuntimeError(
                    "the looked-up vectors were changed in place after the forward, so last_l2 "
                    "cannot be taken on them; read last_l2 before changing them"
                )
            squared = vectors.pow(2).sum(dim=-1)
            if weights is not None:
                squared = squared * weights
            self._last_l2 = squared.sum() / batch
        return self._last_l2

    @last_l2.setter
    def last_l2(self, value: torch.Tensor) -> None:
        self._l2_of = None
        self._last_l2 = value

    def fields_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The field of every global row (same shape)."""
        return interval_of(rows, self.field_offsets)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors [..., dim] of global rows (any shape)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes of everything saved with the module: parameters and index buffers alike."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self.lookup(ids + self.slot_offsets)
        weights = self.pooling.slot_weights(ids, vectors.dtype)
        if self.training:  # `last_l2` is taken on these when read
            self._l2_of = (vectors, weights, ids.shape[0], vectors._version)
        return self.pooling(vectors, weights)

    def field_rows(self, field: int) -> torch.Tensor:
        """Every row of one field [cardinality, dim], e.g. all items for full ranking."""
        start = int(self.field_offsets[field])
        rows = torch.arange(
            start, start + self.layout.cardinalities[field], device=self.slot_offsets.device
        )
        return self.lookup(rows)
