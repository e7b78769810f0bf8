"""Nested embeddings (`dnis-nested`, `matryoshka`): the prefix map, exact truncation, the nested
training's masks, and a run folder that serves a budget it never searched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dnis.app.search as app_search
from dnis import models
from dnis.app.config import load_config
from dnis.embeddings.blocks import BlockLayout, frequency_blocks
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.soft_selection import SoftSelectionEmbedding
from dnis.errors import BudgetError
from dnis.export import load_run
from dnis.search import nested
from dnis.search.methods import method
from dnis.search.nested import (
    NestedResult,
    OrderedDropout,
    searched_order,
    truncate,
    uniform_order,
)
from dnis.search.plan import plan_of
from dnis.tasks.base import predict
from dnis.train import TrainConfig

TRAIN = TrainConfig(epochs=2, batch_size=256, lr=0.01, patience=0)
DIM = 8
SEARCH = {"num_blocks": 3, "warmup_epochs": 1, "search_epochs": 1}


def soft_table() -> SoftSelectionEmbedding:
    """A searched-looking table: alpha with ties at 0 and 1 and values between."""
    layout = FieldLayout(("a", "b"), (40, 25), (0, 1), (False, False), (False, False))
    freqs = [np.r_[0, np.arange(39, 0, -1)], np.r_[0, np.arange(24, 0, -1)]]
    torch.manual_seed(0)
    table = SoftSelectionEmbedding(layout, DIM, frequency_blocks(layout, freqs, num_blocks=3))
    with torch.no_grad():
        table.alpha.copy_(torch.rand(table.alpha.shape).round(decimals=1))
    return table


def test_the_prefix_map_is_monotone_fits_the_budget_and_keeps_block_prefixes():
    table = soft_table()
    order = searched_order(table, "alpha")
    sizes = torch.tensor(order.blocks.size).unsqueeze(1)
    previous = torch.zeros_like(order.rank, dtype=torch.bool)
    full = table.weight.numel()
    for target in [*range(0, full, 7), full]:
        keep = order.keep(target)
        spent = int((keep * sizes).sum())
        assert spent <= target and spent > target - max(order.blocks.size)
        assert bool((keep | ~previous).all()), "a larger budget dropped a kept entry"
        kept_rank = torch.where(keep, order.rank, -1).amax(1)
        dropped_rank = torch.where(keep, order.rank.numel(), order.rank).amin(1)
        assert bool((kept_rank < dropped_rank).all()), "a block kept more than a prefix"
        previous = keep
    assert bool(previous.all())


def test_the_order_follows_alpha_then_saliency():
    table = soft_table()
    order = searched_order(table, "alpha")
    alpha = table.alpha.detach().reshape(-1)
    by_rank = alpha[torch.argsort(order.rank.reshape(-1))]
    assert bool((by_rank[:-1] >= by_rank[1:]).all())


def test_the_uniform_order_cuts_every_field_at_the_same_width():
    blocks = BlockLayout((0, 1), (0, 40), (40, 25), (0, 0))
    order = uniform_order(blocks, DIM)
    for target in (65, 100, 130, 300, 520):
        widths = order.keep(target).sum(1)
        assert widths.tolist() == [target // 65] * 2


@pytest.fixture(scope="module")
def searched(rating_data) -> list[NestedResult]:
    def make(embedding):
        return models.build("mf", rating_data.schema, embedding)

    run = method("dnis-nested")
    return run(make, rating_data, budgets=[0.2, 0.5], dim=DIM, train=TRAIN, options=SEARCH)


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.33, 1.0])
def test_truncation_equals_the_masked_full_model(searched, rating_data, budget):
    result = searched[0]
    full = result.nested
    compact = truncate(result, budget)
    embedding = full.model.embedding
    target = round(budget * embedding.weight.numel())
    ids = rating_data.test.ids
    try:
        with torch.no_grad():
            embedding.alpha.copy_(full.order.keep(target))
        expected = predict(full.model, ids)
    finally:
        with torch.no_grad():
            embedding.alpha.fill_(1.0)
    assert torch.allclose(predict(compact, ids), expected, atol=1e-5)
    assert plan_of(compact.embedding).params == compact.embedding.num_parameters() <= target


def test_every_searched_budget_is_the_one_model_truncated(searched):
    for result in searched:
        assert result.nested is searched[0].nested
        assert result.embedding_params <= round(result.budget * result.full_params)
        assert result.plan.params == result.embedding_params
        assert result.plan.kind == "block-mixed"
    small, large = (r.model.embedding.keep for r in searched)
    assert bool((large | ~small).all())


def test_a_budget_below_the_smallest_prefix_is_refused(searched):
    with pytest.raises(BudgetError, match="smallest prefix"):
        truncate(searched[0], 1e-6)  # one parameter


def test_matryoshka_trains_many_budgets_and_cuts_uniform_prefixes(rating_data, monkeypatch):
    seen: list[int] = []
    real = OrderedDropout.mask

    def spy(self, target):
        seen.append(target)
        real(self, target)

    monkeypatch.setattr(OrderedDropout, "mask", spy)

    def make(embedding):
        return models.build("mf", rating_data.schema, embedding)

    results = method("matryoshka")(
        make, rating_data, budgets=[0.25, 0.5], dim=DIM, train=TRAIN, options={}
    )
    full = results[0].full_params
    assert full in seen and round(0.25 * full) in seen  # the anchors
    assert len(set(seen)) >= 5  # and drawn budgets
    rows = sum(rating_data.cardinalities)
    for result in results:
        widths = {b.width for f in result.plan.fields for b in f.blocks}
        assert widths == {int(result.budget * DIM)}
        assert result.embedding_params == rows * int(result.budget * DIM)


def write_config(folder, name: str, **sections) -> Path:
    """A run config on small synthetic rating data (MF, one epoch) with `sections` added."""
    config = {
        "name": name,
        "seed": 0,
        "output_dir": str(folder / "runs"),
        "dataset": {"name": "synthetic", "task": "rating", "options": {"n_rows": 1500}},
        "model": {"name": "mf"},
        "embedding": {"dim": DIM},
        "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "patience": 0},
        **sections,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_nested_run_folder_serves_a_budget_it_never_searched(tmp_path):
    path = write_config(
        tmp_path, "nested", search={"budgets": [0.5]},
        compare={"methods": ["matryoshka"], "options": {"matryoshka": {}}},
    )  # fmt: skip
    loaded = load_config(path)
    dataset, (result,) = app_search.search_run(loaded, method="matryoshka")
    run_dir = app_search.method_run_dir(loaded, "matryoshka")
    assert (run_dir / nested.ORDER_FILE).is_file() and (run_dir / nested.NESTED_WEIGHTS).is_file()
    for budget in (0.5, 0.25):
        run = load_run(run_dir, budget)
        expected = truncate(result, budget)
        ids = dataset.test.ids
        assert torch.allclose(predict(run.model, ids), predict(expected, ids), atol=1e-5)
        assert run.budget == budget


def test_compare_draws_the_budget_curve_of_the_one_nested_training(tmp_path):
    """`dnis compare` with a nested method: budget_curve.png and a curve table in compare.md; each
    curve point is the nested model cut to that budget, fitting it, and larger budgets keep more."""
    from dnis.app.report.budget_curve import curve_frame
    from dnis.cli import main

    grid = {"methods": ["matryoshka", "uniform"], "budgets": [0.25, 0.5], "seeds": 2}
    path = write_config(tmp_path, "curve", compare=grid)
    assert main(["compare", "--config", str(path)]) == 0
    run_dir = load_config(path).run_dir()
    assert (run_dir / "budget_curve.png").stat().st_size > 0
    report = (run_dir / "compare.md").read_text(encoding="utf-8")
    assert "## Budget curve (budget_curve.png)" in report and "Monotone" in report
    cells = sorted((run_dir / "cells").glob("matryoshka*"))
    rows = [row for cell in cells for row in json.loads(cell.read_text(encoding="utf-8"))]
    frame = curve_frame(rows, "rmse")
    assert set(frame["seed"]) == {0, 1} and frame["method"].eq("matryoshka").all()
    full = rows[0]["full_params"]
    for _, seed in frame.groupby("seed"):
        seed = seed.sort_values("budget")
        # 20 log-spaced budgets from 1%; those below one dim per field (1/DIM) are left out
        assert len(seed) == (np.logspace(-2, 0, 20) >= 1 / DIM).sum()
        assert seed["budget"].iloc[-1] == 1.0
        assert (seed["params"] <= seed["budget"] * full + 1e-6).all()
        assert seed["params"].is_monotonic_increasing
    # the curve's point at a searched budget is that budget's result (the same cut, evaluated)
    result = next(r for r in rows if r["seed"] == 0 and r["budget"] == 0.5)
    cut = next(p for p in result["curve"] if p["params"] == result["embedding_params"])
    assert cut["test"]["rmse"] == pytest.approx(result["metrics"]["test"]["rmse"], abs=1e-6)


def test_a_drop_larger_than_one_std_is_reported():
    import pandas as pd

    from dnis.app.report.budget_curve import drops

    curves = pd.DataFrame({
        "method": ["m"] * 4, "budget": [0.02, 0.1, 0.3, 1.0], "params": [2, 10, 30, 100],
        "mean": [0.99, 0.95, 0.97, 0.94], "std": [0.001, 0.005, 0.005, 0.005], "seeds": [3] * 4,
    })  # fmt: skip
    found = drops(curves, "rmse")  # 0.95 -> 0.97 at 10% -> 30% is worse by 0.02 > 0.005
    assert [(d["from budget"], d["to budget"]) for d in found] == [("0.1", "0.3")]
    assert drops(curves, "auc") == [  # for AUC, higher is better: 0.97 -> 0.94 drops
        {"method": "m", "from budget": "0.3", "to budget": "1", "drop": "0.0300", "std": "0.0050"}
    ]


def test_a_floor_puts_every_blocks_first_dims_ahead_and_stays_nested():
    order = searched_order(soft_table(), "alpha")
    floored = nested.with_floor(order, 2)
    sizes = torch.tensor(order.blocks.size).unsqueeze(1)
    rows = int(sizes.sum())
    # two dims of every block, in each block's own searched order, are exactly the first budget
    keep = floored.keep(2 * rows)
    place = torch.argsort(torch.argsort(order.rank, dim=1), dim=1)
    assert torch.equal(keep, place < 2)
    previous = torch.zeros_like(keep)
    for target in range(0, rows * DIM + 1, 5):
        keep = floored.keep(target)
        assert bool((keep | ~previous).all()), "a larger budget dropped a kept entry"
        previous = keep
    # above the floor the searched order is kept
    rest = floored.rank[place >= 2]
    assert torch.equal(torch.argsort(rest), torch.argsort(order.rank[place >= 2]))
    assert nested.with_floor(order, 0) is order


def test_prefix_placement_keeps_the_searched_widths_at_the_first_dims():
    order = searched_order(soft_table(), "alpha")
    prefixed, permutation = nested.as_prefixes(order)
    full = int(torch.tensor(order.blocks.size).sum()) * DIM
    for target in range(0, full + 1, 11):
        searched, placed = order.keep(target), prefixed.keep(target)
        widths = placed.sum(1)
        assert torch.equal(searched.sum(1), widths)  # the search's width for every block
        assert torch.equal(placed, torch.arange(DIM) < widths.unsqueeze(1))  # at dims 0..w-1
    # dim k of a block is the one the search ranked k-th in it
    assert torch.equal(order.rank.gather(1, permutation), prefixed.rank)
