"""Your own code, imported by `--import`: a module or a .py file that registers a method, a model
or a dataset. Worker processes (`dnis compare --jobs N`) import the same plugins again, since a
spawned process starts without them."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from dnis.errors import DnisError

_IMPORTED: list[str] = []


def import_plugin(name: str) -> None:
    """Import a module by name, or a .py file by path (its module name: the file's stem)."""
    if not name.endswith(".py"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            raise DnisError(
                f"--import {name}: no module {error.name!r}; give an installed module's name or "
                "the path of a .py file"
            ) from None
    else:
        path = Path(name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None or not path.is_file():
            raise DnisError(f"--import {name}: no such Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        name = str(path)
    if name not in _IMPORTED:
        _IMPORTED.append(name)


def import_plugins(names: tuple[str, ...]) -> None:
    """Import every plugin of `names` (a worker process's initializer)."""
    for name in names:
        import_plugin(name)


def imported() -> tuple[str, ...]:
    """The plugins this process imported, in order: what a worker process must import too."""
    return tuple(_IMPORTED)
