"""The result every search method returns, so `compare` is a loop over methods, not a switch,
and the files one budget's result is saved as in a run folder (`budget_file`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dnis.io import atomic_write, write_json
from dnis.models.base import Model
from dnis.search.plan import EmbeddingPlan, plan_of
from dnis.search.prune import FP32_BYTES

# what a search run folder holds per budget: <name>-<budget><suffix>
BUDGET_FILES = {"model": ".pt", "result": ".json", "plan": ".json"}


def budget_file(run_dir: Path, name: str, budget: float) -> Path:
    """`model-<budget>.pt` (the compact model's state dict), `result-<budget>.json` (its
    metrics) or `plan-<budget>.json` (its `EmbeddingPlan`) of a run folder."""
    return Path(run_dir) / f"{name}-{budget}{BUDGET_FILES[name]}"


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
    # the structure of its embedding; read off `model.embedding` when not given
    plan: EmbeddingPlan | None = None
    # what the method kept within the budget: parameters, or stored bytes (`Method.unit`)
    unit: str = "params"
    # how the method chose this structure, beyond the per-field dims (e.g. dnis-precision's
    # allocation candidates and their validation metrics)
    choice: dict[str, Any] = field(default_factory=dict)
    # the budget as the user wrote it when it was a byte size ("256kB"); `budget` is then the
    # fraction it resolved to
    asked: str | None = None

    def __post_init__(self) -> None:
        if self.plan is None and self.model is not None:
            self.plan = plan_of(self.model.embedding)

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
        return cls.of_model(
            method, metric, budget, full_params, trained.model, dims, trained.valid,
            trained.test or {}, retrain_seconds=trained.seconds, train_epochs=trained.epochs,
            epoch_cap_hit=trained.capped, **extra,
        )  # fmt: skip

    @classmethod
    def of_model(
        cls,
        method: str,
        metric: str,
        budget: float,
        full_params: int,
        model: Model,
        dims: dict[str, Any],
        valid: dict[str, float],
        test: dict[str, float],
        **extra: Any,
    ) -> SearchResult:
        """The result of a compact model, its parameters and memory read off its embedding."""
        return cls(
            method=method,
            metric=metric,
            budget=budget,
            full_params=full_params,
            embedding_params=model.embedding.num_parameters(),
            memory_bytes=model.embedding.memory_bytes(),
            dims=dims,
            metrics={"valid": valid, "test": test},
            model=model,
            **extra,
        )

    def save(self, run_dir: Path, **extra: Any) -> None:
        """Write this budget's files into `run_dir`: the plan, the compact model's weights, and
        last (its presence marks the budget finished) the result with `extra` entries."""
        if self.plan is not None:
            self.plan.write(budget_file(run_dir, "plan", self.budget))
        if self.model is not None:
            atomic_write(
                budget_file(run_dir, "model", self.budget),
                lambda handle, m=self.model: torch.save(m.state_dict(), handle),
            )
        write_json(budget_file(run_dir, "result", self.budget), {**self.to_dict(), **extra})

    @property
    def fraction(self) -> float:
        """The share of the full-width embedding spent: of its parameters, or (unit bytes) of
        its fp32 bytes."""
        if self.unit == "bytes":
            return self.memory_bytes / (FP32_BYTES * self.full_params)
        return self.embedding_params / self.full_params

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "budget": self.budget,
            **({"asked": self.asked} if self.asked else {}),
            "full_params": self.full_params,
            "embedding_params": self.embedding_params,
            "fraction": round(self.fraction, 6),
            "unit": self.unit,
            **({"choice": self.choice} if self.choice else {}),
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
