"""Trainer and runs: determinism, resume, early stopping, NaN guard, run artifacts, unseen values."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from dnis.app.config import Config, load_config, parse
from dnis.app.evaluate import evaluate
from dnis.app.train import train
from dnis.data.dataset import EncodedDataset, build_dataset
from dnis.data.encode import Encoder
from dnis.data.schema import FeatureSpec, Schema
from dnis.errors import DnisError
from dnis.models.base import Model
from dnis.tasks import make_task
from dnis.train import Progress, TrainConfig, Trainer
from dnis.train.checkpoint import load_checkpoint


class Killed(Exception):
    pass


class KillAfter(Progress):
    """Simulates a kill right after epoch `epoch` ended (its checkpoint is already on disk)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.records: list[dict] = []

    def epoch_end(self, record: dict) -> None:
        self.records.append(record)
        if record["epoch"] == self.epoch:
            raise Killed(f"killed after epoch {self.epoch}")


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def fit(dataset: EncodedDataset, make_model, name="deepfm", run_dir=None, progress=None, **cfg):
    params = {"hidden": (8,), "dropout": 0.2} if name in ("deepfm", "widedeep") else {}
    model = make_model(dataset, name, dim=4, seed=0, **params)
    config = TrainConfig(**{"epochs": 3, "batch_size": 256, "lr": 0.01, "patience": 0, **cfg})
    trainer = Trainer(model, make_task(dataset), config, run_dir=run_dir, progress=progress)
    return model, trainer


# ---------------------------------------------------------------- determinism


def test_same_seed_same_metrics_and_weights(ctr_data: EncodedDataset, make_model) -> None:
    model_a, trainer_a = fit(ctr_data, make_model)
    result_a = trainer_a.fit()
    model_b, trainer_b = fit(ctr_data, make_model)
    result_b = trainer_b.fit()
    assert len(result_a.history) == 3
    assert without_times(result_a.history) == without_times(result_b.history)
    assert result_a.valid == result_b.valid and result_a.best_epoch == result_b.best_epoch
    assert_same_weights(model_a.state_dict(), model_b.state_dict())


def test_different_seeds_differ(ctr_data: EncodedDataset, make_model) -> None:
    model_a, trainer_a = fit(ctr_data, make_model, epochs=1, seed=0)
    result_a = trainer_a.fit()
    model_b, trainer_b = fit(ctr_data, make_model, epochs=1, seed=1)
    result_b = trainer_b.fit()
    assert result_a.history[0]["loss"] != result_b.history[0]["loss"]
    assert not torch.equal(model_a.embedding.weight, model_b.embedding.weight)


def test_training_learns(ctr_data: EncodedDataset, make_model) -> None:
    model, trainer = fit(ctr_data, make_model, name="fm", epochs=4, lr=0.02)
    before = make_task(ctr_data).evaluate(model, "valid")["auc"]
    result = trainer.fit()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.valid["auc"] > max(before, 0.6)


def test_compiled_training_steps_train_like_eager_ones(ctr_data: EncodedDataset, make_model):
    """`train.compile`: the steps run through torch.compile (inductor) and land where eager ones
    do, up to float rounding; the digest of a run ignores it, like the device."""
    eager_model, eager = fit(ctr_data, make_model, name="fm", epochs=2)
    compiled_model, compiled = fit(ctr_data, make_model, name="fm", epochs=2, compile=True)
    assert compiled.net is not compiled_model  # the steps really go through the compiled module
    want, got = eager.fit(), compiled.fit()
    for a, b in zip(want.history, got.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-4)
    for key, value in eager_model.state_dict().items():
        assert torch.allclose(value, compiled_model.state_dict()[key], atol=1e-4), key
    base = {"dataset": {"name": "synthetic", "task": "ctr"}, "model": {"name": "fm"}}
    digest = parse(Config, base, "test").digest()
    assert parse(Config, {**base, "train": {"compile": True}}, "test").digest() == digest


# ---------------------------------------------------------------- resume (trainer level)


