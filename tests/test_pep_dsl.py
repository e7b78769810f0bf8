"""PEP and DSL: defining behaviour, hand-counted accounting, end to end through the registry."""

from __future__ import annotations

import math

import pytest
import torch

import dnis.search.dsl as dsl
import dnis.search.pep as pep
import dnis.search.training as training
from dnis import models
from dnis.data.synthetic import load_synthetic
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.masked import (
    MaskedEmbedding,
    SoftThresholdEmbedding,
    csr_bytes,
    dense_state,
    readable_rows,
)
from dnis.embeddings.mixed import RaggedEmbedding
from dnis.errors import ConfigError
from dnis.search import methods
from dnis.search.prune import budget_params, padding_rows
from dnis.tasks import make_task
from dnis.tasks.base import predict
from dnis.train import TrainConfig, Trainer
from dnis.train.progress import Progress

# Two fields: a (10 rows), b (6 rows); dim 4 -> 64 entries.
HAND_LAYOUT = FieldLayout(("a", "b"), (10, 6), (0, 1), (False, False), (False, False))
# Field b is a sequence: its row 10 (id 0) is padding.
SEQ_LAYOUT = FieldLayout(("a", "b"), (10, 6), (0, 1, 1), (False, True), (False, True))
TRAIN = TrainConfig(epochs=3, batch_size=256, lr=0.003, patience=0)
# thresholds that sweep the synthetic table within a few epochs (see the PEP sparsity test)
FAST_PEP = {"threshold_init": -7.0, "threshold_lr": 0.1, "extra_epochs": 7}


@pytest.fixture(scope="module")
def small_ctr():
    return load_synthetic(task="ctr", n_rows=2000, vocab=60, seed=0)


def fm_factory(dataset):
    return lambda e: models.build("fm", dataset.schema, e)


# --------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["pep", "dsl"])
def test_methods_register_and_refuse_unknown_options(name, small_ctr):
    fn = methods.method(name)
    assert fn is methods.METHODS[name]
    for bad in ({"no_such_option": 1}, {"granularty": "field"}):
        with pytest.raises(ConfigError, match="has no option"):
            fn(fm_factory(small_ctr), small_ctr, budgets=[0.5], dim=4, train=TRAIN, options=bad)


def test_bad_option_values_are_refused():
    with pytest.raises(ConfigError, match="granularity"):
        pep.PepConfig(granularity="row")
    with pytest.raises(ConfigError):
        pep.PepConfig(check_every=0)
    with pytest.raises(ConfigError, match="schedule"):
        dsl.DslConfig(schedule="linear")
    with pytest.raises(ConfigError):
        dsl.DslConfig(drop_fraction=1.5)


# ----------------------------------------------------------------------------- embeddings, by hand


@pytest.mark.parametrize(
    ("granularity", "thresholds"),
    [("feature_dim", 64), ("feature", 16), ("field_dim", 8), ("field", 2), ("dimension", 4),
     ("global", 1)],
)  # fmt: skip
def test_soft_threshold_parameter_count(granularity, thresholds):
    emb = SoftThresholdEmbedding(HAND_LAYOUT, 4, granularity)
    assert emb.threshold.numel() == thresholds
    assert emb.num_parameters() == 16 * 4 + thresholds
    assert torch.all(emb.threshold == -15.0)


def test_soft_threshold_lookup_by_hand():
    emb = SoftThresholdEmbedding(HAND_LAYOUT, 4, "field")
    with torch.no_grad():
        emb.weight.zero_()
        emb.weight[3] = torch.tensor([0.7, -0.2, -0.9, 0.5])  # field a: g = sigmoid(0) = 0.5
        emb.weight[12] = torch.tensor([0.7, -0.2, -0.05, 0.1])  # field b: g = 0.1
        emb.threshold.copy_(torch.tensor([[0.0], [math.log(0.1 / 0.9)]]))
    out = emb.lookup(torch.tensor([3, 12]))
    torch.testing.assert_close(out[0], torch.tensor([0.2, 0.0, -0.4, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.6, -0.1, 0.0, 0.0]))
    assert emb.num_nonzero() == 4  # 0.7, -0.9 in row 3; 0.7, -0.2 in row 12 (0.1 is not > 0.1)
    torch.testing.assert_close(emb.sparse_table()[[3, 12]], out)
    out.abs().sum().backward()  # both fields' thresholds get gradients via the kept entries
    assert emb.threshold.grad is not None and torch.all(emb.threshold.grad != 0)


