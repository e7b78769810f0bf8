"""Resuming DNIS search runs: SIGKILL at several moments, resume each time, same final result.

The reference is an uninterrupted `search_run` in a subprocess. The kill chain runs the same config
in subprocesses that are SIGKILLed when a checkpoint file appears or changes (plus a seeded random
delay, so the kill lands somewhere inside the next epoch): during the warm-up, during the bilevel
search, during the retrain of the first budget and between the budgets; each is resumed with
`resume=True` until one finishes. Its results must equal the reference's exactly (seconds aside).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dnis.app.config import load_config
from dnis.app.search import search_run
from dnis.data.loader import num_batches
from dnis.data.synthetic import load_synthetic
from dnis.errors import DnisError
from dnis.models import build
from dnis.search.dnis import DnisConfig, dnis
from dnis.tasks import make_task
from dnis.train.checkpoint import read_checkpoint, save_checkpoint
from dnis.train.progress import Progress
from dnis.train.trainer import TrainConfig

CONFIG = {
    "name": "resume",
    "seed": 0,
    "threads": 1,
    "dataset": {
        "name": "synthetic",
        "task": "ctr",
        "options": {"n_rows": 4000, "ranks": [4, 2], "noise_fields": 1, "vocab": 60},
    },
    "model": {"name": "deepfm"},  # dropout-free but with dense layers next to the embeddings
    "embedding": {"dim": 8},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.003, "patience": 0},
    "search": {
        "num_blocks": 3,
        "warmup_epochs": 2,
        "search_epochs": 3,
        "alpha_optimizer": "adam",  # optimizer state that must survive the kill
        "budgets": [0.3, 0.6],
    },
}
# warm-up + search + gradual pruning (one per budget) + retrains + the uniform fallback's trainings
EPOCHS = 2 + 3 + 2 + 2 * 2 + 2 * 2

DRIVER = """
import sys
from dnis.app.config import load_config
from dnis.app.search import search_run
from dnis.tasks import make_task
from dnis.train.progress import Progress

class Epochs(Progress):
    def epoch_start(self, epoch, batches): pass
    def batch_end(self): pass
    def epoch_end(self, record): print("epoch", record["epoch"], flush=True)

search_run(load_config(sys.argv[1]), progress=Epochs(), resume=sys.argv[2] == "resume")
print("done", flush=True)
"""


def write_config(root: Path) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(dict(CONFIG, output_dir=str(root / "runs"))), encoding="utf-8")
    return path


def command(root: Path, mode: str) -> list[str]:
    return [sys.executable, str(root / "driver.py"), str(root / "config.yaml"), mode]


def prepare(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "driver.py").write_text(DRIVER, encoding="utf-8")
    write_config(root)
    return root


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_dir(root: Path) -> Path:
    (found,) = (root / "runs").iterdir()
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run in a subprocess: its run folder."""
    root = prepare(tmp_path_factory.mktemp("reference"))
    done = subprocess.run(
        command(root, "fresh"), capture_output=True, text=True, timeout=300, env=environment()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch ") == EPOCHS
    return run_dir(root)


def without_seconds(value):
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def assert_close(got, want, where: str) -> None:
    """Equal structure and values, floats to 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{where}[{k}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), where
    else:
        assert got == want, where


def assert_same_run(actual: Path, expected: Path) -> None:
    """Same alpha, dims, metrics (to 1e-6) and compact weights as the reference run."""
    for name in ("results.json", "dims.json", "search.json"):
        got = without_seconds(json.loads((actual / name).read_text()))
        want = without_seconds(json.loads((expected / name).read_text()))
        assert_close(got, want, name)
    search = json.loads((actual / "search.json").read_text())
    assert search["alpha"] == json.loads((expected / "search.json").read_text())["alpha"]
    for budget in CONFIG["search"]["budgets"]:
        got = torch.load(actual / f"model-{budget}.pt", weights_only=True)
        want = torch.load(expected / f"model-{budget}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (budget, key)


def changed(path: Path, before: tuple[int, int] | None) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return (stat.st_ino, stat.st_mtime_ns) != before


def signature(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def run_until(root: Path, mode: str, target: str, delay: float) -> tuple[int, str]:
    """Start a run; SIGKILL it `delay` s after `target` (relative to the run folder) is written."""
    out = root / f"out-{time.monotonic_ns()}.txt"
    folder = next((root / "runs").iterdir(), None) if (root / "runs").exists() else None
    before = None if folder is None else signature(folder / target)
    with out.open("w") as handle:
        process = subprocess.Popen(
            command(root, mode), stdout=handle, stderr=subprocess.STDOUT, env=environment()
        )
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            folders = list((root / "runs").glob("*")) if (root / "runs").exists() else []
            if folders and changed(folders[0] / target, before):
                time.sleep(delay)
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        code = process.wait(timeout=120)
    return code, out.read_text()


def test_sigkilled_search_resumes_each_time_to_the_uninterrupted_result(
    reference: Path, tmp_path: Path
) -> None:
    root = prepare(tmp_path)
    budgets = CONFIG["search"]["budgets"]
    rng = random.Random(8)  # the moment inside the next epoch where each kill lands
    kills = [
        "search/warmup/checkpoint.pt",  # warm-up epoch 1 done: killed in warm-up epoch 2
        "search/checkpoint.pt",  # search epoch 1 done: killed in search epoch 2
        "search/prune/checkpoint.pt",  # pruning epoch 1 done: killed in pruning epoch 2
        f"retrain-{budgets[0]}/checkpoint.pt",  # killed in the retrain of budget 1
        f"result-{budgets[0]}.json",  # budget 1 finished: killed before or early in budget 2
    ]
    printed = 0
    for number, target in enumerate(kills):
        code, output = run_until(
            root, "resume" if number else "fresh", target, rng.uniform(0.0, 0.1)
        )
        assert code == -signal.SIGKILL, f"run {number} was not killed at {target}:\n{output}"
        assert "Traceback" not in output, output
        printed += output.count("epoch ")
    done = subprocess.run(
        command(root, "resume"), capture_output=True, text=True, timeout=300, env=environment()
    )
    assert done.returncode == 0, done.stderr
    printed += done.stdout.count("epoch ")
    # no epoch is redone once checkpointed (an epoch is printed after its checkpoint is written)
    assert printed <= EPOCHS
    assert done.stdout.count("epoch ") < EPOCHS  # the last run did not start over
    assert_same_run(run_dir(root), reference)


def copy_of(reference: Path, root: Path) -> Path:
    """The reference run folder under `root`, with a config pointing there."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference, root / "runs" / reference.name)
    return write_config(root)


class Counting(Progress):
    def __init__(self) -> None:
        self.epochs = 0

    def epoch_end(self, record) -> None:
        self.epochs += 1


def test_resuming_a_finished_run_trains_nothing_and_reloads_every_budget(
    reference: Path, tmp_path: Path
) -> None:
    config = load_config(copy_of(reference, tmp_path))
    progress = Counting()
    dataset, results = search_run(config, progress=progress, resume=True)
    assert progress.epochs == 0
    assert_same_run(config.run_dir(), reference)
    task = make_task(dataset)
    for result in results:  # the reloaded compact models score what their saved metrics say
        assert result.model is not None
        test = task.evaluate(result.model, "test", config.train.eval_batch_size)
        assert test == pytest.approx(result.metrics["test"], abs=1e-6)


def test_a_corrupt_search_checkpoint_is_refused(reference: Path, tmp_path: Path) -> None:
    config = load_config(copy_of(reference, tmp_path))
    path = config.run_dir() / "search" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DnisError) as info:
        search_run(config, resume=True)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "without --resume" in message


