"""Export a run's compact model as a scoring graph (TorchScript or ONNX), or as TorchRec tables.

The graph maps encoded ids [B, S] to scores [B]; it is written with the run's encoders, its
config and a manifest into one export folder (`dnis.export.folder`), and the export is refused
unless the graph equals the eager model on a fresh batch. `--format torchrec` writes TorchRec
table configs and weights instead of a graph (`dnis.export.torchrec`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dnis.errors import DnisError
from dnis.export import onnx as onnx_format
from dnis.export import torchrec as torchrec_format
from dnis.export import torchscript
from dnis.export.folder import (
    FORMATS,
    MANIFEST,
    ExportResult,
    build_manifest,
    check_format,
    default_output,
    staged,
    write_run_files,
)
from dnis.export.source import RunModel, load_run
from dnis.export.traceable import example_ids, traceable
from dnis.io import write_json

TRACE_ROWS = 16  # example batch the graph is traced with
CHECK_ROWS = 257  # a different batch size, so a batch size frozen by the trace is caught
CHECK_TOLERANCE = 1e-4  # refuse an export whose graph disagrees more (relative to 1 + |score|)


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
    target = Path(output) if output is not None else default_output(run, fmt)
    if fmt == "torchrec":  # tables and weights instead of a graph
        return torchrec_format.export(run, target)
    if fmt == "onnx":
        onnx_format.require_onnxruntime()  # before any work
    with staged(target) as staging:
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
        write_run_files(run, staging)
        diff = check_graph(run, fmt, staging / FORMATS[fmt])
        manifest = build_manifest(
            run,
            fmt,
            staging,
            [FORMATS[fmt]],
            embedding_bytes=int(run.model.embedding.memory_bytes()),
            check={"rows": CHECK_ROWS, "max_abs_diff": diff},
        )
        manifest["input"] = {"name": onnx_format.INPUT, **manifest["input"]}
        manifest["output"] = {"name": onnx_format.OUTPUT, "dtype": "float32", "shape": ["batch"]}
        if fmt == "onnx":
            manifest["versions"]["opset"] = onnx_format.OPSET
        write_json(staging / MANIFEST, manifest)
    return ExportResult(target, manifest)
