"""Bad configs, bad arguments and crafted files, through the CLI a user runs.

Every case must end in exit code 2 with a message that names the problem and the fix, never a
traceback, and a file from a run folder or export must never run code when it is loaded. The data
cases (bad CSV/Parquet content) are in test_bad_input_data.py, the split cases (empty or
one-class splits) in test_bad_input_splits.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnis.app.config import load_config
from dnis.cli import main
from dnis.errors import ConfigError, DnisError
from dnis.train.checkpoint import FORMAT, read_checkpoint, save_checkpoint


def write_config(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the one-line stderr of `dnis ARGV` (rich wraps long lines)."""
    code = main(argv)
    return code, " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- configs
VALID = """\
name: tiny
output_dir: @OUT@
dataset:
  name: synthetic
  task: ctr
  options: {n_rows: 500, vocab: 20}
model: {name: fm}
embedding: {dim: 4}
train:
  epochs: 1
  batch_size: 128
"""

CONFIG_CASES = [
    # (id, config text after the valid one is formatted, expected message parts)
    ("empty file", "", ["is empty", "dataset:"]),
    ("only a comment", "# nothing here\n", ["is empty", "dataset:"]),
    (
        "duplicated key",
        VALID + "train:\n  epochs: 2\n",
        ["line 12, column 1", "'train' is given twice", "first on line 9"],
    ),
    (
        "duplicated nested key",
        VALID.replace("  epochs: 1\n", "  epochs: 1\n  epochs: 2\n"),
        ["line 11, column 3", "'train.epochs' is given twice", "first on line 10"],
    ),
    (
        "wrong type",
        VALID.replace("epochs: 1", "epochs: many"),
        ["line 10, column 3", "train.epochs", "expected int"],
    ),
    ("unknown key", VALID + "trian: {}\n", ["line 12, column 1", "Did you mean 'train'"]),
    (
        "impossible value",
        VALID.replace("batch_size: 128", "batch_size: 0"),
        ["line 9, column 1", "train.batch_size must be >= 1"],
    ),
    (
        "budget of the wrong type",
        VALID + "search: {budgets: [0.1, nan]}\n",
        ["line 12", "search.budgets[1]", "is not a byte size", "or give a fraction"],
    ),
    ("a list for a section", VALID + "search: [1, 2]\n", ["line 12", "search: expected a mapping"]),
    ("not YAML", "dataset: {name: synthetic\n  task: [", ["not valid YAML"]),
    ("not UTF-8", b"dataset: {name: caf\xe9}\n", ["cannot be read"]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_is_refused_naming_the_line(tmp_path, capsys, text, expected) -> None:
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text.replace("@OUT@", str(tmp_path / "runs")), encoding="utf-8")
    code, err = run_cli(["train", "--config", str(path), "--quiet"], capsys)
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err
    for part in expected:
        assert part in err, (part, err)
    assert not (tmp_path / "runs").exists()  # refused before any folder is made


def test_config_naming_a_folder_is_refused(tmp_path, capsys) -> None:
    code, err = run_cli(["train", "--config", str(tmp_path)], capsys)
    assert code == 2 and "is a folder, not a file" in err


ARGUMENT_CASES = [
    ("--budget nan", ["search", "--budget", "nan"], "'nan' is not a budget"),
    ("--budget inf", ["search", "--budget", "inf"], "'inf' is not a budget"),
    ("--budget -1", ["search", "--budget", "-1"], "'-1' is not a budget"),
    ("--budget word", ["search", "--budget", "half"], "'half' is not a budget"),
    ("--budget bad unit", ["search", "--budget", "2MX"], "a byte size (e.g. 2MB"),
    ("--budgets with nan", ["search", "--budgets", "0.1", "nan"], "'nan' is not a budget"),
    ("compare --budgets 0", ["compare", "--budgets", "0"], "'0' is not a budget"),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES]
)
def test_bad_budget_argument_is_refused_by_the_parser(tmp_path, capsys, argv, expected) -> None:
    config = write_config(tmp_path / "c.yaml", VALID.replace("@OUT@", str(tmp_path / "runs")))
    with pytest.raises(SystemExit) as stop:
        main([*argv[:1], "--config", str(config), *argv[1:]])
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and expected in err, err