def test_a_search_checkpoint_of_another_config_is_refused(reference: Path, tmp_path: Path) -> None:
    config = load_config(copy_of(reference, tmp_path))
    path = config.run_dir() / "search" / "checkpoint.pt"
    _, state = read_checkpoint(path)
    save_checkpoint(path, state, "deadbeef")
    with pytest.raises(DnisError, match="different config") as info:
        search_run(config, resume=True)
    assert str(path) in str(info.value)


def test_dnis_checkpoints_resume_and_a_fresh_start_ignores_them(tmp_path: Path) -> None:
    """The library entry point: without `resume` old (even corrupt) checkpoints are removed."""
    torch.set_num_threads(1)
    dataset = load_synthetic(task="ctr", n_rows=1500, ranks=[2], noise_fields=1, vocab=20)

    def make(embedding):
        return build("fm", dataset.schema, embedding)

    kwargs = dict(
        dim=4,
        budget=[0.5],
        config=DnisConfig(num_blocks=2, warmup_epochs=1, search_epochs=2),
        train=TrainConfig(epochs=2, batch_size=256, patience=0),
        run_dir=tmp_path,
    )
    (first,) = dnis(make, dataset, **kwargs)
    assert (tmp_path / "search" / "checkpoint.pt").exists()
    assert (tmp_path / "retrain-0.5" / "checkpoint.pt").exists()
    (again,) = dnis(make, dataset, resume=True, **kwargs)  # finished: reload and evaluate only
    assert again.metrics == first.metrics and again.dims == first.dims
    (tmp_path / "search" / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(DnisError, match="corrupt"):
        dnis(make, dataset, resume=True, **kwargs)
    (fresh,) = dnis(make, dataset, **kwargs)
    assert fresh.metrics == first.metrics


def test_a_nan_search_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module("dnis.search.dnis")  # the package exports a function dnis

    torch.set_num_threads(1)
    dataset = load_synthetic(task="ctr", n_rows=1500, ranks=[2], noise_fields=1, vocab=20)
    make_task = module.make_task
    calls = {"n": 0}
    per_epoch = 2 * num_batches(dataset.train, 256)  # a model step and an alpha step per batch

    def poisoned(data):
        task = make_task(data)
        loss = task.loss

        def nan_after_one_epoch(model, ids, labels, generator=None):
            calls["n"] += 1
            value = loss(model, ids, labels, generator)
            return value * float("nan") if calls["n"] > per_epoch else value

        task.loss = nan_after_one_epoch
        return task

    monkeypatch.setattr(module, "make_task", poisoned)
    with pytest.raises(DnisError, match="search epoch 2"):
        module.search(
            lambda embedding: build("fm", dataset.schema, embedding),
            dataset,
            dim=4,
            config=DnisConfig(num_blocks=2, warmup_epochs=0, search_epochs=3),
            train=TrainConfig(batch_size=256),
            run_dir=tmp_path,
        )
    _, saved = read_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
