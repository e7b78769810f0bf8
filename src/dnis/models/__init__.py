"""Models, each built as `Model(schema, embedding, **params)`; `build` looks them up by name.

Importing the model modules registers them (`@register_model`); a model of your own registers the
same way, in a module that `dnis ... --import` loads."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from dnis.data.schema import Schema
from dnis.models.armnet import ARMNet
from dnis.models.autoint import AutoInt
from dnis.models.base import Model
from dnis.models.dcn import DCNv2
from dnis.models.din import DIN
from dnis.models.fgcnn import FGCNN
from dnis.models.fm import FM, DeepFM, WideDeep
from dnis.models.mf import BPRMF, MF
from dnis.models.neumf import NeuMF
from dnis.models.registry import MODELS, model_key, register_model
from dnis.registry import check_names


def model_class(name: str) -> type[Model]:
    return MODELS[name]


def model_params(name: str) -> dict[str, Any]:
    """The hyper-parameters a model accepts, with their defaults."""
    signature = inspect.signature(model_class(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "schema", "embedding")
    }


def build(name: str, schema: Schema, embedding: nn.Module, **params: Any) -> Model:
    """Build a model by name, refusing unknown hyper-parameters with a "did you mean"."""
    check_names(params, list(model_params(name)), f"model {name!r}", "parameter")
    return model_class(name)(schema, embedding, **params)


__all__ = [
    "BPRMF", "DIN", "FGCNN", "FM", "MF", "MODELS", "ARMNet", "AutoInt", "DCNv2", "DeepFM", "Model",
    "NeuMF", "WideDeep", "build", "model_key", "register_model",
]  # fmt: skip
