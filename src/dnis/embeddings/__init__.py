"""Input layers: every model reads its fields through one of these modules."""

from dnis.embeddings.fused import FieldPooling, FusedEmbedding
from dnis.embeddings.layout import FieldLayout

__all__ = ["FieldLayout", "FieldPooling", "FusedEmbedding"]
