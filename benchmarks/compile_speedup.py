"""`train.compile`: training-step time of DeepFM compiled with torch.compile vs eager, same process.

DeepFM (width 16, MLP 400-400-400) on the synthetic generator with 16 fields of 5,000 ids, batch
4096, fused Adam, 1 torch thread. Both sides run the Trainer's step module (`step_module`, as
`dnis train` does) on the same batches; the step time is the mean over `--steps` steps after 10
warm-up steps (for the compiled side, after compiling). The compile time and the number of steps
after which compiling pays for itself are printed too. The section "compile" of
docs/performance.md receives the table.

    .venv/bin/python benchmarks/compile_speedup.py            # ~5 minutes on one core
    .venv/bin/python benchmarks/compile_speedup.py --steps 20 # quicker
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import ROOT, machine, write_section
from torch.nn import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per side")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dnis.data.synthetic import load_synthetic
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.models import build
    from dnis.train.trainer import TrainConfig, make_optimizer, step_module

    ranks = (8, 4, 2) * 3
    dataset = load_synthetic(
        task="ctr", n_rows=60_000, ranks=ranks, noise_fields=7, vocab=5000, seed=0
    )
    ids, labels, batch = dataset.train.ids, dataset.train.labels, 4096

    def side(compile_: bool) -> dict[str, float]:
        torch.manual_seed(0)
        embedding = FusedEmbedding(FieldLayout.from_dataset(dataset), 16)
        model = build("deepfm", dataset.schema, embedding, hidden=[400, 400, 400])
        config = TrainConfig(batch_size=batch, compile=compile_)
        net, optimizer = step_module(model, config), make_optimizer(model, config)

        def step(i: int) -> None:
            start = (i * batch) % (len(ids) - batch)
            rows = slice(start, start + batch)
            loss = F.binary_cross_entropy_with_logits(net(ids[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        started = time.perf_counter()
        step(0)  # the compiled side compiles here
        first = time.perf_counter() - started
        for i in range(1, 10):
            step(i)
        started = time.perf_counter()
        for i in range(10, 10 + args.steps):
            step(i)
        return {"first": first, "step": (time.perf_counter() - started) / args.steps}

    eager = side(False)
    compiled = side(True)
    speedup = eager["step"] / compiled["step"]
    saved = eager["step"] - compiled["step"]
    overhead = compiled["first"] - eager["first"]
    break_even = f"{overhead / saved:,.0f}" if saved > 0 else "never"
    load = os.getloadavg()[0]
    text = "\n".join(
        [
            "## torch.compile (`train.compile`)\n",
            f"DeepFM (width 16, MLP 400-400-400, {len(dataset.schema.names)} fields of up to "
            f"5,000 ids), batch {batch}, fused Adam, forward + backward + step through the "
            f"Trainer's step module; mean of {args.steps} steps after 10 warm-up steps. "
            f"`benchmarks/compile_speedup.py`.\n",
            f"Machine: {machine()}; 1-minute load average {load:.1f} (shared with other jobs).\n",
            "| side | first step s (compiles) | step ms | speedup |",
            "|---|---:|---:|---:|",
            f"| eager | {eager['first']:.2f} | {eager['step'] * 1e3:.1f} | 1.00x |",
            f"| compiled | {compiled['first']:.1f} | {compiled['step'] * 1e3:.1f} | "
            f"{speedup:.2f}x |",
            "",
            f"Compiling pays for itself after about {break_even} steps "
            f"({overhead:.0f} s of compiling / {saved * 1e3:.1f} ms saved per step): worth it for "
            "runs of many epochs on large data, not for short ones, hence off by default.",
        ]
    )
    print(text)
    write_section(args.output, "compile", text)


if __name__ == "__main__":
    main()
