"""The export folder every format writes: its file names, its manifest, and the atomic write.

    <output>/
      the format's model files   model.torchscript.pt | model.onnx (a scoring graph), or
                                 torchrec_tables.json + weights.pt + dense.pt (`dnis.export.torchrec`)
      encoders.json              the run's fitted encoders (raw values -> ids)
      config.yaml                the run's resolved config (a copy)
      manifest.json              what it is: format, model, fields in order, budget, parameter
                                 counts, bytes and sha256 of every file, versions, and the check
                                 against the eager model

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dnis
from dnis.errors import DnisError
from dnis.export import onnx as onnx_format
from dnis.export import torchscript
from dnis.export.source import RunModel, run_summary

FORMATS: dict[str, str] = {  # format -> the file the manifest names as its model_file
    "torchscript": torchscript.FILENAME,
    "onnx": onnx_format.FILENAME,
    "torchrec": "torchrec_tables.json",  # tables and weights, no graph: dnis.export.torchrec
}
MANIFEST = "manifest.json"
ENCODERS = "encoders.json"
CONFIG = "config.yaml"
FORMAT_VERSION = 1
# How `predict` turns the graph's output into the score column, per task.
SCORE = {"ctr": "sigmoid", "rating": "identity", "topk": "identity"}


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]

    @property
    def model_bytes(self) -> int:
        return int(self.manifest["model_bytes"])


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DnisError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def default_output(run: RunModel, fmt: str) -> Path:
    suffix = "" if run.budget is None else f"-{run.budget:g}"
    return run.run_dir / f"export-{fmt}{suffix}"


def file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_run_files(run: RunModel, folder: Path) -> None:
    """The run's encoders and a copy of its config, beside the model files."""
    run.encoder.save(folder / ENCODERS)
    shutil.copyfile(run.run_dir / CONFIG, folder / CONFIG)


def build_manifest(
    run: RunModel,
    fmt: str,
    folder: Path,
    model_files: Sequence[str],
    *,
    embedding_bytes: int,
    check: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of an export in `folder`: what every format records. `model_files` are the
    format's files (the first is its `model_file`), `check` how it was compared with the model."""
    encoder = run.encoder
    files = {name: file_entry(folder / name) for name in (*model_files, ENCODERS, CONFIG)}
    counts = run.parameter_counts()
    full = run.full_embedding_params()
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "model_file": model_files[0],
        "model": run.model_name,
        "task": run.task,
        "budget": run.budget,
        "source": run_summary(run),
        "fields": [
            {"name": s.name, "column": s.source, "kind": s.kind, "slots": s.width}
            for s in encoder.schema.features
        ],
        "input": {"dtype": "int64", "shape": ["batch", encoder.schema.num_slots]},
        "score": SCORE.get(run.task, "identity"),
        "parameters": {**counts, "full_embedding": full},
        "embedding_fraction": round(counts["embedding"] / full, 6) if full else None,
        "embedding_bytes": embedding_bytes,
        "model_bytes": sum(files[name]["bytes"] for name in model_files),
        "bytes": sum(entry["bytes"] for entry in files.values()),
        "files": files,
        "check": check,
        "versions": {
            "dnis": dnis.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


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
