"""Search methods by name: one interface, one result type, so `compare` is a loop.

A method is `fn(make_model, dataset, *, budgets, dim, train, options) -> list[SearchResult]`,
one result per budget (in order). `budgets` are fractions of the full-width (`dim`) model's
embedding parameters; `options` are the method's own hyper-parameters from the config
(`compare.options.<method>`), refused with a clear error when unknown. A method that can serve many
budgets from one search (DNIS) does so; the others run once per budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Protocol

from dnis.data.dataset import EncodedDataset
from dnis.errors import BudgetError, ConfigError, did_you_mean
from dnis.search.dnis import DnisConfig, ModelFactory, dnis
from dnis.search.result import SearchResult
from dnis.search.uniform import uniform
from dnis.train.trainer import TrainConfig


class Method(Protocol):
    def __call__(
        self,
        make_model: ModelFactory,
        dataset: EncodedDataset,
        *,
        budgets: Sequence[float],
        dim: int,
        train: TrainConfig,
        options: dict[str, Any],
    ) -> list[SearchResult]: ...


METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    def decorate(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return decorate


def method(name: str) -> Method:
    """The method registered as `name` (every built-in is, once `dnis.search` is imported)."""
    if name not in METHODS:
        suggestion = did_you_mean(name, METHODS)
        raise ConfigError(
            f"unknown method {name!r}.{suggestion} Known: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def check_options(name: str, options: dict[str, Any], allowed: Sequence[str]) -> None:
    for key in options:
        if key not in allowed:
            suggestion = did_you_mean(key, allowed)
            raise ConfigError(
                f"method {name!r} has no option {key!r}.{suggestion} Its options: {', '.join(allowed) or 'none'}"
            )


@register_method("dnis")
def dnis_method(make_model, dataset, *, budgets, dim, train, options):
    """DNIS: one search, then prune and retrain per budget."""
    check_options("dnis", options, [f.name for f in fields(DnisConfig) if f.name != "budgets"])
    config = DnisConfig(**options, budgets=list(budgets))
    return dnis(make_model, dataset, dim=dim, budget=list(budgets), config=config, train=train)


@register_method("dnis-random")
def dnis_random_method(make_model, dataset, *, budgets, dim, train, options):
    """The control: DNIS's warm-up, search and fine-tune with the searched structure replaced by
    a random one of the same budget. What DNIS gains over it is what the search found."""
    check_options(
        "dnis-random", options, [f.name for f in fields(DnisConfig) if f.name != "budgets"]
    )
    results = dnis_method(
        make_model,
        dataset,
        budgets=budgets,
        dim=dim,
        train=train,
        options={**options, "structure": "random"},
    )
    for result in results:
        result.method = "dnis-random"
    return results


@register_method("uniform")
def uniform_method(make_model, dataset, *, budgets, dim, train, options):
    """Every field at the widest uniform width that fits the budget: floor(budget * dim)."""
    check_options("uniform", options, [])
    results = []
    for b in budgets:
        if int(b * dim) < 1:
            raise BudgetError(
                f"uniform needs at least width 1 ({1 / dim:.4g} of the width-{dim} embedding), "
                f"the budget is {b}"
            )
        result = uniform(make_model, dataset, dim=int(b * dim), full_dim=dim, train=train)
        result.budget = b
        results.append(result)
    return results
