"""Data layer: schemas, readers, encoders, splits and named datasets."""

from dnis.data.catalog import datasets, load
from dnis.data.dataset import EncodedDataset, Split, build_dataset
from dnis.data.encode import OOV, Encoder
from dnis.data.loader import batches
from dnis.data.registry import DatasetInfo, register
from dnis.data.schema import FeatureSpec, Schema

__all__ = [
    "OOV",
    "DatasetInfo",
    "EncodedDataset",
    "Encoder",
    "FeatureSpec",
    "Schema",
    "Split",
    "batches",
    "build_dataset",
    "datasets",
    "load",
    "register",
]
