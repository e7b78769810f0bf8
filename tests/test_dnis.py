"""DNIS: blocks, soft selection, pruning, exact materialisation, and the planted ground truth."""

from __future__ import annotations

import importlib
import io

import numpy as np
import pytest
import torch

from dnis import models
from dnis.data.synthetic import load_synthetic
from dnis.embeddings.blocks import BlockLayout, block_edges, frequency_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import ConfigError
from dnis.search.dnis import DnisConfig, materialize, retrain, search
from dnis.search.prune import block_saliency, budget_params, prune_blocks, prune_elements
from dnis.tasks.base import predict
from dnis.train import TrainConfig


def test_block_edges_equal_counts_and_ties_never_straddle():
    counts = np.array([10, 9, 9, 9, 5, 5, 3, 2, 1, 1])
    edges = block_edges(counts, 3, "count")
    assert edges[-1] == len(counts)
    for cut in edges[:-1]:
        assert counts[cut - 1] != counts[cut], f"edge {cut} splits a run of equal counts"
    assert block_edges(np.ones(8, dtype=int), 4, "count") == [8]  # all tied: one block


def test_block_edges_mass_puts_fewer_ids_in_frequent_blocks():
    counts = np.array([100, 50, 20, 10, 5, 4, 3, 2, 1, 1, 1, 1])
    edges = block_edges(counts, 3, "mass")
    sizes = np.diff([0, *edges])
    assert sizes[0] < sizes[-1]


def test_frequency_blocks_cover_every_row_once_with_oov_in_first_block():
    layout = FieldLayout(("a", "b"), (11, 5), (0, 1), (False, False), (False, False))
    freqs = [np.r_[0, np.arange(10, 0, -1)], np.r_[0, [4, 3, 2, 1]]]
    blocks = frequency_blocks(layout, freqs, num_blocks=3)
    row_block = blocks.row_block()
    assert len(row_block) == 16
    assert torch.all(row_block[1:] >= row_block[:-1])  # contiguous ranges
    assert blocks.start[blocks.blocks_of(1)[0]] == 11  # field b starts at its offset (its OOV row)
    assert sum(blocks.size) == 16
    assert blocks.frequency[0] > blocks.frequency[blocks.blocks_of(0)[-1]]


def _soft(seed: int = 0) -> tuple[SoftSelectionEmbedding, BlockLayout]:
    torch.manual_seed(seed)
    layout = FieldLayout(
        ("a", "b", "s"), (30, 20, 8), (0, 1, 2, 2), (False, False, True), (False, False, True)
    )
    freqs = [
        np.r_[0, np.arange(29, 0, -1)],
        np.r_[0, np.arange(19, 0, -1)],
        np.r_[0, np.arange(7, 0, -1)],
    ]
    blocks = frequency_blocks(layout, freqs, num_blocks=4)
    soft = SoftSelectionEmbedding(layout, 8, blocks, init_std=1.0)
    with torch.no_grad():
        soft.alpha.uniform_(0, 1)
    return soft, blocks


def test_soft_selection_scales_each_row_by_its_block_alpha():
    soft, blocks = _soft()
    rows = torch.tensor([0, 5, 29, 31, 55])
    expected = soft.weight[rows] * soft.alpha[soft.row_block[rows]]
    assert torch.allclose(soft.lookup(rows), expected)
    loss = soft(torch.tensor([[1, 2, 3, 0]])).sum()
    loss.backward()
    assert soft.alpha.grad is not None and soft.alpha.grad.abs().sum() > 0


def test_budget_params_validates():
    assert budget_params(0.25, 1000) == 250
    assert budget_params(300, 1000) == 300
    for bad in (0, -0.5, 2.5, 5000):
        with pytest.raises(ConfigError):
            budget_params(bad, 1000)


def test_prune_blocks_keeps_largest_alpha_within_budget():
    soft, blocks = _soft()
    budget = 120
    keep = prune_blocks(soft.alpha, blocks, budget)
    sizes = torch.tensor(blocks.size).unsqueeze(1)
    spent = int((keep * sizes).sum())
    assert spent <= budget
    assert spent >= budget - max(blocks.size)  # nothing that fits was left out
    # every kept entry of a given cost has alpha >= every dropped entry of the same or lower cost
    kept_min = soft.alpha[keep].min()
    dropped = soft.alpha[~keep]
    cheapest = min(blocks.size)
    assert torch.all(dropped[(sizes.expand_as(keep)[~keep] >= cheapest)] <= 1.0)
    assert kept_min >= 0