def test_resume_after_kill_equals_uninterrupted(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    model_a, trainer_a = fit(ctr_data, make_model, run_dir=tmp_path / "a")
    result_a = trainer_a.fit()

    _, trainer_b = fit(ctr_data, make_model, run_dir=tmp_path / "b", progress=KillAfter(1))
    with pytest.raises(Killed):
        trainer_b.fit()
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["epoch"] == 1
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1

    model_b, trainer_b = fit(ctr_data, make_model, run_dir=tmp_path / "b")  # a fresh process
    result_b = trainer_b.fit(resume=True)
    assert without_times(result_b.history) == without_times(result_a.history)
    assert result_b.valid == result_a.valid
    assert_same_weights(model_a.state_dict(), model_b.state_dict())
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_refuses_a_different_config(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    _, trainer = fit(ctr_data, make_model, name="fm", run_dir=tmp_path, epochs=1)
    trainer.fit()
    _, trainer = fit(ctr_data, make_model, name="fm", run_dir=tmp_path, epochs=1, lr=0.5)
    with pytest.raises(DnisError, match="different train config"):
        trainer.fit(resume=True)
    _, trainer = fit(ctr_data, make_model, name="fm", run_dir=tmp_path / "empty", epochs=1)
    with pytest.raises(DnisError, match="no checkpoint"):
        trainer.fit(resume=True)


# ---------------------------------------------------------------- early stopping


def overfitting_run(ctr_data, make_model, run_dir=None, progress=None):
    """A big learning rate on a tiny model: validation AUC peaks early, then early stopping."""
    return fit(
        ctr_data,
        make_model,
        name="fm",
        run_dir=run_dir,
        progress=progress,
        epochs=30,
        lr=0.1,
        patience=2,
    )


def test_early_stopping_restores_the_best_epoch(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    model, trainer = overfitting_run(ctr_data, make_model, run_dir=tmp_path)
    result = trainer.fit()
    epochs = len(result.history)
    assert epochs < 30, "early stopping never triggered"
    assert result.best_epoch == epochs - 2  # patience 2: two epochs without improvement
    aucs = [r["valid_auc"] for r in result.history]
    assert result.valid["auc"] == max(aucs) == aucs[result.best_epoch - 1]
    assert aucs[-1] < max(aucs)
    # the model now holds the best epoch's weights, not the last epoch's
    again = make_task(ctr_data).evaluate(model, "valid")
    assert again["auc"] == pytest.approx(result.valid["auc"], abs=1e-12)
    assert again["logloss"] == pytest.approx(result.valid["logloss"], rel=1e-9)
    last = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert not torch.equal(last["embedding.weight"], model.embedding.weight)


def test_resume_after_kill_at_the_early_stopping_epoch_does_not_train_on(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    """Killed after the last epoch's checkpoint: resuming must give the uninterrupted result."""
    model_a, trainer_a = overfitting_run(ctr_data, make_model, run_dir=tmp_path / "a")
    result_a = trainer_a.fit()
    stop = len(result_a.history)
    assert stop < 30

    _, trainer_b = overfitting_run(ctr_data, make_model, tmp_path / "b", KillAfter(stop))
    with pytest.raises(Killed):
        trainer_b.fit()
    model_b, trainer_b = overfitting_run(ctr_data, make_model, run_dir=tmp_path / "b")
    result_b = trainer_b.fit(resume=True)
    assert len(result_b.history) == stop, "resume trained past the early-stopping epoch"
    assert result_b.best_epoch == result_a.best_epoch
    assert_same_weights(model_a.state_dict(), model_b.state_dict())


# ---------------------------------------------------------------- NaN guard


class NaNModel(Model):
    def __init__(self, base: Model) -> None:
        super().__init__(base.schema, base.embedding)
        self.base = base

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(ids) * float("nan")


def test_nan_loss_raises_a_clear_error(ctr_data: EncodedDataset, make_model) -> None:
    model = NaNModel(make_model(ctr_data, "fm", dim=4))
    trainer = Trainer(model, make_task(ctr_data), TrainConfig(epochs=1, batch_size=256))
    with pytest.raises(DnisError, match=r"loss became nan in epoch 1.*lower train\.lr"):
        trainer.fit()


def test_a_model_with_nothing_to_train_raises_a_clear_error(
    ctr_data: EncodedDataset, make_model
) -> None:
    model = make_model(ctr_data, "fm", dim=4)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # as a kept-rows table with no rows, and no biases
    trainer = Trainer(model, make_task(ctr_data), TrainConfig(epochs=1, batch_size=256))
    with pytest.raises(DnisError, match=r"depends on no trainable parameter in epoch 1"):
        trainer.fit()


def test_exploding_learning_rate_raises(rating_data: EncodedDataset, make_model) -> None:
    model = make_model(rating_data, "mf", dim=4)
    config = TrainConfig(epochs=2, batch_size=128, lr=1e10, optimizer="sgd")
    with pytest.raises(DnisError, match=r"training loss became (nan|inf)"):
        Trainer(model, make_task(rating_data), config).fit()


# ---------------------------------------------------------------- a whole run


def config(tmp_path: Path, tiny_config_dict, **sections) -> Config:
    return parse(Config, tiny_config_dict(tmp_path / "runs", **sections), where="test")


def test_run_writes_every_artifact(tmp_path: Path, tiny_config_dict) -> None:
    cfg = config(tmp_path, tiny_config_dict)
    result = train(cfg)
    run_dir = result.run_dir
    assert run_dir == tmp_path / "runs" / cfg.run_name()
    assert run_dir.name.startswith("tiny-")
    for name in (
        "checkpoint.pt",
        "metrics.jsonl",
        "final.json",
        "config.yaml",
        "encoder.json",
        "model.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"loss", "valid_auc", "valid_logloss"} <= records[0].keys()
    final = json.loads((run_dir / "final.json").read_text())
    assert final == json.loads(json.dumps(result.metrics))
    assert final["epochs_run"] == 3 and 1 <= final["best_epoch"] <= 3
    assert set(final["test"]) == {"auc", "logloss"} and 0.5 < final["test"]["auc"] <= 1.0
    assert final["params"]["total"] == final["params"]["embedding"] + final["params"]["other"]
    assert final["params"]["embedding"] == 4 * sum(final["dataset"]["fields"].values())
    # config.yaml is the resolved config: it loads back to the same config (same run id)
    assert load_config(run_dir / "config.yaml") == cfg
    encoder = Encoder.load(run_dir / "encoder.json")
    assert encoder.cardinalities == list(final["dataset"]["fields"].values())
    # model.pt holds the best weights: re-evaluation reproduces the reported test metrics
    assert evaluate(run_dir) == pytest.approx(final["test"], rel=1e-9)
    assert evaluate(run_dir, "valid") == pytest.approx(final["valid"], rel=1e-9)


def test_run_resume_equals_uninterrupted(tmp_path: Path, tiny_config_dict) -> None:
    whole = train(config(tmp_path / "a", tiny_config_dict))
    cfg = config(tmp_path / "b", tiny_config_dict)
    with pytest.raises(Killed):
        train(cfg, progress=KillAfter(1))
    assert not (cfg.run_dir() / "final.json").exists()
    resumed = train(cfg, resume=True)
    for key in ("valid", "test", "best_epoch", "epochs_run", "params"):
        assert resumed.metrics[key] == whole.metrics[key], key
    assert_same_weights(
        torch.load(whole.run_dir / "model.pt"), torch.load(resumed.run_dir / "model.pt")
    )


def test_a_fresh_run_ignores_an_old_checkpoint(tmp_path: Path, tiny_config_dict) -> None:
    cfg = config(tmp_path, tiny_config_dict)
    with pytest.raises(Killed):
        train(cfg, progress=KillAfter(2))
    again = train(cfg)  # not resume: starts over from epoch 1
    assert again.metrics["epochs_run"] == 3
    records = (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2, 3]


def test_evaluate_refuses_an_unfinished_run(tmp_path: Path) -> None:
    with pytest.raises(DnisError, match="not a dnis run"):
        evaluate(tmp_path)


# ---------------------------------------------------------------- unseen values


def test_unseen_categories_map_to_oov_and_evaluation_runs(make_model) -> None:
    def frame(users: list[str], items: list[str], labels: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"user": users, "item": items, "click": labels})

    train_frame = frame(["a", "b", "c", "a"] * 25, ["x", "y", "x", "z"] * 25, [1, 0, 1, 0] * 25)
    valid_frame = frame(["a", "zz", "b", "c"], ["x", "x", "unseen", "y"], [1, 0, 1, 0])
    test_frame = frame(["new", "b", "a", "c"], ["y", "q", "z", "x"], [0, 1, 1, 0])
    schema = Schema((FeatureSpec("user"), FeatureSpec("item")), label="click")
    ds = build_dataset(
        {"train": train_frame, "valid": valid_frame, "test": test_frame}, schema, "ctr"
    )
    assert ds.cardinalities == [4, 4]
    assert ds.valid.ids.tolist() == [[1, 1], [0, 1], [2, 0], [3, 2]]  # x, then y < z
    assert ds.test.ids.tolist()[0][0] == 0 and ds.test.ids.tolist()[1][1] == 0
    model = make_model(ds, "deepfm", dim=4, hidden=(4,))
    trainer = Trainer(model, make_task(ds), TrainConfig(epochs=2, batch_size=32))
    result = trainer.fit()
    test = make_task(ds).evaluate(model, "test")
    assert all(torch.isfinite(torch.tensor(v)) for v in (*result.valid.values(), *test.values()))


def test_model_that_ignores_the_progress_callback_is_silent(
    ctr_data: EncodedDataset, make_model, capsys
) -> None:
    """The library never prints: a whole fit writes nothing to stdout or stderr."""
    _, trainer = fit(ctr_data, make_model, name="fm", epochs=1)
    trainer.fit()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_callback_sees_every_batch(ctr_data: EncodedDataset, make_model) -> None:
    class Count(Progress):
        def __init__(self) -> None:
            self.starts: list[tuple[int, int]] = []
            self.batches = 0
            self.ends: list[int] = []

        def epoch_start(self, epoch: int, batches: int) -> None:
            self.starts.append((epoch, batches))

        def batch_end(self) -> None:
            self.batches += 1

        def epoch_end(self, record: dict) -> None:
            self.ends.append(record["epoch"])

    progress = Count()
    _, trainer = fit(ctr_data, make_model, name="fm", epochs=2, batch_size=500, progress=progress)
    trainer.fit()
    per_epoch = -(-len(ctr_data.train) // 500)
    assert progress.starts == [(1, per_epoch), (2, per_epoch)]
    assert progress.batches == 2 * per_epoch and progress.ends == [1, 2]
