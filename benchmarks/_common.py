"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "movielens-100k"


def load(name: str, task: str, path: str | Path | None = None, seed: int = 0, **options: Any):
    """`dnis.data.load`, imported late so `--help` stays fast."""
    import dnis.data

    return dnis.data.load(name, task, path=path, seed=seed, **options)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