def test_prune_elements_hits_budget_exactly_and_skips_sequence_padding():
    soft, _ = _soft()
    table = soft.selected_weight().detach()
    keep = prune_elements(table, soft.layout, 100)
    assert int(keep.sum()) == 100
    padding_row = int(soft.layout.field_offsets()[2])
    assert not keep[padding_row].any()
    kept = table.abs()[keep].min()
    keep[padding_row] = True  # padding excluded from the comparison
    assert kept >= table.abs()[~keep].max()


@pytest.mark.parametrize("kind", ["block", "element"])
def test_materialised_embedding_equals_masked_soft_selection(kind):
    soft, blocks = _soft()
    ids = torch.tensor([[1, 2, 3, 0], [0, 19, 7, 7], [29, 0, 0, 0]])
    table = soft.selected_weight().detach()
    if kind == "block":
        keep = prune_blocks(soft.alpha, blocks, 150)
        compact = BlockMixedEmbedding(soft.layout, soft.dim, blocks, keep)
        with torch.no_grad():
            soft.alpha.mul_(keep)
        expected_params = int((keep.sum(1) * torch.tensor(blocks.size)).sum())
    else:
        keep = prune_elements(table, soft.layout, 150)
        compact = RaggedEmbedding(soft.layout, soft.dim, keep)
        with torch.no_grad():
            soft.weight.mul_(keep)
        expected_params = 150
    compact.load_dense(table)
    assert torch.allclose(compact(ids), soft(ids), atol=1e-6)
    assert compact.num_parameters() == expected_params
    compact(ids).sum().backward()
    assert compact.values.grad is not None and compact.values.grad.abs().sum() > 0


def test_ragged_memory_counts_its_indices():
    soft, _ = _soft()
    keep = prune_elements(soft.selected_weight().detach(), soft.layout, 100)
    compact = RaggedEmbedding(soft.layout, soft.dim, keep)
    rows = soft.layout.total_rows
    assert compact.memory_bytes() == 100 * 4 + 100 * 2 + (rows + 1) * 4


# ---------------------------------------------------------------- end to end on planted structure

TRAIN = TrainConfig(epochs=4, batch_size=512, lr=3e-3, patience=2)
# the static schedule: one search, pruned afterwards to any budget
SEARCH = DnisConfig(
    num_blocks=4, warmup_epochs=2, search_epochs=4, alpha_lr=0.01, alpha_l1=1e-4, schedule="static"
)


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    ds = load_synthetic(
        task="ctr", n_rows=30_000, ranks=(8, 4, 2), noise_fields=2, vocab=300, seed=0
    )

    def make(embedding):
        return models.build("fm", ds.schema, embedding)

    state = search(make, ds, dim=16, config=SEARCH, train=TRAIN)
    return ds, make, state


def _field_dims(dims: dict, name: str) -> float:
    return float(np.mean(dims[name]["block_dims"]))


