"""Shared fixtures: tiny synthetic and handmade datasets, and helpers to build models on them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.schema import FeatureSpec, Schema
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.models.base import Model

# the synthetic CTR data of the compare-grid tests: three fields of 40 ids (two carry signal)
SYNTHETIC_CTR = {
    "name": "synthetic",
    "task": "ctr",
    "options": {"n_rows": 3000, "ranks": [4, 2], "noise_fields": 1, "vocab": 40},
}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Small tensors run faster (and more reproducibly) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ctr_data() -> EncodedDataset:
    return load_synthetic(task="ctr", n_rows=3000, vocab=80, seed=0)


@pytest.fixture(scope="session")
def rating_data() -> EncodedDataset:
    return load_synthetic(task="rating", n_rows=2000, vocab=60, seed=0)


def sequence_frame(n_rows: int = 400, seed: int = 0) -> pd.DataFrame:
    """user, item, a genre-like sequence (sometimes empty), a numeric column and a 0/1 label."""
    rng = np.random.default_rng(seed)
    genres = ["a", "b", "c", "d", "e"]
    seqs = []
    for _ in range(n_rows):
        k = int(rng.integers(0, 4))
        seqs.append("|".join(rng.choice(genres, size=k, replace=False)))
    return pd.DataFrame(
        {
            "user": rng.integers(0, 20, n_rows).astype(str),
            "item": rng.integers(0, 30, n_rows).astype(str),
            "genres": seqs,
            "price": rng.normal(size=n_rows),
            "label": (rng.random(n_rows) < 0.5).astype(np.float32),
        }
    )


SEQUENCE_SCHEMA = Schema(
    features=(
        FeatureSpec("user"),
        FeatureSpec("item"),
        FeatureSpec("genres", kind="sequence", max_len=3, pooling="mean"),
        FeatureSpec("price", kind="numeric", buckets=4),
    ),
    label="label",
    user="user",
    item="item",
)


@pytest.fixture(scope="session")
def sequence_data() -> EncodedDataset:
    return build_dataset(sequence_frame(), SEQUENCE_SCHEMA, "ctr", seed=0)


def topk_frame(n_users: int = 12, n_items: int = 30, seed: int = 0) -> pd.DataFrame:
    """Implicit feedback with increasing timestamps per user, for leave_last_out.

    User "anchor" has interacted with every item early on, so every item is in the training
    vocabulary; the others have 4-8 random items (repeats allowed). One user has only two rows
    (kept entirely in training), so not every user is evaluated.
    """
    rng = np.random.default_rng(seed)
    rows = []
    histories = {"anchor": [f"i{k}" for k in range(n_items)] + ["i0", "i1"]}
    for u in range(n_users):
        length = 2 if u == 0 else int(rng.integers(4, 9))
        histories[f"u{u}"] = [f"i{k}" for k in rng.integers(0, n_items, length)]
    for user, items in histories.items():
        for t, item in enumerate(items):
            rows.append({"user": user, "item": item, "ts": 1000 * t + len(rows)})
    return pd.DataFrame(rows)


TOPK_SCHEMA = Schema(
    features=(FeatureSpec("user"), FeatureSpec("item")), user="user", item="item", time="ts"
)


@pytest.fixture(scope="session")
def topk_data() -> EncodedDataset:
    return build_dataset(topk_frame(), TOPK_SCHEMA, "topk", split="leave_last_out")


@pytest.fixture(scope="session")
def topk_data_with_new_item() -> EncodedDataset:
    """topk_data plus one user whose validation and test items never occur in training."""
    extra = pd.DataFrame(
        {
            "user": ["late"] * 3,
            "item": ["i0", "new-a", "new-b"],
            "ts": [10**6, 10**6 + 1, 10**6 + 2],
        }
    )
    frame = pd.concat([topk_frame(), extra], ignore_index=True)
    return build_dataset(frame, TOPK_SCHEMA, "topk", split="leave_last_out")


def _make_model(dataset: EncodedDataset, name: str, dim: int = 8, seed: int = 0, **params) -> Model:
    torch.manual_seed(seed)
    embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), dim, init_std=0.1)
    return build(name, dataset.schema, embedding, **params)


@pytest.fixture
def make_model():
    """`make_model(dataset, name, dim=8, seed=0, **params)`: a model around a FusedEmbedding."""
    return _make_model


def tiny_config(output_dir, **sections) -> dict:
    """A tiny synthetic CTR run as a config mapping; `sections` update its sections."""
    data = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(output_dir),
        "dataset": {
            "name": "synthetic",
            "task": "ctr",
            "options": {"n_rows": 2000, "vocab": 50, "ranks": [4, 2], "noise_fields": 1},
        },
        "model": {"name": "fm", "params": {}},
        "embedding": {"dim": 4, "init_std": 0.05},
        "train": {"epochs": 3, "batch_size": 256, "lr": 0.01, "patience": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture
def tiny_config_dict():
    """`tiny_config_dict(output_dir, **sections)`: a tiny synthetic CTR run config mapping."""
    return tiny_config
