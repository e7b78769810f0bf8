"""The task contract: its loss, its metrics, and which metric drives early stopping."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dnis.data.dataset import EncodedDataset, Split
from dnis.data.loader import batches
from dnis.models.base import Model


class Task(ABC):
    name: str
    metric: str  # validation metric for early stopping and model selection
    higher_is_better: bool

    def __init__(self, dataset: EncodedDataset) -> None:
        self.dataset = dataset

    @abstractmethod
    def loss(
        self, model: Model, ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Training loss of one batch (`generator` drives any sampling, e.g. negatives)."""

    @abstractmethod
    def evaluate(self, model: Model, split: str, batch_size: int = 8192) -> dict[str, float]:
        """Metrics of `model` on a split ("valid" or "test")."""

    def better(self, new: float, best: float | None) -> bool:
        if best is None:
            return True
        return new > best if self.higher_is_better else new < best


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live: batches are moved there, scores come back to the CPU."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


@torch.no_grad()
def predict(model: Model, ids: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Scores of every row (on the CPU), in batches, in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [
        model(ids[start : start + batch_size].to(device)).cpu()
        for start in range(0, len(ids), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def predict_split(
    model: Model, split: Split, batch_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels of every row of a split (on the CPU), read in batches in file order.

    For splits on disk (`dnis.data.cache.DiskSplit`): memory holds one block of rows plus the
    scores, never the split's ids. The batches are the same row slices as `predict`'s. Scores go
    into one tensor allocated up front: keeping each batch's small output alive between the large
    freed buffers of the forward passes fragments the heap, which then grows with the rows.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    n = len(split)
    scores: torch.Tensor | None = None
    labels = torch.empty(n, dtype=torch.float32)
    start = 0
    for ids, target in batches(split, batch_size):
        out = model(ids.to(device)).cpu()
        if scores is None:
            scores = torch.empty(n, dtype=out.dtype)
        scores[start : start + len(ids)] = out
        labels[start : start + len(ids)] = target
        start += len(ids)
    model.train(was_training)
    return (torch.zeros(0) if scores is None else scores), labels