def test_search_finds_the_planted_structure(planted):
    ds, make, state = planted
    result = retrain(
        state, make, 0.25, config=SEARCH, train=TrainConfig(epochs=1, batch_size=512, lr=3e-3)
    )
    dims = result.dims
    signal = [_field_dims(dims, f"signal{i}") for i in range(3)]
    noise = [_field_dims(dims, f"noise{i}") for i in range(2)]
    assert max(noise) <= 2.0, f"noise fields kept dims: {noise}"
    assert signal[0] > signal[2], f"rank-8 field should get more dims than rank-2: {signal}"
    assert min(signal) > max(noise)
    for i in range(3):  # frequent blocks keep more dims than the rarest block of the same field
        blocks = dims[f"signal{i}"]["block_dims"]
        assert blocks[0] > blocks[-1], f"signal{i}: {blocks}"
    # alpha itself ranks the fields the same way
    alpha_means = state.history[-1]["alpha_field_mean"]
    assert (
        alpha_means["signal0"] > alpha_means["noise0"]
        and alpha_means["signal0"] > alpha_means["noise1"]
    )


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_compact_model_predicts_like_the_pruned_soft_model(planted, granularity):
    ds, make, state = planted
    compact = materialize(state, 0.2, DnisConfig(granularity=granularity))
    model = make(compact)
    dense = {k: v for k, v in state.model.state_dict().items() if not k.startswith("embedding.")}
    model.load_state_dict(dense, strict=False)
    soft = state.embedding
    saved = soft.state_dict()
    full = soft.weight.numel()
    with torch.no_grad():
        if granularity == "block":
            saliency = block_saliency(soft.selected_weight(), state.blocks)
            keep = prune_blocks(soft.alpha, state.blocks, budget_params(0.2, full), saliency)
            soft.alpha.mul_(keep)
        else:
            keep = prune_elements(soft.selected_weight(), soft.layout, budget_params(0.2, full))
            soft.weight.mul_(keep)
    expected = predict(state.model, ds.valid.ids)
    soft.load_state_dict(saved)
    got = predict(model, ds.valid.ids)
    assert torch.allclose(got, expected, atol=1e-5)
    params = compact.num_parameters()
    assert params <= budget_params(0.2, full)
    if granularity == "element":
        assert params == budget_params(0.2, full)

    # the saved compact table shrinks in proportion to the budget (plus, for element, its index)
    def size(module):
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.tell()

    ratio = size(compact) / size(soft)
    if granularity == "block":
        # a few KiB of block metadata and zip entries on top of the kept values
        assert size(compact) < 0.2 * size(soft) + 8192, f"saved compact is {ratio:.2f} of the full"
    else:
        expected_bytes = params * (4 + 2) + (soft.layout.total_rows + 1) * 4
        assert compact.memory_bytes() == expected_bytes
        assert size(compact) < 1.1 * expected_bytes + 4096
        assert ratio < 0.2 * 1.5 + 0.1


def test_one_search_serves_many_budgets(planted):
    ds, make, state = planted
    quick = TrainConfig(epochs=1, batch_size=1024, lr=3e-3)
    results = [retrain(state, make, b, config=SEARCH, train=quick) for b in (0.05, 0.5)]
    assert results[0].embedding_params < results[1].embedding_params
    assert all(r.search_seconds == state.seconds for r in results)
    assert set(results[0].metrics) == {"valid", "test"}


def test_dnis_runs_through_every_model():
    ds = load_synthetic(task="ctr", n_rows=3000, ranks=(4, 2), noise_fields=1, vocab=50, seed=1)
    config = DnisConfig(num_blocks=2, warmup_epochs=0, search_epochs=1, budgets=[0.3])
    quick = TrainConfig(epochs=1, batch_size=512)
    for name in ("mf", "bprmf", "neumf", "fm", "widedeep", "deepfm"):

        def make(embedding, name=name):
            return models.build(name, ds.schema, embedding)

        state = search(make, ds, dim=8, config=config, train=quick)
        result = retrain(state, make, 0.3, config=config, train=quick)
        assert np.isfinite(result.metrics["test"]["auc"]), name


def test_the_readme_python_example_runs(tmp_path):
    from dnis import data, search
    from dnis.app.report import write_search_report

    ds = data.load("synthetic", task="ctr", n_rows=3000, vocab=50)

    def make_model(emb):
        return models.FM(ds.schema, emb)

    quick = TrainConfig(epochs=1, batch_size=512)
    config = DnisConfig(warmup_epochs=0, search_epochs=1, num_blocks=2)
    result = search.dnis(make_model, ds, dim=8, budget=0.2, config=config, train=quick)
    report = write_search_report([result], tmp_path / "run")
    assert report.exists() and (tmp_path / "run" / "dims.json").exists()
    assert result.embedding_params <= 0.2 * result.full_params + 1


def test_explicit_block_edges_from_the_config():
    ds = load_synthetic(task="ctr", n_rows=3000, ranks=(4,), noise_fields=1, vocab=100, seed=2)
    config = DnisConfig(block_mode=[0.1, 0.5], warmup_epochs=0, search_epochs=1)

    def make(embedding):
        return models.build("fm", ds.schema, embedding)

    state = search(make, ds, dim=4, config=config, train=TrainConfig(epochs=1, batch_size=512))
    for field in range(2):
        assert len(state.blocks.blocks_of(field)) <= 3
    with pytest.raises(ConfigError):
        DnisConfig(block_mode="quantiles")


