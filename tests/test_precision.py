"""dnis-precision: widths and storage precisions allocated under a byte budget, trained
quantization-aware, stored quantized (through `dnis compare --config`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SYNTHETIC_CTR

from dnis.cli import main
from dnis.embeddings.blocks import BlockLayout
from dnis.embeddings.layout import FieldLayout
from dnis.embeddings.mixed import BlockMixedEmbedding
from dnis.embeddings.quantized import PRECISIONS, row_bytes
from dnis.embeddings.quantized_blocks import QuantizedBlockEmbedding
from dnis.search.precision import FakeQuantBlockMixed, allocate_bytes, cheapest

PRECISION_MIX = ["int4", "int8", "fp16", "fp32", "int4", "int8"]


def mixed_table(seed: int = 0) -> BlockMixedEmbedding:
    """Two fields of 30 and 24 ids, three blocks each, random kept dims of width 8."""
    layout = FieldLayout(("a", "b"), (30, 24), (0, 1), (False, False), (False, False))
    blocks = BlockLayout((0, 0, 0, 1, 1, 1), (0, 10, 20, 30, 38, 46), (10, 10, 10, 8, 8, 8),
                         (0,) * 6)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(6, 8, generator=generator) < 0.6
    keep[2] = False  # a block that keeps nothing
    table = BlockMixedEmbedding(layout, 8, blocks, keep)
    table.load_dense(torch.randn(54, 8, generator=generator))
    return table


def test_quantization_aware_lookup_serves_what_the_materialised_table_stores():
    compact = mixed_table()
    fake = FakeQuantBlockMixed(compact, PRECISION_MIX)
    stored = QuantizedBlockEmbedding.from_dense(
        compact.layout, 8, compact.blocks, compact.keep, PRECISION_MIX, fake.dense()
    )
    rows = torch.arange(54)
    served = fake.lookup(rows)
    assert torch.allclose(served, stored.lookup(rows), atol=1e-6, rtol=0)
    assert not torch.allclose(served, compact.lookup(rows))  # it does quantize
    assert (served[20:30] == 0).all()  # the empty block serves zeros


def test_quantization_aware_lookup_passes_the_gradient_straight_through():
    fake = FakeQuantBlockMixed(mixed_table(), PRECISION_MIX)
    rows = torch.tensor([0, 5, 12, 31, 47, 47])
    weights = torch.randn(6, 8)
    (fake.lookup(rows) * weights).sum().backward()
    reference = mixed_table()
    (reference.lookup(rows) * weights).sum().backward()
    assert torch.equal(fake.values.grad, reference.values.grad)


def test_byte_allocation_keeps_the_best_scored_dims_that_fit_exactly():
    blocks = BlockLayout((0, 0, 1), (0, 10, 20), (10, 10, 30), (0, 0, 0))
    score = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.7, 0.6, 0.5, 0.4], [0.95, 0.3, 0.2, 0.2]])
    precisions = ["fp32", "int8", "int4"]
    budget = 10 * 4 * 2 + 10 * (2 + 4) + 30 * (1 + 4)  # 2 fp32 dims, 2 int8 dims, 2 int4 dims
    keep, spent = allocate_bytes(score, torch.zeros_like(score), blocks, precisions, budget)
    widths = keep.sum(1).tolist()
    expected = sum(
        n * row_bytes(w, p) for n, w, p in zip((10, 10, 30), widths, precisions, strict=True)
    )
    assert spent == expected <= budget
    assert keep[0, :2].all() and not keep[0, 2:].any()  # the two best of block 0
    assert keep[2, 0]  # the best entry of all: block 2's first dim, paying its scales first
    # int4's second dim costs no byte of its own (two codes share a byte), so it comes free
    assert widths[2] >= 2


def test_each_block_takes_the_cheapest_precision_within_the_tolerance():
    sensitivity = [{"fp16": 0.0, "int8": 0.0005, "int4": 0.02}, {"fp16": 0.004, "int8": 0.01,
                   "int4": 0.05}, {"fp16": -0.001, "int8": -0.002, "int4": 0.0}]  # fmt: skip
    assert cheapest(sensitivity, list(PRECISIONS), 0.001) == ["int8", "fp32", "int4"]
    assert cheapest(sensitivity, ["fp32", "fp16", "int8"], 0.001) == ["int8", "fp32", "int8"]
    assert cheapest(sensitivity, list(PRECISIONS), 1.0) == ["int4"] * 3


GRID = {
    "name": "precision",
    "seed": 0,
    "dataset": SYNTHETIC_CTR,
    "model": {"name": "fm"},
    "embedding": {"dim": 16},
    "train": {"epochs": 2, "batch_size": 512, "lr": 0.003},
    "search": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1},
    "compare": {
        "methods": ["dnis-precision"],
        "budget_unit": "bytes",
        "budgets": [0.25, 0.0625],
        "seeds": 1,
    },
}


def test_dnis_precision_through_compare_fits_the_bytes_and_serves_what_it_trained(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "output_dir": str(tmp_path / "runs")}), "utf-8")
    assert main(["compare", "--config", str(path)]) == 0
    (cell,) = (tmp_path / "runs").glob("*/cells/dnis-precision-seed0.json")
    rows = json.loads(cell.read_text(encoding="utf-8"))
    assert [r["budget"] for r in rows] == [0.25, 0.0625]
    for row in rows:
        assert row["unit"] == "bytes" and row["memory_bytes"] <= row["budget_bytes"]
        choice = row["choice"]
        assert choice["chosen"] in [c["label"] for c in choice["candidates"]]
        assert all(c["bytes"] <= row["budget_bytes"] for c in choice["candidates"])
        # the stored (materialised) model validates as the quantization-aware one trained
        assert row["metrics"]["valid"]["auc"] == pytest.approx(choice["trained_valid"], abs=1e-6)
        # the two best candidates as served were fine-tuned; the better one trained was kept
        before = sorted(choice["candidates"], key=lambda c: -c["valid_auc"])
        finalists = choice["finalists"]
        assert set(finalists) == {c["label"] for c in before[:2]}
        assert finalists[choice["chosen"]] == max(finalists.values()) == choice["trained_valid"]
        precisions = {p for name in ("signal0", "signal1", "noise0")
                      for p in row["dims"][name]["block_precisions"]}  # fmt: skip
        assert precisions <= set(PRECISIONS)
    small = rows[1]  # 1/16 of the bytes: 4 bytes a row, less than one fp32 dim of every row
    assert small["embedding_params"] > small["budget_bytes"] / 4 * 0.5


def test_a_dnis_precision_option_outside_the_precisions_is_refused(tmp_path, capsys):
    grid = {**GRID, "output_dir": str(tmp_path / "runs")}
    grid["compare"] = {**GRID["compare"], "options": {"dnis-precision": {"precisions": ["int2"]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), "utf-8")
    assert main(["compare", "--config", str(path)]) != 0
    assert "precisions must be a non-empty list of" in capsys.readouterr().err


def test_plan_records_every_blocks_precision(tmp_path):
    from dnis.search.plan import EmbeddingPlan, plan_of

    compact = mixed_table()
    stored = QuantizedBlockEmbedding.from_dense(
        compact.layout, 8, compact.blocks, compact.keep, PRECISION_MIX,
        FakeQuantBlockMixed(compact, PRECISION_MIX).dense(),
    )  # fmt: skip
    plan = plan_of(stored)
    plan.write(Path(tmp_path) / "plan.json")
    again = EmbeddingPlan.read(Path(tmp_path) / "plan.json")
    assert again.kind == "quantized-blocks" and list(again.options["precisions"]) == PRECISION_MIX


def test_without_fp32_the_fallback_is_the_allowed_precision_of_most_bits():
    lost = [{"int8": 0.01, "int4": 0.05}]
    assert cheapest(lost, ["int8", "int4"], 0.001) == ["int8"]


def test_a_narrow_block_moves_to_a_precision_that_is_no_larger_and_more_exact():
    from dnis.search.precision import undominated

    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[0, :2] = True  # int8 at width 2: 6 bytes a row, fp16 4
    keep[1, :6] = True  # int8 at width 6: 10 bytes a row, fp16 12: stays
    keep[2, :2] = True  # int4 at width 2: 5 bytes a row, fp16 4, int8 6
    chosen = undominated(keep, ["int8", "int8", "int4"], list(PRECISIONS))
    assert chosen == ["fp16", "int8", "fp16"]
    assert undominated(keep, ["int8", "int8", "int4"], ["int8", "int4"]) == ["int8", "int8", "int4"]


def test_search_settings_dnis_precision_sets_itself_are_taken_from_it_not_the_user(
    tmp_path, capsys
):
    grid = {**GRID, "output_dir": str(tmp_path / "runs")}
    grid["search"] = {**GRID["search"], "schedule": "gradual", "placement": "prefix"}  # for dnis
    grid["compare"] = {**GRID["compare"], "budgets": [0.25]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), "utf-8")
    assert main(["compare", "--config", str(path)]) == 0  # the search: section does not stop it
    grid["compare"]["options"] = {"dnis-precision": {"schedule": "gradual"}}
    path.write_text(yaml.safe_dump(grid), "utf-8")
    assert main(["compare", "--config", str(path)]) != 0  # asked of it directly: refused
    assert "compare.options.dnis-precision" in capsys.readouterr().err
