"""A cached, parallel grid of benchmark cells: each cell is a JSON file, so a rerun resumes."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

Cell = dict[str, Any]


def run_grid(
    cells: list[Cell],
    run_cell: Callable[[Cell], Cell],
    cache: Path,
    key: Callable[[Cell], str],
    jobs: int,
    run: bool = True,
) -> list[Cell]:
    """Results of every cell: cached ones read back, the others run in `jobs` processes.

    `run_cell` must be a module-level function (it is pickled to the worker processes). Cells are
    submitted in the given order (put the longest first). With `run=False`, nothing is computed.
    """
    cache.mkdir(parents=True, exist_ok=True)
    done, todo = [], []
    for cell in cells:
        path = cache / f"{key(cell)}.json"
        if path.exists():
            done.append(json.loads(path.read_text(encoding="utf-8")))
        else:
            todo.append((cell, path))
    if not run:
        print(f"summarizing {len(done)} cached cells; {len(todo)} not run", flush=True)
        return done
    print(f"{len(done)} cells cached, {len(todo)} to run on {jobs} processes", flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_cell, cell): (cell, path) for cell, path in todo}
        for future in as_completed(futures):
            cell, path = futures[future]
            result = future.result()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result), encoding="utf-8")
            tmp.replace(path)
            done.append(result)
            print(
                f"done {key(cell)} in {result['wall_seconds']:.0f}s ({len(done)} cells)", flush=True
            )
    return done
