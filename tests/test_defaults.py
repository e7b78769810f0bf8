"""Defaults that converge: the global bias starts at the labels' mean, training says when it hit
its epoch cap, and a config naming only data, model, width and budgets runs as written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dnis import models
from dnis.app.config import Config, DatasetConfig, ModelConfig, load_config
from dnis.app.train import load_dataset, model_factory
from dnis.cli import main
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.tasks import make_task
from dnis.train import Progress, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "movielens-100k"


def fresh_model(dataset, name: str, **params):
    """A new model (seeded: its random layers must not depend on what ran before)."""
    torch.manual_seed(0)
    config = Config(dataset=DatasetConfig(name="synthetic"), model=ModelConfig(name, params))
    embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), 8, 0.01)
    return model_factory(config, dataset)(embedding)


@pytest.mark.parametrize(
    "name", ["mf", "neumf", "fm", "widedeep", "deepfm", "autoint", "dcnv2", "fgcnn", "armnet"]
)
def test_ctr_models_start_at_the_log_odds_of_the_click_rate(ctr_data, name) -> None:
    rate = float(ctr_data.train.labels.double().mean())
    model = fresh_model(ctr_data, name)
    bias = model.output_bias()
    assert bias is not None, f"{name}: no global bias found"
    assert float(bias.detach()) == pytest.approx(math.log(rate / (1 - rate)), abs=1e-6)
    with torch.no_grad():  # small initial weights: every score is near the base logit
        logits = model.eval()(ctr_data.train.ids[:512])
    assert float(torch.sigmoid(logits).mean()) == pytest.approx(rate, abs=0.05)


def test_rating_models_start_at_the_mean_rating(rating_data) -> None:
    mean = float(rating_data.train.labels.double().mean())
    assert make_task(rating_data).base_score() == pytest.approx(mean)
    for name in ("mf", "neumf"):
        model = fresh_model(rating_data, name)
        assert float(model.output_bias()) == pytest.approx(mean, abs=1e-6), name
        with torch.no_grad():
            scores = model.eval()(rating_data.train.ids[:512])
        assert float(scores.mean()) == pytest.approx(mean, abs=0.05), name


def test_din_starts_at_the_base_logit(sequence_data) -> None:
    rate = float(sequence_data.train.labels.double().mean())
    model = fresh_model(sequence_data, "din", history_field="genres")
    assert float(model.output_bias()) == pytest.approx(math.log(rate / (1 - rate)), abs=1e-6)


def test_ranking_models_keep_their_zero_start(topk_data) -> None:
    assert make_task(topk_data).base_score() is None
    model = fresh_model(topk_data, "bprmf")
    assert model.output_bias() is None


class Notes(Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.mark.parametrize(("epochs", "patience", "capped"), [(2, 5, True), (30, 1, False)])
def test_training_says_when_it_stopped_at_the_epoch_cap(ctr_data, epochs, patience, capped) -> None:
    model = models.build(
        "fm", ctr_data.schema, FusedEmbedding(FieldLayout.from_dataset(ctr_data), 4, 0.01)
    )
    progress = Notes()
    config = TrainConfig(epochs=epochs, patience=patience, lr=0.01, batch_size=256)
    result = Trainer(model, make_task(ctr_data), config, progress=progress).fit()
    assert result.capped is capped
    if capped:
        assert len(progress.notes) == 1 and "train.epochs=2" in progress.notes[0]
    else:
        assert len(result.history) < epochs and not progress.notes


DEFAULT_CONFIGS = sorted((ROOT / "configs").glob("*-defaults.yaml"))


@pytest.mark.parametrize("path", DEFAULT_CONFIGS, ids=[p.stem for p in DEFAULT_CONFIGS])
def test_default_only_configs_name_nothing_but_data_model_width_and_budgets(path) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    assert set(data) == {"dataset", "model", "embedding", "search"}
    assert set(data["model"]) == {"name"} and set(data["embedding"]) == {"dim"}
    assert set(data["search"]) == {"budgets"}


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="needs ../shared/data/movielens-100k")
def test_the_ml100k_default_config_trains_from_the_cli(tmp_path, monkeypatch) -> None:
    """The user's path: `dnis train --config configs/...-defaults.yaml`, from the repository root
    (its data path is relative to it), shortened to one epoch."""
    monkeypatch.chdir(ROOT)
    config = ROOT / "configs" / "movielens-100k-rating-mf-defaults.yaml"
    argv = ["--config", str(config), "--quiet", "--set", f"output_dir={tmp_path}"]
    assert main(["train", *argv, "--set", "train.epochs=1"]) == 0
    run_dir = load_config(config, [f"output_dir={tmp_path}", "train.epochs=1"]).run_dir()
    final = json.loads((run_dir / "final.json").read_text())
    assert final["epoch_cap_hit"] is True  # one epoch is far from converged, and it says so
    # the global bias starts at the mean rating, so even one epoch beats predicting that mean
    # (the bias used to start at 0: a 1-epoch warm-up had validation RMSE 2.79)
    dataset = load_dataset(load_config(config).dataset, seed=0)
    train_mean = dataset.train.labels.double().mean()
    mean_rmse = float((dataset.test.labels.double() - train_mean).pow(2).mean().sqrt())
    assert final["test"]["rmse"] < mean_rmse
