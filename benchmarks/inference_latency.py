"""Inference latency per batch of a compact (searched) DeepFM against the full-width one.

One process, one torch thread, eval mode, no autograd: the median time of one forward pass of a
batch through DeepFM (MLP 400-400-400) built around the full-width `FusedEmbedding` (width 16), a
`BlockMixedEmbedding` and a `RaggedEmbedding` (both at 25% of the parameters, a random structure on
6 frequency blocks per field, as a search would leave them), on the synthetic generator's ids. The
ratios are against the full-width model in the same process. The section "inference-latency" of
docs/performance.md receives the table.

    .venv/bin/python benchmarks/inference_latency.py [--batch 4096] [--vocab 100000]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _common import ROOT, machine, write_section


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=100_000, help="ids per field (at most)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dnis.data.synthetic import load_synthetic
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.embeddings.blocks import dataset_blocks
    from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
    from dnis.models import build
    from dnis.search.inference import batch_latency_ms

    dataset = load_synthetic(
        task="ctr", n_rows=200_000, ranks=(8, 4, 2, 8, 4, 2), noise_fields=2, vocab=args.vocab
    )
    layout, dim = FieldLayout.from_dataset(dataset), 16
    blocks = dataset_blocks(dataset, 6, "count")
    torch.manual_seed(0)
    embeddings = {
        "full width (fused)": FusedEmbedding(layout, dim),
        "block mixed 25%": BlockMixedEmbedding(
            layout, dim, blocks, torch.rand(blocks.num_blocks, dim) < 0.25
        ),
        "ragged (element) 25%": RaggedEmbedding(
            layout, dim, torch.rand(layout.total_rows, dim) < 0.25
        ),
    }
    ids = dataset.test.ids[: args.batch]
    rows = []
    for name, embedding in embeddings.items():
        model = build("deepfm", dataset.schema, embedding, hidden=[400, 400, 400]).eval()
        ms = batch_latency_ms(model, ids, len(ids), args.repeats)
        rows.append((name, ms, embedding.memory_bytes()))
    reference = rows[0][1]
    load = os.getloadavg()[0]
    lines = [
        "## Inference latency: compact vs full-width model\n",
        f"DeepFM (MLP 400-400-400, width 16) on the synthetic generator ({len(layout.names)} "
        f"fields, {layout.total_rows:,} table rows), one forward pass of a batch of {len(ids):,} "
        f"rows in eval mode without autograd, median of {args.repeats}; the compact embeddings "
        "hold 25% of the parameters in a random structure over 6 frequency blocks per field. "
        "`benchmarks/inference_latency.py`.\n",
        f"Machine: {machine()}; 1-minute load average {load:.1f} (shared with other jobs).\n",
        "| model's embedding | ms/batch | vs full width | embedding memory |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {ms:.2f} | {ms / reference:.2f}x | {memory / 2**20:.2f} MiB |"
            for name, ms, memory in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(args.output, "inference-latency", text)


if __name__ == "__main__":
    main()
