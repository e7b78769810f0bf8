"""Things a user names: one registry for datasets, models and search methods, and the checks of
the options a user gives them.

A `Registry` maps names to things (a dataset's `DatasetInfo`, a model class, a search method).
Registering is a call or a decorator; a lookup of an unknown name raises a `ConfigError` that
lists the known names and suggests the closest. `check_names` refuses option names a thing does
not take, with a "did you mean"; `parse_options` builds an options dataclass from a user's
mapping, refusing unknown keys and values of the wrong type, so typos never pass silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar, overload

from dnis.errors import ConfigError, did_you_mean

T = TypeVar("T")
OptionsT = TypeVar("OptionsT")  # an options dataclass


class Registry(Mapping[str, T]):
    """Things by name. `kind` names them in errors ("dataset", "model", "method"); `normalize`
    maps a name to its key (e.g. case and dashes folded); `hint` ends an unknown-name error;
    `load` imports the modules that register the built-ins, once, before the first lookup."""

    def __init__(
        self,
        kind: str,
        *,
        normalize: Callable[[str], str] | None = None,
        hint: str = "",
        load: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.hint = hint
        self._normalize = normalize or (lambda name: name)
        self._load = load
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, value: T) -> T: ...
    def register(self, name: str, value: Any = None) -> Any:
        """`register(name, value)`, or `@register(name)` as a decorator; returns the value. A name
        registered again is replaced (the last registration wins)."""

        def add(value: T) -> T:
            self._entries[self._normalize(name)] = value
            return value

        return add if value is None else add(value)

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None  # first, so a module that registers may look up
            load()
        return self._entries

    def __getitem__(self, name: str) -> T:
        """The thing registered as `name`; an unknown name is a ConfigError with a suggestion."""
        entries = self._loaded()
        key = self._normalize(name)
        if key not in entries:
            known = sorted(entries)
            message = f"unknown {self.kind} {name!r}.{did_you_mean(key, known)} Known: "
            raise ConfigError(message + ", ".join(known) + (f" {self.hint}" if self.hint else ""))
        return entries[key]

    def get(self, name: str, default: Any = None) -> Any:
        return self._loaded().get(self._normalize(name), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name) in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._loaded()))

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def check_names(
    given: Iterable[str],
    allowed: Collection[str],
    owner: str,
    what: str = "option",
    where: str | None = None,
) -> None:
    """Refuse a name not in `allowed`: "<owner> has no <what> 'x'. Did you mean 'y'? Its <what>s:
    ...". `where`, the dotted config key of the options, prefixes the message and names the key."""
    for name in given:
        if name not in allowed:
            prefix = f"{where}: " if where else ""
            raise ConfigError(
                f"{prefix}{owner} has no {what} {name!r}.{did_you_mean(name, allowed)} "
                f"Its {what}s: {', '.join(allowed) or 'none'}",
                key=f"{where}.{name}" if where else None,
            )


def parse_options(
    cls: type[OptionsT],
    options: Mapping[str, Any] | OptionsT,
    owner: str,
    where: str,
    fixed: Collection[str] = (),
) -> OptionsT:
    """Options dataclass `cls` from a user's mapping (an instance of `cls` passes as it is).

    Every key must be a field of `cls` (not one of `fixed`, the fields its owner sets itself) and
    every value of the field's type: an int passes for a float and becomes one, a list passes for a
    tuple, YAML having no tuples. The class's own `__post_init__` checks the values; a ConfigError
    it raises whose `key` is a field is renamed `<where>.<field>` (its message starts with the
    field's name). `owner` names the owner in errors ("method 'pep'"), `where` is the dotted
    config key of the options ("compare.options.pep")."""
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of options, got {type(options).__name__} {options!r}",
            key=where,
        )
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields if f.init and f.name not in fixed]
    check_names(options, names, owner, "option", where)
    hints = typing.get_type_hints(cls)
    values = {key: typed(hints[key], value, f"{where}.{key}") for key, value in options.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        if error.key in names:
            raise ConfigError(f"{where}.{error}", key=f"{where}.{error.key}") from None
        raise


def typed(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against type `hint` (and converted: int -> float, list <-> tuple), the
    items of a list, tuple or dict each against theirs."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return typed(option, value, where)
            except ConfigError:
                continue
    else:
        base = origin or hint
        if base is Any:
            return value
        if base in (list, tuple) and isinstance(value, list | tuple):
            item = args[0] if args else Any
            return base(typed(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if base is dict and isinstance(value, dict) and args:
            return {k: typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, base) and not (isinstance(value, bool) and base is not bool):
            return value
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}", key=where)
