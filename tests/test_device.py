"""`train.device`: choosing a device, and (where a CUDA GPU is visible) every path on it.

The GPU tests run on a machine with CUDA; CI has none, so there they are skipped with that reason.
The CPU tests check the choice of device and that results are identical on the CPU either way.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dnis import models
from dnis.app.compare import compare
from dnis.app.config import Config, parse
from dnis.data.synthetic import load_synthetic
from dnis.errors import ConfigError
from dnis.search import methods
from dnis.tasks import make_task
from dnis.tasks.base import model_device
from dnis.train import TrainConfig
from dnis.train.trainer import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


def test_device_names_resolve_or_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        TrainConfig(device="gpu0")
    with pytest.raises(ConfigError, match="only cpu, cuda"):
        TrainConfig(device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU; set train.device: cpu"):
            TrainConfig(device="cuda")


def _config(
    tmp_path, device: str, model: str = "fm", task: str = "ctr", methods: list[str] | None = None
) -> Config:
    raw = {
        "name": f"device-{device}",
        "seed": 0,
        "output_dir": str(tmp_path),
        "dataset": {"name": "synthetic", "task": task, "options": {"n_rows": 3000, "vocab": 80}},
        "model": {"name": model},
        "embedding": {"dim": 8},
        "train": {"epochs": 2, "batch_size": 256, "lr": 3e-3, "device": device},
        "search": {"warmup_epochs": 1, "search_epochs": 1, "budgets": [0.25]},
        "compare": {
            "methods": methods or ["dnis", "uniform", "random", "mde", "hashing", "qr"],
            "budgets": [0.25, 0.5],
            "seeds": 1,
            "options": {"random": {"trials": 2, "trial_epochs": 1}, "mde": {"temperatures": [0.3]}},
        },
    }
    return parse(Config, raw, where="test")


def test_the_model_factory_places_models_on_the_configured_device(tmp_path):
    from dnis.app.train import build_model

    config = _config(tmp_path, "cpu")
    dataset = load_synthetic(task="ctr", n_rows=500, vocab=20, seed=0)
    assert model_device(build_model(config, dataset)) == torch.device("cpu")


@needs_cuda
@pytest.mark.parametrize("granularity", ["block", "element"])
def test_dnis_runs_on_the_gpu_and_matches_the_cpu_closely(granularity):
    dataset = load_synthetic(task="ctr", n_rows=3000, vocab=80, seed=0)
    results = {}
    for device in ("cpu", "cuda"):
        target = torch.device(device)
        result = methods.method("dnis")(
            lambda e, t=target: models.build("deepfm", dataset.schema, e).to(t),
            dataset,
            budgets=[0.25],
            dim=8,
            train=TrainConfig(epochs=2, batch_size=256, device=device),
            options={"warmup_epochs": 1, "search_epochs": 1, "granularity": granularity},
        )[0]
        assert model_device(result.model).type == device
        results[device] = result
    assert results["cpu"].embedding_params == results["cuda"].embedding_params
    assert (
        abs(results["cpu"].metrics["test"]["auc"] - results["cuda"].metrics["test"]["auc"]) < 0.05
    )


@needs_cuda
def test_every_method_of_compare_runs_on_the_gpu(tmp_path):
    every = sorted(methods.METHODS)
    rows = compare(_config(tmp_path, "cuda", methods=every))
    assert {r["method"] for r in rows} == set(every)
    for row in rows:
        if "infeasible" in row:
            continue
        assert 0.4 < row["metrics"]["test"]["auc"] <= 1.0
        assert row["embedding_params"] <= row["full_params"]


@needs_cuda
@pytest.mark.parametrize("name", ["mf", "deepfm", "autoint", "dcnv2", "fgcnn", "armnet"])
def test_models_train_and_evaluate_on_the_gpu(name):
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.train.trainer import Trainer

    task_name = "rating" if name == "mf" else "ctr"
    dataset = load_synthetic(task=task_name, n_rows=2000, vocab=50, seed=0)
    model = models.build(name, dataset.schema, FusedEmbedding(FieldLayout.from_dataset(dataset), 8))
    model = model.cuda()
    task = make_task(dataset)
    Trainer(model, task, TrainConfig(epochs=1, batch_size=256, embedding_l2=1e-4)).fit()
    metrics = task.evaluate(model, "test")
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@needs_cuda
def test_topk_ranking_on_the_gpu_equals_the_cpu():
    from dnis.data.catalog import load
    from dnis.embeddings import FieldLayout, FusedEmbedding

    dataset = load("movielens-latest-small", "topk", seed=0)
    torch.manual_seed(0)
    model = models.build(
        "bprmf", dataset.schema, FusedEmbedding(FieldLayout.from_dataset(dataset), 16)
    )
    task = make_task(dataset)
    on_cpu = task.evaluate(model, "valid")
    on_gpu = task.evaluate(replace_model(model, "cuda"), "valid")
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-6)


def replace_model(model, device: str):
    import copy

    return copy.deepcopy(model).to(device)


def test_train_config_device_is_part_of_the_config(tmp_path):
    config = _config(tmp_path, "cpu")
    assert config.train.device == "cpu"
    assert replace(config.train, device="auto").device == "auto"
