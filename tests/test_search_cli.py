"""`dnis search` and `dnis demo` end to end on a small synthetic config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "name": "tiny",
    "seed": 0,
    "dataset": {
        "name": "synthetic",
        "task": "ctr",
        "options": {"n_rows": 4000, "ranks": [4, 2], "noise_fields": 1, "vocab": 60},
    },
    "model": {"name": "fm"},
    "embedding": {"dim": 8},
    "train": {"epochs": 2, "batch_size": 512, "lr": 0.003},
    "search": {"num_blocks": 3, "warmup_epochs": 1, "search_epochs": 1, "budgets": [0.5]},
}


def dnis(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnis", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def write_config(tmp_path: Path) -> Path:
    config = dict(TINY, output_dir=str(tmp_path / "runs"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_search_writes_reports_and_compact_models_per_budget(tmp_path):
    config = write_config(tmp_path)
    result = dnis(
        "search", "--config", str(config), "--budgets", "0.1", "0.4", "--quiet", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    for name in (
        "config.yaml",
        "encoder.json",
        "search.json",
        "dims.json",
        "results.json",
        "report.md",
        "dims.png",
        "metric.png",
        "model-0.1.pt",
        "model-0.4.pt",
    ):
        assert (run_dir / name).exists(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["budget"] for r in results] == [0.1, 0.4]
    for r in results:
        assert r["embedding_params"] <= round(r["budget"] * r["full_params"])
        assert 0.5 <= r["metrics"]["test"]["auc"] <= 1.0
    dims = json.loads((run_dir / "dims.json").read_text())
    assert set(dims["0.1"]) == {"signal0", "signal1", "noise0"}
    assert (run_dir / "model-0.1.pt").stat().st_size < (run_dir / "model-0.4.pt").stat().st_size
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["search"]["budgets"] == [0.1, 0.4]  # the resolved config records what ran
    assert "| dnis |" in result.stdout


def test_search_refuses_an_impossible_budget(tmp_path):
    config = write_config(tmp_path)
    result = dnis("search", "--config", str(config), "--budget", "0", "--quiet", cwd=tmp_path)
    assert result.returncode == 2
    assert "'0' is not a budget" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_prints_dnis_beside_the_uniform_grid_and_the_planted_truth(tmp_path):
    config = write_config(tmp_path)
    result = dnis("demo", str(config), "--grid", "2", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DNIS" in result.stdout and "d=2" in result.stdout and "d=8" in result.stdout
    assert "planted truth" in result.stdout and "true rank" in result.stdout


def test_search_run_budgets_argument_drives_the_gradual_search(tmp_path):
    """`search_run(config, budgets=...)` prunes the gradual search to those budgets, not to the
    config's (else the retrain of a budget the schedule never reached is refused)."""
    from dnis.app.config import load_config
    from dnis.app.search import search_run

    config = load_config(write_config(tmp_path))
    assert 0.4 not in config.search.budgets
    _, results = search_run(config, budgets=[0.4])
    assert [r.budget for r in results] == [0.4]
    assert results[0].pruned == results[0].before["valid"]  # the snapshot at 0.4 itself


def test_min_width_and_prefix_placement_through_the_config(tmp_path):
    """`search.min_width` and `search.placement: prefix` in a config run by `dnis search`: the
    defaults leave blocks without dims at dims the search chose; with a floor of half the
    uniform width (1 of 2 dims at 25% of d=8) every block keeps a dim, at its first dims."""
    import torch

    from dnis.app.config import load_config
    from dnis.cli import main
    from dnis.export import load_run

    def compact(name: str, **search):
        config = dict(TINY, name=name, output_dir=str(tmp_path / "runs"))
        config["search"] = {**TINY["search"], "budgets": [0.25], **search}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        assert main(["search", "--config", str(path), "--quiet"]) == 0
        return load_run(load_config(path).run_dir(), 0.25).model.embedding

    def is_prefix(keep: torch.Tensor) -> bool:
        return bool((keep == (torch.arange(keep.shape[1]) < keep.sum(1, keepdim=True))).all())

    default = compact("default").keep
    assert (default.sum(1) == 0).any() and not is_prefix(default)
    floored = compact("floored", min_width=0.5, placement="prefix")
    assert (floored.keep.sum(1) >= 1).all() and is_prefix(floored.keep)
    assert floored.num_parameters() <= round(0.25 * floored.layout.total_rows * 8)  # the budget


