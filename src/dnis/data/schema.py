"""Declarative feature specs: what each input column is and how it becomes embedding ids.

Every feature becomes one embedding *field* (numeric ones too, after quantile bucketing), so all
inputs of a model go through one fused table and a search method can size every one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from dnis.errors import ConfigError, did_you_mean

FeatureKind = Literal["categorical", "numeric", "sequence"]
KINDS: tuple[str, ...] = ("categorical", "numeric", "sequence")


@dataclass(frozen=True)
class FeatureSpec:
    """One input field.

    - ``categorical``: one value per row (user id, city, ...).
    - ``numeric``: a number, bucketised by training-set quantiles into ``buckets`` ids (missing = OOV).
    - ``sequence``: several values per row (genres, a user's item history), given as a list or a
      ``separator``-joined string, truncated to ``max_len`` and padded with id 0, pooled by ``pooling``.
    """

    name: str
    kind: FeatureKind = "categorical"
    column: str | None = None  # source column; defaults to `name`
    min_count: int = 1  # values seen fewer times in training map to the OOV id
    buckets: int = 10  # numeric only
    max_len: int = 1  # sequence only
    separator: str = "|"  # sequence only, when values come as one string
    pooling: Literal["mean", "sum"] = "mean"  # sequence only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        if self.min_count < 1:
            raise ConfigError(f"feature {self.name!r}: min_count must be >= 1")
        if self.kind == "numeric" and self.buckets < 2:
            raise ConfigError(f"feature {self.name!r}: numeric features need buckets >= 2")
        if self.kind == "sequence" and self.max_len < 1:
            raise ConfigError(f"feature {self.name!r}: sequence features need max_len >= 1")
        if self.kind != "sequence" and self.max_len != 1:
            raise ConfigError(f"feature {self.name!r}: max_len only applies to kind 'sequence'")
        if self.pooling not in ("mean", "sum"):
            raise ConfigError(f"feature {self.name!r}: pooling must be 'mean' or 'sum'")

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def width(self) -> int:
        """Number of id slots this feature takes in an encoded row."""
        return self.max_len if self.kind == "sequence" else 1


@dataclass(frozen=True)
class Schema:
    """All features of a dataset plus the label and, for top-k, which fields are user and item."""

    features: tuple[FeatureSpec, ...]
    label: str | None = None
    user: str | None = None  # feature name of the user field (top-k, leave-last-out split)
    item: str | None = None  # feature name of the item field (top-k)
    time: str | None = None  # source column with a timestamp (temporal splits)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if not names:
            raise ConfigError("schema: at least one feature is needed")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"schema: duplicate feature names {duplicates}")
        if self.label is not None and self.label in {f.source for f in self.features}:
            raise ConfigError(
                f"schema: the label column {self.label!r} is also listed as a feature; "
                "remove it from `features` (it would leak the answer into the model)"
            )
        for role in ("user", "item"):
            value = getattr(self, role)
            if value is not None and value not in names:
                raise ConfigError(
                    f"schema: {role} field {value!r} is not one of the features {names}"
                )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no feature named {name!r}; features are {self.names}") from None

    def __getitem__(self, name: str) -> FeatureSpec:
        return self.features[self.index(name)]

    @property
    def num_slots(self) -> int:
        return sum(f.width for f in self.features)

    def slot_fields(self) -> list[int]:
        """Field index of every id slot of an encoded row (sequence fields take max_len slots)."""
        return [i for i, f in enumerate(self.features) for _ in range(f.width)]

    def slot_range(self, name: str) -> slice:
        start = 0
        for f in self.features:
            if f.name == name:
                return slice(start, start + f.width)
            start += f.width
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        defaults = {f.name: f.default for f in fields(FeatureSpec)}
        feats = [
            {k: v for k, v in asdict(f).items() if k == "name" or v != defaults[k]}
            for f in self.features
        ]
        out: dict[str, Any] = {"features": feats}
        for key in ("label", "user", "item", "time"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "schema") -> Schema:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        check_keys(data, {"features", "label", "user", "item", "time"}, where)
        raw = data.get("features")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.features: expected a non-empty list of feature specs")
        specs = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item:
                raise ConfigError(f"{where}.features[{i}]: expected a mapping with a `name`")
            check_keys(item, {f.name for f in fields(FeatureSpec)}, f"{where}.features[{i}]")
            specs.append(FeatureSpec(**item))
        rest = {k: data.get(k) for k in ("label", "user", "item", "time")}
        return cls(features=tuple(specs), **rest)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Schema:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(yaml.safe_load(handle), where=str(path))


def check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    """Refuse unknown keys with a "did you mean" hint: typos must never pass silently."""
    for key in data:
        if key not in allowed:
            suggestion = did_you_mean(key, sorted(allowed))
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggestion} (allowed: {', '.join(sorted(allowed))})"
            )


def categorical(*names: str, min_count: int = 1) -> list[FeatureSpec]:
    """Shorthand for several plain categorical features."""
    return [FeatureSpec(name=n, min_count=min_count) for n in names]


__all__ = ["FeatureSpec", "Schema", "check_keys", "categorical"]
