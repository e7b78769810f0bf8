"""Lookup latency of the compact (searched) embeddings against the full-width fused table.

Same rows, same process, one torch thread, eval mode without autograd: one batch lookup (the
embedding module's forward) through FusedEmbedding (d=64), BlockMixedEmbedding and
RaggedEmbedding (both at 25% of the parameters, a random structure on 6 frequency blocks per
field), and, for comparison, the block-mixed table read the way its lookup worked before issue 20
(a flat index for every dim of every row, from `_row_index`). Two workloads: the same batch
looked up again and again (its rows stay in the caches), and `--batches` different batches in
turn (rows come from memory, as in serving). The modules are timed in alternating rounds (the
order rotated every round, `--repeats` lookups of each per round); a module's time is the median
over all its lookups, its ratio the median over rounds of its time over the fused table's in the
same round, by wall clock and by this thread's CPU time. The section "lookup-latency" of
docs/performance.md receives the table.

    .venv/bin/python benchmarks/lookup_latency.py [--batch 4096] [--rows 100000] [--fields 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, machine, write_section

from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.blocks import frequency_blocks
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding

REFERENCE = "fused d=64"


class PerDimLookup(torch.nn.Module):
    """A BlockMixedEmbedding read as its lookup did before issue 20: the searchsorted block of
    every row, a flat value index for each of its `dim` dims, one gather, times the keep mask."""

    def __init__(self, embedding: BlockMixedEmbedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        index, weight = e._row_index(ids + e.slot_offsets)
        return e.values.index_select(0, index.reshape(-1)).view(index.shape) * weight


def rounds(
    modules: dict[str, torch.nn.Module], batches: list[torch.Tensor], count: int, repeats: int
) -> dict[str, dict[str, list[list[float]]]]:
    """Seconds of every lookup by wall clock and thread CPU time, per module, per round; the
    lookups take the batches in turn."""
    times = {name: {"wall": [], "cpu": []} for name in modules}
    names = list(modules)
    with torch.no_grad():
        for module in modules.values():
            module.eval()
            module(batches[0])  # warm-up
        for r in range(count):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                wall, cpu = [], []
                for i in range(repeats):
                    ids = batches[(r * repeats + i) % len(batches)]
                    started, started_cpu = time.perf_counter(), time.thread_time()
                    modules[name](ids)
                    cpu.append(time.thread_time() - started_cpu)
                    wall.append(time.perf_counter() - started)
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=100_000, help="ids per field")
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10, help="lookups per module per round")
    parser.add_argument("--batches", type=int, default=16, help="batches of the second workload")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, f, d = args.rows, args.fields, args.dim
    layout = FieldLayout(tuple(f"f{i}" for i in range(f)), (n,) * f, tuple(range(f)),
                         (False,) * f, (False,) * f)  # fmt: skip
    counts = [np.r_[0, np.arange(n - 1, 0, -1)] for _ in range(f)]
    blocks = frequency_blocks(layout, counts, num_blocks=6)
    block_keep = torch.rand(blocks.num_blocks, d) < 0.25
    element_keep = torch.rand(layout.total_rows, d) < 0.25
    block_mixed = BlockMixedEmbedding(layout, d, blocks, block_keep)
    block_mixed.reset_parameters()
    modules: dict[str, torch.nn.Module] = {
        REFERENCE: FusedEmbedding(layout, d),
        "block mixed 25%": block_mixed,
        "block mixed 25%, per-dim index (before)": PerDimLookup(block_mixed),
        "ragged (element) 25%": RaggedEmbedding(layout, d, element_keep),
    }
    batches = [torch.randint(0, n, (args.batch, f)) for _ in range(max(args.batches, 1))]
    with torch.no_grad():
        torch.testing.assert_close(
            modules["block mixed 25%, per-dim index (before)"](batches[0]), block_mixed(batches[0])
        )
    workloads = {"same batch": batches[:1], f"{len(batches)} batches": batches}
    load_before = os.getloadavg()[0]
    times = {w: rounds(modules, b, args.rounds, args.repeats) for w, b in workloads.items()}
    load_after = os.getloadavg()[0]

    def ms(workload: str, name: str) -> float:
        return 1000 * statistics.median(t for run in times[workload][name]["wall"] for t in run)

    def ratio(workload: str, name: str, clock: str) -> float:
        runs = times[workload]
        pairs = zip(runs[name][clock], runs[REFERENCE][clock], strict=True)
        return statistics.median(statistics.median(a) / statistics.median(b) for a, b in pairs)

    same, many = workloads
    lines = [
        "## Lookup latency: compact tables vs the full-width table\n",
        f"One batch lookup (the embedding module's forward: {args.batch:,} rows x {f} fields, "
        f"{n:,} ids per field, width {d}) in eval mode without autograd, one process, one torch "
        "thread. The compact tables hold 25% of the parameters in a random structure on 6 "
        "frequency blocks per field (block mixed) or per row (ragged). The per-dim index row is "
        "the same block-mixed table read as its lookup did before issue 20 (a flat index for "
        f"every dim of every row). Workloads: the same batch again and again (its rows stay in "
        f"the caches), and {len(batches)} random batches in turn (rows come from memory). "
        f"{args.rounds} rounds per workload alternate the modules (the order rotated each round, "
        f"{args.repeats} lookups each): ms/batch is the median lookup by wall clock, a ratio the "
        "median over rounds of the module's time over the fused table's in the same round, by "
        "wall clock and by this thread's CPU time. `benchmarks/lookup_latency.py`.\n",
        f"Machine: {machine()}; 1-minute load average {load_before:.1f} before and "
        f"{load_after:.1f} after the run on {os.cpu_count()} CPUs (shared with other jobs; the "
        "ratios, measured side by side, are what to read).\n",
        f"| lookup | {same}: ms | vs fused (wall) | vs fused (CPU) | {many}: ms | "
        "vs fused (wall) | vs fused (CPU) | memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, module in modules.items():
        stored = isinstance(module, FusedEmbedding | BlockMixedEmbedding | RaggedEmbedding)
        memory = f"{module.memory_bytes() / 2**20:.1f} MiB" if stored else "the block mixed one"
        cells = [
            f"{ms(w, name):.3f} | {ratio(w, name, 'wall'):.2f}x | {ratio(w, name, 'cpu'):.2f}x"
            for w in workloads
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {memory} |")
    before = "block mixed 25%, per-dim index (before)"
    gains = [
        f"{ratio(w, before, 'cpu') / ratio(w, 'block mixed 25%', 'cpu'):.1f}x ({w})"
        for w in workloads
    ]
    lines.append(
        "\nThe block-mixed lookup reads each row's stored values as one window of `values` (the "
        "widest block's width), in one gather of the batch's rows through a strided view, and "
        "places them with one scatter per chunk of rows; against the per-dim index lookup of the "
        f"same table it is {' and '.join(gains)} faster by CPU time in this run."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(args.output, "lookup-latency", text)


if __name__ == "__main__":
    main()
