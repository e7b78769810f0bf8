"""The compact model of a finished run, rebuilt on the CPU from the files the run wrote.

A train run (`dnis train`) holds `model.pt`: the model around a full-width `FusedEmbedding`. A
search run (`dnis search`, any method) holds per budget `model-<budget>.pt`, the model around the
compact embedding the method trained, and `plan-<budget>.json`, its `EmbeddingPlan`: the kind of
embedding and its structure (`dnis.search.plan`). Both hold `config.yaml` and `encoder.json`. The
compact embedding is rebuilt from the plan (and, for per-row structures such as CSR indices, the
buffers saved with the weights), never guessed from state-dict keys, so no data is read. A nested
run (`dnis.search.nested`) also serves a budget it has no files for: its compact model and plan
are cut from the full nested model (`nested.pt`, `order.json`). Of `config.yaml` (the
resolved config the run saved) only what rebuilds the model is read, as a `RunSpec`: the export
layer sits below the application layer that owns the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dnis import models
from dnis.data.encode import Encoder
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.base import FieldEmbedding
from dnis.errors import ConfigError, DnisError
from dnis.models.base import Model
from dnis.search.nested import NESTED_WEIGHTS, ORDER_FILE, NestedOrder, cut_state
from dnis.search.plan import EmbeddingPlan, build, plan_of
from dnis.search.prune import BYTE_SIZE, resolve_budget
from dnis.search.result import budget_file
from dnis.train.checkpoint import UnsafeFileError, read_checkpoint, safe_load

RUN_FIX = "pass a folder written by `dnis train` or `dnis search` (runs/<name>-<hash>/)"


@dataclass(frozen=True)
class RunSpec:
    """What rebuilding a run's model needs of its `config.yaml`, and nothing else."""

    task: str  # dataset.task: rating | ctr | topk
    encoding: str  # dataset.encoding: the text encoding of the training files
    model: str  # model.name
    model_params: dict[str, Any]  # model.params
    dim: int  # embedding.dim: the full width
    init_std: float  # embedding.init_std


@dataclass
class RunModel:
    """A run's model, ready to score encoded ids, with what is needed to encode raw values."""

    run_dir: Path
    kind: str  # "train" or "search"
    model: Model
    encoder: Encoder
    spec: RunSpec
    budget: float | None  # the search budget of this model; None for a train run
    weights: Path  # the file the weights came from

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def model_name(self) -> str:
        return self.spec.model

    def parameter_counts(self) -> dict[str, int]:
        """Stored values of the embedding (its `num_parameters`: a quantized table's values are
        buffers, not parameters, and count all the same) and the parameters of the rest."""
        embedding = self.model.embedding.num_parameters()
        other = sum(
            p.numel() for name, p in self.model.named_parameters()
            if not name.startswith("embedding.")
        )  # fmt: skip
        return {"embedding": embedding, "other": other, "total": embedding + other}

    def full_embedding_params(self) -> int:
        """Parameters of the full-width table the budget is a fraction of."""
        return sum(self.encoder.cardinalities) * self.spec.dim


FULL = "full"  # the --budget value that picks a train run's full-width model.pt


def budgets_of(run_dir: Path) -> dict[float, Path]:
    """{budget: model file} of the search models in a run folder."""
    found = {}
    for path in run_dir.glob("model-*.pt"):
        try:
            found[float(path.stem.removeprefix("model-"))] = path
        except ValueError:
            continue
    return dict(sorted(found.items()))


def parse_budget(value: float | str | None) -> float | str | None:
    """None, "full" or a float (a CLI string such as "0.25" becomes 0.25)."""
    if value is None or isinstance(value, int | float):
        return value
    if str(value).strip().lower() == FULL:
        return FULL
    try:
        return float(value)
    except ValueError:
        raise DnisError(
            f"--budget {value!r} is neither a number (e.g. 0.25), a byte size (e.g. 2MB) nor "
            f"{FULL!r}"
        ) from None


