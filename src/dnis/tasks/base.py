"""The task contract: its loss, its metrics, and which metric drives early stopping."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dnis import distributed
from dnis.data.cache import DiskSplit
from dnis.data.dataset import EncodedDataset
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

    def base_score(self) -> float | None:
        """The score that fits the training labels best before any feature is used (the model's
        global bias starts there), or None when the task has no such offset (ranking)."""
        return None

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
    """Scores of every row (on the CPU), in batches, in eval mode (the caller's mode is restored).

    Under torchrun each rank scores its run of batches and every rank gets all the scores.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    first, last = distributed.eval_range(len(ids), batch_size)
    out = [
        model(ids[start : min(start + batch_size, last)].to(device)).cpu()
        for start in range(first, last, batch_size)
    ]
    model.train(was_training)
    return distributed.gather(torch.cat(out) if out else torch.zeros(0))


@torch.no_grad()
def predict_split(
    model: Model, split: DiskSplit, batch_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels of every row of a split on disk (on the CPU), read in batches in file
    order: memory holds one batch of rows plus the scores, never the split's ids. The batches are
    the same row slices as `predict`'s (and shared between ranks the same way). Scores go into one
    tensor allocated up front: keeping each batch's small output alive between the large freed
    buffers of the forward passes fragments the heap, which then grows with the rows.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    first, last = distributed.eval_range(len(split), batch_size)
    scores = torch.empty(0)
    labels = torch.empty(last - first, dtype=torch.float32)
    for start in range(first, last, batch_size):
        ids_np, target = split.read(start, min(start + batch_size, last))
        out = model(torch.from_numpy(ids_np).long().to(device)).cpu()
        if start == first:
            scores = torch.empty(last - first, dtype=out.dtype)
        scores[start - first : start - first + len(out)] = out
        labels[start - first : start - first + len(out)] = torch.from_numpy(target)
    model.train(was_training)
    return distributed.gather(scores), distributed.gather(labels)
