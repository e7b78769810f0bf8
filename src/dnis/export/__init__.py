"""Ship a compact model: export it with its encoders, load it back, score raw values.

    from dnis import export
    result = export.export_run("runs/deepfm-ml-ctr-1a2b3c4d", "onnx", budget=0.25)
    predictor = export.load(result.path)          # or a run folder: the PyTorch model itself
    scores = predictor.predict({"user": ["1"], "item": ["31"], ...})

See `dnis.export.folder` for the folder layout and the manifest. `export_run(run, "torchrec")`
writes TorchRec table configs and weights instead of a graph; `TorchRecTables` reads them back
(see `dnis.export.torchrec`).
"""

from dnis.export.artifact import export_run
from dnis.export.folder import FORMATS, ExportResult, read_manifest
from dnis.export.predictor import Predictor, load
from dnis.export.scoring import ScoredFile, predict_file
from dnis.export.source import RunModel, load_run
from dnis.export.torchrec import TorchRecTables

__all__ = [
    "FORMATS", "ExportResult", "Predictor", "RunModel", "ScoredFile", "TorchRecTables",
    "export_run", "load", "load_run", "predict_file", "read_manifest",
]  # fmt: skip
