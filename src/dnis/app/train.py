"""A training run from a config: load data, build the model around its embedding, train, write.

`runs/<name>-<config hash>/` receives: config.yaml (resolved), encoder.json (fitted on train),
metrics.jsonl (one line per epoch), checkpoint.pt (resume point), model.pt (best weights) and
final.json (validation and test metrics, parameter counts, times). All written atomically.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnis import distributed, models
from dnis.app import track
from dnis.app.config import Config, DatasetConfig
from dnis.data.catalog import load
from dnis.data.checks import check_splits
from dnis.data.dataset import EncodedDataset
from dnis.data.schema import Schema
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.io import atomic_write, write_json, write_yaml
from dnis.models.base import Model
from dnis.tasks import make_task
from dnis.train.progress import Progress
from dnis.train.trainer import Trainer, resolve_device


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def load_dataset(
    config: DatasetConfig, seed: int, output_dir: str | Path = "runs"
) -> EncodedDataset:
    """The config's dataset. With `dataset.streaming`, it is built into (or reused from) the
    on-disk cache, by default in `<output_dir>/.cache`: pass the run's `output_dir` (a
    config's default is "runs")."""
    if config.name is not None:
        return load(config.name, config.task, path=config.path, seed=seed, **config.options)
    from dnis.data.tabular import load_files

    assert config.format is not None and config.schema is not None and config.path is not None
    return load_files(
        format=config.format,
        path=config.path,
        schema=Schema.from_dict(config.schema, where="dataset.schema"),
        task=config.task,
        split=config.split,
        seed=seed,
        delimiter=config.delimiter,
        header=config.header,
        names=config.names,
        encoding=config.encoding,
        streaming=config.streaming_options(output_dir),
    )


def model_factory(config: Config, dataset: EncodedDataset) -> Callable[[nn.Module], Model]:
    """Builds the configured model around whatever embedding it is given (search swaps it),
    on the configured device: every method builds its models here, so none needs to know it."""
    device = distributed.local_device(resolve_device(config.train.device))
    base = make_task(dataset).base_score()

    def build(embedding: nn.Module) -> Model:
        model = models.build(config.model.name, dataset.schema, embedding, **config.model.params)
        bias = model.output_bias()
        if base is not None and bias is not None:
            with torch.no_grad():  # start at the labels' mean, not 0 (a 3.5-star offset for MF)
                bias.fill_(base)
        return model.to(device)

    return build


def build_model(config: Config, dataset: EncodedDataset) -> Model:
    """The model, around a full-width fused embedding, initialised from the run's seed."""
    torch.manual_seed(config.seed)
    embedding = FusedEmbedding(
        FieldLayout.from_dataset(dataset), config.embedding.dim, config.embedding.init_std
    )
    return model_factory(config, dataset)(embedding)


def parameter_counts(model: Model) -> dict[str, int]:
    embedding = sum(p.numel() for p in model.embedding.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": embedding, "other": total - embedding, "total": total}


def start_run(config: Config, run_dir: Path) -> EncodedDataset:
    """Write the resolved config, load the data, save its encoders: the start of every run."""
    if config.threads:
        torch.set_num_threads(config.threads)
    with distributed.main_first():  # rank 0 builds a streaming cache, the others reuse it
        dataset = load_dataset(config.dataset, config.seed, config.output_dir)
    # bad data, and splits a run cannot use (empty, or one class for ctr), fail before any folder
    source = config.dataset.name or config.dataset.path  # a registered dataset, or your file(s)
    files = isinstance(source, dict)
    method = None if config.dataset.name or files else config.dataset.split
    check_splits(dataset, source=source if files else str(source), method=method)
    write_yaml(run_dir / "config.yaml", config.to_dict())
    dataset.encoder.save(run_dir / "encoder.json")
    return dataset


def train(config: Config, *, resume: bool = False, progress: Progress | None = None) -> RunResult:
    run_dir = config.run_dir()
    if not resume and (run_dir / "checkpoint.pt").exists():
        (run_dir / "checkpoint.pt").unlink()  # a fresh run must not inherit an old resume point
    track.check(config.tracking)  # a missing tracker package fails before any work
    dataset = start_run(config, run_dir)
    with track.open_tracker(config, "train", fresh=not resume) as tracker:
        model = build_model(config, dataset)
        task = make_task(dataset)
        trainer = Trainer(
            model,
            task,
            config.train,
            run_dir=run_dir,
            progress=track.track_progress(progress, tracker),
            config_hash=config.digest(),
        )
        started = time.perf_counter()
        result = trainer.fit(resume=resume)
        atomic_write(run_dir / "model.pt", lambda handle: torch.save(model.state_dict(), handle))
        test = task.evaluate(model, "test", config.train.eval_batch_size)
        metrics = {
            "run": run_dir.name,
            "dataset": dataset.summary(),
            "model": config.model.name,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "epoch_cap_hit": result.capped,
            "valid": result.valid,
            "test": test,
            "params": parameter_counts(model),
            "train_seconds": round(result.train_seconds, 3),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        }
        write_json(run_dir / "final.json", metrics)
        final = {k: metrics[k] for k in ("valid", "test", "params", "best_epoch", "epochs_run")}
        final.update(train_seconds=metrics["train_seconds"], wall_seconds=metrics["wall_seconds"])
        tracker.log_metrics(result.best_epoch, track.numbers(final, sep="_"), "final")
        track.log_files(tracker, run_dir, ["config.yaml", "final.json", "metrics.jsonl"])
    return RunResult(run_dir, metrics)
