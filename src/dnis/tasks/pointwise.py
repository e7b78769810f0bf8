"""Point-wise tasks: rating prediction (MSE; RMSE, MAE) and CTR prediction (BCE; AUC, logloss)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dnis.data.dataset import EncodedDataset
from dnis.models.base import Model
from dnis.tasks.base import Task, model_device, predict
from dnis.tasks.metrics import auc, logloss, mae, rmse


class RatingTask(Task):
    """Predictions are clipped to the training rating range at evaluation (as Surprise does)."""

    name = "rating"
    metric = "rmse"
    higher_is_better = False

    def __init__(self, dataset: EncodedDataset) -> None:
        super().__init__(dataset)
        labels = dataset.train.labels
        self.low, self.high = float(labels.min()), float(labels.max())

    def loss(self, model: Model, ids, labels, generator) -> torch.Tensor:
        device = model_device(model)
        return F.mse_loss(model(ids.to(device)), labels.to(device))

    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        data = self.dataset.split(split)
        pred = predict(model, data.ids, batch_size).clamp(self.low, self.high)
        return {"rmse": rmse(pred, data.labels), "mae": mae(pred, data.labels)}


class CTRTask(Task):
    name = "ctr"
    metric = "auc"
    higher_is_better = True

    def loss(self, model: Model, ids, labels, generator) -> torch.Tensor:
        device = model_device(model)
        return F.binary_cross_entropy_with_logits(model(ids.to(device)), labels.to(device))

    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        data = self.dataset.split(split)
        logits = predict(model, data.ids, batch_size)
        return {"auc": auc(logits, data.labels), "logloss": logloss(logits, data.labels)}
