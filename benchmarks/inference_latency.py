"""Inference latency per batch of compact (searched) models against the full-width ones.

One process, one torch thread, eval mode, no autograd: the median time of one forward pass of a
batch through a model built around the full-width `FusedEmbedding`, a `BlockMixedEmbedding` and
a `RaggedEmbedding` (both at 25% of the parameters, a random structure on 6 frequency blocks per
field, as a search would leave them). DeepFM (MLP 400-400-400) and FM at width 16 on the
synthetic generator's ids, MF at width 64 on MovieLens latest-small ratings (the bundled data).
The ratios are against the full-width model of the same kind in the same process. The section
"inference-latency" of docs/performance.md receives the table.

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
    parser.add_argument(
        "--models", nargs="+", choices=("deepfm", "fm", "mf"), default=["deepfm", "fm", "mf"]
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dnis.data import load as load_dataset
    from dnis.data.synthetic import load_synthetic
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.embeddings.blocks import dataset_blocks
    from dnis.embeddings.mixed import BlockMixedEmbedding, RaggedEmbedding
    from dnis.models import build
    from dnis.search.inference import batch_latency_ms

    synthetic = load_synthetic(
        task="ctr", n_rows=200_000, ranks=(8, 4, 2, 8, 4, 2), noise_fields=2, vocab=args.vocab
    )
    ratings = load_dataset("movielens-latest-small", "rating", seed=0)
    settings = {  # model -> (dataset, width, model params)
        "deepfm": (synthetic, 16, {"hidden": [400, 400, 400]}),
        "fm": (synthetic, 16, {}),
        "mf": (ratings, 64, {}),
    }
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        dataset, dim, params = settings[name]
        layout = FieldLayout.from_dataset(dataset)
        blocks = dataset_blocks(dataset, 6, "count")
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
        reference = None
        for kind, embedding in embeddings.items():
            model = build(name, dataset.schema, embedding, **params).eval()
            ms = batch_latency_ms(model, ids, len(ids), args.repeats)
            reference = reference or ms
            rows.append((name, dim, layout.total_rows, len(ids), kind, ms, ms / reference,
                         embedding.memory_bytes()))  # fmt: skip
    load = os.getloadavg()[0]
    lines = [
        "## Inference latency: compact vs full-width model\n",
        "One forward pass of a batch in eval mode without autograd, median of "
        f"{args.repeats}: DeepFM (MLP 400-400-400) and FM at width 16 on the synthetic generator "
        f"(8 fields), MF at width 64 on MovieLens latest-small ratings; the compact embeddings "
        "hold 25% of the parameters in a random structure over 6 frequency blocks per field "
        "(block mixed) or per row (ragged). `benchmarks/inference_latency.py`.\n",
        f"Machine: {machine()}; 1-minute load average {load:.1f} (shared with other jobs).\n",
        "| model | width | table rows | batch | model's embedding | ms/batch | vs full width "
        "| embedding memory |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
        *(
            f"| {model} | {dim} | {total:,} | {batch:,} | {kind} | {ms:.2f} | {ratio:.2f}x "
            f"| {memory / 2**20:.2f} MiB |"
            for model, dim, total, batch, kind, ms, ratio, memory in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(args.output, "inference-latency", text)


if __name__ == "__main__":
    main()
