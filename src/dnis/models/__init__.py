"""Models, each built as `Model(schema, embedding, **params)`; `build` looks them up by name."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from dnis.data.schema import Schema
from dnis.errors import ConfigError, did_you_mean
from dnis.models.armnet import ARMNet
from dnis.models.autoint import AutoInt
from dnis.models.base import Model
from dnis.models.dcn import DCNv2
from dnis.models.din import DIN
from dnis.models.fgcnn import FGCNN
from dnis.models.fm import FM, DeepFM, WideDeep
from dnis.models.mf import BPRMF, MF
from dnis.models.neumf import NeuMF

MODELS: dict[str, type[Model]] = {
    "mf": MF,
    "bprmf": BPRMF,
    "neumf": NeuMF,
    "fm": FM,
    "widedeep": WideDeep,
    "deepfm": DeepFM,
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "fgcnn": FGCNN,
    "din": DIN,
    "armnet": ARMNet,
}


def model_class(name: str) -> type[Model]:
    key = name.lower().replace("-", "").replace("_", "").replace("&", "")
    if key not in MODELS:
        suggestion = did_you_mean(key, MODELS)
        raise ConfigError(f"unknown model {name!r}.{suggestion} Known: {', '.join(MODELS)}")
    return MODELS[key]


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
    allowed = model_params(name)
    for key in params:
        if key not in allowed:
            suggestion = did_you_mean(key, allowed)
            raise ConfigError(
                f"model {name!r} has no parameter {key!r}.{suggestion} "
                f"Its parameters: {allowed or 'none'}"
            )
    return model_class(name)(schema, embedding, **params)


__all__ = [
    "BPRMF", "DIN", "FGCNN", "FM", "MF", "MODELS", "ARMNet", "AutoInt", "DCNv2", "DeepFM", "Model",
    "NeuMF", "WideDeep", "build",
]  # fmt: skip
