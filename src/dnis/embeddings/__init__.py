"""Input layers: every model reads its fields through one of these modules."""

from dnis.embeddings.base import FieldEmbedding, FieldPooling
from dnis.embeddings.fused import FusedEmbedding
from dnis.embeddings.layout import FieldLayout

__all__ = ["FieldEmbedding", "FieldLayout", "FieldPooling", "FusedEmbedding"]
