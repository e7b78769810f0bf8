"""A killed `dnis search --method M --resume` run of any method, and a killed `dnis compare`
cell, continue from their checkpoints (`dnis.search.training.Phases`) and end with the results of
a run that was never killed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import dnis.app.search as app_search
from dnis.app.config import load_config
from dnis.train.trainer import Trainer

DATA = {"n_rows": 1200, "ranks": [4, 2], "noise_fields": 1, "vocab": 30, "numeric_fields": 1}
OPTIONS = {  # short runs with at least two trainings each where the method has them
    "autodim": {"warmup_epochs": 1, "search_epochs": 2},
    "optfs": {"search_epochs": 2, "rewind_epoch": 0},
    "pep": {"extra_epochs": 1},
    "dnis-nested": {"num_blocks": 2, "warmup_epochs": 1, "search_epochs": 2},
    "dnis-random": {"num_blocks": 2, "warmup_epochs": 1, "search_epochs": 2},
    "dnis-precision": {"num_blocks": 2, "warmup_epochs": 1, "search_epochs": 2},
}


class Killed(Exception):
    """Stands for the kill: raised right after a checkpoint was written."""


def write_config(root: Path) -> Path:
    data = {
        "name": "resume",
        "seed": 0,
        "output_dir": str(root / "runs"),
        "dataset": {"name": "synthetic", "task": "ctr", "options": DATA},
        "model": {"name": "fm"},
        "embedding": {"dim": 8},
        "train": {"epochs": 3, "batch_size": 256, "lr": 0.01, "patience": 0},
        "search": {"budgets": [0.5, 0.75]},
        "compare": {"methods": sorted(OPTIONS), "options": OPTIONS},
    }
    root.mkdir()
    path = root / "resume.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def count_saves(monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> list[int]:
    """Counts the checkpoints written from now on; raises Killed after the `kill_at`-th."""
    saves = [0]
    real = Trainer._save

    def save(self, state):
        real(self, state)
        if self.run_dir is not None:
            saves[0] += 1
            if saves[0] == kill_at:
                raise Killed

    monkeypatch.setattr(Trainer, "_save", save)
    return saves


@pytest.mark.parametrize(
    "name",
    [
        "uniform",
        "hashing",
        "pep",
        "optfs",
        "dsl",
        "autodim",
        "matryoshka",
        "dnis-nested",
        "magprune",
        "dnis-random",
        "dnis-precision",
        "int8-qat",
    ],
)
def test_a_killed_method_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, name):
    whole = load_config(write_config(tmp_path / "whole"))
    saves = count_saves(monkeypatch)
    _, expected = app_search.search_run(whole, method=name)
    total = saves[0]
    assert total >= 2, "the method's trainings keep no checkpoints"

    cut = load_config(write_config(tmp_path / "cut"))
    count_saves(monkeypatch, kill_at=total // 2)
    with pytest.raises(Killed):
        app_search.search_run(cut, method=name)
    saves = count_saves(monkeypatch)
    _, resumed = app_search.search_run(cut, method=name, resume=True)
    assert saves[0] == total - total // 2, "the resumed run redid finished epochs"

    for want, got in zip(expected, resumed, strict=True):
        assert got.embedding_params == want.embedding_params
        for split in ("valid", "test"):
            for key, value in want.metrics[split].items():
                assert got.metrics[split][key] == pytest.approx(value, abs=1e-6), (split, key)
        for key, value in want.model.state_dict().items():
            assert torch.allclose(got.model.state_dict()[key], value, atol=1e-6), key


def test_a_compare_cell_cut_mid_training_continues_from_its_checkpoints(tmp_path, monkeypatch):
    from dnis.app.compare import cell_checkpoints, compare

    def grid(root: Path):
        config = load_config(write_config(root))
        config.compare.methods, config.compare.seeds = ["pep"], 1
        config.compare.budgets = [0.5, 0.75]
        return config

    whole = grid(tmp_path / "whole")
    saves = count_saves(monkeypatch)
    expected = compare(whole)
    total = saves[0]
    assert total >= 2
    assert not cell_checkpoints(whole.run_dir(), "pep", 0).exists()  # removed once done

    cut = grid(tmp_path / "cut")
    count_saves(monkeypatch, kill_at=total // 2)
    with pytest.raises(Killed):
        compare(cut)
    assert cell_checkpoints(cut.run_dir(), "pep", 0).is_dir()
    saves = count_saves(monkeypatch)
    resumed = compare(cut)
    assert saves[0] == total - total // 2, "the resumed cell redid finished epochs"
    for want, got in zip(expected, resumed, strict=True):
        for split in ("valid", "test"):
            for key, value in want["metrics"][split].items():
                assert got["metrics"][split][key] == pytest.approx(value, abs=1e-6), (split, key)
