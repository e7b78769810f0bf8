"""`dnis compare`: the grid, its outputs, parameter accounting, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SYNTHETIC_CTR

from dnis.app.compare import compare
from dnis.app.config import load_config
from dnis.app.report.compare_report import summarize
from dnis.errors import ConfigError
from dnis.io import write_json

GRID = {
    "name": "grid",
    "seed": 0,
    "dataset": SYNTHETIC_CTR,
    "model": {"name": "fm"},
    "embedding": {"dim": 8},
    "train": {"epochs": 1, "batch_size": 512, "lr": 0.003},
    "compare": {
        "methods": ["dnis", "uniform"],
        "budgets": [0.25, 0.5],
        "seeds": 2,
        "options": {"dnis": {"num_blocks": 2, "warmup_epochs": 0, "search_epochs": 1}},
    },
}


def write(tmp_path: Path, **changes) -> Path:
    config = {**GRID, "output_dir": str(tmp_path / "runs"), **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_grid_rows_and_parameter_accounting(tmp_path):
    config = load_config(write(tmp_path))
    rows = compare(config)
    assert len(rows) == 2 * 2 * 2  # methods x budgets x seeds
    total_rows = 41 + 41 + 41  # three fields of 40 ids plus the OOV id (vocab 40, all seen)
    by = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    for seed in range(2):
        # uniform at budget b uses width floor(b * 8): exactly rows x width parameters
        assert by[("uniform", 0.25, seed)]["embedding_params"] == total_rows * 2
        assert by[("uniform", 0.5, seed)]["embedding_params"] == total_rows * 4
        assert by[("uniform", 0.5, seed)]["memory_bytes"] == total_rows * 4 * 4
        for budget in (0.25, 0.5):
            assert by[("dnis", budget, seed)]["embedding_params"] <= round(budget * total_rows * 8)
    assert all(r["full_params"] == total_rows * 8 for r in rows)
    first = [r for r in rows if r["seed"] == 0]
    assert all(r["latency_ms"] > 0 and r["peak_memory_mb"] >= 0 for r in first)


def test_pareto_marks_only_non_dominated_cells():
    frame = pd.DataFrame(
        [
            {"method": "a", "budget": 0.1, "seed": 0, "embedding_params": 10, "memory_bytes": 40,
             "test_auc": 0.70, "search_seconds": 0, "retrain_seconds": 1, "latency_ms": 1, "peak_memory_mb": 1},
            {"method": "b", "budget": 0.1, "seed": 0, "embedding_params": 12, "memory_bytes": 48,
             "test_auc": 0.69, "search_seconds": 0, "retrain_seconds": 1, "latency_ms": 1, "peak_memory_mb": 1},
            {"method": "b", "budget": 0.5, "seed": 0, "embedding_params": 50, "memory_bytes": 200,
             "test_auc": 0.75, "search_seconds": 0, "retrain_seconds": 1, "latency_ms": 1, "peak_memory_mb": 1},
        ]
    )  # fmt: skip
    table = summarize(frame, "auc").set_index(["method", "budget"])
    assert table.loc[("a", 0.1), "pareto"]
    assert not table.loc[("b", 0.1), "pareto"]  # more params and worse than a
    assert table.loc[("b", 0.5), "pareto"]
    rmse = summarize(frame.rename(columns={"test_auc": "test_rmse"}), "rmse").set_index(
        ["method", "budget"]
    )
    assert rmse.loc[("b", 0.1), "pareto"]  # lower is better for RMSE: 0.69 beats 0.70


def test_cli_writes_outputs_and_resumes_after_sigkill(tmp_path):
    config_path = write(tmp_path)
    command = [sys.executable, "-m", "dnis", "compare", "--config", str(config_path)]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    cells = tmp_path / "runs"
    deadline = time.monotonic() + 240
    finished: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        finished = sorted(cells.glob("*/cells/*.json"))
        if finished:
            break
        time.sleep(0.2)
    assert finished, "no cell finished before the deadline"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {p.name: p.read_bytes() for p in cells.glob("*/cells/*.json")}
    assert 1 <= len(before) < 4, "the kill should land mid-grid"
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    run_dir = next(cells.iterdir())
    after = {p.name: p.read_bytes() for p in (run_dir / "cells").glob("*.json")}
    assert len(after) == 4
    for name, content in before.items():
        assert after[name] == content, f"{name} was recomputed"
    recomputed = [
        line
        for line in result.stderr.splitlines()
        if " seed " in line and line.strip().endswith(" s")
    ]
    assert len(recomputed) == 4 - len(before)
    for name in ("compare.csv", "compare.md", "pareto.png"):
        assert (run_dir / name).exists()
    frame = pd.read_csv(run_dir / "compare.csv")
    assert len(frame) == 8 and set(frame["method"]) == {"dnis", "uniform"}
    assert "★" in (run_dir / "compare.md").read_text(encoding="utf-8")
    assert json.loads((run_dir / "cells" / "dnis-seed0.json").read_text())[0]["method"] == "dnis"


def test_parallel_cells_give_the_same_rows_as_one_process(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    serial_config = load_config(write(tmp_path / "a"), ["compare.seeds=1"])
    serial = compare(serial_config)
    parallel_config = load_config(write(tmp_path / "b"), ["compare.seeds=1", "compare.jobs=2"])
    parallel = compare(parallel_config)
    assert parallel_config.run_dir().name == serial_config.run_dir().name
    drop = ("latency_ms", "peak_memory_mb", "search_seconds", "retrain_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in parallel] == [
        {k: v for k, v in r.items() if k not in drop} for r in serial
    ]


def test_a_budget_below_a_methods_floor_is_an_infeasible_row_not_a_stopped_grid(tmp_path):
    from dnis.app.report.compare_report import write_compare_report

    # 3 fields of 41 ids at width 8 (984 params): 0.1% buys 1 row of 8, hashing needs one row per
    # field (3 rows) -> infeasible; 50% fits.
    grid = {"methods": ["hashing", "uniform"], "budgets": [0.001, 0.5], "seeds": 1}
    config = load_config(write(tmp_path, compare=grid))
    rows = compare(config)
    infeasible = [r for r in rows if "infeasible" in r]
    # uniform's floor is width 1 = 1/8 of the embedding: 0.001 is below it too
    assert [(r["method"], r["budget"]) for r in infeasible] == [
        ("hashing", 0.001),
        ("uniform", 0.001),
    ]
    assert "one row per field" in infeasible[0]["infeasible"]
    trained = {(r["method"], r["budget"]) for r in rows if "infeasible" not in r}
    assert trained == {("hashing", 0.5), ("uniform", 0.5)}
    report = write_compare_report(rows, config.run_dir(), "auc", "t").read_text(encoding="utf-8")
    assert "hashing at 0.001: hashing needs at least one row per field" in report


@pytest.mark.parametrize(
    "options, says",
    [
        ({"hashing": {"sed": 1}},
         r"compare\.options\.hashing: method 'hashing' has no option 'sed'\. Did you mean 'seed'"),
        ({"random": {"trials": "4"}}, r"compare\.options\.random\.trials: expected int, got str"),
        ({"mde": {"temperatures": [0.1, 2]}}, r"compare\.options\.mde\.temperatures must be"),
        ({"dnis": {"search_epochs": 1.5}}, r"compare\.options\.dnis\.search_epochs: expected int"),
    ],
)  # fmt: skip
def test_bad_method_options_fail_before_any_cell_trains(tmp_path, options, says):
    grid = {"methods": ["uniform", *options], "budgets": [0.5], "seeds": 1, "options": options}
    config = load_config(write(tmp_path, compare=grid))
    with pytest.raises(ConfigError, match=says) as caught:
        compare(config)
    assert caught.value.key.startswith(f"compare.options.{next(iter(options))}.")
    assert not (config.run_dir() / "cells").exists() or not any(
        (config.run_dir() / "cells").iterdir()
    )  # uniform, listed first, did not run either


def test_adding_a_method_or_seed_reuses_the_finished_cells(tmp_path):
    first = load_config(write(tmp_path))
    compare(first)
    more = load_config(write(tmp_path), ["compare.methods=['dnis', 'uniform', 'hashing']"])
    assert more.run_dir() == first.run_dir()
    cell = more.run_dir() / "cells" / "dnis-seed0.json"
    before = cell.stat().st_mtime_ns
    compare(more)
    assert cell.stat().st_mtime_ns == before


def test_a_cell_another_process_finished_meanwhile_is_not_recomputed(tmp_path):
    config = load_config(write(tmp_path), ["compare.methods=['uniform']", "compare.options={}"])
    planted = [{"method": "uniform", "seed": 1, "from": "the other process"}]

    def other_process_finishes_seed_1(name, seed, seconds):
        if seed == 0:  # while this run trains seed 0, another one writes seed 1's cell
            write_json(config.run_dir() / "cells" / "uniform-seed1.json", planted)

    rows = compare(config, on_cell=other_process_finishes_seed_1)
    assert rows[-1] == planted[0]  # read back, not trained again


def test_dnis_standing_names_the_best_other_method_and_the_margin():
    from dnis.app.report.compare_report import dnis_standing

    def cell(method, budget, seed, auc):
        return {"method": method, "budget": budget, "seed": seed, "embedding_params": 10,
                "memory_bytes": 40, "test_auc": auc, "search_seconds": 0, "retrain_seconds": 1,
                "latency_ms": 1, "peak_memory_mb": 1}  # fmt: skip

    frame = pd.DataFrame(
        [cell("dnis", 0.1, s, a) for s, a in enumerate([0.80, 0.82])]  # 0.81 ± 0.0141
        + [cell("uniform", 0.1, s, a) for s, a in enumerate([0.78, 0.78])]
        + [cell("pep", 0.1, s, a) for s, a in enumerate([0.79, 0.79])]
        + [cell("dnis", 0.5, s, a) for s, a in enumerate([0.80, 0.80])]
        + [cell("pep", 0.5, s, a) for s, a in enumerate([0.81, 0.83])]  # 0.82 ± 0.0141
        + [cell("uniform", 0.5, s, a) for s, a in enumerate([0.70, 0.70])]
        + [cell("dnis", 0.25, s, a) for s, a in enumerate([0.80, 0.80])]
        + [cell("pep", 0.25, s, a) for s, a in enumerate([0.79, 0.83])]  # 0.81 ± 0.0283
    )
    low, middle, high = dnis_standing(summarize(frame, "auc"), "auc")
    assert (low["best other"], low["DNIS margin"], low["DNIS rank"]) == ("pep", "+0.0200", "1 of 3")
    assert low["verdict"] == "DNIS best"
    assert (high["best other"], high["DNIS margin"], high["DNIS rank"]) == (
        "pep",
        "-0.0200",
        "2 of 3",
    )
    assert high["verdict"] == "behind pep by more than the stds"  # 0.02 > sqrt(0 + 0.0141^2)
    assert (middle["DNIS margin"], middle["verdict"]) == ("-0.0100", "behind pep, within one std")
    rmse = dnis_standing(summarize(frame.rename(columns={"test_auc": "test_rmse"}), "rmse"), "rmse")
    assert rmse[0]["best other"] == "uniform" and rmse[0]["DNIS margin"] == "-0.0300"
    # a DNIS cell that kept its uniform fallback (`search.fallback`) says so in the verdict
    kept = frame.assign(fallback=[1, 0] + [0] * (len(frame) - 2))
    low, middle, _ = dnis_standing(summarize(kept, "auc"), "auc")
    assert low["verdict"] == "DNIS best (the uniform fallback was kept in 1 of 2 seeds)"
    assert middle["verdict"] == "behind pep, within one std"


def test_pareto_plot_draws_a_cell_with_no_embedding_parameters():
    """OutRank can drop every field (0 parameters); a log axis would silently hide that cell."""
    import matplotlib.pyplot as plt

    from dnis.app.report.compare_report import pareto_figure

    def cell(method, budget, params, auc):
        return {"method": method, "budget": budget, "seed": 0, "embedding_params": params,
                "memory_bytes": 4 * params, "test_auc": auc, "search_seconds": 0,
                "retrain_seconds": 1, "latency_ms": 1, "peak_memory_mb": 1}  # fmt: skip

    frame = pd.DataFrame(
        [cell("outrank", 0.1, 0, 0.76), cell("outrank", 0.5, 0, 0.76)]
        + [cell("dnis", 0.1, 10_000, 0.78), cell("dnis", 0.5, 50_000, 0.79)]
    )
    table = summarize(frame, "auc")
    figure = pareto_figure(table, "auc")
    axis = figure.axes[0]
    drawn = [(x, y) for line in axis.lines for x, y in zip(*line.get_data(), strict=True)]
    assert (0, 0.76) in drawn and (10_000, 0.78) in drawn
    left, right = axis.get_xlim()
    assert left < 0 < 10_000 < 50_000 < right  # 0 is inside the visible axis, not at -inf
    pixels = axis.transData.transform([(0, 0.76), (10_000, 0.78)])
    assert pixels[0][0] < pixels[1][0]
    plt.close(figure)
    alone = pareto_figure(summarize(frame[frame["method"] == "outrank"], "auc"), "auc")
    left, right = alone.axes[0].get_xlim()  # only 0-parameter cells (`--methods outrank`)
    assert left < 0 < right
    plt.close(alone)


def test_the_random_structure_control_runs_the_dnis_pipeline_at_the_same_budget(tmp_path, capsys):
    """`dnis compare --methods dnis dnis-random`: the control shares DNIS's search settings and
    budget, keeps other dims than the search, and shows up as its own method in compare.md."""
    from dnis.cli import main

    grid = {**GRID["compare"], "methods": ["dnis", "dnis-random"], "seeds": 1}
    grid["options"] = {"dnis": grid["options"]["dnis"], "dnis-random": grid["options"]["dnis"]}
    config = write(tmp_path, compare=grid)
    assert main(["compare", "--config", str(config)]) == 0
    report = capsys.readouterr().out
    assert "dnis-random" in report and "| epochs |" in report
    rows = pd.read_csv(load_config(config).run_dir() / "compare.csv")
    # every cell records how long its final model trained (early-stopped, or at the cap)
    assert (rows["train_epochs"] >= 1).all() and set(rows["epoch_cap_hit"]) <= {True, False}
    by = {(r.method, r.budget): r for r in rows.itertuples()}
    full = 3 * 41 * 8
    for budget in (0.25, 0.5):
        searched, control = by[("dnis", budget)], by[("dnis-random", budget)]
        assert control.embedding_params <= round(budget * full)
        # the same budget, filled as closely (blocks of a field may differ in size by one row)
        assert abs(control.embedding_params - searched.embedding_params) <= 0.05 * full
