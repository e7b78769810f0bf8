"""The models by name: each model module registers its class with `@register_model(name)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from dnis.registry import Registry

if TYPE_CHECKING:
    from dnis.models.base import Model

ModelT = TypeVar("ModelT", bound="type[Model]")


def model_key(name: str) -> str:
    """A model's registry key: case, dashes, underscores and "&" folded (Wide&Deep: widedeep)."""
    return name.lower().replace("-", "").replace("_", "").replace("&", "")


MODELS: Registry[type[Model]] = Registry("model", normalize=model_key)


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator: `@register_model("mymodel")` makes `model: {name: mymodel}` build it."""
    return MODELS.register(name)
