"""Splits a run cannot use are refused before training, by every command, in memory and streamed:
an empty split (DNIS's alpha steps would wait forever for a validation batch) or a CTR split of
one class (AUC undefined). The message names the split, the rows and what to change."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dnis.cli import main
from dnis.data.dataset import build_dataset
from dnis.data.schema import Schema
from dnis.errors import DnisError
from dnis.models import build
from dnis.search.dnis import DnisConfig, search
from dnis.train import TrainConfig

CLICKS = {"features": ["user", "item"], "label": "clicked"}
VISITS = {"features": ["user", "item"], "user": "user", "item": "item", "time": "t"}


def clicks(labels: list[int]) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {"user": [f"u{i % 7}" for i in range(n)], "item": [f"i{i % 5}" for i in range(n)],
         "clicked": labels}
    )  # fmt: skip


def one_file(frame: pd.DataFrame) -> Callable[[Path], str]:
    def write(folder: Path) -> str:
        frame.to_csv(folder / "data.csv", index=False)
        return str(folder / "data.csv")

    return write


def three_files(**labels: list[int]) -> Callable[[Path], dict[str, str]]:
    def write(folder: Path) -> dict[str, str]:
        paths = {}
        for split, values in labels.items():
            clicks(values).to_csv(folder / f"{split}.csv", index=False)
            paths[split] = str(folder / f"{split}.csv")
        return paths

    return write


BOTH = [0, 1] * 20
# (data, task, schema, what the message must say); every case runs through train, search and
# compare, and the csv/ctr/rating ones also with dataset.streaming: true
CASES = {
    "one row": (
        one_file(clicks([1])),
        "ctr",
        CLICKS,
        [
            "the validation and test splits are empty",
            "data.csv has 1 row;",
            "gives train 1, valid 0, test 0",
            "from 8 rows on",
            "{train: ..., valid: ..., test: ...}",
        ],
    ),  # fmt: skip
    "five rows": (
        one_file(clicks([0, 1, 0, 1, 1]).rename(columns={"clicked": "stars"})),
        "rating",
        {"features": ["user", "item"], "label": "stars"},
        ["the validation split is empty", "data.csv has 5 rows;", "train 4, valid 0, test 1"],
    ),
    "no user with 3 interactions": (
        one_file(
            pd.DataFrame(
                {"user": ["a", "a", "b", "b"], "item": ["x", "y", "x", "z"], "t": [1, 2, 3, 4]}
            )
        ),
        "topk",
        VISITS,
        [
            "the validation and test splits are empty",
            "split: leave_last_out",
            "each user needs 3 or more interactions",
        ],
    ),  # fmt: skip
    "train of one class": (
        one_file(clicks([0] * 40)),
        "ctr",
        CLICKS,
        [
            "every label of the training split is 0",
            "(32 rows: 32 of class 0, 0 of class 1)",
            "cannot learn from one class",
            "give every split both labels",
        ],
    ),  # fmt: skip
    "valid of one class": (
        three_files(train=BOTH, valid=[1] * 5, test=BOTH[:6]),
        "ctr",
        CLICKS,
        [
            "every label of the validation split is 1",
            "(5 rows: 0 of class 0, 5 of class 1)",
            "valid.csv: every label",
            "AUC is undefined",
            "early stopping",
        ],
    ),  # fmt: skip
    "test of one class": (
        three_files(train=BOTH, valid=BOTH[:6], test=[0] * 3),
        "ctr",
        CLICKS,
        ["every label of the test split is 0", "(3 rows: 3 of class 0, 0 of class 1)"],
    ),
}
STREAMABLE = [name for name, case in CASES.items() if case[1] != "topk"]


def write_config(folder: Path, case: str, streaming: bool) -> Path:
    make, task, schema, _ = CASES[case]
    config = {
        "output_dir": str(folder / "runs"),
        "dataset": {"format": "csv", "path": make(folder), "task": task, "schema": schema,
                    "streaming": streaming},
        "model": {"name": "bprmf" if task == "topk" else "fm"},
        "embedding": {"dim": 4},
        "train": {"epochs": 1, "batch_size": 16},
        "search": {"warmup_epochs": 0, "search_epochs": 1, "budgets": [0.5]},
        "compare": {"methods": ["uniform"], "budgets": [0.5], "seeds": 1},
    }  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def flat(text: str) -> str:
    """The message without the console's line wrapping."""
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["train", "search", "compare"])
@pytest.mark.parametrize(
    "case, streaming",
    [(name, False) for name in CASES] + [(name, True) for name in STREAMABLE],
)
def test_unusable_split_is_refused_before_training(
    tmp_path: Path, capsys, command: str, case: str, streaming: bool
) -> None:
    config = write_config(tmp_path, case, streaming)
    assert main([command, "--config", str(config)] + (["--quiet"] * (command != "compare"))) == 2
    err = flat(capsys.readouterr().err)
    for fragment in CASES[case][3]:
        assert fragment in err, err
    assert not list((tmp_path / "runs").rglob("config.yaml"))  # refused before any run folder
    assert not list((tmp_path / "runs").rglob("*.pt"))
    if streaming:  # the same refusal from the on-disk cache
        assert list((tmp_path / "runs" / ".cache").glob("*/meta.json"))


@pytest.mark.parametrize("streaming", [False, True])
def test_search_on_one_row_exits_instead_of_hanging(tmp_path: Path, streaming: bool) -> None:
    """The watchdog: `dnis search` on a 1-row file used to loop forever in the alpha steps."""
    config = write_config(tmp_path, "one row", streaming)
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dnis", "search", "--config", str(config), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here with TimeoutExpired, not by blocking the suite
        env=env,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the validation and test splits are empty" in flat(done.stderr)


def test_search_refuses_an_empty_validation_split_instead_of_spinning() -> None:
    """The library call, which skips the run's checks: the alpha steps' batch cycle refuses an
    empty validation split (watched from a thread, so a regression fails instead of hanging)."""
    schema = Schema.from_dict(CLICKS)
    data = build_dataset(clicks([1, 0]), schema, "ctr")  # 80/10/10 of 2 rows: train 2, valid 0
    assert len(data.valid) == 0
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            search(
                lambda embedding: build("fm", data.schema, embedding),
                data,
                dim=4,
                config=DnisConfig(warmup_epochs=0, search_epochs=1, budgets=[0.5]),
                train=TrainConfig(epochs=1, batch_size=4),
            )
            outcome.append(None)
        except BaseException as error:  # handed to the test's thread
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert outcome, "search still running after 120 s: it spins on the empty validation split"
    assert isinstance(outcome[0], DnisError)
    assert "validation split is empty" in str(outcome[0])