def test_soft_threshold_never_counts_padding_rows():
    emb = SoftThresholdEmbedding(SEQ_LAYOUT, 4, "global", threshold_init=-30.0)
    assert emb.num_nonzero() == 15 * 4  # all but padding row 10
    assert not emb.kept()[10].any() and torch.all(emb.sparse_table()[10] == 0)


def test_csr_bytes_and_masked_embedding_accounting():
    assert csr_bytes(7, 16) == 7 * 4 + 7 * 2 + 17 * 4 == 110
    mask = torch.zeros(16, 4, dtype=torch.bool)
    mask[0, :3] = True
    mask[5, 1] = True
    mask[15, [0, 2, 3]] = True
    emb = MaskedEmbedding(HAND_LAYOUT, 4, mask)
    assert emb.num_parameters() == 7
    assert emb.memory_bytes() == 110  # values float32, int16 dims, int32 row pointers
    assert emb.row_widths().tolist() == [3] + [0] * 4 + [1] + [0] * 9 + [3]
    assert torch.all(emb.weight[~mask] == 0) and torch.all(emb.weight[mask] != 0)
    ragged = emb.to_ragged()
    assert isinstance(ragged, RaggedEmbedding)
    assert ragged.num_parameters() == 7 and ragged.memory_bytes() == 110
    rows = torch.arange(16)
    torch.testing.assert_close(ragged.lookup(rows), emb.lookup(rows))
    emb.lookup(rows).pow(2).sum().backward()  # no gradient off the mask
    assert torch.all(emb.weight.grad[~mask] == 0) and torch.all(emb.weight.grad[mask] != 0)


def test_masked_embedding_refuses_padding_entries_and_bad_shapes():
    mask = torch.zeros(16, 4, dtype=torch.bool)
    mask[10, 0] = True  # padding row of the sequence field
    with pytest.raises(ValueError, match="padding"):
        MaskedEmbedding(SEQ_LAYOUT, 4, mask)
    with pytest.raises(ValueError):
        MaskedEmbedding(HAND_LAYOUT, 4, torch.ones(15, 4, dtype=torch.bool))
    assert readable_rows(SEQ_LAYOUT).tolist() == [True] * 10 + [False] + [True] * 5


def test_ticket_embedding_is_initial_weights_times_mask():
    torch.manual_seed(0)
    init = torch.randn(16, 4)
    mask = torch.rand(16, 4) < 0.4
    ticket = pep.ticket_embedding(HAND_LAYOUT, 4, mask, init)
    assert torch.equal(ticket.weight.detach(), init * mask)
    assert torch.equal(ticket.lookup(torch.arange(16)).detach(), init * mask)
    assert ticket.num_parameters() == int(mask.sum())


def test_top_magnitude_keeps_exactly_the_largest():
    table = torch.tensor([[0.5, -0.1, 0.0], [-0.7, 0.2, 0.05]])
    assert pep.top_magnitude(table, 3).tolist() == [[True, False, False], [True, True, False]]


# -------------------------------------------------------------------------------------------- PEP


def test_pep_reaches_each_budget_by_its_thresholds(small_ctr):
    budgets = [0.25, 0.5]  # snapshots are taken largest budget first
    search = pep.pep_search(
        fm_factory(small_ctr), small_ctr, budgets=budgets, dim=8, train=TRAIN,
        config=pep.PepConfig(**FAST_PEP),
    )  # fmt: skip
    full = search.layout.total_rows * 8
    for budget, snapshot in zip(budgets, search.snapshots, strict=True):
        target = budget_params(budget, full)
        assert snapshot.source == "threshold" and snapshot.target == target
        assert 0.9 * target <= snapshot.nonzeros <= target  # at most the budget, and close to it
        assert torch.equal(snapshot.values != 0, snapshot.mask)  # the mask is V_hat's support
    assert search.snapshots[1].step <= search.snapshots[0].step
    assert search.history[-1]["nonzeros"] <= search.snapshots[0].target
    assert [b for h in search.history for b in h["reached"]] == [0.5, 0.25]


