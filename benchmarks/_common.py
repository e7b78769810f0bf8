"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` into its own marked section of the results page `path`, leaving the others.

    Each benchmark script owns one section, so docs/results.md is regenerated piece by piece;
    headings are shifted down one level to sit under the page's title.
    """
    body = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    page = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = head + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)


def run_child(
    script: str, args: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `script` with `args` in a fresh one-thread Python process and return the JSON of its
    last `RESULT {...}` line, or {"skipped": why} when it timed out or failed."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "PYTHONWARNINGS": "ignore", **(env or {})}  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout:.0f} s (--timeout)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"skipped": f"failed (exit {done.returncode}): {tail}"}
