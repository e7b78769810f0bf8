"""Unified Embedding (feature multiplexing) and OutRank: defining behaviour, accounting, end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import dnis.search.outrank  # noqa: F401  (registers "outrank")
import dnis.search.unified  # noqa: F401  (registers "unified")
from dnis import models
from dnis.data.synthetic import load_synthetic
from dnis.embeddings.field_subset import FieldSubsetEmbedding
from dnis.embeddings.hashed import PRIME, hash_coefficients
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.multiplexed import MultiplexedEmbedding
from dnis.errors import BudgetError, ConfigError
from dnis.search import methods
from dnis.search.outrank import (
    batch_scores,
    field_codes,
    label_classes,
    outrank_scores,
    rank_dataset,
    row_codes,
    select_fields,
)
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
    with pytest.raises(BudgetError, match="buys no row"):  # compare: an infeasible row
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


@pytest.mark.parametrize("name", ["unified", "outrank"])
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


# ------------------------------------------------------------------------------ outrank: scoring


def test_batch_scores_by_hand():
    # class 0: rows 0, 1 (x = 0, 1); class 1: rows 2..5 (x = 0, 1, 2, 2)
    x = np.array([0, 1, 0, 1, 2, 2])
    y = np.array([0, 0, 1, 1, 1, 1])
    h_x_given_y = 2 / 6 * math.log(2) + 4 / 6 * -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    # shifted by the class counts: class 0 reads x[2], x[3] = 0, 1; class 1 reads x[0..3] = 0, 1, 0, 1
    h_shift_given_y = math.log(2)
    plain, corrected = batch_scores(x, y, 2)
    assert plain == pytest.approx(math.log(3) - h_x_given_y)
    assert corrected == pytest.approx(h_shift_given_y - h_x_given_y)
    # an id code is only a name: relabelling values changes nothing
    assert batch_scores(x * 7 + 100, y, 2) == pytest.approx((plain, corrected))


def test_batch_scores_match_the_outrank_package():
    # numbers printed by outrank 0.97.5's mutual_info_estimator_numba(field, label, 1.0, flag) on
    # these arrays (float32 there, float64 here)
    rng = np.random.default_rng(1)
    n = 5000
    y = rng.integers(0, 2, n)
    noise_high = rng.integers(0, 2000, n)
    noise_low = rng.integers(0, 5, n)
    signal = rng.integers(0, 20, n)
    y_signal = (rng.random(n) < np.where(signal < 10, 0.7, 0.3)).astype(np.int64)
    reference = {
        "noise_high": (0.24177777767181396, -0.007784128189086914),
        "noise_low": (0.00027128143119625747, 9.775161743164062e-06),
        "signal": (0.08010423183441162, 0.07842278480529785),
    }
    ours = {
        "noise_high": batch_scores(noise_high, y, 2),
        "noise_low": batch_scores(noise_low, y, 2),
        "signal": batch_scores(signal, y_signal, 2),
    }
    for name, (plain, corrected) in reference.items():
        assert ours[name][0] == pytest.approx(plain, abs=2e-6)
        assert ours[name][1] == pytest.approx(corrected, abs=2e-6)


def test_cardinality_correction_demotes_a_high_cardinality_noise_field():
    rng = np.random.default_rng(0)
    n = 6000
    informative = rng.integers(0, 4, n)
    y = (rng.random(n) < np.where(informative < 2, 0.6, 0.4)).astype(np.int64)
    noise = rng.integers(0, 3000, n)  # about two rows per value: plain MI is large by chance
    codes = [informative, noise]
    corrected, plain = outrank_scores(codes, y)
    assert plain[1] > plain[0]  # plain MI prefers the noise
    assert corrected[0] > corrected[1]  # the corrected score does not
    assert abs(corrected[1]) < 0.02
    uncorrected, _ = outrank_scores(codes, y, correction=False)
    np.testing.assert_allclose(uncorrected, plain)


def test_scores_are_medians_over_batches():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 30, 3000), rng.integers(0, 2, 3000)
    per_batch = [
        batch_scores(x[s], y[s], 2)[1]
        for s in (slice(0, 1000), slice(1000, 2000), slice(2000, 3000))
    ]
    scores, _ = outrank_scores([x], y, batch_size=1000)
    assert scores[0] == pytest.approx(np.median(per_batch))
    scores, _ = outrank_scores(
        [x], y, batch_size=1200
    )  # 3 near-equal batches, not 1200 + 1200 + 600
    parts = np.array_split(np.arange(3000), 3)
    assert scores[0] == pytest.approx(np.median([batch_scores(x[p], y[p], 2)[1] for p in parts]))


def test_label_classes():
    assert label_classes(np.array([0.0, 1.0, 1.0, 0.0])).tolist() == [0, 1, 1, 0]
    stars = np.array([1.0, 4.5, 3.0, 5.0, 4.5, 0.5])
    assert label_classes(stars).tolist() == [1, 3, 2, 4, 3, 0]  # few levels: the levels
    continuous = np.random.default_rng(0).normal(size=1000)
    classes = label_classes(continuous, bins=10)
    assert classes.min() == 0 and classes.max() == 9
    assert np.all(np.bincount(classes) == 100)  # equal-frequency bins
    order = np.argsort(continuous)
    assert np.all(np.diff(classes[order]) >= 0)  # bins follow the label's order


def test_field_codes_treat_a_sequence_as_one_value():
    # field 0: one slot; field 1: a sequence of three slots
    layout = FieldLayout(("u", "genres"), (5, 4), (0, 1, 1, 1), (False, True), (False, True))
    ids = np.array([[1, 1, 2, 0], [2, 1, 2, 0], [3, 3, 0, 0], [1, 1, 2, 0]])
    codes = field_codes(ids, layout)
    assert codes[0].tolist() == [1, 2, 3, 1]
    assert codes[1].tolist() == [0, 0, 1, 0]  # (1, 2, 0) < (3, 0, 0)
    many = np.random.default_rng(0).integers(0, 3, size=(500, 4))
    np.testing.assert_array_equal(
        row_codes(many), np.unique(many, axis=0, return_inverse=True)[1].reshape(-1)
    )


# --------------------------------------------------------------------- outrank: defining claim


@pytest.mark.parametrize("seed", [0, 1])
def test_outrank_ranks_planted_signal_above_noise(seed):
    data = load_synthetic(task="rating", n_rows=10_000, vocab=150, seed=seed, noise_fields=3)
    scores, _ = rank_dataset(data)
    names = data.schema.names
    signal = [s for s, n in zip(scores, names, strict=True) if n.startswith("signal")]
    noise = [s for s, n in zip(scores, names, strict=True) if n.startswith("noise")]
    assert len(signal) == 3 and len(noise) == 3
    assert min(signal) > max(noise)
    assert max(abs(s) for s in noise) < 0.02  # noise scores about 0, whatever its cardinality


def test_rank_dataset_refuses_topk(five_fields):
    with pytest.raises(ConfigError, match="top-k"):
        rank_dataset(dataclasses.replace(five_fields, task="topk"))


# -------------------------------------------------------------------- outrank: selection, layout


def test_select_fields_prefix_and_greedy():
    cards, order, dim = [10, 50, 5], [1, 0, 2], 2  # costs 20, 100, 10
    assert select_fields(order, cards, dim, 130, "prefix") == [True, True, True]
    assert select_fields(order, cards, dim, 129, "prefix") == [True, True, False]
    assert select_fields(order, cards, dim, 99, "prefix") == [False, False, False]
    assert select_fields(order, cards, dim, 99, "greedy") == [True, False, True]
    assert select_fields(order, cards, dim, 25, "greedy") == [True, False, False]
    with pytest.raises(ConfigError, match="selection"):
        select_fields(order, cards, dim, 99, "best")


def test_field_subset_embedding_counts_and_zeroes_dropped_fields():
    layout = _layout((4, 3, 5))
    torch.manual_seed(0)
    emb = FieldSubsetEmbedding(layout, 2, [True, False, True])
    assert emb.num_parameters() == (4 + 5) * 2
    assert emb.memory_bytes() == 18 * 4 + 3  # table + one bool per field
    out = emb.lookup(torch.arange(12))
    torch.testing.assert_close(out[:4], emb.weight[:4])
    assert torch.all(out[4:7] == 0)
    torch.testing.assert_close(out[7:], emb.weight[4:])
    out.sum().backward()
    assert torch.all(emb.weight.grad == 1)  # kept rows read once each, dropped reads reach none
    empty = FieldSubsetEmbedding(layout, 2, [False, False, False])
    assert empty.num_parameters() == 0 and empty.memory_bytes() == 3
    assert torch.all(empty.lookup(torch.tensor([[0, 5]])) == 0)
    assert empty(torch.tensor([[0, 1, 2]])).shape == (1, 3, 2)


# --------------------------------------------------------------------------- outrank: end to end


@pytest.mark.parametrize("selection", ["prefix", "greedy"])
def test_outrank_end_to_end_with_fm(selection):
    data = load_synthetic(task="rating", n_rows=3000, vocab=60, seed=0, noise_fields=3)
    dim, budgets = 8, [0.3, 0.6, 1.0]
    results = methods.method("outrank")(
        _fm(data), data, budgets=budgets, dim=dim, train=TRAIN, options={"selection": selection}
    )
    cards = dict(zip(data.schema.names, data.cardinalities, strict=True))
    full = sum(cards.values()) * dim
    assert [r.budget for r in results] == budgets
    for result in results:
        assert result.method == "outrank" and result.metric == "rmse"
        assert result.embedding_params <= budget_params(result.budget, full)
        kept = [n for n, v in result.dims.items() if v["kept"]]
        assert result.embedding_params == sum(cards[n] for n in kept) * dim
        assert result.embedding_params == result.model.embedding.num_parameters()
        assert result.memory_bytes == result.embedding_params * 4 + len(cards)
        assert result.search_seconds > 0 and len(result.history) == len(cards)
        ranked = [h["field"] for h in result.history]
        assert [h["rank"] for h in result.history] == list(range(1, len(cards) + 1))
        if selection == "prefix":  # the kept fields are the top of the ranking
            assert kept and set(kept) == set(ranked[: len(kept)])
        for v in result.dims.values():
            assert v["block_dims"] == [dim if v["kept"] else 0]
        dropped = [data.schema.index(n) for n, v in result.dims.items() if not v["kept"]]
        fields = result.model.embedding(data.test.ids[:50])
        assert torch.all(fields[:, dropped] == 0)
        scores = predict(result.model, data.test.ids)
        assert torch.isfinite(scores).all() and "rmse" in result.metrics["test"]
    assert all(v["kept"] for v in results[-1].dims.values())  # the full budget keeps every field
    assert results[0].embedding_params < results[1].embedding_params