def test_search_with_no_budget_is_refused_before_searching(tmp_path, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", VALID.replace("@OUT@", str(tmp_path / "runs")))
    code, err = run_cli(
        ["search", "--config", str(config), "--set", "search.budgets=[]", "--quiet"], capsys
    )
    assert code == 2 and "search.budgets is empty" in err and "dnis train" in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", VALID.replace("@OUT@", str(blocker / "runs")))
    code, err = run_cli(["train", "--config", str(config), "--quiet"], capsys)
    assert code == 2 and "Not a directory" in err and str(blocker) in err, err


def unprivileged() -> list[str]:
    """A command prefix under which permission bits hold: root bypasses them, so root drops the
    capabilities that do (setpriv, from util-linux); anybody else needs nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_read_only_output_folder_names_the_folder_and_the_fix(tmp_path) -> None:
    read_only = tmp_path / "runs"
    read_only.mkdir(mode=0o555)
    config = write_config(tmp_path / "c.yaml", VALID.replace("@OUT@", str(read_only)))
    done = subprocess.run(
        [*unprivileged(), sys.executable, "-m", "dnis", "train", "--config", str(config), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    err = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr
    assert "Permission denied" in err and str(read_only) in err and "output_dir" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- crafted files never run code
class Payload:
    """Unpickling this calls `Path.touch(marker)`: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_state_dict(marker: Path) -> dict:
    return {"embedding.weight": torch.zeros(2, 2), "evil": Payload(marker)}


def crafted_checkpoint(path: Path, marker: Path, config_hash: str) -> None:
    """A checkpoint with a valid envelope and checksum around a malicious payload: an attacker
    can recompute the checksum, so only the safe unpickler stands in the way."""
    save_checkpoint(path, {"model": Payload(marker), "epoch": 1}, config_hash)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    """A folder holding a finished train run and a finished search run of one config."""
    root = tmp_path_factory.mktemp("runs")
    data = tiny_config(root / "runs", train={"epochs": 1, "batch_size": 256, "lr": 0.01})
    data["dataset"]["options"]["n_rows"] = 800
    data["search"] = {"warmup_epochs": 0, "search_epochs": 1, "budgets": [0.25, 0.5]}
    config = write_config(root / "c.yaml", data)
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    assert main(["search", "--config", str(config), "--quiet"]) == 0
    return load_config(config).run_dir()


@pytest.fixture
def run_copy(finished_runs, tmp_path) -> Path:
    copy = tmp_path / finished_runs.name
    shutil.copytree(finished_runs, copy)
    return copy


INPUT = "signal0,signal1,signal2,noise0,noise1\n1,2,3,4,5\n6,7,8,9,10\nnew,1,1,1,1\n"


def _config_hash(run_dir: Path) -> str:
    return run_dir.name.rsplit("-", 1)[1]


CRAFTED = [
    # (id, file to replace, how, command)
    ("train --resume", "checkpoint.pt", "checkpoint", ["train", "--resume"]),
    ("search --resume", "search/checkpoint.pt", "checkpoint", ["search", "--resume"]),
    ("export model.pt", "model.pt", "state", ["export", "--format", "onnx", "--budget", "full"]),
    ("export model.pt in an envelope", "model.pt", "checkpoint", ["export", "--format", "onnx", "--budget", "full"]),
    ("export model-0.25.pt", "model-0.25.pt", "state", ["export", "--format", "onnx", "--budget", "0.25"]),
    ("predict model.pt", "model.pt", "state", ["predict", "--budget", "full"]),
    ("predict model-0.25.pt", "model-0.25.pt", "state", ["predict", "--budget", "0.25"]),
    ("evaluate model.pt", "model.pt", "state", ["evaluate", "--budget", "full"]),
    ("evaluate model-0.5.pt", "model-0.5.pt", "state", ["evaluate"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "how", "command"), [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED]
)
def test_a_crafted_file_is_refused_and_runs_no_code(
    run_copy, tmp_path, capsys, target, how, command
) -> None:
    marker = tmp_path / "code-ran"
    path = run_copy / target
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "checkpoint":
        crafted_checkpoint(path, marker, _config_hash(run_copy))
    else:
        torch.save(crafted_state_dict(marker), path)
    verb = command[0]
    if verb in ("train", "search"):  # the copy's own config, pointed at the copy
        argv = [verb, "--config", str(run_copy / "config.yaml"), *command[1:], "--quiet",
                "--set", f"output_dir={run_copy.parent}"]  # fmt: skip
    elif verb == "predict":
        (tmp_path / "in.csv").write_text(INPUT)
        argv = [verb, str(run_copy), "--input", str(tmp_path / "in.csv"),
                "--output", str(tmp_path / "out.csv"), *command[1:], "--quiet"]  # fmt: skip
    elif verb == "export":
        argv = [verb, str(run_copy), *command[1:], "--output", str(tmp_path / "export")]
    else:
        argv = [verb, str(run_copy), *command[1:]]
    code, err = run_cli(argv, capsys)
    assert not marker.exists(), "loading the file ran its code"
    assert code == 2, err
    assert "was refused" in err and "could run code" in err and target.split("/")[-1] in err, err


def test_crafted_checkpoint_is_refused_by_the_reader_even_with_a_valid_checksum(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    crafted_checkpoint(tmp_path / "checkpoint.pt", marker, "abc")
    with pytest.raises(DnisError, match=r"checkpoint.pt was refused.*GLOBAL"):
        read_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
    assert FORMAT == 1  # the format on disk is unchanged: checkpoints of earlier runs still load


def test_torchscript_export_needs_trust_onnx_does_not(finished_runs, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    (tmp_path / "in.csv").write_text(INPUT)
    outputs = {}
    for fmt in ("torchscript", "onnx"):
        export = tmp_path / fmt
        assert main(["export", str(finished_runs), "--format", fmt, "--budget", "0.25",
                     "--output", str(export)]) == 0  # fmt: skip
        capsys.readouterr()
        outputs[fmt] = tmp_path / f"{fmt}.csv"
        argv = ["predict", str(export), "--input", str(tmp_path / "in.csv"),
                "--output", str(outputs[fmt]), "--quiet"]  # fmt: skip
        code, err = run_cli(argv, capsys)
        if fmt == "torchscript":
            assert code == 2 and "TorchScript export, which is code" in err and "--trust" in err
            assert not outputs[fmt].exists()
            assert run_cli([*argv, "--trust"], capsys)[0] == 0
        else:
            assert code == 0, err
    scores = {fmt: pd.read_csv(path)["score"].to_numpy() for fmt, path in outputs.items()}
    assert len(scores["onnx"]) == 3
    np.testing.assert_allclose(scores["torchscript"], scores["onnx"], atol=1e-5)


# ---------------------------------------------------------------- damaged files and evaluate
def test_evaluate_a_search_run_scores_every_budget(finished_runs, capsys) -> None:
    code = main(["evaluate", str(finished_runs)])
    out = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and set(out) == {"full", "0.25", "0.5"}
    for budget in ("0.25", "0.5"):
        saved = yaml.safe_load((finished_runs / f"result-{budget}.json").read_text())
        assert out[budget]["auc"] == pytest.approx(saved["metrics"]["test"]["auc"], abs=1e-6)
    assert main(["evaluate", str(finished_runs), "--budget", "0.5", "--split", "valid"]) == 0
    one = yaml.safe_load(capsys.readouterr().out)
    assert set(one) == {"auc", "logloss"}


def test_evaluate_a_truncated_model_is_a_clear_error(run_copy, capsys) -> None:
    model = run_copy / "model-0.25.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    code, err = run_cli(["evaluate", str(run_copy), "--budget", "0.25"], capsys)
    assert code == 2 and "model-0.25.pt is corrupt or not a model file" in err, err


# ---------------------------------------------------------------- fuzzing the config reader
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
YAMLISH = st.text(
    alphabet="dataset:nme{}[],- \n\t'\"#&*!|>%@`.0123456789_trainlpochsbudg", max_size=200
)


@st.composite
def mutated_config(draw) -> str:
    """The valid config with one line deleted, duplicated, re-indented or its value replaced."""
    lines = VALID.replace("@OUT@", "runs").splitlines()
    at = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "indent", "value"]))
    if how == "delete":
        del lines[at]
    elif how == "duplicate":
        lines.insert(at, lines[at])
    elif how == "indent":
        lines[at] = " " * draw(st.integers(0, 4)) + lines[at].lstrip()
    else:
        key = lines[at].split(":", 1)[0]
        value = draw(
            st.sampled_from(["", "-1", "0", "1e9", "nan", ".nan", "[]", "{}", "yes", "~", "'x'"])
        )
        lines[at] = f"{key}: {value}"
    return "\n".join(lines) + "\n"


@FUZZ
@given(
    text=st.one_of(
        YAMLISH,
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        mutated_config(),
    )
)
def test_random_or_mutated_config_loads_or_raises_config_error(tmp_path, text) -> None:
    """Random YAML-ish text, random bytes, and one-line mutations of a valid config."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert str(path) in str(error)


def test_the_fuzzed_template_itself_is_valid(tmp_path) -> None:
    path = write_config(tmp_path / "c.yaml", VALID.replace("@OUT@", "runs"))
    assert load_config(path).train.epochs == 1


def test_predict_reads_other_encodings_with_the_encoding_option(finished_runs, tmp_path, capsys):
    """`dnis predict` reads CSVs in the training files' encoding, and `--encoding` overrides it;
    the error for undecodable bytes names the option predict has."""
    latin = tmp_path / "in.csv"
    latin.write_bytes(INPUT.replace("new", "caf\u00e9").encode("latin-1"))
    out = tmp_path / "out.csv"
    argv = ["predict", str(finished_runs), "--budget", "0.25", "--input", str(latin),
            "--output", str(out), "--quiet"]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "line 4" in err and "--encoding for dnis predict" in err, err
    assert run_cli([*argv, "--encoding", "latin-1"], capsys)[0] == 0
    assert len(pd.read_csv(out)) == 3