def test_pep_search_stops_once_every_budget_is_saved(small_ctr):
    config = pep.PepConfig(**FAST_PEP)
    search = pep.pep_search(
        fm_factory(small_ctr), small_ctr, budgets=[0.5, 0.25], dim=8, train=TRAIN, config=config
    )
    last = search.history[-1]
    smallest = search.snapshots[1]
    # the run ended in the epoch and at the step that saved the smallest budget, before its bound
    assert last["epoch"] == smallest.epoch == len(search.history) < TRAIN.epochs + 7
    assert last["reached"][-1] == 0.25
    steps_per_epoch = math.ceil(len(small_ctr.train) / TRAIN.batch_size)
    assert (smallest.epoch - 1) * steps_per_epoch < smallest.step < smallest.epoch * steps_per_epoch
    assert math.isfinite(last["loss"])  # the mean over the rows the stopped epoch trained on


def test_pep_retrain_starts_from_initial_weights_times_mask(small_ctr, monkeypatch):
    search = pep.pep_search(
        fm_factory(small_ctr), small_ctr, budgets=[0.5], dim=8, train=TRAIN,
        config=pep.PepConfig(**FAST_PEP),
    )  # fmt: skip
    seen = {}

    class Recording(training.Trainer):  # every method's trainings start in `Phases.fit`
        def __init__(self, model, *args, **kwargs):
            seen["weight"] = model.embedding.weight.detach().clone()
            seen["dense"] = dense_state(model)
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(training, "Trainer", Recording)
    # another seed for the retrain, so a fresh draw could not pass for the saved table
    other_seed = TrainConfig(**{**vars(TRAIN), "seed": 5})
    result = pep.pep_retrain(search, fm_factory(small_ctr), 0, other_seed)
    mask = search.snapshots[0].mask
    assert torch.equal(seen["weight"], search.init_weight * mask)
    for key, value in search.init_dense.items():  # dense layers rewound to their start too
        assert torch.equal(seen["dense"][key], value)
    # the saved initial table is the one the search started from (same seed, first draw)
    torch.manual_seed(TRAIN.seed)
    fresh = SoftThresholdEmbedding(search.layout, 8, "feature_dim", -7.0)
    assert torch.equal(fresh.weight.detach(), search.init_weight)
    # the mask stayed fixed through retraining
    widths = result.model.embedding.widths()
    assert torch.equal(widths, mask.sum(dim=1))


def test_pep_falls_back_to_magnitude_when_a_budget_is_not_reached(small_ctr):
    options = {"threshold_init": -30.0, "search_epochs": 1, "extra_epochs": 1}
    budgets = [0.3]
    results = methods.method("pep")(
        fm_factory(small_ctr), small_ctr, budgets=budgets, dim=4, train=TRAIN, options=options
    )
    (result,) = results
    target = budget_params(0.3, result.full_params)
    assert result.embedding_params == target  # exactly the budget, never a bigger model
    assert all(v["snapshot"] == "magnitude_fallback" for v in result.dims.values())
    assert result.history[-1]["magnitude_fallback"] == budgets
    assert sum(1 for h in result.history if "valid_auc" in h) == 2  # search + extra epoch


# -------------------------------------------------------------------------------------------- DSL


def test_drop_fraction_schedule():
    cosine = dsl.DslConfig(drop_fraction=0.3)
    assert dsl.drop_fraction_at(0, cosine, 100) == pytest.approx(0.3)
    assert dsl.drop_fraction_at(50, cosine, 100) == pytest.approx(0.15)
    assert dsl.drop_fraction_at(100, cosine, 100) == pytest.approx(0.0)
    assert dsl.drop_fraction_at(150, cosine, 100) == pytest.approx(0.0)
    assert dsl.drop_fraction_at(70, dsl.DslConfig(schedule="constant"), 100) == 0.3


