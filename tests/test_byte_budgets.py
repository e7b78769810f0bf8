"""Budgets in bytes: `compare.budget_unit: bytes`, byte sizes as budgets, and the int8/int4
post-training-quantization baselines competing in bytes (through `dnis compare --config`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SYNTHETIC_CTR

from dnis.cli import main
from dnis.embeddings.quantized import row_bytes
from dnis.search.prune import parse_byte_size

DIM = 16
TOTAL_ROWS = 3 * 41  # three fields of 40 ids plus the OOV id each
FULL_BYTES = 4 * TOTAL_ROWS * DIM

GRID = {
    "name": "bytes",
    "seed": 0,
    "dataset": SYNTHETIC_CTR,
    "model": {"name": "fm"},
    "embedding": {"dim": DIM},
    "train": {"epochs": 2, "batch_size": 512, "lr": 0.003},
    "compare": {
        "methods": ["uniform", "int8", "int4"],
        "budget_unit": "bytes",
        "budgets": [0.125, f"{FULL_BYTES // 16}B"],
        "seeds": 1,
    },
}


def write(tmp_path: Path, **compare) -> Path:
    config = {**GRID, "output_dir": str(tmp_path / "runs")}
    config["compare"] = {**GRID["compare"], **compare}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_dir(tmp_path: Path) -> Path:
    (found,) = (tmp_path / "runs").iterdir()
    return found


def test_quantized_baselines_fill_the_byte_budget_and_the_report_ranks_by_bytes(tmp_path, capsys):
    assert main(["compare", "--config", str(write(tmp_path))]) == 0
    frame = pd.read_csv(run_dir(tmp_path) / "compare.csv")
    assert set(frame["budget_unit"]) == {"bytes"}
    eighth, sixteenth = sorted(frame["budget"].unique(), reverse=True)
    assert eighth == 0.125 and sixteenth == pytest.approx(1 / 16)
    for _, row in frame.iterrows():
        budget = row["budget_bytes"]
        assert budget == pytest.approx(row["budget"] * FULL_BYTES, abs=4)
        assert row["memory_bytes"] <= budget  # every stored byte, scales and biases included
    # the widest width whose quantized row fits: 1/8 of 64 bytes a row is 8 bytes, so int8 keeps
    # width 4 (4 + 4 bytes) and int4 width 8 (4 + 4); at 1/16 (4 bytes a row) neither fits a row
    by = {(r.method, r.budget): r for r in frame.itertuples()}
    assert by[("int8", 0.125)].memory_bytes == TOTAL_ROWS * row_bytes(4, "int8")
    assert by[("int4", 0.125)].memory_bytes == TOTAL_ROWS * row_bytes(8, "int4")
    assert by[("int4", 0.125)].embedding_params == TOTAL_ROWS * 8  # twice uniform's values
    assert by[("uniform", 0.125)].embedding_params == TOTAL_ROWS * 2
    report = (run_dir(tmp_path) / "compare.md").read_text(encoding="utf-8")
    assert "as few bytes stored" in report and "fraction of the full-width fp32" in report
    assert "int8 at 0.0625" in report and "int4 at 0.0625" in report  # infeasible, named


def test_a_quantized_method_in_a_parameter_grid_is_refused_before_any_work(tmp_path, capsys):
    path = write(tmp_path, budget_unit="params", budgets=[0.25])
    assert main(["compare", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert "int8 spends its budgets as stored bytes" in err and "budget_unit: bytes" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("cells/*"))


@pytest.mark.parametrize(
    ("compare", "says"),
    [
        ({"budget_unit": "params", "budgets": ["2MB"], "methods": ["uniform"]},
         "is a byte size; set compare.budget_unit: bytes"),
        ({"budgets": ["2 parsecs"]}, "is not a byte size"),
        ({"budget_unit": "words"}, "compare.budget_unit must be one of"),
        ({"budgets": ["1GB"]}, "more than the full-width fp32 embedding"),
    ],
)  # fmt: skip
def test_bad_byte_budgets_are_clear_errors(tmp_path, capsys, compare, says):
    assert main(["compare", "--config", str(write(tmp_path, **compare))]) != 0
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("2MB", 2_000_000), ("1.5 MiB", 1_572_864), ("300kB", 300_000), ("4096B", 4096),
     ("1GiB", 2**30)],
)  # fmt: skip
def test_byte_sizes_parse_in_decimal_and_binary_units(text, size):
    assert parse_byte_size(text) == size


def test_the_command_line_sets_the_unit_and_byte_sizes_and_cells_record_them(tmp_path):
    path = write(tmp_path, methods=["uniform"], budget_unit="params", budgets=[0.5])
    size = f"{FULL_BYTES // 8}B"
    argv = ["compare", "--config", str(path), "--methods", "int4", "--budget-unit", "bytes"]
    assert main([*argv, "--budgets", "0.25", size]) == 0
    (cell,) = (run_dir(tmp_path) / "cells").glob("*.json")
    rows = json.loads(cell.read_text(encoding="utf-8"))
    assert {r["budget_unit"] for r in rows} == {"bytes"}
    assert [r["budget"] for r in rows] == [0.25, 0.125]
    assert [r["budget_bytes"] for r in rows] == [FULL_BYTES // 4, FULL_BYTES // 8]


def test_a_byte_size_never_grows_past_itself_and_is_whole_bytes():
    from dnis.errors import ConfigError
    from dnis.search.prune import budget_params, bytes_fraction

    fraction = bytes_fraction(1003, 10_000)  # 250 whole fp32 parameters fit in 1003 bytes
    assert 4 * budget_params(fraction, 10_000) == 1000
    with pytest.raises(ConfigError, match="whole number of bytes"):
        parse_byte_size("1.5B")


def test_a_cell_over_its_byte_budget_is_no_competitor_in_the_standing():
    from dnis.app.report.compare_report import dnis_standing, summarize

    rows = []
    for seed in range(2):
        for method, rmse, stored in (("dnis-precision", 0.91, 900), ("int8", 0.92, 1000),
                                     ("magprune", 0.90, 1600)):  # fmt: skip
            rows.append({"method": method, "budget": 0.125, "seed": seed, "embedding_params": 1,
                         "memory_bytes": stored, "test_rmse": rmse + seed * 1e-3,
                         "search_seconds": 0, "retrain_seconds": 0, "latency_ms": None,
                         "peak_memory_mb": None, "budget_unit": "bytes",
                         "budget_bytes": 1000})  # fmt: skip
    (standing,) = dnis_standing(summarize(pd.DataFrame(rows), "rmse"), "rmse", "dnis-precision")
    assert standing["best other"] == "int8" and standing["verdict"] == "dnis-precision best"


def test_quantization_aware_baselines_serve_what_they_trained(tmp_path):
    assert main(["compare", "--config", str(write(tmp_path, methods=["int4-qat", "int8-qat"],
                                                   budgets=[0.125]))]) == 0  # fmt: skip
    for name in ("int4-qat", "int8-qat"):
        (cell,) = (run_dir(tmp_path) / "cells").glob(f"{name}-seed0.json")
        (row,) = json.loads(cell.read_text(encoding="utf-8"))
        # trained with every row served quantized, then stored quantized: the same model
        assert row["metrics"]["valid"]["auc"] == pytest.approx(row["before"]["valid"]["auc"],
                                                               abs=1e-6)  # fmt: skip
        assert row["memory_bytes"] <= row["budget_bytes"]
        assert "test" not in row["before"]  # the test split is read once, by the stored model


def test_search_takes_a_byte_size_and_export_finds_its_model_by_it(tmp_path, capsys):
    """`dnis search --budget 600B` (the user's path) keeps at most 600 bytes of fp32 values, and
    `dnis export RUN --budget 600B` picks that model without the user computing its fraction."""
    path = write(tmp_path)
    assert main(["search", "--config", str(path), "--budget", "600B", "--quiet",
                 "--set", "search.warmup_epochs=1", "--set", "search.search_epochs=1"]) == 0  # fmt: skip
    (result,) = run_dir(tmp_path).glob("result-*.json")
    saved = json.loads(result.read_text(encoding="utf-8"))
    assert saved["budget"] == pytest.approx(150 / (TOTAL_ROWS * DIM))  # 150 whole fp32 values
    assert saved["asked"] == "600B"  # the size as written, beside the fraction it resolved to
    assert "| 600B |" in (run_dir(tmp_path) / "report.md").read_text(encoding="utf-8")
    assert 4 * saved["embedding_params"] <= 600
    assert main(["export", str(run_dir(tmp_path)), "--budget", "600B", "--format",
                 "torchscript", "--output", str(tmp_path / "model.pt")]) == 0  # fmt: skip
    assert (tmp_path / "model.pt").exists()  # the export folder
    bad = ["export", str(run_dir(tmp_path)), "--budget", "600 parsecs", "--format", "torchscript"]
    assert main([*bad, "--output", str(tmp_path / "bad")]) != 0
    assert "is not a byte size" in capsys.readouterr().err
