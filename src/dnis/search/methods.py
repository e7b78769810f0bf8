"""Search methods by name: one interface, one result type, so `compare` is a loop.

A method is called as `method(name)(make_model, dataset, *, budgets, dim, train, options)` and
returns one `SearchResult` per budget (in order). `budgets` are fractions of the full-width
(`dim`) model's embedding parameters; `options` are the method's own hyper-parameters from the
config (`compare.options.<method>`): a mapping, checked against the method's options dataclass
(unknown keys refused with a "did you mean", values of the wrong type or out of range refused)
before anything trains. A method that can serve many budgets from one search (DNIS) does so; the
others run once per budget. A method registered with `unit="bytes"` (the quantized baselines)
spends a budget as bytes, 4 a parameter (a fraction of the fp32 full-width table's bytes), and
keeps its stored bytes, scales and indices included, within it; `compare` runs it only when its
grid counts bytes (`compare.budget_unit: bytes`).

Writing one: a function `fn(job, options) -> list[SearchResult]` (`job` a `training.Job`, the
call's arguments with the layout, task and full parameter count derived from them; `options` an
instance of its options dataclass), registered with `@register_method(name, OptionsClass)`, in a
module that `dnis/search/__init__.py` imports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dnis.data.dataset import EncodedDataset
from dnis.embeddings.blocks import BLOCK_MODES
from dnis.errors import ConfigError
from dnis.registry import Registry, parse_options
from dnis.search.dnis import DnisConfig, dnis
from dnis.search.result import SearchResult
from dnis.search.training import Job, ModelFactory, Phases
from dnis.train.trainer import TrainConfig

BUDGET_UNITS: tuple[str, ...] = ("params", "bytes")


class Options:
    """Base of a method's options dataclass: its fields are the options, with their defaults."""

    def require(self, ok: bool, key: str, rule: str) -> None:
        """Refuse option `key` unless `ok`: "<key> <rule>, got <value>" (in `compare`, the key is
        named in full: compare.options.<method>.<key>)."""
        if not ok:
            raise ConfigError(f"{key} {rule}, got {getattr(self, key)!r}", key=key)


def require_blocks(options: Any) -> None:
    """Check the frequency-block options of a method that has them, `num_blocks` and
    `block_mode` (as DNIS's: count, mass, or a list of edge fractions)."""
    options.require(options.num_blocks >= 1, "num_blocks", "must be >= 1")
    mode = options.block_mode
    rule = f"must be one of {BLOCK_MODES} or a list of edge fractions"
    options.require(not isinstance(mode, str) or mode in BLOCK_MODES, "block_mode", rule)


@dataclass
class NoOptions(Options):
    """The options of a method that takes none."""


class Method:
    """A registered method: its function and its options class. Calling it checks the options
    (a mapping, or an instance of the class) and runs the function."""

    def __init__(
        self,
        name: str,
        run: Callable[[Job, Any], list[SearchResult]],
        options: type,
        fixed: Collection[str] = (),
        unit: str = "params",
        search_section: bool = False,
    ) -> None:
        if unit not in BUDGET_UNITS:
            raise ValueError(f"unit must be one of {BUDGET_UNITS}, got {unit!r}")
        self.name = name
        self.run = run
        self.options = options
        self.fixed = fixed  # fields of `options` the method sets itself, never a user
        self.unit = unit  # what the method keeps within a budget: parameters, or stored bytes
        # its options start from a config's `search:` section (DNIS's settings), then
        # `compare.options.<name>` on top
        self.search_section = search_section
        functools.update_wrapper(self, run)  # its __module__, __name__ and __doc__

    def parse(self, options: Mapping[str, Any] | Any) -> Any:
        """The options as an instance of the method's options class (ConfigError when wrong)."""
        where = f"compare.options.{self.name}"
        return parse_options(self.options, options, f"method {self.name!r}", where, self.fixed)

    def __call__(
        self,
        make_model: ModelFactory,
        dataset: EncodedDataset,
        *,
        budgets: Sequence[float],
        dim: int,
        train: TrainConfig,
        options: Mapping[str, Any] | Any,
        phases: Phases | None = None,
    ) -> list[SearchResult]:
        """`phases`: where the method's trainings keep checkpoints (default: none)."""
        typed = self.parse(options)
        job = Job(self.name, make_model, dataset, list(budgets), dim, train, phases or Phases())
        return self.run(job, typed)

    def __repr__(self) -> str:
        return f"<method {self.name!r}, options {self.options.__name__}>"


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str,
    options: type = NoOptions,
    *,
    fixed: Collection[str] = (),
    unit: str = "params",
    search_section: bool = False,
) -> Callable[[Callable[[Job, Any], list[SearchResult]]], Method]:
    """Decorator: register `fn(job, options) -> list[SearchResult]` as method `name`, taking the
    options of dataclass `options` (from a config's `search:` section first, with
    `search_section`) and keeping its results within the budget's `unit`."""

    def decorate(fn: Callable[[Job, Any], list[SearchResult]]) -> Method:
        return METHODS.register(name, Method(name, fn, options, fixed, unit, search_section))

    return decorate


def method(name: str) -> Method:
    """The method registered as `name` (every built-in is, once `dnis.search` is imported)."""
    return METHODS[name]


@register_method("dnis", DnisConfig, fixed=("budgets",), search_section=True)
def dnis_method(job: Job, config: DnisConfig) -> list[SearchResult]:
    """DNIS: one search, then prune and retrain per budget."""
    config = replace(config, budgets=list(job.budgets))
    root = job.phases.root
    return dnis(
        job.make_model,
        job.dataset,
        dim=job.dim,
        budget=list(job.budgets),
        config=config,
        train=job.train,
        run_dir=None if root is None else root / "dnis",  # its search and retrains resume there
        resume=job.phases.resume,
        config_hash=job.phases.config_hash,
    )


@register_method("dnis-random", DnisConfig, fixed=("budgets", "fallback"), search_section=True)
def dnis_random_method(job: Job, config: DnisConfig) -> list[SearchResult]:
    """The control: DNIS's warm-up, search and fine-tune with the searched structure replaced by
    a random one of the same budget. What DNIS gains over it is what the search found."""
    results = dnis_method.run(job, replace(config, structure="random", fallback="none"))
    for result in results:
        result.method = "dnis-random"
    return results
