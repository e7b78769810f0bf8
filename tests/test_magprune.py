"""MagPrune: global magnitude pruning of the trained full-width table, then fine-tuning.

One `dnis search --method magprune` run (DeepFM, CTR, three budgets) serves the end-to-end
tests; a spy keeps the trained full-width table it pruned and the in-process results. The
ranking's tie rule and the fine-tuning's two ways out (no fine-tuning; fine-tuning that never
beats the pruned weights) are checked on their own.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import yaml

import dnis.app.search as app_search
import dnis.search.magprune as magprune
from dnis import models
from dnis.app.config import load_config
from dnis.cli import main
from dnis.data.synthetic import load_synthetic, make_frame
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import RaggedEmbedding, ragged_keep
from dnis.errors import ConfigError
from dnis.export import load
from dnis.search import methods
from dnis.search.plan import EmbeddingPlan
from dnis.search.prune import budget_params
from dnis.train import TrainConfig

BUDGETS = [0.1, 0.25, 0.5]
DIM = 8
FORMATS = ("torchscript", "onnx") if importlib.util.find_spec("onnxruntime") else ("torchscript",)
DATA = {"n_rows": 1500, "ranks": [4, 2], "noise_fields": 1, "vocab": 40, "numeric_fields": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI search: its config, run folder, in-process results and the full-width table."""
    root = tmp_path_factory.mktemp("magprune")
    config = {
        "name": "magprune",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": {"name": "synthetic", "task": "ctr", "options": DATA},
        "model": {"name": "deepfm"},
        "embedding": {"dim": DIM},
        "train": {"epochs": 3, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {"budgets": BUDGETS},
    }
    path = root / "magprune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    kept: dict[str, object] = {}
    real_search, real_train = app_search.search_run, magprune.train_full

    def search_spy(*args, **kwargs):
        kept["dataset"], kept["results"] = real_search(*args, **kwargs)
        return kept["dataset"], kept["results"]

    def train_spy(*args, **kwargs):
        kept["full"] = real_train(*args, **kwargs)
        return kept["full"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_search, "search_run", search_spy)
        patch.setattr(magprune, "train_full", train_spy)
        assert main(["search", "--config", str(path), "--method", "magprune", "--quiet"]) == 0
    kept["run_dir"] = app_search.method_run_dir(load_config(path), "magprune")
    return kept


def kept_mask(result) -> torch.Tensor:
    """bool [rows, dim]: the entries the result's compact table stores."""
    embedding = result.model.embedding
    assert isinstance(embedding, RaggedEmbedding)
    return ragged_keep(
        embedding.indptr.cpu(), embedding.dims.cpu(), embedding.layout.total_rows, embedding.dim
    )


def test_the_kept_count_is_the_budget_parameter_count(run):
    results, full = run["results"], run["full"]
    total = full.table.numel()
    assert [r.budget for r in results] == BUDGETS
    for result in results:
        target = budget_params(result.budget, total)
        assert result.full_params == total
        assert result.embedding_params == target == int(kept_mask(result).sum())
        assert result.model.embedding.values.numel() == target
        plan = EmbeddingPlan.read(run["run_dir"] / f"plan-{result.budget}.json")
        assert plan == result.plan and plan.kind == "ragged" and plan.params == target


def test_the_kept_entries_are_the_largest_magnitudes_of_the_trained_table(run):
    magnitude = run["full"].table.abs()
    flat = magnitude.reshape(-1).numpy()
    for result in run["results"]:
        keep = kept_mask(result)
        assert magnitude[keep].min() >= magnitude[~keep].max()
        # the same set by an independent ranking (numpy's stable sort, ties: lower index)
        count = int(keep.sum())
        expected = np.zeros(flat.size, dtype=bool)
        expected[np.argsort(-flat, kind="stable")[:count]] = True
        assert np.array_equal(keep.reshape(-1).numpy(), expected)
        # global, not per field: the fields keep different shares of their entries
        field_share = [e["nonzeros"] / (e["cardinality"] * DIM) for e in result.dims.values()]
        assert max(field_share) - min(field_share) > 0.05


def test_a_larger_budget_keeps_a_superset(run):
    masks = [kept_mask(r) for r in run["results"]]
    for small, large in zip(masks, masks[1:], strict=False):
        assert bool((small & ~large).sum() == 0) and int(large.sum()) > int(small.sum())


def test_the_fine_tuned_model_is_not_the_pruned_table(run):
    """Fine-tuning moved the kept values (the mask stayed: the kept set is the pruned one)."""
    table = run["full"].table
    for result in run["results"]:
        embedding = result.model.embedding
        moved = embedding.values.detach().cpu() - table[kept_mask(result)]
        assert result.train_epochs == 3 and result.dims["signal0"]["finetune_best_epoch"] >= 1
        assert float(moved.abs().max()) > 1e-4
        assert result.before["valid"] and result.pruned and result.metrics["test"]


def test_the_exported_model_scores_as_the_in_process_model(run, tmp_path):
    frame, _ = make_frame(300, (4, 2), 1, 40, 1, 1.1, "ctr", seed=7)  # fresh raw rows
    frame.loc[0, "signal0"] = "never-seen"
    for result in run["results"]:
        model = result.model.cpu().eval()
        for fmt in FORMATS:
            export = tmp_path / f"export-{fmt}-{result.budget}"
            assert main(["export", str(run["run_dir"]), "--format", fmt, "--budget",
                         str(result.budget), "--output", str(export)]) == 0  # fmt: skip
            predictor = load(export, trust=True)
            ids = torch.from_numpy(predictor.encode(frame))
            with torch.no_grad():
                expected = model(ids).numpy()
            assert np.max(np.abs(predictor.raw(frame) - expected)) <= 1e-5, (fmt, result.budget)


# ------------------------------------------------------------------------- the rule, by hand


def test_ties_keep_the_lower_index_and_padding_is_never_kept():
    # field b is a sequence: its row 3 (id 0) is padding, never read, never kept
    layout = FieldLayout(("a", "b"), (3, 2), (0, 1), (False, True), (False, True))
    table = torch.tensor([[0.5, -0.1], [-0.5, 0.2], [0.2, 0.5], [9.0, 9.0], [-0.2, 0.0]])
    order = magprune.magnitude_order(table, layout).tolist()
    assert order == [0, 2, 5, 3, 4, 8, 1, 9]  # |0.5| x3, |0.2| x3, 0.1, 0.0; rows 3 skipped
    keep = magprune.keep_first(magprune.magnitude_order(table, layout), table.shape, 4)
    assert keep.tolist() == [[True, False], [True, True], [False, True], [False, False],
                             [False, False]]  # fmt: skip
    everything = magprune.keep_first(torch.tensor(order), table.shape, 100)
    assert int(everything.sum()) == 8 and not everything[3].any()


@pytest.fixture(scope="module")
def small_ctr():
    return load_synthetic(task="ctr", n_rows=1500, vocab=40, seed=0)


def fm_factory(dataset):
    return lambda e: models.build("fm", dataset.schema, e)


def spy_full(monkeypatch) -> dict:
    kept: dict = {}
    real = magprune.train_full

    def spy(*args, **kwargs):
        kept["full"] = real(*args, **kwargs)
        return kept["full"]

    monkeypatch.setattr(magprune, "train_full", spy)
    return kept


def test_without_fine_tuning_the_kept_values_are_the_trained_ones(small_ctr, monkeypatch):
    kept = spy_full(monkeypatch)
    train = TrainConfig(epochs=2, batch_size=256, lr=0.01, patience=0)
    (result,) = methods.method("magprune")(
        fm_factory(small_ctr), small_ctr, budgets=[0.3], dim=4, train=train,
        options={"finetune_epochs": 0},
    )  # fmt: skip
    table = kept["full"].table
    assert torch.equal(result.model.embedding.values.detach().cpu(), table[kept_mask(result)])
    assert result.train_epochs == 0 and result.metrics["valid"] == result.pruned


def test_fine_tuning_that_never_beats_the_pruned_weights_is_dropped(small_ctr, monkeypatch):
    """Early stopping counts the pruned weights as epoch 0: a fine-tune that only makes the
    validation metric worse (here: a learning rate far too large) leaves them as they were."""
    kept = spy_full(monkeypatch)
    train = TrainConfig(epochs=2, batch_size=256, lr=0.01, patience=0)
    (result,) = methods.method("magprune")(
        fm_factory(small_ctr), small_ctr, budgets=[0.3], dim=4, train=train,
        options={"finetune_lr": 5.0, "finetune_epochs": 1},
    )  # fmt: skip
    assert result.train_epochs == 1 and result.dims["signal0"]["finetune_best_epoch"] == 0
    assert result.metrics["valid"] == result.pruned
    assert torch.equal(
        result.model.embedding.values.detach().cpu(), kept["full"].table[kept_mask(result)]
    )


def test_bad_options_are_refused(small_ctr):
    for bad in ({"finetune_epochs": -1}, {"finetune_lr": 0.0}, {"init_std": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            methods.method("magprune")(
                fm_factory(small_ctr), small_ctr, budgets=[0.5], dim=4,
                train=TrainConfig(epochs=1), options=bad,
            )  # fmt: skip
    with pytest.raises(ConfigError, match="has no option"):
        methods.method("magprune")(
            fm_factory(small_ctr), small_ctr, budgets=[0.5], dim=4,
            train=TrainConfig(epochs=1), options={"finetune_epoch": 1},
        )  # fmt: skip
