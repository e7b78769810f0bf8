"""A synthetic CTR/rating generator with planted structure, for tests, demos and benchmarks.

Each signal field f has Zipf-distributed ids whose true embeddings have a known rank r_f (they live
in an r_f-dimensional subspace of a shared latent space); noise fields have ids that do not affect
the label at all. The label comes from FM-style pairwise interactions of the true embeddings, so
the right answer to "how many dims does each field deserve" is known: more for higher rank, none
for noise. Numeric fields (Criteo-like shape) add a linear signal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.registry import DatasetInfo, register
from dnis.data.schema import FeatureSpec, Schema
from dnis.errors import ConfigError

DEFAULT_RANKS: tuple[int, ...] = (8, 4, 2)


def zipf_ids(rng: np.random.Generator, n_rows: int, vocab: int, exponent: float) -> np.ndarray:
    """Ids 0..vocab-1 with P(i) proportional to 1/(i+1)^exponent (id 0 most frequent)."""
    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    return rng.choice(vocab, size=n_rows, p=p / p.sum())


def make_frame(
    n_rows: int = 20_000,
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    noise_fields: int = 2,
    vocab: int = 500,
    numeric_fields: int = 0,
    exponent: float = 1.1,
    task: str = "ctr",
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Raw frame (string ids, numeric columns, label) and the planted truth."""
    rng = np.random.default_rng(seed)
    latent = max(ranks) if ranks else 1
    columns: dict[str, Any] = {}
    vectors = []
    truth_rank: dict[str, int] = {}
    for f, rank in enumerate(ranks):
        ids = zipf_ids(rng, n_rows, vocab, exponent)
        basis = rng.normal(size=(rank, latent)) / np.sqrt(rank)
        table = rng.normal(size=(vocab, rank)) @ basis  # rank-`rank` embeddings in latent space
        vectors.append(table[ids])
        name = f"signal{f}"
        columns[name] = ids
        truth_rank[name] = rank
    for f in range(noise_fields):
        name = f"noise{f}"
        columns[name] = zipf_ids(rng, n_rows, vocab, exponent)
        truth_rank[name] = 0
    logit = np.zeros(n_rows)
    for a in range(len(vectors)):
        for b in range(a + 1, len(vectors)):
            logit += np.sum(vectors[a] * vectors[b], axis=1)
    for f in range(numeric_fields):
        values = rng.normal(size=n_rows)
        columns[f"num{f}"] = values
        logit += 0.5 * values * (1 if f % 2 == 0 else -1)
    logit = (logit - logit.mean()) / (logit.std() + 1e-12)
    if task == "rating":
        label = 3.0 + logit + 0.3 * rng.normal(size=n_rows)
    else:
        label = (rng.random(n_rows) < 1 / (1 + np.exp(-2.0 * logit))).astype(np.float32)
    frame = pd.DataFrame(
        {k: (v.astype(str) if v.dtype.kind == "i" else v) for k, v in columns.items()}
    )
    frame["label"] = label
    return frame, {"true_rank": truth_rank}


def synthetic_schema(frame: pd.DataFrame, min_count: int = 1, buckets: int = 10) -> Schema:
    features = [
        FeatureSpec(c, kind="numeric", buckets=buckets)
        if c.startswith("num")
        else FeatureSpec(c, min_count=min_count)
        for c in frame.columns
        if c != "label"
    ]
    return Schema(features=tuple(features), label="label")


def load_synthetic(
    *,
    task: str,
    path: Path | None = None,
    seed: int = 0,
    n_rows: int = 20_000,
    ranks: tuple[int, ...] | list[int] = DEFAULT_RANKS,
    noise_fields: int = 2,
    vocab: int = 500,
    numeric_fields: int = 0,
    exponent: float = 1.1,
    min_count: int = 1,
) -> EncodedDataset:
    """Generate, split 80/10/10 (seeded) and encode. `path` is unused (nothing is read)."""
    if path is not None:
        raise ConfigError("dataset 'synthetic' is generated, it takes no path")
    frame, truth = make_frame(
        n_rows, tuple(ranks), noise_fields, vocab, numeric_fields, exponent, task, seed
    )
    return build_dataset(
        frame, synthetic_schema(frame, min_count), task, name="synthetic", seed=seed, meta=truth
    )


register(
    DatasetInfo(
        name="synthetic",
        loader=load_synthetic,
        tasks=("ctr", "rating"),
        description="generated: Zipf ids, signal fields of known embedding rank, pure-noise fields",
        bundled=True,
    )
)