def test_prune_and_regrow_by_hand():
    weight = torch.tensor([[0.5, 0.0, -0.1], [0.0, 0.3, 0.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    grad = torch.tensor([[0.0, 0.9, 0.0], [0.2, 0.0, 0.05]])
    readable = torch.tensor([True, True])
    # floor(3 * 0.7) = 2: drop -0.1 and 0.3, grow the two largest gradients off the mask
    new, grown = dsl.prune_and_regrow(weight, grad, mask, readable, 0.7)
    assert new.tolist() == [[True, True, False], [True, False, False]]
    assert grown.tolist() == [[False, True, False], [True, False, False]]
    # a just-dropped entry may be regrown (RigL); it is then not new
    new, grown = dsl.prune_and_regrow(
        weight, torch.tensor([[0, 0, 0.7], [0, 0, 0.0]]), mask, readable, 0.4
    )
    assert torch.equal(new, mask) and not grown.any()
    # padding rows are never grown into, however large their gradient
    mask = torch.tensor([[True, False, True], [False, False, False]])
    grad = torch.tensor([[0.0, 0.01, 0.0], [5.0, 5.0, 5.0]])
    new, grown = dsl.prune_and_regrow(weight, grad, mask, torch.tensor([True, False]), 0.5)
    assert new.tolist() == [[True, True, False], [False, False, False]]
    # a fraction too small to move one entry changes nothing
    new, grown = dsl.prune_and_regrow(weight, grad, mask, readable, 0.4)
    assert torch.equal(new, mask) and not grown.any()


def test_apply_mask_zeroes_values_and_optimizer_state():
    mask = torch.zeros(16, 4, dtype=torch.bool)
    mask[:4] = True
    emb = MaskedEmbedding(HAND_LAYOUT, 4, mask)
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.1)
    emb.lookup(torch.arange(16)).sum().backward()
    optimizer.step()
    new = mask.clone()
    new[0] = False
    new[5] = True
    grown = new & ~mask
    dsl.apply_mask(emb, optimizer, new, grown)
    assert torch.equal(emb.mask, new)
    state = optimizer.state[emb.weight]
    for tensor in (emb.weight.detach(), state["exp_avg"], state["exp_avg_sq"]):
        assert torch.all(tensor[~new] == 0) and torch.all(tensor[grown] == 0)
        assert torch.all(tensor[1:4] != 0)  # kept entries keep their values and moments


def test_random_mask_has_exactly_the_count_off_padding():
    mask = dsl.random_mask(SEQ_LAYOUT, 4, 37, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 37 and not mask[10].any()
    again = dsl.random_mask(SEQ_LAYOUT, 4, 37, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    with pytest.raises(ConfigError):
        dsl.random_mask(SEQ_LAYOUT, 4, 61, torch.Generator())


def test_dsl_holds_the_budget_at_every_step(small_ctr):
    dim, budget = 8, 0.3
    counts, stray = [], []

    def check(step, embedding):
        counts.append(int(embedding.mask.sum()))
        stray.append(int((embedding.weight.detach()[~embedding.mask] != 0).sum()))

    config = dsl.DslConfig(update_every=2)
    run = dsl.train_sparse(
        fm_factory(small_ctr), small_ctr, dim=dim, budget=budget, train=TRAIN, config=config,
        on_step=check,
    )  # fmt: skip
    layout = FieldLayout.from_dataset(small_ctr)
    target = budget_params(budget, layout.total_rows * dim)
    steps_per_epoch = math.ceil(len(small_ctr.train) / TRAIN.batch_size)
    assert len(counts) == TRAIN.epochs * steps_per_epoch
    assert counts == [target] * len(counts)  # stored entries == budget at every step
    assert stray == [0] * len(stray)  # and nothing off the mask is non-zero
    assert sum(h["regrown"] for h in run.history) > 0  # the mask really moved
    start = dsl.random_mask(layout, dim, target, torch.Generator().manual_seed(TRAIN.seed))
    assert not torch.equal(start, run.embedding.mask)
    assert all(h["active_min"] == h["active_max"] == target for h in run.history)


class StopAfter(Progress):
    """Interrupts a run after epoch `epoch` is checkpointed (as a kill would)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_dsl_resumes_from_a_checkpoint_exactly(small_ctr, tmp_path):
    """The mask schedule (its update replaces optimizer steps) survives a checkpoint: a run
    interrupted after epoch 2 and resumed ends exactly as an uninterrupted one."""
    layout = FieldLayout.from_dataset(small_ctr)
    config = dsl.DslConfig(update_every=2, end_fraction=1.0)
    steps = TRAIN.epochs * math.ceil(len(small_ctr.train) / TRAIN.batch_size)

    def trainer(run_dir, progress=None):
        torch.manual_seed(0)
        mask = dsl.random_mask(layout, 4, 100, torch.Generator().manual_seed(0))
        embedding = MaskedEmbedding(layout, 4, mask)
        hook = dsl.MaskSchedule(embedding, readable_rows(layout), config, steps)
        model = fm_factory(small_ctr)(embedding)
        return Trainer(model, make_task(small_ctr), TRAIN, run_dir, progress, hooks=[hook])

    whole = trainer(tmp_path / "whole")
    expected = whole.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "cut", StopAfter(2)).fit()
    resumed = trainer(tmp_path / "cut")
    result = resumed.fit(resume=True)
    assert resumed.hooks[0].step == whole.hooks[0].step == steps
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in result.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in expected.history
    ]
    assert sum(h["updates"] for h in result.history) == steps // 2
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", ["pep", "dsl"])
def test_end_to_end_with_fm(name, small_ctr):
    dim, budgets = 8, [0.5, 0.25]
    options = FAST_PEP if name == "pep" else {"update_every": 3}
    results = methods.method(name)(
        fm_factory(small_ctr), small_ctr, budgets=budgets, dim=dim, train=TRAIN, options=options
    )
    full = FieldLayout.from_dataset(small_ctr).total_rows * dim
    assert [r.budget for r in results] == budgets
    for result in results:
        target = budget_params(result.budget, full)
        assert result.method == name and result.metric == "auc" and result.full_params == full
        assert 0.9 * target <= result.embedding_params <= target
        embedding = result.model.embedding
        assert isinstance(embedding, RaggedEmbedding)
        assert result.embedding_params == embedding.num_parameters()
        assert result.memory_bytes == embedding.memory_bytes()
        assert result.memory_bytes == csr_bytes(result.embedding_params, full // dim)
        assert set(result.dims) == set(small_ctr.schema.names)
        for stats in result.dims.values():
            assert 0 <= stats["min_width"] <= stats["mean_width"] <= stats["max_width"] <= dim
            assert len(stats["block_mean_width"]) >= 1
        assert sum(v["nonzeros"] for v in result.dims.values()) == result.embedding_params
        assert result.search_seconds > 0 and result.history
        assert set(result.metrics) == {"valid", "test"} and "auc" in result.metrics["test"]
        scores = predict(result.model, small_ctr.test.ids)
        assert scores.shape == (len(small_ctr.test),) and torch.isfinite(scores).all()
    if name == "pep":
        assert results[0].pruned and all(
            v["snapshot"] == "threshold" for r in results for v in r.dims.values()
        )
    else:
        assert results[0].embedding_params == budget_params(0.5, full)  # exactly, always


def test_compact_model_predicts_as_the_trained_masked_model(small_ctr):
    run = dsl.train_sparse(
        fm_factory(small_ctr), small_ctr, dim=4, budget=0.4, train=TRAIN,
        config=dsl.DslConfig(update_every=3),
    )  # fmt: skip
    from dnis.embeddings.masked import swap_embedding

    final = swap_embedding(fm_factory(small_ctr), run.embedding.to_ragged(), dense_state(run.model))
    torch.testing.assert_close(
        predict(final, small_ctr.test.ids), predict(run.model, small_ctr.test.ids)
    )


@pytest.mark.parametrize("name", ["pep", "dsl"])
def test_padding_rows_are_never_stored(name, sequence_data):
    options = (
        {"threshold_init": -30.0, "search_epochs": 1, "extra_epochs": 0} if name == "pep" else {}
    )
    (result,) = methods.method(name)(
        lambda e: models.build("fm", sequence_data.schema, e), sequence_data, budgets=[0.5],
        dim=4, train=TrainConfig(epochs=1, batch_size=64), options=options,
    )  # fmt: skip
    layout = FieldLayout.from_dataset(sequence_data)
    widths = result.model.embedding.widths()
    assert widths[padding_rows(layout)].sum() == 0
    assert result.embedding_params == budget_params(0.5, layout.total_rows * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("name", ["pep", "dsl"])
def test_runs_on_the_gpu_like_on_the_cpu(name, small_ctr):
    from dnis.tasks.base import model_device

    options = FAST_PEP if name == "pep" else {"update_every": 3}
    results = {}
    for device in ("cpu", "cuda"):
        target = torch.device(device)
        (result,) = methods.method(name)(
            lambda e, t=target: models.build("deepfm", small_ctr.schema, e).to(t),
            small_ctr, budgets=[0.3], dim=8,
            train=TrainConfig(**{**vars(TRAIN), "device": device}), options=options,
        )  # fmt: skip
        assert model_device(result.model).type == device
        assert result.model.embedding.values.device.type == device
        results[device] = result
    cpu, gpu = results["cpu"], results["cuda"]
    target = budget_params(0.3, cpu.full_params)
    assert gpu.embedding_params <= target and cpu.embedding_params <= target
    if name == "dsl":
        assert gpu.embedding_params == cpu.embedding_params == target
    assert abs(cpu.metrics["test"]["auc"] - gpu.metrics["test"]["auc"]) < 0.05
