"""Checkpoints written atomically and loaded with a clear error when torn or foreign."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dnis.errors import DnisError
from dnis.io import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file
        raise DnisError(
            f"checkpoint {path} cannot be read ({error}); delete it and rerun"
        ) from error