def test_fresh_tables_start_at_the_searched_tables_init_std():
    """`embedding.init_std` reaches every table a DNIS run starts afresh: the uniform fallback's
    and a `retrain: scratch` compact model's (normal at that std, not the library's 0.01)."""
    from dnis.search.dnis import compact_model, uniform_model

    ds = load_synthetic(task="ctr", n_rows=3000, ranks=(4,), noise_fields=1, vocab=100, seed=2)
    config = DnisConfig(warmup_epochs=0, search_epochs=1, schedule="static", retrain="scratch")

    def make(embedding):
        return models.build("fm", ds.schema, embedding)

    train = TrainConfig(epochs=1, batch_size=512)
    state = search(make, ds, dim=8, config=config, train=train, init_std=0.5)
    uniform = uniform_model(state, make, 0.5, train).embedding
    compact, _ = compact_model(state, make, 0.5, config=config, train=train)
    for table in (uniform, compact):
        assert float(table.values.std()) == pytest.approx(0.5, rel=0.1)


# ---------------------------------------------------------------- early stopping of the search


def test_search_patience_stops_after_stale_epochs_and_keeps_the_best(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Validation AUC 0.60, 0.70, 0.65, 0.66, ...: with patience 2 the search stops after epoch 4,
    keeps epoch 2's model, and a resumed search stops there too (nothing more is trained)."""
    from dnis.tasks import make_task

    dnis_module = importlib.import_module("dnis.search.dnis")  # the package exports a `dnis()`

    ds = load_synthetic(task="ctr", n_rows=1500, ranks=(4,), noise_fields=1, vocab=50, seed=3)
    scripted = iter([0.60, 0.70, 0.65, 0.66, 0.90, 0.95, 0.97])
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted_task(dataset):
        task = make_task(dataset)
        real = task.evaluate

        def evaluate(model, split, batch_size=8192):
            out = real(model, split, batch_size)
            if split == "valid":  # a search epoch's (no warm-up), then the searched model's
                snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
                out["auc"] = next(scripted)
            return out

        task.evaluate = evaluate
        return task

    monkeypatch.setattr(dnis_module, "make_task", scripted_task)
    config = DnisConfig(
        num_blocks=2, warmup_epochs=0, search_epochs=7, patience=2, schedule="static"
    )
    train = TrainConfig(batch_size=256, lr=1e-2)

    def make(embedding):
        return models.build("fm", ds.schema, embedding)

    state = search(make, ds, dim=4, config=config, train=train, run_dir=tmp_path)
    assert [r["valid_auc"] for r in state.history] == [0.60, 0.70, 0.65, 0.66]
    for key, value in state.model.state_dict().items():
        if key != "embedding.alpha":  # alpha is frozen after the search, values as of epoch 2
            assert torch.equal(value, snapshots[1][key]), key
    assert torch.equal(state.embedding.alpha.detach(), snapshots[1]["embedding.alpha"])
    again = search(make, ds, dim=4, config=config, train=train, run_dir=tmp_path, resume=True)
    assert len(again.history) == 4
    with pytest.raises(ConfigError, match="patience"):
        DnisConfig(patience=-1)


def test_tied_alphas_are_ranked_by_saliency_not_field_order():
    """alpha clamped at exactly 1 everywhere: the kept blocks follow the weights, and permuting
    the blocks permutes the result (field 0 does not win ties)."""
    blocks = BlockLayout(field=(0, 1, 2), start=(0, 10, 20), size=(10, 10, 10), frequency=(5, 5, 5))
    alpha = torch.ones(3, 4)
    table = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    table[20:] *= 10.0  # block 2 carries the most mass in every dim
    keep = prune_blocks(alpha, blocks, 40, block_saliency(table, blocks))
    assert keep[2].all() and not keep[:2].any()
    permutation = [2, 0, 1]
    moved = torch.cat([table[10 * b : 10 * b + 10] for b in permutation])
    again = prune_blocks(alpha, blocks, 40, block_saliency(moved, blocks))
    assert torch.equal(again, keep[permutation])


def test_saliency_does_not_change_when_scale_moves_between_weights_and_alpha():
    blocks = BlockLayout(field=(0, 1), start=(0, 5), size=(5, 5), frequency=(1, 1))
    weight = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    alpha = torch.rand(2, 3, generator=torch.Generator().manual_seed(2)) + 0.1
    folded = weight * alpha[blocks.row_block()]
    rescaled = (weight * 4.0) * (alpha / 4.0)[blocks.row_block()]
    torch.testing.assert_close(block_saliency(folded, blocks), block_saliency(rescaled, blocks))


@pytest.mark.parametrize(
    ("l1_step", "shrink"), [("proximal", 0.01 * 1e-3), ("auto", 0.01 * 1e-3), ("loss", 0.01)]
)
def test_a_block_absent_from_the_validation_batch_shrinks_only_by_the_proximal_l1(
    ctr_data, l1_step, shrink
):
    """With the L1 term in the loss, the per-block normalisation turns a block's pure L1 gradient
    (it is absent from the batch) into a full-size step; as a proximal step it shrinks by lr * l1."""
    from dnis.embeddings.blocks import dataset_blocks
    from dnis.search.dnis import AlphaSearch
    from dnis.tasks import make_task

    blocks = dataset_blocks(ctr_data, 6, "count")
    soft = SoftSelectionEmbedding(FieldLayout.from_dataset(ctr_data), 4, blocks)
    model = models.build("fm", ctr_data.schema, soft)
    with torch.no_grad():
        soft.alpha.fill_(0.5)
    config = DnisConfig(alpha_lr=0.01, alpha_l1=1e-3, l1_step=l1_step)
    ids, labels = ctr_data.valid.ids[:8], ctr_data.valid.labels[:8]
    rows = ids + soft.layout.slot_offsets()
    used = set(blocks.row_block()[rows.reshape(-1)].tolist())
    absent = [b for b in range(blocks.num_blocks) if b not in used]
    assert absent, "the batch touches every block; pick fewer rows"
    hook = AlphaSearch(model, soft, make_task(ctr_data), config, TrainConfig(), budgets=[0.5])
    hook._alpha_step((ids, labels), torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        soft.alpha[absent], torch.full((len(absent), 4), 0.5 - shrink), rtol=0, atol=1e-7
    )


def test_budgets_come_from_the_config_and_init_std_is_honoured(ctr_data):
    """One source of budgets: without `budget`, dnis() prunes to `config.budgets`; the searched
    table starts at `init_std` (a tiny learning rate keeps it there for this check)."""
    from dnis.search import dnis

    def make(embedding):
        return models.build("fm", ctr_data.schema, embedding)

    config = DnisConfig(num_blocks=2, warmup_epochs=0, search_epochs=1, budgets=[0.2, 0.6])
    train = TrainConfig(epochs=1, batch_size=512, lr=1e-9, patience=0)
    results = dnis(make, ctr_data, dim=4, config=config, train=train, init_std=0.3)
    assert [r.budget for r in results] == [0.2, 0.6]
    state = search(make, ctr_data, dim=4, config=config, train=train, init_std=0.3)
    assert float(state.embedding.weight.std()) == pytest.approx(0.3, rel=0.1)


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_the_random_control_keeps_other_dims_within_the_same_budget(planted, granularity):
    ds, make, state = planted
    full = state.embedding.weight.numel()
    searched = materialize(state, 0.2, DnisConfig(granularity=granularity))
    control = materialize(state, 0.2, DnisConfig(granularity=granularity, structure="random"))
    again = materialize(state, 0.2, DnisConfig(granularity=granularity, structure="random"))
    target = budget_params(0.2, full)
    assert control.num_parameters() <= target
    assert control.num_parameters() >= 0.95 * searched.num_parameters()

    def structure(compact):  # the kept positions: the integer buffers of either layout
        return [v for v in compact.state_dict().values() if not v.is_floating_point()]

    assert all(map(torch.equal, structure(control), structure(again)))  # seeded
    assert not all(map(torch.equal, structure(control), structure(searched)))


def _gradual(ctr_data, tmp_path=None, resume=False, **options):
    from dnis.search import dnis

    def make(embedding):
        return models.build("fm", ctr_data.schema, embedding)

    settings = {"num_blocks": 3, "warmup_epochs": 1, "search_epochs": 3, "budgets": [0.2, 0.5]}
    config = DnisConfig(schedule="gradual", **{**settings, **options})
    train = TrainConfig(epochs=2, batch_size=512, patience=0)
    return dnis(make, ctr_data, dim=4, config=config, train=train, run_dir=tmp_path, resume=resume)


@pytest.mark.parametrize("structure", ["searched", "random"])
def test_a_gradual_search_ends_at_each_budget_so_pruning_changes_nothing(ctr_data, structure):
    """The search knows the budgets: the soft model at each budget's snapshot and the compact
    model materialised from it give the same validation metrics (before retraining)."""
    results = _gradual(ctr_data, structure=structure)
    assert [r.budget for r in results] == [0.2, 0.5]
    pruning = [record for record in results[0].history if record.get("phase") == "prune"]
    kept = [record["kept_params"] for record in pruning]
    assert len(results[0].history) == 3 + 2 and kept == sorted(kept, reverse=True)
    for result in results:
        assert result.embedding_params <= budget_params(result.budget, result.full_params)
        assert result.embedding_params >= 0.9 * budget_params(result.budget, result.full_params)
        for metric, value in result.before["valid"].items():
            assert result.pruned[metric] == pytest.approx(value, abs=1e-5), metric
    assert kept == [results[1].embedding_params, results[0].embedding_params]


def test_a_gradual_search_resumes_with_its_snapshots(ctr_data, tmp_path):
    first = _gradual(ctr_data, tmp_path)
    again = _gradual(ctr_data, tmp_path, resume=True)  # reloads the finished search and retrains
    for a, b in zip(first, again, strict=True):
        assert a.dims == b.dims and a.before == b.before
        assert a.metrics["test"] == pytest.approx(b.metrics["test"], abs=1e-6)


def test_a_gradual_search_refuses_what_its_schedule_cannot_serve(ctr_data):
    with pytest.raises(ConfigError, match="granularity: block"):
        DnisConfig(schedule="gradual", granularity="element")
    with pytest.raises(ConfigError, match="same size twice"):
        _gradual(ctr_data, budgets=[0.5, 0.5])
    from dnis.errors import DnisError
    from dnis.search.dnis import compact_model

    with pytest.raises(DnisError, match="not one of the gradual search's budgets"):
        state = search(
            lambda e: models.build("fm", ctr_data.schema, e), ctr_data, dim=4,
            config=DnisConfig(schedule="gradual", warmup_epochs=0, search_epochs=1),
            train=TrainConfig(epochs=1, batch_size=512),
        )  # fmt: skip
        compact_model(state, None, 0.3, config=DnisConfig(schedule="gradual"), train=TrainConfig())


def test_holdout_alpha_data_keeps_validation_out_of_the_search(ctr_data, monkeypatch):
    """`alpha_data: holdout`: the alpha steps read a seeded tenth of the training rows, the model
    steps of the search the other nine tenths, and no search step reads the validation split."""
    from dnis.data.dataset import hold_out

    dnis_module = importlib.import_module("dnis.search.dnis")  # the package exports its function
    trainer_module = importlib.import_module("dnis.train.trainer")

    rest, held = hold_out(ctr_data, 0.1, seed=3)
    assert len(held) == round(0.1 * len(ctr_data.train))
    assert len(rest.train) + len(held) == len(ctr_data.train)
    assert rest.valid is ctr_data.valid and rest.test is ctr_data.test
    rows = torch.cat([rest.train.ids, held.ids]).tolist()
    assert sorted(map(tuple, rows)) == sorted(map(tuple, ctr_data.train.ids.tolist()))
    assert torch.equal(hold_out(ctr_data, 0.1, seed=3)[1].ids, held.ids)  # seeded

    alpha_rows, trained = [], []
    real_endless, real_batches = dnis_module.endless_batches, trainer_module.batches
    monkeypatch.setattr(
        dnis_module,
        "endless_batches",
        lambda split, *a: alpha_rows.append(len(split)) or real_endless(split, *a),
    )
    monkeypatch.setattr(trainer_module, "batches",
                        lambda split, *a, **k: trained.append(len(split)) or real_batches(split, *a, **k))  # fmt: skip
    results = _gradual(ctr_data, alpha_data="holdout")
    held_rows = round(0.1 * len(ctr_data.train))
    assert alpha_rows and set(alpha_rows) == {held_rows}
    # warm-up, search and pruning epochs train on the rest; the retrains on every training row
    assert set(trained) == {len(ctr_data.train) - held_rows, len(ctr_data.train)}
    assert len(ctr_data.valid) not in alpha_rows
    assert [r.budget for r in results] == [0.2, 0.5]
    with pytest.raises(ConfigError, match="holdout_fraction"):
        DnisConfig(alpha_data="holdout", holdout_fraction=1.0)
