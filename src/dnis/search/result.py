"""The result every search method returns, so `compare` is a loop over methods, not a switch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dnis.models.base import Model


@dataclass
class SearchResult:
    method: str
    metric: str  # the task's primary validation metric, e.g. "auc"
    budget: float  # as asked: a fraction of the full embedding, or a parameter count
    full_params: int  # embedding parameters of the full-width model
    embedding_params: int  # embedding parameters of the compact model
    memory_bytes: int  # bytes of the compact embedding, index overhead included
    dims: dict[str, Any]  # per field: width of every block, or width statistics per id
    metrics: dict[str, dict[str, float]]  # {"valid": ..., "test": ...} of the retrained model
    before: dict[str, dict[str, float]] = field(default_factory=dict)  # full model, before pruning
    pruned: dict[str, float] = field(default_factory=dict)  # valid metrics pruned, not retrained
    search_seconds: float = 0.0
    retrain_seconds: float = 0.0
    # epochs of the final model's training (early-stopped on validation, like every method's),
    # and whether it stopped at the train.epochs cap instead
    train_epochs: int = 0
    epoch_cap_hit: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch search log
    model: Model | None = None  # the retrained compact model

    @classmethod
    def from_trained(
        cls,
        method: str,
        metric: str,
        budget: float,
        full_params: int,
        trained: Any,
        dims: dict[str, Any],
        **extra: Any,
    ) -> SearchResult:
        """The result of a model trained around a compact embedding (`training.Trained`): its
        parameters and memory are read off that embedding, so no method can misreport them."""
        return cls(
            method=method,
            metric=metric,
            budget=budget,
            full_params=full_params,
            embedding_params=trained.embedding.num_parameters(),
            memory_bytes=trained.embedding.memory_bytes(),
            dims=dims,
            metrics={"valid": trained.valid, "test": trained.test or {}},
            retrain_seconds=trained.seconds,
            train_epochs=trained.epochs,
            epoch_cap_hit=trained.capped,
            model=trained.model,
            **extra,
        )

    @property
    def fraction(self) -> float:
        return self.embedding_params / self.full_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "budget": self.budget,
            "full_params": self.full_params,
            "embedding_params": self.embedding_params,
            "fraction": round(self.fraction, 6),
            "memory_bytes": self.memory_bytes,
            "dims": self.dims,
            "metrics": self.metrics,
            "before": self.before,
            "pruned": self.pruned,
            "search_seconds": round(self.search_seconds, 3),
            "retrain_seconds": round(self.retrain_seconds, 3),
            "train_epochs": self.train_epochs,
            "epoch_cap_hit": self.epoch_cap_hit,
        }