def test_holdout_alpha_data_through_the_config(tmp_path, monkeypatch):
    """`search.alpha_data: holdout` in a config run by `dnis search`: the alpha steps read the
    held-out fifth of the training rows, the search's model steps the rest, the retrain them all."""
    import importlib

    from dnis.cli import main

    dnis_module = importlib.import_module("dnis.search.dnis")
    trainer_module = importlib.import_module("dnis.train.trainer")
    alpha_rows, trained = set(), set()
    real_endless, real_batches = dnis_module.endless_batches, trainer_module.batches

    def endless(split, *args):
        alpha_rows.add(len(split))
        return real_endless(split, *args)

    def batches(split, *args, **kwargs):
        trained.add(len(split))
        return real_batches(split, *args, **kwargs)

    monkeypatch.setattr(dnis_module, "endless_batches", endless)
    monkeypatch.setattr(trainer_module, "batches", batches)
    config = dict(TINY, output_dir=str(tmp_path / "runs"))
    config["search"] = {**TINY["search"], "alpha_data": "holdout", "holdout_fraction": 0.2}
    path = tmp_path / "holdout.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["search", "--config", str(path), "--quiet"]) == 0
    (held,) = alpha_rows
    rest, full = sorted(trained)
    assert held == round(0.2 * full) and rest + held == full


def test_alpha_every_through_the_config(tmp_path, monkeypatch):
    """`search.alpha_every: 3` in a config run by `dnis search`: one alpha step after every third
    model step of the bilevel epoch (the first, the fourth, ...), and alpha still moves."""
    import math

    from dnis.cli import main
    from dnis.search.dnis import AlphaSearch

    calls = []
    real_step = AlphaSearch._alpha_step

    def counted(self, batch, generator):
        calls.append(self.steps)
        return real_step(self, batch, generator)

    monkeypatch.setattr(AlphaSearch, "_alpha_step", counted)
    config = dict(TINY, output_dir=str(tmp_path / "runs"))
    config["search"] = {**TINY["search"], "alpha_every": 3, "schedule": "static"}
    path = tmp_path / "every.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["search", "--config", str(path), "--quiet"]) == 0
    train_rows = 0.8 * 4000  # the synthetic split: 80% train
    steps = math.ceil(train_rows / 512)
    assert calls == list(range(0, steps, 3))
    (run,) = (tmp_path / "runs").iterdir()
    alpha = json.loads((run / "search.json").read_text(encoding="utf-8"))["alpha"]
    assert any(a != 1.0 for row in alpha for a in row)  # the alpha steps it took moved alpha


def test_uniform_fallback_through_the_config(tmp_path, monkeypatch):
    """`search.fallback: uniform` in a config run by `dnis search`: each budget also trains the
    uniform width that fits it and keeps the better on validation, saves that one (the run
    folder's model, reloaded by `--resume` and by `load_run`), reports both metrics, and reads
    the test split once, for the kept model. A search that L1 collapses (alpha_l1 0.05) is
    caught by the fallback; the defaults' is not."""
    import torch

    from dnis.app.config import load_config
    from dnis.cli import main
    from dnis.export import load_run
    from dnis.tasks.pointwise import CTRTask

    tested = []
    evaluate = CTRTask.evaluate

    def counting(self, model, split, batch_size=8192):  # compact models (`keep`) on test
        tested.extend([model] if split == "test" and hasattr(model.embedding, "keep") else [])
        return evaluate(self, model, split, batch_size)

    monkeypatch.setattr(CTRTask, "evaluate", counting)

    def run(name: str, *extra: str, **search) -> tuple[Path, dict]:
        config = dict(TINY, name=name, output_dir=str(tmp_path / "runs"))
        config["search"] = {**TINY["search"], "budgets": [0.25], "fallback": "uniform", **search}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        assert main(["search", "--config", str(path), "--quiet", *extra]) == 0
        run_dir = load_config(path).run_dir()
        (result,) = json.loads((run_dir / "results.json").read_text())
        return path, result

    kept = {}
    for name, search in {"searched": {}, "collapsed": {"alpha_l1": 0.05}}.items():
        tested.clear()
        path, result = run(name, **search)
        assert len(tested) == 1  # one budget, one compact model tested: the kept one
        choice, valid = result["choice"], result["metrics"]["valid"]["auc"]
        better = max(choice["valid"], key=choice["valid"].get)  # auc: higher is better
        assert choice["structure"] == better and valid == choice["valid"][better]
        assert choice["uniform_width"] == 2  # 25% of d=8
        keep = load_run(load_config(path).run_dir(), 0.25).model.embedding.keep
        uniform = (keep == (torch.arange(8) < 2)).all()
        assert bool(uniform) == (better == "uniform")
        kept[name] = better
        report = (load_config(path).run_dir() / "report.md").read_text(encoding="utf-8")
        assert "valid_auc uniform | kept |" in report and f"| {better} |" in report
        _, resumed = run(name, "--resume", **search)  # the kept model reloads as saved
        assert resumed["metrics"] == result["metrics"] and resumed["choice"] == choice
    assert kept == {"searched": "searched", "collapsed": "uniform"}
