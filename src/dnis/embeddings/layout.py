"""Where each field's ids live: the contract between encoded data and any embedding module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dnis.data.dataset import EncodedDataset
from dnis.data.schema import Schema


@dataclass(frozen=True)
class FieldLayout:
    """Field names and row counts, plus how the id slots of an encoded row map to fields.

    A categorical or numeric field takes one slot; a sequence field takes max_len slots that are
    pooled (mean or sum) over their non-padding ids.
    """

    names: tuple[str, ...]
    cardinalities: tuple[int, ...]
    slot_fields: tuple[int, ...]
    sequence_fields: tuple[bool, ...]
    mean_pooled: tuple[bool, ...]

    @classmethod
    def from_schema(cls, schema: Schema, cardinalities: list[int]) -> FieldLayout:
        return cls(
            names=tuple(schema.names),
            cardinalities=tuple(int(c) for c in cardinalities),
            slot_fields=tuple(schema.slot_fields()),
            sequence_fields=tuple(f.kind == "sequence" for f in schema.features),
            mean_pooled=tuple(
                f.kind == "sequence" and f.pooling == "mean" for f in schema.features
            ),
        )

    @classmethod
    def from_dataset(cls, dataset: EncodedDataset) -> FieldLayout:
        return cls.from_schema(dataset.schema, dataset.cardinalities)

    @property
    def num_fields(self) -> int:
        return len(self.names)

    @property
    def num_slots(self) -> int:
        return len(self.slot_fields)

    @property
    def has_sequences(self) -> bool:
        return any(self.sequence_fields)

    @property
    def total_rows(self) -> int:
        return sum(self.cardinalities)

    def field_offsets(self) -> torch.Tensor:
        """Row of each field's id 0 in a fused table holding all fields one after another."""
        sizes = torch.tensor((0,) + self.cardinalities[:-1], dtype=torch.long)
        return torch.cumsum(sizes, 0)

    def slot_offsets(self) -> torch.Tensor:
        return self.field_offsets()[torch.tensor(self.slot_fields, dtype=torch.long)]

    def index(self, name: str) -> int:
        return self.names.index(name)


def interval_of(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Index i with starts[i] <= value < starts[i + 1] of every value (same shape), for a short
    ascending `starts` beginning at or below every value (field or block starts): a count of the
    starts at or below each value, which, unlike `searchsorted`, exports to ONNX."""
    return (values.unsqueeze(-1) >= starts).sum(dim=-1) - 1