def sized_budget(budget: float | str | None, full_params: int) -> float | str | None:
    """A byte size ("2MB") as the fraction of the full-width fp32 table's bytes it holds, which
    is what `dnis search --budget 2MB` resolved it to and named its files by; other values as
    they are."""
    if not isinstance(budget, str) or not BYTE_SIZE.fullmatch(budget):
        return budget  # a number, "full", or words `parse_budget` refuses
    try:
        return resolve_budget(budget, full_params, "--budget")
    except ConfigError as error:
        raise DnisError(f"{error} (or give a budget such as 0.25, or {FULL!r})") from None


def available(run_dir: Path) -> str:
    """The models of a run folder, as a user picks them."""
    parts = []
    if (run_dir / "model.pt").is_file():
        parts.append(f"the full-width model of `dnis train` (--budget {FULL})")
    budgets = budgets_of(run_dir)
    if budgets:
        listed = ", ".join(f"{b:g}" for b in budgets)
        parts.append(f"search models for budgets {listed} (e.g. --budget {next(iter(budgets)):g})")
    return " and ".join(parts)


def pick_weights(run_dir: Path, budget: float | str | None) -> tuple[str, float | None, Path]:
    """("train" | "search", budget, weights file) of a run folder, or a DnisError saying why not.

    A train run and a search run of the same config share a folder; `budget` picks: None when
    the folder holds one model only, "full" for the train run's model.pt, a number for a search
    model.
    """
    budget = parse_budget(budget)
    budgets = budgets_of(run_dir)
    full = run_dir / "model.pt"
    if not budgets and not full.is_file():
        raise DnisError(
            f"{run_dir} holds no trained model (neither model.pt nor model-<budget>.pt): the run "
            "has not finished; let it finish (or resume it with --resume), then try again"
        )
    if budget is None:
        if len(budgets) + full.is_file() > 1:
            raise DnisError(f"{run_dir} holds several models: {available(run_dir)}; pick one")
        budget = FULL if full.is_file() else next(iter(budgets))
    if budget == FULL:
        if not full.is_file():
            raise DnisError(f"{run_dir} has no full-width model.pt; it holds {available(run_dir)}")
        return "train", None, full
    match = [b for b in budgets if math.isclose(b, budget, rel_tol=1e-9, abs_tol=1e-12)]
    if not match:
        raise DnisError(
            f"{run_dir} has no model for budget {budget:g}; it holds {available(run_dir)}"
        )
    return "search", match[0], budgets[match[0]]


def nested_budget(run_dir: Path, budget: float | str | None) -> float | None:
    """`budget` when a nested run (`dnis.search.nested`) serves it by truncation, none being
    saved for it; None otherwise."""
    budget = parse_budget(budget)
    if not isinstance(budget, int | float) or not (run_dir / ORDER_FILE).is_file():
        return None
    saved = budgets_of(run_dir)
    if any(math.isclose(b, budget, rel_tol=1e-9, abs_tol=1e-12) for b in saved):
        return None
    return float(budget)


def read_run_yaml(run_dir: Path) -> dict[str, Any]:
    """The mapping of a run's config.yaml, or a DnisError saying why not."""
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DnisError(f"{path} cannot be read ({error}); {RUN_FIX}") from None
    if not isinstance(data, dict):
        raise DnisError(f"{path} is not a run config (not a mapping); {RUN_FIX}")
    return data


def read_run_spec(run_dir: Path) -> RunSpec:
    """The `RunSpec` of a run folder. Its config.yaml is the resolved config the run wrote, so
    every key is there; one missing or of the wrong type means the file was changed since."""
    data = read_run_yaml(run_dir)

    def value(key: str, kind: type) -> Any:
        found: Any = data
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if kind is float and isinstance(found, int) and not isinstance(found, bool):
            found = float(found)
        if not isinstance(found, kind) or isinstance(found, bool):
            raise DnisError(
                f"{run_dir / 'config.yaml'}: {key} is missing or not a {kind.__name__} "
                f"({found!r}); the file was changed after the run: rerun it"
            )
        return found

    return RunSpec(
        task=value("dataset.task", str),
        encoding=value("dataset.encoding", str),
        model=value("model.name", str),
        model_params=value("model.params", dict),
        dim=value("embedding.dim", int),
        init_std=value("embedding.init_std", float),
    )


