"""ONNX: the model exported into `model.onnx` (opset 17), run with onnxruntime.

Needs the optional extra: ``pip install 'dnis[onnx]'`` (onnx, onnxruntime). The export uses
torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): it needs no extra
package and handles the models' ops, while the newer dynamo exporter (torch's default since 2.9)
needs onnxscript. The batch axis is dynamic; opset 17 is the first with every op used
(ScatterElements with reduction="add" for the ragged embedding needs 16).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnis.errors import DnisError

FILENAME = "model.onnx"
OPSET = 17
INPUT = "ids"
OUTPUT = "score"
INSTALL = "install the optional extra: pip install 'dnis[onnx]' (onnx and onnxruntime)"


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DnisError(
            f"the ONNX format needs onnxruntime, which is not installed; {INSTALL}"
        ) from None
    return onnxruntime


def write(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export `model` (already made traceable, in eval mode) with a dynamic batch axis."""
    require_onnxruntime()
    try:
        import onnx
    except ImportError:
        raise DnisError(f"the ONNX format needs the onnx package; {INSTALL}") from None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


class OnnxRunner:
    """Scores encoded ids [B, S] (int64) with an ONNX file in onnxruntime (CPU)."""

    def __init__(self, path: Path) -> None:
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self.session.run([OUTPUT], {INPUT: ids})[0]
