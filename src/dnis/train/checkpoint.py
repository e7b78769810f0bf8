"""Checkpoints written atomically and loaded with a clear error when torn, corrupt or foreign.

On disk a checkpoint is a `torch.save` of a small envelope::

    {"format": 1, "config_hash": str, "sha256": hex digest of payload, "payload": bytes}

where `payload` is the `torch.save` serialisation of the training state: tensors, numbers,
strings and plain containers only. Loading reads the envelope, verifies the SHA-256 of the exact
payload bytes, and compares the config hash, so a truncated, bit-flipped or foreign file and a
checkpoint written by another config are refused, never loaded silently.

Run folders are shared between people, so a checkpoint is data, never code: both the envelope and
the payload are read with `weights_only=True`, whose unpickler builds tensors and plain containers
only and refuses any other global (a crafted `__reduce__` is never called). The checksum guards
against damage, not against an attacker, who can recompute it; `weights_only` is the guard.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from dnis.errors import DnisError
from dnis.io import atomic_write

FORMAT = 1

_START_OVER = "delete it and start the run again without --resume"


class UnsafeFileError(DnisError):
    """A file that should hold tensors holds other pickled objects: loading it could run code."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"{path} was refused: it holds pickled objects other than tensors and plain "
            f"containers, and loading it could run code ({reason}). dnis writes no such files; do "
            "not use a run folder or export of unknown origin (see docs/security.md)"
        )


def safe_load(source: str | Path | io.BytesIO) -> Any:
    """`torch.load` restricted to tensors and plain containers, on the CPU; never runs code.

    Raises `UnsafeFileError` for a file that names any other global (e.g. a crafted
    `__reduce__`); a damaged file raises what torch raises, for the caller to explain."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        globals_named = [line for line in str(error).splitlines() if "GLOBAL" in line]
        if not globals_named:
            raise  # a damaged stream (e.g. an unknown opcode): the caller calls it corrupt
        name = source if isinstance(source, str | Path) else "the file"
        raise UnsafeFileError(name, globals_named[0].strip()) from None


def save_checkpoint(path: str | Path, state: dict[str, Any], config_hash: str) -> None:
    """Write `state` to `path` atomically, with its SHA-256 and the hash of the config behind it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    envelope = {
        "format": FORMAT,
        "config_hash": str(config_hash),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": payload,
    }
    atomic_write(path, lambda handle: torch.save(envelope, handle))


def read_checkpoint(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(config hash, state) of a checkpoint whose checksum is verified; DnisError if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise DnisError(f"checkpoint {path} does not exist; start the run without --resume")
    try:
        envelope = safe_load(path)
    except UnsafeFileError:
        raise
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise DnisError(
            f"checkpoint {path} is corrupt or not a checkpoint (cannot be read: {error}); "
            + _START_OVER
        ) from None
    if not (
        isinstance(envelope, dict)
        and envelope.get("format") == FORMAT
        and isinstance(envelope.get("payload"), bytes)
        and isinstance(envelope.get("sha256"), str)
        and isinstance(envelope.get("config_hash"), str)
    ):
        raise DnisError(
            f"checkpoint {path} is not a dnis checkpoint of format {FORMAT} (written by another "
            "program or an older dnis); " + _START_OVER
        )
    payload = envelope["payload"]
    if hashlib.sha256(payload).hexdigest() != envelope["sha256"]:
        raise DnisError(
            f"checkpoint {path} is corrupt (its SHA-256 checksum does not match its contents); "
            + _START_OVER
        )
    try:
        state = safe_load(io.BytesIO(payload))
    except UnsafeFileError as error:
        raise UnsafeFileError(path, error.reason) from None
    except Exception as error:  # checksum matched: written by an incompatible torch/dnis
        raise DnisError(f"checkpoint {path} cannot be unpacked ({error}); " + _START_OVER) from None
    if not isinstance(state, dict):
        raise DnisError(f"checkpoint {path} does not hold a training state; " + _START_OVER)
    return envelope["config_hash"], state


def check_config_hash(path: str | Path, found: str, expected: str) -> None:
    """Refuse a checkpoint whose config hash `found` is not this run's `expected`."""
    if found != expected:
        raise DnisError(
            f"cannot resume from checkpoint {path}: it was written by a different config "
            f"(config hash {found}, this run's is {expected}); resume with the config that wrote "
            f"it, or {_START_OVER}"
        )


def load_checkpoint(path: str | Path, expected_hash: str | None = None) -> dict[str, Any]:
    """The state saved at `path`, after verifying its checksum and, if given, its config hash.

    Raises DnisError naming the file and the fix for a missing, truncated, bit-flipped or foreign
    file, and for a checkpoint written by a config whose hash is not `expected_hash`.
    """
    found, state = read_checkpoint(path)
    if expected_hash is not None:
        check_config_hash(path, found, expected_hash)
    return state
