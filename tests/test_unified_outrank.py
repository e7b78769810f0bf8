"""Unified Embedding (feature multiplexing) and OutRank: defining behaviour, accounting, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dnis.search.unified  # noqa: F401  (registers "unified")
from dnis import models
from dnis.data.synthetic import load_synthetic
from dnis.embeddings.hashed import PRIME, hash_coefficients
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.multiplexed import MultiplexedEmbedding
from dnis.errors import ConfigError
from dnis.search import methods
from dnis.search.prune import budget_params
from dnis.search.unified import unified_rows
from dnis.tasks.base import predict
from dnis.train import TrainConfig

TRAIN = TrainConfig(epochs=1, batch_size=256, lr=0.01)


def _layout(cards: tuple[int, ...]) -> FieldLayout:
    n = len(cards)
    names = tuple(f"f{i}" for i in range(n))
    return FieldLayout(names, cards, tuple(range(n)), (False,) * n, (False,) * n)


def _fm(dataset):
    return lambda e: models.build("fm", dataset.schema, e)


@pytest.fixture(scope="module")
def five_fields():
    return load_synthetic(task="ctr", n_rows=2000, vocab=60, seed=0)  # 3 signal + 2 noise


@pytest.fixture(scope="module")
def nine_fields():
    return load_synthetic(task="ctr", n_rows=2000, vocab=60, ranks=(8, 4, 2, 2, 1), noise_fields=4)


# ---------------------------------------------------------------------------- unified: accounting


def test_unified_rows_buy_the_budget():
    assert unified_rows(640, 8) == 80
    assert unified_rows(647, 8) == 80  # never over: the rest buys less than a row
    assert unified_rows(647, 8, probes=2) == 161  # concat: rows of width 4
    assert unified_rows(647, 8, probes=2, combine="sum") == 80  # sum: rows of width 8
    with pytest.raises(ConfigError, match="buys no row"):
        unified_rows(7, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        unified_rows(640, 8, probes=3)


def test_multiplexed_concat_hashes_every_probe_and_field_apart():
    layout = _layout((20, 6))
    torch.manual_seed(0)
    emb = MultiplexedEmbedding(layout, 4, rows=7, probes=2, combine="concat", seed=3)
    assert emb.weight.shape == (7, 2)
    assert emb.num_parameters() == 14
    # table + a, b (int64 per probe and field: 2 * 2 each) + the row count (one int64)
    assert emb.memory_bytes() == 14 * 4 + 2 * 4 * 8 + 8
    a, b = hash_coefficients(4, 3)  # index p * F + f
    rows = torch.arange(26)
    index = emb.indices(rows)
    for r in range(26):
        f, i = (0, r) if r < 20 else (1, r - 20)
        expected = [((a[p * 2 + f] * i + b[p * 2 + f]) % PRIME) % 7 for p in range(2)]
        assert index[r].tolist() == expected
    out = emb.lookup(rows)
    torch.testing.assert_close(
        out, torch.cat([emb.weight[index[:, 0]], emb.weight[index[:, 1]]], 1)
    )
    # four distinct hash functions: fields and probes never share one
    assert len({(x, y) for x, y in zip(a, b, strict=True)}) == 4
    assert emb.a.shape == (2, 2) and emb.a[0, 1].item() == a[2]


def test_multiplexed_sum_adds_full_width_rows():
    emb = MultiplexedEmbedding(_layout((20, 6)), 4, rows=9, probes=3, combine="sum", seed=1)
    assert emb.num_parameters() == 36 and emb.weight.shape == (9, 4)
    rows = torch.tensor([[0, 25], [19, 20]])
    index = emb.indices(rows)
    assert index.shape == (2, 2, 3)
    torch.testing.assert_close(emb.lookup(rows), emb.weight[index].sum(dim=-2))


def test_multiplexed_full_table_is_collision_free():
    layout = _layout((20, 6))
    emb = MultiplexedEmbedding(layout, 4, rows=52, probes=2)  # 2 chunks x 26 ids
    assert emb.identity
    index = emb.indices(torch.arange(26))
    assert index[:, 0].tolist() == list(range(26)) and index[:, 1].tolist() == list(range(26, 52))
    counts = emb.collisions()
    assert counts == {"collisions": [0, 0], "cross_field": [0, 0], "identical": [0, 0]}
    assert not MultiplexedEmbedding(layout, 4, rows=51, probes=2).identity


def test_multiplexed_collision_counts_match_a_direct_count():
    layout = _layout((30, 12))
    for probes, combine in ((1, "concat"), (2, "concat"), (2, "sum")):
        emb = MultiplexedEmbedding(layout, 4, rows=16, probes=probes, combine=combine, seed=5)
        index = emb.indices(torch.arange(42)).tolist()
        field = [0] * 30 + [1] * 12
        readers: dict[int, list[tuple[int, int]]] = {}
        for r, rows in enumerate(index):
            for p, row in enumerate(rows):
                readers.setdefault(row, []).append((r, p))
        shared = [any(len(readers[row]) > 1 for row in rows) for rows in index]
        cross = [
            any(len({field[s] for s, _ in readers[row]}) > 1 for row in rows) for rows in index
        ]
        keys = [tuple(sorted(rows)) if combine == "sum" else tuple(rows) for rows in index]
        identical = [keys.count(k) > 1 for k in keys]

        def per_field(flags, field=field):
            return [
                sum(flag for flag, f in zip(flags, field, strict=True) if f == g) for g in (0, 1)
            ]

        counts = emb.collisions()
        assert counts["collisions"] == per_field(shared)
        assert counts["cross_field"] == per_field(cross)
        assert counts["identical"] == per_field(identical)
        assert counts["cross_field"][1] > 0  # 42 ids in 16 rows: fields do meet
        if probes == 1:
            assert counts["identical"] == counts["collisions"]


# ----------------------------------------------------------------------- unified: defining claim


@pytest.mark.parametrize("options", [{}, {"probes": 2}])
def test_unified_table_is_the_budget_whatever_the_number_of_fields(
    options, five_fields, nine_fields
):
    dim = 8
    assert five_fields.schema.names != nine_fields.schema.names
    for budget in (640, 0.25):
        sizes = []
        for dataset in (five_fields, nine_fields):
            full = sum(dataset.cardinalities) * dim
            [result] = methods.method("unified")(
                _fm(dataset), dataset, budgets=[budget], dim=dim, train=TRAIN, options=options
            )
            count = budget_params(budget, full)
            width = dim // options.get("probes", 1)
            assert result.embedding_params == count // width * width
            assert count - width < result.embedding_params <= count
            rows = {v["shared_rows"] for v in result.dims.values()}
            assert len(rows) == 1  # one table, read by every field
            sizes.append(result.embedding_params)
        if budget == 640:
            assert sizes == [640, 640]


# ------------------------------------------------------------------------ end to end and options


def test_unified_end_to_end_with_fm(five_fields):
    dim, budgets = 8, [0.2, 0.5]
    results = methods.method("unified")(
        _fm(five_fields), five_fields, budgets=budgets, dim=dim, train=TRAIN, options={}
    )
    full = sum(five_fields.cardinalities) * dim
    assert [r.budget for r in results] == budgets
    for result in results:
        assert result.method == "unified" and result.metric == "auc"
        assert 0 < result.embedding_params <= budget_params(result.budget, full)
        assert result.embedding_params == result.model.embedding.num_parameters()
        assert result.memory_bytes == result.model.embedding.memory_bytes()
        assert set(result.dims) == set(five_fields.schema.names)
        for v in result.dims.values():
            assert v["block_dims"] == [dim]
            assert 0 <= v["identical"] <= v["collisions"] <= v["cardinality"]
        scores = predict(result.model, five_fields.test.ids)
        assert scores.shape == (len(five_fields.test),) and torch.isfinite(scores).all()
    # a fifth of the ids' rows for all of them: most ids collide, many across fields
    assert sum(v["cross_field_collisions"] for v in results[0].dims.values()) > 0


@pytest.mark.parametrize("name", ["unified"])
def test_unknown_options_are_refused(name, five_fields):
    with pytest.raises(ConfigError, match="has no option"):
        methods.method(name)(
            _fm(five_fields), five_fields, budgets=[0.5], dim=4, train=TRAIN, options={"probs": 2}
        )


def test_unified_refuses_a_bad_combine(five_fields):
    with pytest.raises(ConfigError, match="combine"):
        methods.method("unified")(
            _fm(five_fields),
            five_fields,
            budgets=[0.5],
            dim=4,
            train=TRAIN,
            options={"combine": "mean"},
        )
