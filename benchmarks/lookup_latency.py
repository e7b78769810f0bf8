"""Lookup latency of the compact (searched) embeddings against the full-width fused table.

Same rows, same process, one torch thread: the median time of one batch lookup through
FusedEmbedding (d=64), BlockMixedEmbedding and RaggedEmbedding (both at 25% of the parameters,
random structure on frequency blocks), and the ratios to the fused table.

    .venv/bin/python benchmarks/lookup_latency.py [--batch 4096] [--rows 100000] [--fields 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.embeddings.blocks import frequency_blocks
from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
from dnis.search.inference import batch_latency_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=100_000, help="ids per field")
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
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
    modules = {
        "fused d=64": FusedEmbedding(layout, d),
        "block mixed 25%": BlockMixedEmbedding(layout, d, blocks, block_keep),
        "ragged (element) 25%": RaggedEmbedding(layout, d, element_keep),
    }
    ids = torch.randint(0, n, (args.batch, f))
    times = {name: batch_latency_ms(m, ids, len(ids), args.repeats) for name, m in modules.items()}
    reference = times["fused d=64"]  # its own row's time: the ratio of that row is 1 exactly
    print(f"batch {args.batch} x {f} fields, {n:,} ids per field, width {d}, 1 torch thread")
    for name, module in modules.items():
        ms = times[name]
        mib = module.memory_bytes() / 2**20
        print(f"{name:22s} {ms:8.3f} ms/batch  {ms / reference:6.2f}x fused   {mib:8.1f} MiB")


if __name__ == "__main__":
    main()
