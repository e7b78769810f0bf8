"""Inference cost of a trained model: batch latency, and peak memory measured in a fresh process.

Peak memory is the growth of a fresh process's peak RSS (VmHWM, reset through clear_refs once
torch is imported) while it loads the model and scores batches: weights, index buffers and
activations, and nothing the parent process happens to hold. Linux only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dnis.models.base import Model


@torch.no_grad()
def batch_latency_ms(
    model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4096, repeats: int = 5
) -> float:
    """Median wall time (ms) of one forward pass over `batch_size` rows in eval mode, after a
    warm-up: of a model, or of any module that maps ids to outputs (an embedding alone)."""
    model.eval()
    batch = ids[:batch_size]
    model(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def peak_memory_mb(model: Model, ids: torch.Tensor, batch_size: int = 4096) -> float:
    """Peak RSS growth (MiB) of a fresh process that loads `model` and scores `ids` in batches."""
    with tempfile.TemporaryDirectory() as folder:
        model_path, ids_path = Path(folder) / "model.pt", Path(folder) / "ids.pt"
        torch.save(model, model_path)
        torch.save(ids[: 4 * batch_size].clone(), ids_path)
        probe = subprocess.run(
            [sys.executable, "-m", "dnis.search.inference", str(model_path), str(ids_path), str(batch_size)],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
    return float(json.loads(probe.stdout.strip().splitlines()[-1])["peak_mb"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _probe(model_path: str, ids_path: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    ids = torch.load(ids_path)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux >= 4.0)
    before = _status_kib("VmRSS")
    model = torch.load(model_path, weights_only=False)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            model(ids[start : start + batch_size])
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))
