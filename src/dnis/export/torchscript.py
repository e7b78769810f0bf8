"""TorchScript: the model traced with example ids into `model.torchscript.pt`, run with torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

FILENAME = "model.torchscript.pt"


def write(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace `model` (already made traceable, in eval mode) on `example` ids and save it.

    Tracing records the operations one example batch runs; the export checks the saved graph
    against the eager model on other batches, so a shape or branch frozen by the trace is caught.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the deprecation notice of torch.jit
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


class TorchScriptRunner:
    """Scores encoded ids [B, S] (int64) with a saved TorchScript module."""

    def __init__(self, path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(ids))).numpy()
