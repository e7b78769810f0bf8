"""Lookup latency of the compact (searched) and quantized tables against the full-width fused one.

Same rows, same process, one torch thread, eval mode without autograd: one batch lookup (the
embedding module's forward) through FusedEmbedding (d=64), BlockMixedEmbedding and
RaggedEmbedding (both at 25% of the parameters, a random structure on 6 frequency blocks per
field), for comparison the block-mixed table read the way its lookup worked before issue 20 (a
flat index for every dim of every row, from `_row_index`), and QuantizedEmbedding made from the
fused table (the same rows) at fp16, int8 and int4 (issue 19). The dequantize cost is timed, not
hidden: for each precision a "codes gather only" module does the quantized forward up to the
dequantize (ids + slot offsets, the gather of the rows' stored codes, and of their scale and bias
for int8/int4, as stored), so a quantized lookup's time splits into gather and dequantize
(lookup - gather only). Two workloads: the same batch looked up again and again (its rows stay in
the caches), and `--batches` different batches in turn (rows come from memory, as in serving).
The modules are timed in alternating rounds (the order rotated every round, `--repeats` lookups of
each per round); a module's time is the median over all its lookups, its ratio the median over
rounds of its time over the fused table's in the same round, and a dequantize share the median
over rounds of 1 - (gather only / quantized lookup), by wall clock and by this thread's CPU time.
The section "lookup-latency" of docs/performance.md receives the tables.

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
from dnis.embeddings.quantized import QuantizedEmbedding

REFERENCE = "fused d=64"
PRECISIONS = ("fp16", "int8", "int4")


def quantized(precision: str) -> str:
    return f"quantized {precision}"


def gather_only(precision: str) -> str:
    return f"quantized {precision}: codes gather only"


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


class CodesGather(torch.nn.Module):
    """A QuantizedEmbedding's forward up to its dequantize: ids + slot offsets, then the gather of
    the rows' stored codes (and, for int8/int4, of their fp16 scale and bias), returned as
    stored."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.embedding
        flat = (ids + e.slot_offsets).reshape(-1)
        if e.scale is None or e.bias is None:
            return (e.codes.index_select(0, flat),)
        return (
            e.codes.index_select(0, flat),
            e.scale.index_select(0, flat),
            e.bias.index_select(0, flat),
        )


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
    fused = FusedEmbedding(layout, d)
    modules: dict[str, torch.nn.Module] = {
        REFERENCE: fused,
        "block mixed 25%": block_mixed,
        "block mixed 25%, per-dim index (before)": PerDimLookup(block_mixed),
        "ragged (element) 25%": RaggedEmbedding(layout, d, element_keep),
    }
    for precision in PRECISIONS:
        table = QuantizedEmbedding.from_table(layout, fused.weight, precision)
        modules[quantized(precision)] = table
        modules[gather_only(precision)] = CodesGather(table)
    batches = [torch.randint(0, n, (args.batch, f)) for _ in range(max(args.batches, 1))]
    with torch.no_grad():
        torch.testing.assert_close(
            modules["block mixed 25%, per-dim index (before)"](batches[0]), block_mixed(batches[0])
        )
        # the quantized tables serve the fused table's rows to within one step of their grid
        exact, rows = fused(batches[0]), batches[0] + fused.slot_offsets
        for precision in PRECISIONS:
            table = modules[quantized(precision)]
            error = (table(batches[0]) - exact).abs().amax(dim=-1)
            step = exact.abs().amax(dim=-1) / 1024  # fp16: 10 mantissa bits
            if table.scale is not None:
                step = table.scale.float()[rows]
            assert bool((error <= step + 1e-6).all()), precision
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
    fp32_bytes = fused.memory_bytes()
    lines = [
        "## Lookup latency: compact and quantized tables vs the full-width table\n",
        f"One batch lookup (the embedding module's forward: {args.batch:,} rows x {f} fields, "
        f"{n:,} ids per field, width {d}) in eval mode without autograd, one process, one torch "
        "thread. The compact tables hold 25% of the parameters in a random structure on 6 "
        "frequency blocks per field (block mixed) or per row (ragged). The per-dim index row is "
        "the same block-mixed table read as its lookup did before issue 20 (a flat index for "
        "every dim of every row). The quantized tables are `QuantizedEmbedding.from_table` of the "
        "fused table's rows at fp16, int8 and int4 (row-wise fp16 scale and bias, int4 packed two "
        "per byte), dequantized to float32 in the lookup; each one's *codes gather only* row is "
        "its forward without the dequantize (the gather of the rows' codes, and of their scale "
        "and bias, as stored). Workloads: the same batch again and again (its rows stay in "
        f"the caches), and {len(batches)} random batches in turn (rows come from memory). "
        f"{args.rounds} rounds per workload alternate the modules (the order rotated each round, "
        f"{args.repeats} lookups each): ms/batch is the median lookup by wall clock, a ratio the "
        "median over rounds of the module's time over the fused table's in the same round, by "
        "wall clock and by this thread's CPU time; memory is every tensor the module saves, and "
        "for the quantized tables its ratio to the fused fp32 table's. "
        "`benchmarks/lookup_latency.py`.\n",
        f"Machine: {machine()}; 1-minute load average {load_before:.1f} before and "
        f"{load_after:.1f} after the run on {os.cpu_count()} CPUs (shared with other jobs; the "
        "ratios, measured side by side, are what to read).\n",
        f"| lookup | {same}: ms | vs fused (wall) | vs fused (CPU) | {many}: ms | "
        "vs fused (wall) | vs fused (CPU) | memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, module in modules.items():
        if isinstance(module, QuantizedEmbedding):
            size = module.memory_bytes()
            memory = f"{size / 2**20:.1f} MiB ({size / fp32_bytes:.2f}x fp32)"
        elif isinstance(module, CodesGather):
            memory = f"the {module.embedding.precision} one"
        elif isinstance(module, PerDimLookup):
            memory = "the block mixed one"
        else:
            memory = f"{module.memory_bytes() / 2**20:.1f} MiB"
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
        f"same table it is {' and '.join(gains)} faster by CPU time in this run. The ragged "
        "(element) lookup reads each row's values and their dims as one window of the widest "
        "row's width the same way, and one scatter places them; it used to build an index per "
        "stored entry (10.4x and 9.7x the fused table's time in the run before the change)."
    )

    def share(workload: str, precision: str, clock: str) -> float:
        runs = times[workload]
        pairs = zip(runs[gather_only(precision)][clock], runs[quantized(precision)][clock],
                    strict=True)  # fmt: skip
        return statistics.median(1 - statistics.median(g) / statistics.median(q) for g, q in pairs)

    lines += [
        "\n### Quantized lookup: gather vs dequantize\n",
        "Per precision, the quantized lookup's median ms split into the gather of the stored "
        "codes (the *codes gather only* row) and the dequantize to float32 (the lookup's median "
        "minus the gather's); the dequantize share is the median over rounds of 1 - gather only "
        "/ lookup in the same round.\n",
        "| precision | workload | lookup ms | gather ms | dequantize ms | dequantize share "
        "(wall) | dequantize share (CPU) | gather only vs fused fp32 (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision in PRECISIONS:
        for w in workloads:
            total, gather = ms(w, quantized(precision)), ms(w, gather_only(precision))
            lines.append(
                f"| {precision} | {w} | {total:.3f} | {gather:.3f} | {total - gather:.3f} | "
                f"{share(w, precision, 'wall'):.0%} | {share(w, precision, 'cpu'):.0%} | "
                f"{ratio(w, gather_only(precision), 'cpu'):.2f}x |"
            )
    reading = []
    for w in workloads:
        parts = ", ".join(
            f"{p} {ratio(w, quantized(p), 'cpu'):.2f}x ({share(w, p, 'cpu'):.0%})"
            for p in PRECISIONS
        )
        reading.append(f"{parts} ({w})")
    sizes = ", ".join(
        f"{p} {modules[quantized(p)].memory_bytes() / fp32_bytes:.2f}x" for p in PRECISIONS
    )
    gathers = [ratio(w, gather_only(p), "cpu") for w in workloads for p in PRECISIONS]
    lines.append(
        "\nBy CPU time a quantized lookup took this multiple of the fused fp32 lookup's time, "
        f"with the dequantize's share of it in brackets: {'; '.join(reading)}, for tables of "
        f"{sizes} the fp32 table's bytes. The gather of the codes alone took {min(gathers):.2f}x "
        f"to {max(gathers):.2f}x the fp32 lookup's CPU time (fewer bytes per row); the "
        "dequantize (a float conversion for fp16; times the row's scale plus its bias for int8; "
        "for int4 also the nibble split by & 15 and >> 4 and an interleave;) is work over the gathered "
        "rows that the fp32 lookup does not do, and it "
        "decides whether a quantized lookup is faster or slower than fp32's on this CPU."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(args.output, "lookup-latency", text)


if __name__ == "__main__":
    main()
