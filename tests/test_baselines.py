"""Baselines: MDE, hashing, QR and random search (defining behaviour, accounting, end to end)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dnis import models
from dnis.data.synthetic import load_synthetic
from dnis.embeddings.blocks import BlockLayout, dataset_blocks
from dnis.embeddings.hashed import PRIME, HashedEmbedding, count_collisions
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.embeddings.projected import ProjectedBlockEmbedding
from dnis.embeddings.qr import QREmbedding
from dnis.errors import ConfigError
from dnis.search import methods
from dnis.search.hashing import hash_rows
from dnis.search.mde import block_probabilities, mde_cost, mde_widths
from dnis.search.qr import choose_m
from dnis.search.random_search import candidate_widths, keep_first, sample_widths
from dnis.tasks.base import predict
from dnis.train import TrainConfig

BASELINES = ("mde", "hashing", "qr", "random")


def _layout(cards: tuple[int, ...]) -> FieldLayout:
    n = len(cards)
    names = tuple(f"f{i}" for i in range(n))
    return FieldLayout(names, cards, tuple(range(n)), (False,) * n, (False,) * n)


# Two fields: a (10 rows, blocks of 4 and 6), b (6 rows, one block).
HAND_LAYOUT = _layout((10, 6))
HAND_BLOCKS = BlockLayout(field=(0, 0, 1), start=(0, 4, 10), size=(4, 6, 6), frequency=(30, 6, 12))


@pytest.fixture(scope="module")
def small_ctr():
    return load_synthetic(task="ctr", n_rows=2000, vocab=60, seed=0)


# --------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", BASELINES)
def test_methods_resolve_and_refuse_unknown_options(name, small_ctr):
    fn = methods.method(name)
    assert fn is methods.METHODS[name]
    with pytest.raises(ConfigError, match="has no option"):
        fn(
            lambda e: models.build("fm", small_ctr.schema, e),
            small_ctr,
            budgets=[0.5],
            dim=4,
            train=TrainConfig(epochs=1),
            options={"no_such_option": 1},
        )


def test_every_method_has_an_options_dataclass_whose_defaults_parse():
    for name, entry in methods.METHODS.items():
        assert dataclasses.is_dataclass(entry.options), name
        assert isinstance(entry.parse({}), entry.options), name
        assert entry.__module__.startswith("dnis.search."), name  # the module that defines it


def test_options_are_converted_to_their_types():
    random = methods.method("random").parse({"candidates": [0, 4, 8], "block_mode": [0.1, 0.5]})
    assert random.candidates == (0, 4, 8) and random.block_mode == [0.1, 0.5]
    mde = methods.method("mde").parse({"temperatures": [0, 1]})
    assert mde.temperatures == (0.0, 1.0) and all(type(t) is float for t in mde.temperatures)
    assert methods.method("hashing").parse({"init_std": 1}).init_std == 1.0
    assert methods.method("unified").parse({"seed": None}).seed is None


@pytest.mark.parametrize(
    "name, options, says",
    [
        ("random", {"trials": True}, r"compare\.options\.random\.trials: expected int, got bool"),
        ("hashing", {"seed": 1.5}, r"compare\.options\.hashing\.seed: expected int, got float"),
        ("qr", {"init_std": "0.01"}, r"compare\.options\.qr\.init_std: expected float"),
        ("random", {"candidates": [0, "8"]}, r"compare\.options\.random\.candidates\[1\]"),
        ("outrank", {"correction": "yes"}, r"compare\.options\.outrank\.correction: expected bool"),
        ("hashing", {"init_std": 0}, r"compare\.options\.hashing\.init_std must be > 0, got 0\.0"),
        ("random", {"trial_epochs": 0}, r"compare\.options\.random\.trial_epochs must be >= 1"),
        ("mde", {"temperatures": []}, r"compare\.options\.mde\.temperatures must be a non-empty"),
        ("mde", {"block_mode": "mas"}, r"compare\.options\.mde\.block_mode must be one of"),
        ("unified", {"combine": "max"}, r"compare\.options\.unified\.combine must be one of"),
        ("pep", {"granularity": "row"}, r"compare\.options\.pep\.granularity must be one of"),
        ("hashing", ["seed"], r"compare\.options\.hashing: expected a mapping"),
        ("dnis", {"budgets": [0.5]}, r"method 'dnis' has no option 'budgets'"),  # set by the call
    ],
)  # fmt: skip
def test_bad_option_types_and_values_name_their_key(name, options, says):
    with pytest.raises(ConfigError, match=says) as caught:
        methods.method(name).parse(options)
    assert caught.value.key.startswith(f"compare.options.{name}")


# -------------------------------------------------------------------------------------------- MDE


def test_mde_widths_follow_popularity_and_fit_the_budget():
    p = [0.2, 0.05, 0.01, 0.001]
    sizes = [5, 20, 100, 1000]
    dim, budget = 16, 4000
    for temperature in (0.1, 0.3, 0.5, 1.0):
        widths = mde_widths(p, sizes, dim, temperature, budget)
        assert all(1 <= w <= dim for w in widths)
        assert widths == sorted(widths, reverse=True)  # frequent blocks get at least as many dims
        assert mde_cost(np.array(widths), np.array(sizes), dim) <= budget
    assert mde_widths(p, sizes, dim, 1.0, budget)[0] > mde_widths(p, sizes, dim, 1.0, budget)[-1]
    uniform = mde_widths(p, sizes, dim, 0.0, budget)
    assert len(set(uniform)) == 1
    # hand count: width 3 costs (5 + 20 + 100 + 1000) * 3 + 4 * 3 * 16 = 3567 <= 4000; width 4: 4756
    assert uniform == [3, 3, 3, 3]
    assert mde_widths(p, sizes, dim, 0.5, 10**9) == [dim] * 4
    with pytest.raises(ConfigError, match="at least"):
        mde_widths(p, sizes, dim, 0.5, 1000)  # width 1 everywhere costs 1125 + 64


def test_mde_widths_on_dataset_blocks_shrink_with_frequency(small_ctr):
    blocks = dataset_blocks(small_ctr, 4)
    layout = FieldLayout.from_dataset(small_ctr)
    p = block_probabilities(blocks, layout.num_fields)
    budget = layout.total_rows * 8 // 3
    for temperature, uniform in ((0.0, True), (0.3, False), (1.0, False)):
        widths = mde_widths(p, blocks.size, 8, temperature, budget)
        assert mde_cost(np.array(widths), np.array(blocks.size), 8) <= budget
        for f in range(layout.num_fields):
            field_widths = [widths[b] for b in blocks.blocks_of(f)]
            assert field_widths == sorted(field_widths, reverse=True)
            assert (len(set(field_widths)) == 1) or not uniform
    assert len(set(mde_widths(p, blocks.size, 8, 1.0, budget))) > 1


def test_block_probabilities_are_mean_id_probabilities_within_fields():
    p = block_probabilities(HAND_BLOCKS, 2)
    # field a: 36 counts; block 0: 30 / 4 / 36, block 1: 6 / 6 / 36; field b: 12 / 6 / 12
    np.testing.assert_allclose(p, [30 / 4 / 36, 6 / 6 / 36, 12 / 6 / 12])


def test_projected_embedding_counts_and_projects():
    torch.manual_seed(0)
    emb = ProjectedBlockEmbedding(HAND_LAYOUT, 4, HAND_BLOCKS, [3, 1, 2])
    # tables 4*3 + 6*1 + 6*2 = 30, projections (3 + 1 + 2) * 4 = 24
    assert emb.num_parameters() == 54
    # float32 parameters + four int64 index buffers of 3 blocks
    assert emb.memory_bytes() == 54 * 4 + 4 * 3 * 8
    with torch.no_grad():
        emb.projection.normal_()
    rows = torch.tensor([[0, 3, 4], [9, 10, 15]])
    out = emb.lookup(rows)
    assert out.shape == (2, 3, 4)
    narrow = emb.narrow(rows)
    widths = {0: 3, 3: 3, 4: 1, 9: 1, 10: 2, 15: 2}
    bases = {0: 0, 3: 0, 4: 3, 9: 3, 10: 4, 15: 4}
    for i, row in enumerate(rows.reshape(-1).tolist()):
        w, base = widths[row], bases[row]
        vector = narrow.reshape(-1, narrow.shape[-1])[i]
        assert torch.all(vector[w:] == 0)
        expected = vector[:w] @ emb.projection[base : base + w]
        torch.testing.assert_close(out.reshape(-1, 4)[i], expected)
    out.sum().backward()  # gradients reach both tables and projections
    assert emb.values.grad is not None and emb.projection.grad.abs().sum() > 0


def test_projected_embedding_starts_as_truncated_table():
    emb = ProjectedBlockEmbedding(HAND_LAYOUT, 4, HAND_BLOCKS, [3, 1, 2])
    rows = torch.arange(16)
    padded = torch.nn.functional.pad(emb.narrow(rows), (0, 1))
    torch.testing.assert_close(emb.lookup(rows), padded)


# ---------------------------------------------------------------------------------------- hashing


def test_hash_rows_formula():
    assert hash_rows([100, 50, 10], 32) == [20, 10, 2]  # floor(32 * n / 160)
    assert hash_rows([5, 100], 100) == [4, 95]
    assert hash_rows([1000, 2], 10) == [9, 1]  # floor 0 raised to 1
    assert hash_rows([100, 1, 1], 3) == [1, 1, 1]  # the largest gives back what the floors took
    assert hash_rows([4, 4], 8) == [4, 4]
    with pytest.raises(ConfigError):
        hash_rows([10, 10, 10], 2)


def test_count_collisions_on_hand_made_buckets():
    assert count_collisions(torch.tensor([0, 1, 1, 2, 3, 3, 3])) == 5
    assert count_collisions(torch.tensor([0, 1, 2])) == 0
    assert count_collisions(torch.tensor([4, 4])) == 2


def test_hashed_embedding_hashes_accounts_and_counts_collisions():
    layout = _layout((20, 6))
    emb = HashedEmbedding(layout, 3, [5, 6], seed=1)
    assert emb.num_parameters() == (5 + 6) * 3
    assert emb.memory_bytes() == 11 * 3 * 4 + 3 * 2 * 8  # table + a, b, rows (int64) per field
    a, b = emb.a.tolist(), emb.b.tolist()
    expected = [((a[0] * i + b[0]) % PRIME) % 5 for i in range(20)]
    field, bucket = emb.buckets(torch.arange(20))
    assert field.tolist() == [0] * 20 and bucket.tolist() == expected
    torch.testing.assert_close(emb.lookup(torch.arange(20)), emb.weight[torch.tensor(expected)])
    # field 1 keeps all its rows: identity, stored after field 0's 5 rows
    torch.testing.assert_close(emb.lookup(torch.arange(20, 26)), emb.weight[5:11])
    counts = np.bincount(expected, minlength=5)
    assert emb.collisions() == [int(counts[counts > 1].sum()), 0]
    # field-salted: another field with the same rows hashes differently
    assert HashedEmbedding(_layout((20, 20)), 3, [5, 5]).a.unique().numel() == 2


# --------------------------------------------------------------------------------------------- QR


def test_choose_m_is_the_smallest_that_fits():
    # rows for [100, 10] at m = 2: 50 + 2 and 5 + 2; m = 6: 17 + 6 and 2 + 6; m = 10: 10 + 10, full 10
    assert choose_m([100, 10], 2, 120) == [2, 2]  # 59 rows
    assert choose_m([100, 10], 2, 62) == [6, 6]  # 31 rows
    assert choose_m([100, 10], 2, 60) == [10, 0]  # 30 rows, the 10-id field in full
    assert choose_m([100, 10], 2, 220) == [0, 0]  # m = 1: both full
    with pytest.raises(ConfigError):
        choose_m([100, 10], 2, 59)


def test_qr_embedding_composes_quotient_and_remainder():
    torch.manual_seed(0)
    emb = QREmbedding(_layout((100, 10)), 2, [10, 0])
    assert emb.num_parameters() == (10 + 10) * 2 + 10 * 2  # quotient 10 + full 10, remainder 10
    assert emb.memory_bytes() == 60 * 4 + 2 * 8  # + m per field (int64)
    out = emb.lookup(torch.tensor([3, 5, 47, 100, 109]))
    # ids 3 and 5 share quotient row 0 but not their remainder rows
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[0], emb.quotient[0] * emb.remainder[3])
    torch.testing.assert_close(out[1], emb.quotient[0] * emb.remainder[5])
    torch.testing.assert_close(out[2], emb.quotient[4] * emb.remainder[7])
    # the full field reads its own rows (after field 0's 10 quotient rows), untouched
    torch.testing.assert_close(out[3], emb.quotient[10])
    torch.testing.assert_close(out[4], emb.quotient[19])
    every = emb.lookup(torch.arange(110))
    assert torch.unique(every, dim=0).shape[0] == 110  # distinct (q, r) pairs: distinct vectors


# ----------------------------------------------------------------------------------------- random


def test_random_widths_come_from_candidates_and_fit():
    candidates = candidate_widths([0, 1, 2, 4, 8, 16, 32, 64], 8)
    assert candidates.tolist() == [0, 1, 2, 4, 8]
    rng = np.random.default_rng(0)
    sizes = [5, 20, 100, 300]
    for budget in (50, 400, 2000):
        for _ in range(20):
            widths = sample_widths(rng, sizes, candidates, budget)
            assert set(widths) <= set(candidates.tolist())
            assert sum(n * w for n, w in zip(sizes, widths, strict=True)) <= budget
    keep = keep_first([3, 1, 0], 4)
    emb = BlockMixedEmbedding(HAND_LAYOUT, 4, HAND_BLOCKS, keep)
    assert emb.num_parameters() == 4 * 3 + 6 * 1 + 6 * 0
    assert keep.tolist()[0] == [True, True, True, False]


# ------------------------------------------------------------------------------------ end to end


OPTIONS = {
    "mde": {"num_blocks": 2, "temperatures": [0.0, 0.5]},
    "hashing": {},
    "qr": {},
    "random": {"trials": 2, "trial_epochs": 1, "num_blocks": 3},
}


@pytest.mark.parametrize("name", BASELINES)
def test_method_end_to_end_with_deepfm(name, small_ctr):
    dim, budgets = 8, [0.3, 0.6]
    train = TrainConfig(epochs=1, batch_size=256, lr=0.01)
    results = methods.method(name)(
        lambda e: models.build("deepfm", small_ctr.schema, e),
        small_ctr,
        budgets=budgets,
        dim=dim,
        train=train,
        options=OPTIONS[name],
    )
    full = FieldLayout.from_dataset(small_ctr).total_rows * dim
    assert [r.budget for r in results] == budgets
    for result in results:
        assert result.method == name and result.metric == "auc"
        assert result.full_params == full
        assert 0 < result.embedding_params <= result.budget * full
        assert result.embedding_params == result.model.embedding.num_parameters()
        assert result.memory_bytes >= 4 * result.embedding_params
        assert set(result.dims) == set(small_ctr.schema.names)
        assert all("block_dims" in v for v in result.dims.values())
        assert set(result.metrics) == {"valid", "test"} and "auc" in result.metrics["test"]
        scores = predict(result.model, small_ctr.test.ids)
        assert scores.shape == (len(small_ctr.test),) and torch.isfinite(scores).all()
        assert result.model.embedding.lookup(torch.tensor([0])).shape == (1, dim)
    if name == "mde":
        chosen = [h for h in results[0].history if h["chosen"]]
        assert len(chosen) == 1 and len(results[0].history) == 2
        embedding = results[0].model.embedding
        assert embedding.num_parameters() == mde_cost(
            embedding.widths.numpy(), np.array(embedding.blocks.size), dim
        )
    if name == "hashing":
        rows = hash_rows(small_ctr.cardinalities, math.floor(0.3 * full + 0.5) // dim)
        assert [v["block_rows"][0] for v in results[0].dims.values()] == rows
        assert all(v["collisions"] <= v["cardinality"] for v in results[0].dims.values())
    if name == "qr":
        assert all(v["m"] >= 2 for v in results[0].dims.values())
    if name == "random":
        assert len(results[0].history) == 2 and results[0].search_seconds > 0
        assert all(w in (0, 1, 2, 4, 8) for v in results[0].dims.values() for w in v["block_dims"])
