"""Experiment tracking (`tracking:` / --track): MLflow and TensorBoard for train, search, compare.

MLflow runs against a local file store in tmp_path (no server); TensorBoard's event files are
read back with its EventAccumulator. The MLflow and TensorBoard tests skip when the `tracking`
extra is not installed; the digest and missing-package tests always run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from dnis.app.compare import compare
from dnis.app.config import Config, parse
from dnis.app.search import search_run
from dnis.app.train import train
from dnis.cli import main
from dnis.errors import ConfigError

EXTRA = "the tracking extra is not installed: pip install 'dnis[tracking]'"

TINY = {
    "name": "tracked",
    "dataset": {
        "name": "synthetic",
        "task": "ctr",
        "options": {"n_rows": 2000, "ranks": [4, 2], "noise_fields": 1, "vocab": 40},
    },
    "model": {"name": "fm"},
    "embedding": {"dim": 8},
    "train": {"epochs": 2, "batch_size": 512, "lr": 0.003},
    "search": {"num_blocks": 2, "warmup_epochs": 1, "search_epochs": 1, "budgets": [0.5]},
    "compare": {"methods": ["uniform"], "budgets": [0.25, 0.5], "seeds": 1},
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Runs and a default ./mlruns land in tmp_path; MLflow's env switches are undone after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def make_config(tmp_path: Path, **tracking) -> Config:
    data = {**TINY, "output_dir": str(tmp_path / "runs")}
    if tracking:
        data["tracking"] = tracking
    return parse(Config, data, "test")


def mlflow_client(uri: Path):
    mlflow = pytest.importorskip("mlflow", reason=EXTRA)
    return mlflow.MlflowClient(uri.resolve().as_uri())


def only_run(client, experiment: str, parent: bool = True):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    if parent:
        runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 1
    return runs[0], found.experiment_id


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard", reason=EXTRA)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_the_tracking_section_does_not_change_the_digest(tmp_path):
    plain = make_config(tmp_path)
    tracked = make_config(
        tmp_path, mlflow=True, tensorboard=True, mlflow_uri="elsewhere", experiment="x"
    )
    assert tracked.digest() == plain.digest()
    assert tracked.run_dir() == plain.run_dir()
    with pytest.raises(ConfigError, match="Did you mean 'tensorboard'"):
        make_config(tmp_path, tensorbord=True)


def test_tracking_off_creates_nothing(tmp_path):
    result = train(make_config(tmp_path))
    assert not (tmp_path / "mlruns").exists()
    assert not (result.run_dir / "tensorboard").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_missing_tracker_package_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    config = make_config(tmp_path, mlflow=True)
    with pytest.raises(ConfigError, match=r"tracking.mlflow is on.*pip install 'dnis\[tracking\]'"):
        train(config)
    assert not (tmp_path / "runs").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError, match=r"tracking.tensorboard is on.*dnis\[tracking\]"):
        search_run(make_config(tmp_path, tensorboard=True))
    assert not (tmp_path / "runs").exists()


def test_train_logs_epochs_params_final_metrics_and_files_to_both(tmp_path):
    pytest.importorskip("tensorboard", reason=EXTRA)
    client = mlflow_client(tmp_path / "mlflow-store")
    config = make_config(
        tmp_path, mlflow=True, tensorboard=True, mlflow_uri=str(tmp_path / "mlflow-store")
    )
    result = train(config)
    assert not (tmp_path / "mlruns").exists()  # the configured store, not the default

    run, _ = only_run(client, "tracked")  # experiment: the run's name without its hash
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"train {config.run_name()}"
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.params["dataset.options.n_rows"] == "2000"
    assert run.data.params["search.budgets"] == "[0.5]"
    assert not any(key.startswith("tracking") for key in run.data.params)
    assert run.data.tags["dnis.config_hash"] == config.digest()
    history = client.get_metric_history(run.info.run_id, "valid_auc")
    assert [m.step for m in history] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    final = run.data.metrics
    assert final["final/test_auc"] == pytest.approx(result.metrics["test"]["auc"])
    assert final["final/params_total"] == result.metrics["params"]["total"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final.json", "metrics.jsonl"} <= artifacts

    found = scalars(result.run_dir / "tensorboard" / "train")
    assert [step for step, _ in found["loss"]] == [1, 2]
    assert [step for step, _ in found["valid_auc"]] == [1, 2]
    assert found["final/test_auc"][0][1] == pytest.approx(result.metrics["test"]["auc"])


def test_search_logs_phases_and_budgets_with_their_own_prefixes(tmp_path):
    pytest.importorskip("tensorboard", reason=EXTRA)
    client = mlflow_client(tmp_path / "mlruns")
    config = make_config(tmp_path, mlflow=True, tensorboard=True, experiment="dnis-tests")
    _, results = search_run(config)  # default store: ./mlruns (the test's cwd)

    run, _ = only_run(client, "dnis-tests")
    run_id = run.info.run_id
    steps = {
        key: [m.step for m in client.get_metric_history(run_id, key)]
        for key in (
            "warmup/loss", "search/loss", "search/alpha_mean", "prune/kept_params",
            "retrain-0.5/valid_auc", "retrain-0.5/uniform/valid_auc",
        )
    }  # fmt: skip
    assert steps == {
        "warmup/loss": [1],
        "search/loss": [1],
        "search/alpha_mean": [1],
        "prune/kept_params": [1],  # the gradual pruning phase: one epoch per budget
        "retrain-0.5/valid_auc": [1, 2],
        "retrain-0.5/uniform/valid_auc": [1, 2],  # the fallback's training (`search.fallback`)
    }
    assert "search/alpha_field_mean/signal0" in run.data.metrics
    assert run.data.metrics["budget-0.5/test_auc"] == pytest.approx(
        results[0].metrics["test"]["auc"]
    )
    assert run.data.metrics["budget-0.5/embedding_params"] == results[0].embedding_params
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "report.md", "results.json", "dims.png", "metric.png"} <= artifacts

    found = scalars(config.run_dir() / "tensorboard" / "search")
    assert [step for step, _ in found["retrain-0.5/loss"]] == [1, 2]
    assert "search/alpha_mean" in found and "warmup/valid_auc" in found


def test_compare_logs_one_child_run_per_row_and_the_report(tmp_path):
    client = mlflow_client(tmp_path / "mlruns")
    pytest.importorskip("tensorboard", reason=EXTRA)
    config_path = tmp_path / "grid.yaml"
    config_path.write_text(yaml.safe_dump({**TINY, "output_dir": "runs"}), encoding="utf-8")
    assert main(["compare", "--config", str(config_path), "--track", "mlflow"]) == 0

    parent, experiment = only_run(client, "tracked")
    assert parent.info.run_name.startswith("compare tracked-")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "compare.md", "compare.csv", "pareto.png", "cells"} <= artifacts
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_budget = {float(c.data.params["budget"]): c for c in children}
    assert sorted(by_budget) == [0.25, 0.5]
    for child in children:
        assert child.data.params["method"] == "uniform"
        assert child.data.params["seed"] == "0"
        assert {"test_auc", "valid_auc", "embedding_params", "memory_bytes"} <= set(
            child.data.metrics
        )
    assert (
        by_budget[0.25].data.metrics["embedding_params"]
        < by_budget[0.5].data.metrics["embedding_params"]
    )
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "tensorboard").exists()  # --track mlflow: only MLflow

    # a rerun finds every cell cached: its rows are logged all the same, now to TensorBoard too
    rows = compare(
        parse(Config, {**TINY, "output_dir": "runs", "tracking": {"tensorboard": True}}, "t")
    )
    sessions = sorted(p.name for p in (run_dir / "tensorboard" / "compare").iterdir() if p.is_dir())
    assert sessions == ["uniform_budget_0.25_seed_0", "uniform_budget_0.5_seed_0"]
    found = scalars(run_dir / "tensorboard" / "compare" / sessions[0])
    assert found["test_auc"][0][1] == pytest.approx(rows[0]["metrics"]["test"]["auc"])


def test_track_flag_overrides_the_config(tmp_path):
    path = tmp_path / "on.yaml"
    data = {**TINY, "output_dir": "runs", "tracking": {"tensorboard": True}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", "--config", str(path), "--quiet", "--track", "none"]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "tensorboard").exists()
    pytest.importorskip("tensorboard", reason=EXTRA)
    assert main(["train", "--config", str(path), "--quiet"]) == 0  # the config's tensorboard
    assert list((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))


def test_trackers_fan_out_and_close_with_the_run_status():
    from dnis.app.track import MultiTracker, Tracker, TrackingProgress

    class Recorder(Tracker):
        active = True

        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def log_metrics(self, step, metrics, prefix=""):
            self.calls.append(("metrics", step, dict(metrics), prefix))

        def close(self, status="FINISHED"):
            self.calls.append(("close", status))

    first, second = Recorder(), Recorder()
    with pytest.raises(RuntimeError), MultiTracker([first, second]) as both:
        progress = TrackingProgress(None, both, lambda record: "p")
        progress.epoch_start(3, 10)
        progress.batch_end()
        progress.epoch_end({"epoch": 3, "loss": 0.5})
        raise RuntimeError("the run failed")
    expected = [("metrics", 3, {"loss": 0.5}, "p"), ("close", "FAILED")]
    assert first.calls == second.calls == expected
    with Recorder() as interrupted:
        pass
    assert interrupted.calls == [("close", "FINISHED")]
