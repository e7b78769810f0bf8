"""The export folder: the graph, the encoders, the config and a manifest, written atomically.

    <output>/
      model.torchscript.pt | model.onnx   the compact model: encoded ids [B, S] -> scores [B]
      (or, for --format torchrec, torchrec_tables.json + weights.pt + dense.pt: TorchRec table
      configs and weights, no scoring graph; see `dnis.export.torchrec`)
      encoders.json                       the run's fitted encoders (raw values -> ids)
      config.yaml                         the run's resolved config (a copy)
      manifest.json                       what it is: format, model, fields in order, budget,
                                          parameter counts, bytes and sha256 of every file,
                                          versions, and the check against the eager model

The folder is built in a temporary folder beside `output` and renamed into place, so a reader
sees the old export or the new one, never a half-written one. An existing export at `output`
is replaced; anything else there is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dnis
from dnis.errors import DnisError
from dnis.export import onnx as onnx_format
from dnis.export import torchscript
from dnis.export.source import RunModel, load_run, run_summary
from dnis.export.traceable import example_ids, traceable
from dnis.io import write_json

FORMATS: dict[str, str] = {
    "torchscript": torchscript.FILENAME,
    "onnx": onnx_format.FILENAME,
    "torchrec": "torchrec_tables.json",  # tables and weights, no graph: dnis.export.torchrec
}
MANIFEST = "manifest.json"
ENCODERS = "encoders.json"
CONFIG = "config.yaml"
FORMAT_VERSION = 1
TRACE_ROWS = 16  # example batch the graph is traced with
CHECK_ROWS = 257  # a different batch size, so a batch size frozen by the trace is caught
CHECK_TOLERANCE = 1e-4  # refuse an export whose graph disagrees more (relative to 1 + |score|)
# How `predict` turns the graph's output into the score column, per task.
SCORE = {"ctr": "sigmoid", "rating": "identity", "topk": "identity"}


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def model_bytes(self) -> int:
        return int(self.manifest["model_bytes"])


def default_output(run: RunModel, fmt: str) -> Path:
    suffix = "" if run.budget is None else f"-{run.budget:g}"
    return run.run_dir / f"export-{fmt}{suffix}"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DnisError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def runner_for(fmt: str, path: Path):
    """A callable scoring encoded ids [B, S] with the graph file of format `fmt`."""
    if fmt == "torchrec":
        raise DnisError(
            f"{path.parent} is a TorchRec export (table configs and weights, no scoring graph): "
            "load it into TorchRec, or predict with the run folder or a torchscript/onnx export"
        )
    if fmt == "onnx":
        return onnx_format.OnnxRunner(path)
    return torchscript.TorchScriptRunner(path)


def check_graph(run: RunModel, fmt: str, path: Path) -> float:
    """Max |graph - eager| / (1 + |eager|) on fresh ids; refuses the export when it is too large."""
    ids = example_ids(run.model.embedding.layout, CHECK_ROWS, seed=1)
    with torch.no_grad():
        expected = run.model(ids).numpy()
    got = runner_for(fmt, path)(ids.numpy())
    if got.shape != expected.shape:
        raise DnisError(
            f"the exported {fmt} graph of {run.run_dir} returns shape {got.shape} for "
            f"{CHECK_ROWS} rows instead of {expected.shape}; {run.model_name} does not export "
            "faithfully (please report it)"
        )
    error = float(np.max(np.abs(got - expected) / (1.0 + np.abs(expected)), initial=0.0))
    if not error <= CHECK_TOLERANCE:
        raise DnisError(
            f"the exported {fmt} graph of {run.run_dir} disagrees with the PyTorch model "
            f"(relative error {error:.2e} > {CHECK_TOLERANCE:g}); {run.model_name} does not "
            "export faithfully (please report it)"
        )
    return float(np.max(np.abs(got - expected), initial=0.0))


def build_manifest(run: RunModel, fmt: str, folder: Path, max_abs_diff: float) -> dict[str, Any]:
    encoder = run.encoder
    graph = FORMATS[fmt]
    counts = run.parameter_counts()
    full = run.full_embedding_params()
    files = {name: file_entry(folder / name) for name in (graph, ENCODERS, CONFIG)}
    versions = {
        "dnis": dnis.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if fmt == "onnx":
        versions["opset"] = onnx_format.OPSET
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "model_file": graph,
        "model": run.model_name,
        "task": run.task,
        "budget": run.budget,
        "source": run_summary(run),
        "fields": [
            {"name": s.name, "column": s.source, "kind": s.kind, "slots": s.width}
            for s in encoder.schema.features
        ],
        "input": {
            "name": onnx_format.INPUT,
            "dtype": "int64",
            "shape": ["batch", encoder.schema.num_slots],
        },
        "output": {"name": onnx_format.OUTPUT, "dtype": "float32", "shape": ["batch"]},
        "score": SCORE.get(run.task, "identity"),
        "parameters": {**counts, "full_embedding": full},
        "embedding_fraction": round(counts["embedding"] / full, 6) if full else None,
        "embedding_bytes": int(run.model.embedding.memory_bytes()),
        "model_bytes": files[graph]["bytes"],
        "bytes": sum(entry["bytes"] for entry in files.values()),
        "files": files,
        "check": {"rows": CHECK_ROWS, "max_abs_diff": max_abs_diff},
        "versions": versions,
    }


def export_run(
    run_dir: str | Path | RunModel,
    fmt: str = "torchscript",
    *,
    budget: float | str | None = None,
    output: str | Path | None = None,
) -> ExportResult:
    """Export the compact model of a run (one budget of a search run) with its encoders."""
    check_format(fmt)
    run = run_dir if isinstance(run_dir, RunModel) else load_run(run_dir, budget)
    if fmt == "torchrec":  # tables and weights instead of a graph
        from dnis.export import torchrec as torchrec_format

        return torchrec_format.export(
            run, Path(output) if output is not None else default_output(run, fmt)
        )
    if fmt == "onnx":
        onnx_format.require_onnxruntime()  # before any work
    target = Path(output) if output is not None else default_output(run, fmt)
    refuse_foreign(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model = traceable(run.model)
        example = example_ids(model.embedding.layout, TRACE_ROWS, seed=0)
        writer = onnx_format.write if fmt == "onnx" else torchscript.write
        try:
            writer(model, example, staging / FORMATS[fmt])
        except DnisError:
            raise
        except Exception as error:  # the tracer or exporter failed: not the user's mistake
            first = (str(error).strip().splitlines() or [""])[0][:300]
            raise DnisError(
                f"the {fmt} export of {run.model_name} failed ({type(error).__name__}: {first}); "
                f"try the other format, and please report it with torch {torch.__version__}"
            ) from error
        run.encoder.save(staging / ENCODERS)
        shutil.copyfile(run.run_dir / CONFIG, staging / CONFIG)
        diff = check_graph(run, fmt, staging / FORMATS[fmt])
        manifest = build_manifest(run, fmt, staging, diff)
        write_json(staging / MANIFEST, manifest)
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(target, manifest)


def refuse_foreign(target: Path) -> None:
    """An existing export may be replaced; any other file or non-empty folder is left alone."""
    if not target.exists():
        return
    if target.is_dir() and ((target / MANIFEST).is_file() or not any(target.iterdir())):
        return
    raise DnisError(
        f"{target} exists and is not a dnis export; choose another --output or remove it"
    )


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target` to fill; renamed to `target` when the block succeeds,
    removed when it fails (`target` must be absent, empty or an earlier export)."""
    refuse_foreign(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        fsync_dir(staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an old export there is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export folder; with `verify`, every file's size and sha256 are checked."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DnisError(f"{path} cannot be read ({error}); export the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise DnisError(f"{path} is not a dnis export manifest; export the run again")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DnisError(
            f"{folder} was exported by a newer dnis (format {manifest['format_version']}); "
            "upgrade dnis to read it"
        )
    if verify:
        for name, entry in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise DnisError(f"{folder} is incomplete: {name} is missing; export the run again")
            if file_entry(file) != entry:
                raise DnisError(
                    f"{file} is corrupt or was changed after the export (its size or sha256 "
                    "differs from manifest.json); export the run again"
                )
    return manifest