def read_encoder(path: Path) -> Encoder:
    try:
        return Encoder.load(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DnisError(
            f"{path} is not a readable encoder file ({type(error).__name__}: {error}); "
            "it was damaged after the run: rerun it"
        ) from None


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A saved state dict (plain, or inside a checksummed checkpoint envelope)."""
    try:
        state = safe_load(path)
    except UnsafeFileError:
        raise
    except Exception as error:  # torch raises many types for a damaged file
        raise DnisError(f"{path} is corrupt or not a model file ({error}); rerun the run") from None
    if isinstance(state, dict) and "payload" in state and "sha256" in state:
        _, state = read_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DnisError(f"{path} does not hold model weights (a state dict); rerun the run")
    return state


def run_plan(run_dir: Path, kind: str, budget: float | None, layout: FieldLayout, dim: int):
    """The `EmbeddingPlan` of a run's model: a search budget's `plan-<budget>.json`, or the full
    table of a train run."""
    if kind == "train":
        return plan_of(FusedEmbedding(layout, dim))
    assert budget is not None
    path = budget_file(run_dir, "plan", budget)
    if not path.is_file():
        raise DnisError(
            f"{run_dir} has no {path.name}, the embedding plan export rebuilds the compact "
            "model from (a search run of an older dnis wrote none); rerun the search"
        )
    return EmbeddingPlan.read(path)


def compact_embedding(
    state: dict[str, torch.Tensor], layout: FieldLayout, plan: EmbeddingPlan, path: Path
) -> FieldEmbedding:
    """The embedding module the saved weights belong to, rebuilt from its plan."""
    if not plan.rebuildable:
        raise DnisError(
            f"{path}: its embedding is of kind {plan.kind!r}, which dnis cannot rebuild for "
            "export or predict yet (no builder registered in dnis.search.plan)"
        )
    prefix = "embedding."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        return build(plan, layout, own)
    except ValueError as error:  # a module refusing the structure it is given
        raise DnisError(f"{path}: its plan does not rebuild ({error}); rerun the search") from None


def load_run(run_dir: str | Path, budget: float | str | None = None) -> RunModel:
    """The model of a train run, or of one budget of a search run, on the CPU in eval mode.

    `budget`: a search model's budget, "full" for the train run's model, or None when the folder
    holds one model only.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DnisError(f"{run_dir} is not a folder; {RUN_FIX}")
    for required in ("config.yaml", "encoder.json"):
        if not (run_dir / required).is_file():
            raise DnisError(f"{run_dir} is not a dnis run: {required} is missing; {RUN_FIX}")
    spec = read_run_spec(run_dir)
    encoder = read_encoder(run_dir / "encoder.json")
    budget = sized_budget(budget, sum(encoder.cardinalities) * spec.dim)
    cut = nested_budget(run_dir, budget)
    kind, budget, weights = (
        pick_weights(run_dir, budget) if cut is None else ("search", cut, run_dir / NESTED_WEIGHTS)
    )
    layout = FieldLayout.from_schema(encoder.schema, encoder.cardinalities)
    state = read_state(weights)
    if cut is None:
        plan = run_plan(run_dir, kind, budget, layout, spec.dim)
    else:  # a nested run's unsearched budget: its compact model is cut from the full one
        order = NestedOrder.read(run_dir / ORDER_FILE)
        state, plan = cut_state(order, state, layout, cut)
    embedding = compact_embedding(state, layout, plan, weights)
    model = models.build(spec.model, encoder.schema, embedding, **spec.model_params)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise DnisError(
            f"{weights} does not fit the model its config.yaml describes ({' '.join(first)}); "
            "the config or the encoders changed after the run: rerun it"
        ) from None
    return RunModel(run_dir, kind, model.eval(), encoder, spec, budget, weights)


def run_summary(run: RunModel) -> dict[str, Any]:
    """What the manifest says about where the model came from."""
    return {"run": run.run_dir.name, "kind": run.kind, "weights": run.weights.name}
