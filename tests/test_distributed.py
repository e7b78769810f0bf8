"""Multi-process training under torchrun (gloo on the CPU): the same metrics as one process.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node 2` in a
subprocess, as a user would, and compares with one process: training metrics (within 1e-3 AUC),
a DNIS search's structure on the planted generator, and evaluation of fixed models (exact: every
rank's scores are gathered before the metric is computed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dnis.cli import main
from dnis.data.catalog import load
from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.tasks import make_task

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]

TRAIN_CONFIG = {
    "name": "ddp",
    "seed": 0,
    "dataset": {
        "name": "synthetic",
        "task": "ctr",
        "options": {"n_rows": 20000, "ranks": [8, 4, 2], "noise_fields": 2, "vocab": 300},
    },
    "model": {"name": "deepfm", "params": {"hidden": [32, 32]}},
    "embedding": {"dim": 16},
    "train": {"epochs": 3, "batch_size": 512, "lr": 0.003, "patience": 0},
}
SEARCH_CONFIG = {
    **TRAIN_CONFIG,
    "name": "ddp-search",
    "dataset": {
        **TRAIN_CONFIG["dataset"],
        "options": {**TRAIN_CONFIG["dataset"]["options"], "n_rows": 30000},
    },  # fmt: skip
    "model": {"name": "fm"},
    "train": {"epochs": 4, "batch_size": 512, "lr": 0.003, "patience": 2},
    "search": {"num_blocks": 4, "warmup_epochs": 2, "search_epochs": 4, "budgets": [0.25]},
}


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def dnis_command(tmp: Path, config: dict, processes: int, command: str, output: str) -> Path:
    """Run `dnis <command>` on `processes` processes (1: plainly); the run folder."""
    path = tmp / f"{output}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp / output)}), encoding="utf-8")
    launcher = [*TORCHRUN, str(processes), "-m"] if processes > 1 else [sys.executable, "-m"]
    done = subprocess.run(
        [*launcher, "dnis", command, "--config", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = [p for p in (tmp / output).iterdir() if p.is_dir()]
    return run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_two_processes_train_to_the_metrics_of_one(tmp_path: Path) -> None:
    single = dnis_command(tmp_path, TRAIN_CONFIG, 1, "train", "single")
    double = dnis_command(tmp_path, TRAIN_CONFIG, 2, "train", "ddp")
    one, two = read_json(single / "final.json"), read_json(double / "final.json")
    assert abs(one["test"]["auc"] - two["test"]["auc"]) < 1e-3, (one["test"], two["test"])
    assert abs(one["valid"]["auc"] - two["valid"]["auc"]) < 1e-3
    # every epoch's loss (averaged over both ranks' rows) and validation AUC agree too
    epochs = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (single, double)
    ]
    for a, b in zip(*epochs, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["valid_auc"] - b["valid_auc"]) < 1e-3
    # rank 1 kept its own files beside rank 0's, with the same (gathered, exact) metrics
    other = read_json(double / "ranks" / "1" / "final.json")
    assert other["test"] == two["test"] and other["valid"] == two["valid"]
    assert {"config.yaml", "encoder.json", "model.pt", "final.json"} <= {
        p.name for p in double.iterdir()
    }


def field_dims(run: Path) -> dict[str, float]:
    (budget,) = read_json(run / "dims.json").values()  # {budget: {field: {block_dims: ...}}}
    return {name: float(np.mean(spec["block_dims"])) for name, spec in budget.items()}


def test_dnis_search_under_ddp_finds_the_planted_structure(tmp_path: Path) -> None:
    single = dnis_command(tmp_path, SEARCH_CONFIG, 1, "search", "single")
    double = dnis_command(tmp_path, SEARCH_CONFIG, 2, "search", "ddp")
    found = field_dims(double)
    signal = [found[f"signal{i}"] for i in range(3)]
    noise = [found[f"noise{i}"] for i in range(2)]
    assert max(noise) <= 2.0 and min(signal) > max(noise), found
    assert signal[0] > signal[2], found
    assert found == field_dims(single)  # the structure one process finds
    # alpha (all-reduced every step) ends where one process's does
    alpha = [np.array(read_json(run / "search.json")["alpha"]) for run in (single, double)]
    assert np.abs(alpha[0] - alpha[1]).max() < 1e-3
    one = read_json(single / "result-0.25.json")["metrics"]["test"]["auc"]
    two = read_json(double / "result-0.25.json")["metrics"]["test"]["auc"]
    assert abs(one - two) < 1e-3


EVALUATE = """
import json, sys
import torch
from dnis import distributed
sys.path.insert(0, sys.argv[2])
from test_distributed import fixed_metrics

distributed.setup("cpu")
assert distributed.world_size() == 2
# gather: uneven lengths come back whole, in rank order
got = distributed.gather(torch.arange(distributed.rank() + 2))
assert got.tolist() == [0, 1, 0, 1, 2], got
path = f"{sys.argv[1]}.{distributed.rank()}.json"
with open(path, "w") as handle:
    json.dump(fixed_metrics(), handle)
distributed.teardown()
"""


def fixed_metrics() -> dict[str, dict[str, float]]:
    """Metrics of seeded untrained models on small splits, with tiny evaluation batches (so the
    ranks' shares are uneven runs of batches)."""
    out = {}
    for task in ("ctr", "rating"):
        dataset = load_synthetic(task=task, n_rows=3000, vocab=80, seed=0)
        out[task] = _evaluate(dataset, "deepfm" if task == "ctr" else "mf", batch_size=37)
    topk = load("movielens-latest-small", "topk", seed=0)
    out["topk"] = _evaluate(topk, "bprmf", batch_size=37, row_budget=50 * 9000)
    # several held-out items per user: each rank takes a run of chunks of 3 users, the per-user
    # values are gathered and averaged
    from test_tasks import multi_item_data

    multi = multi_item_data(seed=1, n_users=40, n_items=60)
    out["topk-multi"] = _evaluate(multi, "bprmf", batch_size=37, row_budget=3 * 61)
    return out


def _evaluate(dataset, model_name: str, batch_size: int, **task_options) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(model_name, dataset.schema, FusedEmbedding(FieldLayout.from_dataset(dataset), 8))
    task = make_task(dataset)
    if task_options:
        task.row_budget = task_options["row_budget"]
    return task.evaluate(model, "test", batch_size)


def test_metrics_are_computed_exactly_over_every_ranks_predictions(tmp_path: Path) -> None:
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE, encoding="utf-8")
    stem = tmp_path / "metrics"
    done = subprocess.run(
        [*TORCHRUN, "2", str(script), str(stem), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [read_json(Path(f"{stem}.{r}.json")) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same, whole-split metrics
    want = fixed_metrics()
    for task, metrics in want.items():
        for name, value in metrics.items():
            assert ranks[0][task][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, name)
    assert ranks[0]["topk"]["users"] == want["topk"]["users"] > 0
    assert ranks[0]["topk-multi"]["users"] == want["topk-multi"]["users"] == 39


def test_commands_that_do_not_split_their_work_refuse_torchrun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TRAIN_CONFIG), encoding="utf-8")
    assert main(["compare", "--config", str(config)]) == 2
    assert "runs in one process" in capsys.readouterr().err.replace("\n", " ")
