"""Raw feature values in, scores out: the saved encoders in front of a model.

`load(path)` takes an export folder (TorchScript run with torch, ONNX with onnxruntime) or a run
folder (the PyTorch model itself), and returns a `Predictor`. Encoding is the training encoders'
vectorised `transform`: a value never seen in training (or below `min_count`, or missing) gets
the field's OOV id 0, a sequence is a list or a separator-joined string, a number is bucketed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from dnis.data.encode import Encoder
from dnis.errors import DataError, DnisError
from dnis.export.artifact import runner_for
from dnis.export.folder import CONFIG, ENCODERS, MANIFEST, read_manifest
from dnis.export.source import load_run, read_encoder
from dnis.models.base import Model

Runner = Callable[[np.ndarray], np.ndarray]
DEFAULT_ENCODING = "utf-8"


class EagerRunner:
    """Scores encoded ids with the PyTorch model of a run folder."""

    def __init__(self, model: Model) -> None:
        self.model = model.eval()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(ids))).numpy()


class Predictor:
    """Encodes raw values with the run's encoders and scores them with the model.

    - `raw(data)`: the model's output per row (logits for ctr, predicted ratings for rating).
    - `predict(data)`: the score a user wants: a click probability (sigmoid of the logit) for
      ctr, the model's output otherwise (ratings are not clipped to the training range).
    `data` is a pandas DataFrame or a mapping of column name -> values, one entry per row.
    """

    def __init__(
        self,
        encoder: Encoder,
        runner: Runner,
        *,
        task: str,
        backend: str,
        source: Path,
        manifest: dict[str, Any] | None = None,
        encoding: str = DEFAULT_ENCODING,
    ) -> None:
        self.encoder = encoder
        self.runner = runner
        self.task = task
        self.backend = backend  # torchscript | onnx | torch
        self.source = source
        self.manifest = manifest
        self.encoding = encoding  # of the training files: input CSVs are read with it by default

    @property
    def columns(self) -> list[str]:
        """Input columns the model needs, in field order."""
        return [spec.source for spec in self.encoder.schema.features]

    def check_columns(self, frame: pd.DataFrame, path: str | Path | None = None) -> None:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"missing feature column(s) {missing}: the model needs {self.columns}, the input "
                f"has {list(frame.columns)}",
                path=path or frame.attrs.get("source"),
                column=missing[0],
                fix="add the column(s) with raw values as in training (a sequence as a list or a "
                "separator-joined string; values never seen in training are fine, they map to the "
                "OOV id), or rename the input's columns to these names",
            )

    def frame(self, data: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
        if isinstance(data, pd.DataFrame):
            frame = data
        elif isinstance(data, Mapping):
            try:
                frame = pd.DataFrame(dict(data))
            except ValueError as error:
                raise DataError(f"the columns cannot form a table: {error}") from None
        else:
            raise DnisError(
                f"expected a pandas DataFrame or a mapping of columns, got {type(data).__name__}"
            )
        self.check_columns(frame)
        return frame

    def encode(self, data: pd.DataFrame | Mapping[str, Any]) -> np.ndarray:
        """Encoded ids [rows, slots] (int64), fields in the model's order."""
        return self.encoder.transform(self.frame(data))

    def score_ids(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(self.runner(np.asarray(ids, dtype=np.int64)), dtype=np.float32)

    def raw(self, data: pd.DataFrame | Mapping[str, Any], batch_size: int = 8192) -> np.ndarray:
        ids = self.encode(data)
        chunks = [self.score_ids(ids[s : s + batch_size]) for s in range(0, len(ids), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    def to_score(self, raw: np.ndarray) -> np.ndarray:
        if self.task == "ctr":
            return (1.0 / (1.0 + np.exp(-raw.astype(np.float64)))).astype(np.float32)
        return raw

    def predict(self, data: pd.DataFrame | Mapping[str, Any], batch_size: int = 8192) -> np.ndarray:
        return self.to_score(self.raw(data, batch_size))


def load(path: str | Path, budget: float | str | None = None, *, trust: bool = False) -> Predictor:
    """A Predictor for an export folder or a run folder (one budget of a search run).

    A TorchScript export is a program: loading it runs what its author put in it. It is loaded
    only with `trust=True` (`dnis predict --trust`); ONNX exports and run folders hold data only
    and need no such flag (docs/security.md).
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if budget is not None:
            raise DnisError(
                f"{path} is an export: it holds one model (budget {manifest.get('budget')}); "
                "drop --budget, or export the budget you want and use that export"
            )
        fmt = manifest["format"]
        if fmt == "torchscript" and not trust:
            raise DnisError(
                f"{path} is a TorchScript export, which is code: loading it runs whatever its "
                "author put in it. Pass --trust (Python: trust=True) if you trust where it came "
                "from, or score with an ONNX export or the run folder, which hold data only"
            )
        return Predictor(
            read_encoder(path / ENCODERS),
            runner_for(fmt, path / manifest["model_file"]),
            task=manifest["task"],
            backend=fmt,
            source=path,
            manifest=manifest,
            encoding=_export_encoding(path / CONFIG),
        )
    if (path / "config.yaml").is_file() or not path.exists():
        run = load_run(path, budget)
        return Predictor(
            run.encoder,
            EagerRunner(run.model),
            task=run.task,
            backend="torch",
            source=path,
            encoding=run.spec.encoding,
        )
    raise DnisError(
        f"{path} is neither a dnis export (no {MANIFEST}) nor a run folder (no config.yaml); "
        "pass the folder `dnis export` or `dnis train`/`dnis search` wrote"
    )


def _export_encoding(config: Path) -> str:
    """The text encoding of the training files, from the run config an export carries."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        encoding = data["dataset"].get("encoding", DEFAULT_ENCODING)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return DEFAULT_ENCODING  # the manifest's checksum already vouched for the file
    return encoding if isinstance(encoding, str) else DEFAULT_ENCODING
