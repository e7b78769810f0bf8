"""OutRank (Škrlj et al., 2023, arXiv:2309.01552): rank fields, keep the best that fit, train.

Paper: B. Škrlj, B. Mramor, "OutRank: Speeding up AutoML-based Model Search for Large Sparse Data
sets with Cardinality-aware Feature Ranking" (RecSys 2023); reference implementation
outbrain/outrank, heuristic `MI-numba-randomized` (its default), read to match the estimator.

Score of a field X against the (discretised) label Y, both categorical, natural log:

    MI(X; Y)    = H(X) - H(X | Y),     H(X | Y) = sum_c (n_c / n) H(X | Y = c)
    score(X; Y) = H(X_shift | Y) - H(X | Y)

Plain MI grows with a field's cardinality even when the field is noise: the plug-in estimate of
H(X | Y = c) from the n_c rows of class c falls short of H(X) (estimated from all n rows) by more
the more values X has and the fewer rows c has. The cardinality-aware correction replaces H(X) by
the same estimate on unrelated rows of the same size: X_shift pairs each row of class c with X's
value n_c rows further down the data (wrapping around), which on shuffled data is a draw of X
independent of Y, with the same sample size per class, so the small-sample bias cancels and a
noise field scores about 0 whatever its cardinality. This is the reference's `MI-numba-randomized`
estimator, which conditions on the label (its scorer receives the field first and the label
second, and iterates over the second argument's values); our numpy version reproduces its numbers
(checked against outrank 0.97.5 to float32 precision on random data: 0.2418 plain MI vs -0.0078
corrected for a 2000-value noise field on 5000 rows). The shift is deterministic (no seed). As in
the reference, the data are scored in mini-batches of `batch_size` rows (its `--minibatch_size`
default 2^14) and a field's score is the median over batches; we split the rows into near-equal
batches so no tiny tail batch adds noise. `correction: false` ranks by plain MI instead.

Then, per budget, the fields are taken in rank order while their full-width tables (cardinality x
`dim`) fit the budget: `selection: prefix` (default) stops at the first field that does not fit,
i.e. drops the lowest-ranked fields until the rest fits, as OutRank's users keep its top-k
features; `selection: greedy` skips a field that does not fit and goes on down the ranking (it
keeps smaller lower-ranked fields when a large high-ranked one is too big). Kept fields keep full
width, dropped fields read zero vectors (`FieldSubsetEmbedding`), and the model is trained from
scratch (`train.seed`). The model's linear (first-order) terms are not embedding parameters and
stay, as for every other method.

Inputs, from the training split only: every field is scored on its encoded ids (numeric fields
are already quantile buckets; a sequence field's tuple of ids is one value, as the reference
treats a raw multivalue column). Labels: CTR labels are the classes; rating labels are classes as
they are when they have at most `label_bins` distinct values (MovieLens' 5 or 10 star levels),
else they are cut into `label_bins` equal-frequency (training quantile) bins. Top-k data have no
label, so OutRank refuses them.

Options (`OutRankOptions`): `label_bins` (10), `batch_size` (16384), `subsampling` (1: every row;
the reference CLI's default 10 keeps every 10th line of huge streamed logs, our training splits
are small), `correction` (true), `selection` ("prefix"), `init_std` (0.01).

Why our own numpy and not the `outrank` package: `pip install outrank` (0.97.5, in a throwaway
venv) installs cleanly and resolves to the numpy, pandas and matplotlib versions we use (`pip
check` clean), and its scorer (`outrank.algorithms.feature_ranking.ranking_mi_numba.
mutual_info_estimator_numba(field, label, 1.0, True)`) can be called as a library. But it brings
about 40 packages to runtime: numba/llvmlite (compiled, bound to numpy versions), scipy,
scikit-learn, seaborn, pathos/multiprocess, even pre-commit and flake8; and its scorer loops per
value in numba. The estimator is three bincounts per field and batch in numpy, so we implement it
and keep the install light (the package stays useful as the cross-check above).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.field_subset import FieldSubsetEmbedding
from dnis.embeddings.layout import FieldLayout
from dnis.errors import ConfigError
from dnis.search.methods import Options, register_method
from dnis.search.result import SearchResult
from dnis.search.training import INIT_STD, Job, train_budgets

SELECTIONS: tuple[str, ...] = ("prefix", "greedy")


@dataclass
class OutRankOptions(Options):
    """OutRank's options (`compare.options.outrank`)."""

    label_bins: int = 10
    batch_size: int = 2**14
    subsampling: int = 1
    correction: bool = True
    selection: str = "prefix"  # prefix | greedy
    init_std: float = INIT_STD

    def __post_init__(self) -> None:
        self.require(self.label_bins >= 2, "label_bins", "must be >= 2")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.subsampling >= 1, "subsampling", "must be >= 1")
        self.require(self.selection in SELECTIONS, "selection", f"must be one of {SELECTIONS}")
        self.require(self.init_std > 0, "init_std", "must be > 0")


