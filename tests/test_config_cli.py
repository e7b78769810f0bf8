"""Config files (keys, types, overrides) and the command line, end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dnis.app.config import Config, DatasetConfig, load_config, parse
from dnis.app.train import train
from dnis.cli import main
from dnis.data import catalog
from dnis.errors import ConfigError, DnisError


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dnis", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---------------------------------------------------------------- keys and types


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        (None, "trian", "train"),
        (None, "output_dri", "output_dir"),
        ("dataset", "nmae", "name"),
        ("model", "parms", "params"),
        ("embedding", "dims", "dim"),
        ("train", "epoch", "epochs"),
        ("train", "batchsize", "batch_size"),
    ],
)
def test_unknown_key_at_each_level_suggests(
    tmp_path: Path, tiny_config_dict, section: str | None, key: str, suggestion: str
) -> None:
    data = tiny_config_dict(tmp_path)
    (data if section is None else data[section])[key] = 1
    path = write_config(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError, match=rf"(?i)unknown key '{key}'.*did you mean '{suggestion}'"):
        load_config(path)


def test_unknown_key_in_own_files_schema_suggests(tmp_path: Path, tiny_config_dict) -> None:
    data = tiny_config_dict(tmp_path)
    data["dataset"] = {
        "format": "csv",
        "path": str(tmp_path / "r.csv"),
        "task": "rating",
        "schema": {"features": ["user", "item"], "labl": "rating"},
    }
    (tmp_path / "r.csv").write_text("user,item,rating\n" + "u1,i1,3\n" * 20)
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'label'"):
        train(cfg)


def test_unknown_dataset_option_suggests(tmp_path: Path, tiny_config_dict) -> None:
    """A typo in `dataset.options` must be a ConfigError with a hint, not a TypeError."""
    data = tiny_config_dict(tmp_path, dataset={"options": {"n_row": 2000, "vocab": 50}})
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match=r"(?i)n_row.*did you mean 'n_rows'"):
        train(cfg)


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("train", "lr", "fast", "train.lr"),
        ("train", "epochs", True, "train.epochs"),
        ("train", "epochs", 2.5, "train.epochs"),
        ("embedding", "dim", "8", "embedding.dim"),
        ("model", "params", [1, 2], "model.params"),
        ("dataset", "options", "n_rows=5", "dataset.options"),
        (None, "seed", "zero", "seed"),
        (None, "dataset", ["synthetic"], "dataset"),
    ],
)
def test_wrong_type_names_the_key(
    tmp_path: Path, tiny_config_dict, section: str | None, key: str, value, named: str
) -> None:
    data = tiny_config_dict(tmp_path)
    (data if section is None else data[section])[key] = value
    with pytest.raises(ConfigError, match=rf"\b{re.escape(named)}\b"):
        load_config(write_config(tmp_path / "c.yaml", data))


def test_values_are_checked(tmp_path: Path, tiny_config_dict) -> None:
    for section, key, value, message in (
        ("train", "optimizer", "adamw", "train.optimizer"),
        ("train", "lr", 0, "train.lr"),
        ("train", "batch_size", 0, "train.batch_size"),
        ("embedding", "dim", 0, "embedding.dim"),
    ):
        data = tiny_config_dict(tmp_path)
        data[section][key] = value
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path / "c.yaml", data))


def test_ints_are_accepted_as_floats_and_defaults_fill_in(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"dataset": {"name": "synthetic"}, "train": {"lr": 1}})
    cfg = load_config(path)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "mf" and cfg.embedding.dim == 64 and cfg.output_dir == "runs"
    assert cfg.dataset.task == "rating" and cfg.dataset.split == "random"
    topk = parse(Config, {"dataset": {"name": "synthetic", "task": "topk"}}, "x")
    assert topk.dataset.split == "leave_last_out"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: synthetic\n  task: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="dataset"):
        load_config(write_config(tmp_path / "empty.yaml", {}))  # dataset is required


# ---------------------------------------------------------------- overrides and identity


def test_set_overrides(tmp_path: Path, tiny_config_dict) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path))
    base = load_config(path)
    cfg = load_config(
        path,
        ["train.lr=0.01", "model.params.hidden=[8, 4]", "model.name=deepfm", "seed=3"],
    )
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.model.params == {"hidden": [8, 4]} and cfg.model.name == "deepfm"
    assert cfg.seed == 3 and cfg.train.seed == 3
    assert load_config(path, ["train.lr=0.5"]).train.lr == 0.5
    assert load_config(path, ["train.lr=0.5"]).run_name() != base.run_name()
    # where results go does not change the run's identity
    assert load_config(path, [f"output_dir={tmp_path / 'elsewhere'}"]).digest() == base.digest()
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(path, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'lr'"):
        load_config(path, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path, ["train.lr=abc"])


def test_seed_belongs_at_the_top(tmp_path: Path, tiny_config_dict) -> None:
    data = tiny_config_dict(tmp_path, train={"seed": 5})
    with pytest.raises(ConfigError, match="top level"):
        load_config(write_config(tmp_path / "c.yaml", data))


def test_dataset_name_and_format_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="not both"):
        DatasetConfig(name="synthetic", format="csv", path="x.csv", schema={"features": ["a"]})
    with pytest.raises(ConfigError, match="either"):
        DatasetConfig()
    with pytest.raises(ConfigError, match="path"):
        DatasetConfig(format="csv")
    with pytest.raises(ConfigError, match="not both"):
        parse(
            Config,
            {"dataset": {"name": "synthetic", "format": "csv", "path": "x", "schema": {}}},
            "c.yaml",
        )


def test_loader_options_with_own_files_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"dataset.options \(min_count\).*dataset.schema"):
        DatasetConfig(
            format="csv", path="x.csv", schema={"features": ["a"]}, options={"min_count": 5}
        )


def test_unknown_dataset_name_suggests(tmp_path: Path, tiny_config_dict) -> None:
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'movielens-latest-small'"):
        catalog.load("movielens-latest-smal", task="rating")
    data = tiny_config_dict(tmp_path, dataset={"name": "synthetc", "options": {}})
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    with pytest.raises(
        ConfigError, match=r"(?i)unknown dataset 'synthetc'.*did you mean 'synthetic'"
    ):
        train(cfg)


def test_model_typo_in_config_is_refused(tmp_path: Path, tiny_config_dict) -> None:
    data = tiny_config_dict(tmp_path, model={"name": "deepfm", "params": {"hiden": [4]}})
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'hidden'"):
        train(cfg)
    data = tiny_config_dict(tmp_path, model={"name": "deepfn", "params": {}})
    cfg = load_config(write_config(tmp_path / "c.yaml", data))
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'deepfm'"):
        train(cfg)


def test_example_configs_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path)
        # a tuned config names its runs; a defaults-only one takes model-dataset-task
        assert cfg.run_name().startswith(cfg.name or cfg.base_name())
        assert cfg.name or path.stem.endswith("-defaults")
        assert load_config(path).digest() == cfg.digest()  # a stable run id


# ---------------------------------------------------------------- command line


def test_cli_train_then_evaluate_end_to_end(tmp_path: Path, tiny_config_dict, capsys) -> None:
    data = tiny_config_dict(tmp_path / "runs", train={"epochs": 2})
    path = write_config(tmp_path / "tiny.yaml", data)
    done = run_cli("train", "--config", str(path), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    printed = json.loads(done.stdout)
    run_dir = Path(printed["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["test"] == printed["test"]
    assert final["epochs_run"] == 2
    assert load_config(run_dir / "config.yaml").train.epochs == 2

    # re-evaluation from the run folder alone reproduces the test metrics
    assert main(["evaluate", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(final["test"], rel=1e-9)
    assert main(["evaluate", str(run_dir), "--split", "valid"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(final["valid"], rel=1e-9)


def test_cli_set_override_and_resume(tmp_path: Path, tiny_config_dict, capsys) -> None:
    path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(tmp_path / "runs"))
    args = ["train", "--config", str(path), "--quiet", "--set", "train.epochs=1"]
    assert main([*args, "--set", "train.lr=0.02"]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.lr == 0.02 and saved.train.epochs == 1
    # resuming a finished run trains nothing more and reports the same metrics
    before = json.loads((run_dir / "final.json").read_text())
    assert main([*args, "--set", "train.lr=0.02", "--resume"]) == 0
    capsys.readouterr()
    after = json.loads((run_dir / "final.json").read_text())
    assert after["test"] == before["test"] and after["epochs_run"] == 1


@pytest.mark.parametrize(
    ("where", "value"),
    [(None, {"trian": {"epochs": 1}}), ("dataset", {"options": {"n_row": 100}})],
    ids=["unknown-key", "dataset-option-typo"],
)
def test_cli_bad_config_exits_2_without_traceback(
    tmp_path: Path, tiny_config_dict, where: str | None, value: dict
) -> None:
    data = tiny_config_dict(tmp_path / "runs", **({where: value} if where else value))
    path = write_config(tmp_path / "bad.yaml", data)
    done = run_cli("train", "--config", str(path), "--quiet")
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr
    assert "Traceback" not in done.stderr
    assert "did you mean" in done.stderr.lower()


def test_cli_errors_in_process(tmp_path: Path, tiny_config_dict, capsys) -> None:
    def err() -> str:
        return " ".join(capsys.readouterr().err.split())  # rich wraps long lines

    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert "error:" in err()
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "is not a dnis run" in err()
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "runs"))
    assert main(["train", "--config", str(path), "--quiet", "--set", "embedding.dim=x"]) == 2
    assert "embedding.dim" in err()
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])  # argparse: --config is required
    assert exit_info.value.code == 2


def test_cli_datasets_lists_bundled(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "movielens-latest-small" in out and "synthetic" in out
    names = {d.name for d in catalog.datasets()}
    assert {"movielens-latest-small", "synthetic"} <= names


def test_dnis_error_is_the_base_of_config_error() -> None:
    assert issubclass(ConfigError, DnisError)
