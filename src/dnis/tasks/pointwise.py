"""Point-wise tasks: rating prediction (MSE; RMSE, MAE) and CTR prediction (BCE; AUC, logloss)."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from dnis.data.cache import DiskSplit
from dnis.data.dataset import EncodedDataset, Split
from dnis.data.loader import label_mean, label_range
from dnis.models.base import Model
from dnis.tasks.base import Task, model_device, predict, predict_split
from dnis.tasks.metrics import auc, logloss, mae, rmse


class RatingTask(Task):
    """Predictions are clipped to the training rating range at evaluation (as Surprise does)."""

    name = "rating"
    metric = "rmse"
    higher_is_better = False

    def __init__(self, dataset: EncodedDataset) -> None:
        super().__init__(dataset)
        self.low, self.high = label_range(dataset.train)

    def base_score(self) -> float:
        """The mean training rating: the constant of least squared error."""
        return label_mean(self.dataset.train)

    def loss(self, model: Model, ids, labels, generator) -> torch.Tensor:
        device = model_device(model)
        return F.mse_loss(model(ids.to(device)), labels.to(device))

    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        pred, labels = _scores(model, self.dataset.split(split), batch_size)
        pred = pred.clamp(self.low, self.high)
        return {"rmse": rmse(pred, labels), "mae": mae(pred, labels)}


class CTRTask(Task):
    name = "ctr"
    metric = "auc"
    higher_is_better = True

    def base_score(self) -> float:
        """The log-odds of the training click rate: the constant logit of least log loss."""
        rate = label_mean(self.dataset.train)
        rate = min(max(rate, 1e-6), 1 - 1e-6)
        return math.log(rate / (1 - rate))

    def loss(self, model: Model, ids, labels, generator) -> torch.Tensor:
        device = model_device(model)
        return F.binary_cross_entropy_with_logits(model(ids.to(device)), labels.to(device))

    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        logits, labels = _scores(model, self.dataset.split(split), batch_size)
        return {"auc": auc(logits, labels), "logloss": logloss(logits, labels)}


def _scores(model: Model, data: Split, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels of a whole split; a split on disk is read in batches (same slices)."""
    if isinstance(data, DiskSplit):
        return predict_split(model, data, batch_size)
    return predict(model, data.ids, batch_size), data.labels