def label_classes(labels: np.ndarray, bins: int = 10) -> np.ndarray:
    """Class index per row: the distinct labels when at most `bins`, else quantile bins."""
    values, classes = np.unique(labels, return_inverse=True)
    if len(values) <= bins:
        return classes.reshape(-1)
    edges = np.quantile(labels, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    binned = np.searchsorted(edges, labels, side="right")
    return np.unique(binned, return_inverse=True)[1].reshape(-1)  # no empty classes


def row_codes(columns: np.ndarray) -> np.ndarray:
    """Index of each row among the distinct rows (lexicographic order), like
    `np.unique(columns, axis=0, return_inverse=True)[1]` but an order of magnitude faster."""
    order = np.lexsort(columns.T[::-1])
    ordered = columns[order]
    starts = np.ones(len(columns), dtype=np.int64)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    codes = np.empty(len(columns), dtype=np.int64)
    codes[order] = np.cumsum(starts) - 1
    return codes


def field_codes(ids: np.ndarray, layout: FieldLayout) -> list[np.ndarray]:
    """One categorical value per row and field; a sequence field's id tuple is one value."""
    slot_fields = np.asarray(layout.slot_fields)
    codes = []
    for f in range(layout.num_fields):
        columns = ids[:, slot_fields == f]
        codes.append(columns[:, 0] if columns.shape[1] == 1 else row_codes(columns))
    return codes


def conditional_entropy(
    given: np.ndarray, given_counts: np.ndarray, target: np.ndarray, num_target: int
) -> float:
    """H(T | G) in nats: `given` is G's value index per row (value counts in `given_counts`),
    `target` T's value index per row, in [0, num_target)."""
    groups = len(given_counts)
    joint = np.bincount(given * num_target + target, minlength=groups * num_target)
    joint = joint.reshape(groups, num_target)
    p = joint / np.maximum(given_counts, 1)[:, None]
    plogp = np.where(joint > 0, p * np.log(np.where(joint > 0, p, 1.0)), 0.0)
    return float(-(given_counts @ plogp.sum(axis=1)) / len(target))


def batch_scores(codes: np.ndarray, classes: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(plain MI, cardinality-corrected MI) of one batch of a field against the label classes.

    Conditioned on the label, as the reference: MI = H(X) - H(X | Y); the corrected score replaces
    H(X) by H(X_shift | Y), X's entropy over as many unrelated rows as each class has.
    """
    _, feature, value_counts = np.unique(codes, return_inverse=True, return_counts=True)
    feature = feature.reshape(-1)
    values = len(value_counts)
    class_counts = np.bincount(classes, minlength=num_classes)
    conditional = conditional_entropy(classes, class_counts, feature, values)
    n = len(classes)
    shifted = feature[(np.arange(n) + class_counts[classes]) % n]  # the reference's shift
    background = conditional_entropy(classes, class_counts, shifted, values)
    plain = conditional_entropy(np.zeros(n, dtype=np.int64), np.array([n]), feature, values)
    return plain - conditional, background - conditional


def outrank_scores(
    codes: Sequence[np.ndarray],
    classes: np.ndarray,
    *,
    batch_size: int = 2**14,
    correction: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(score, plain MI) per field: medians over near-equal batches of consecutive rows."""
    n = len(classes)
    if n == 0:
        raise ConfigError("outrank: the training split is empty")
    num_classes = int(classes.max()) + 1
    batches = np.array_split(np.arange(n), max(1, math.ceil(n / batch_size)))
    scores, plain = [], []
    for field in codes:
        per_batch = np.array(
            [batch_scores(field[rows], classes[rows], num_classes) for rows in batches]
        )
        medians = np.median(per_batch, axis=0)
        plain.append(medians[0])
        scores.append(medians[1] if correction else medians[0])
    return np.array(scores), np.array(plain)


def rank_fields(scores: np.ndarray) -> np.ndarray:
    """Field indices, best first (ties keep schema order)."""
    return np.argsort(-scores, kind="stable")


def select_fields(
    order: Sequence[int], cardinalities: Sequence[int], dim: int, budget: int, selection: str
) -> list[bool]:
    """Keep fields in rank order while their full-width tables fit `budget` parameters."""
    if selection not in SELECTIONS:
        raise ConfigError(f"outrank: selection must be one of {SELECTIONS}, got {selection!r}")
    keep = [False] * len(cardinalities)
    spent = 0
    for f in order:
        cost = int(cardinalities[f]) * dim
        if spent + cost <= budget:
            keep[f] = True
            spent += cost
        elif selection == "prefix":
            break
    return keep


def rank_dataset(
    dataset: EncodedDataset,
    *,
    label_bins: int = 10,
    batch_size: int = 2**14,
    subsampling: int = 1,
    correction: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(score, plain MI) per field of the training split."""
    if dataset.task == "topk":
        raise ConfigError(
            "outrank ranks fields by their information about the label; top-k data have none "
            "(use it on rating or ctr data)"
        )
    if label_bins < 2 or batch_size < 1 or subsampling < 1:
        raise ConfigError("outrank: label_bins must be >= 2, batch_size and subsampling >= 1")
    layout = FieldLayout.from_dataset(dataset)
    ids = dataset.train.ids[::subsampling].cpu().numpy()
    labels = dataset.train.labels[::subsampling].cpu().numpy()
    classes = label_classes(labels, label_bins)
    codes = field_codes(ids, layout)
    return outrank_scores(codes, classes, batch_size=batch_size, correction=correction)


@register_method("outrank", OutRankOptions)
def outrank_method(job: Job, options: OutRankOptions) -> list[SearchResult]:
    """Rank the fields once, then per budget keep the best that fit and train."""
    started = time.perf_counter()
    scores, plain = rank_dataset(
        job.dataset,
        label_bins=options.label_bins,
        batch_size=options.batch_size,
        subsampling=options.subsampling,
        correction=options.correction,
    )
    order = rank_fields(scores)
    search_seconds = time.perf_counter() - started
    layout, dim = job.layout, job.dim
    rank = {int(f): r + 1 for r, f in enumerate(order)}
    history = [
        {"field": layout.names[f], "rank": r + 1, "score": float(scores[f]), "mi": float(plain[f])}
        for r, f in enumerate(order)
    ]

    def report(keep: list[bool], _: FieldSubsetEmbedding) -> dict[str, Any]:
        return {
            name: {
                "block_dims": [dim if keep[f] else 0],
                "kept": keep[f],
                "rank": rank[f],
                "score": float(scores[f]),
                "mi": float(plain[f]),
                "cardinality": layout.cardinalities[f],
            }
            for f, name in enumerate(layout.names)
        }

    return train_budgets(
        job,
        lambda target: select_fields(order, layout.cardinalities, dim, target, options.selection),
        lambda keep: FieldSubsetEmbedding(layout, dim, keep, options.init_std),
        report,
        search_seconds=search_seconds,
        history=history,
    )
