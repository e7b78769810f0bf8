"""MLflow: one MLflow run per `dnis train|search|compare`, one child run per compare row.

It logs through an `MlflowClient` (never the global active run), so library use does not
disturb a caller's own `mlflow.start_run()`. The default store is a local file store, ./mlruns,
no server and no network; MLflow's usage telemetry is switched off unless the environment says
otherwise (MLFLOW_DISABLE_TELEMETRY).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dnis.app.track.base import Tracker, metric_key, numbers, param_text, require
from dnis.errors import ConfigError

MAX_KEY, MAX_VALUE = 250, 6000  # MLflow's limits on a param's key and value


def store_uri(uri: str | None) -> str:
    """The tracking URI: a plain path (or None: ./mlruns) becomes a local file store's URI."""
    if uri is None or len(urlparse(uri).scheme) <= 1:  # no scheme (or a Windows drive letter)
        return Path(uri or "mlruns").expanduser().resolve().as_uri()
    return uri


def import_mlflow(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # dnis reaches no server unasked
    if urlparse(uri).scheme == "file":
        # MLflow 3 keeps the file store in maintenance mode, behind this opt-in; it needs no
        # database (mlflow-skinny has none) and is what `mlflow ui --backend-store-uri` reads
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return require("mlflow", "mlflow")


class MlflowTracker(Tracker):
    active = True

    def __init__(self, *, uri: str | None, experiment: str, run_name: str, tags: dict[str, str]):
        self.uri = store_uri(uri)
        mlflow = import_mlflow(self.uri)
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        self.tags = tags
        try:
            self.client = mlflow.MlflowClient(self.uri)
            self.experiment_id = self._experiment(experiment)
            self.run_id = self.client.create_run(
                self.experiment_id, run_name=run_name, tags=tags
            ).info.run_id
        except mlflow.exceptions.MlflowException as error:
            raise ConfigError(
                f"tracking: MLflow cannot use the store {self.uri} (tracking.mlflow_uri): "
                f"{error.message}"
            ) from None
        self.closed = False

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except Exception:  # another process created it meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _metrics(self, step: int, metrics: Mapping[str, Any], prefix: str) -> list[Any]:
        now = int(time.time() * 1000)
        return [
            self._metric(metric_key(k, prefix), v, now, step) for k, v in numbers(metrics).items()
        ]

    def _params(self, params: Mapping[str, Any]) -> list[Any]:
        return [
            self._param(metric_key(str(k))[:MAX_KEY], param_text(v)[:MAX_VALUE])
            for k, v in params.items()
        ]

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=self._params(params))

    def log_metrics(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        self.client.log_batch(self.run_id, metrics=self._metrics(step, metrics, prefix))

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def log_child(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        tags = {**self.tags, "mlflow.parentRunId": self.run_id}
        child = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.client.log_batch(
            child, metrics=self._metrics(0, metrics, ""), params=self._params(params)
        )
        self.client.set_terminated(child)

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed:
            self.closed = True
            self.client.set_terminated(self.run_id, status)
