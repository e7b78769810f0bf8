"""TensorBoard: event files in the run folder (`<run>/tensorboard/<command>/` by default).

Scalars per epoch and the final ones; the resolved config and report.md / compare.md as text;
the plots as images; each compare row as an hparams session (the HPARAMS tab's table).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dnis.app.track.base import Tracker, metric_key, numbers, param_text, require


class TensorBoardTracker(Tracker):
    active = True

    def __init__(self, logdir: Path, *, fresh: bool = True) -> None:
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        if fresh:  # a fresh run replaces the old curves; a resumed one continues them
            for old in logdir.rglob("events.out.tfevents.*"):
                old.unlink()
        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        rows = "".join(f"| `{k}` | `{param_text(v)}` |\n" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows)

    def log_metrics(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in numbers(metrics).items():
            self.writer.add_scalar(metric_key(key, prefix), value, step)

    def log_artifact(self, path: Path) -> None:
        """Markdown as text, PNG plots as images; other files stay in the run folder only."""
        if path.suffix == ".md":
            self.writer.add_text(path.name, path.read_text(encoding="utf-8"))
        elif path.suffix == ".png":
            from matplotlib.image import imread

            self.writer.add_image(path.name, imread(path)[..., :3], dataformats="HWC")

    def log_child(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        hparams = {
            k: v if isinstance(v, str | bool | int | float) else param_text(v)
            for k, v in params.items()
        }
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # "dnis budget=0.25 seed=0": a folder
        self.writer.add_hparams(hparams, numbers(metrics), run_name=folder)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
