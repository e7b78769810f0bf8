"""Training-step cost of every method's input layer against the plain fused table.

What each search method adds to a training step is mostly its input layer: DNIS's soft selection,
PEP's soft thresholds, AutoDim's candidate tables, MDE's projections, hashing, QR, ... This times
forward + backward of each layer alone (no model, no optimizer) on real MovieLens CTR batches
(the bundled latest-small, every field of the DeepFM setting of `compare_methods.py`: width 64,
6 frequency blocks per field, structures at 25% of the parameters where a layer has one), median
over repeats, one process, one torch thread, and divides by the fused d=64 table's time. The
section "embedding-step" of docs/performance.md receives the table.

    .venv/bin/python benchmarks/embedding_step.py [--batch 1024] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ROOT, load, machine, write_section


def model_step(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer as the searches' model steps run it: alpha (the architecture) gets no gradient
    there, only in the architecture steps."""
    layer.alpha.requires_grad_(False)
    return layer


def layers(dataset, dim: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Every method's training-time input layer, built lazily, at about 25% where it has a size."""
    from dnis.embeddings.blocks import dataset_blocks
    from dnis.embeddings.fused import FusedEmbedding
    from dnis.embeddings.gated import GatedEmbedding
    from dnis.embeddings.hashed import HashedEmbedding
    from dnis.embeddings.layout import FieldLayout
    from dnis.embeddings.masked import MaskedEmbedding, SoftThresholdEmbedding, readable_rows
    from dnis.embeddings.mixed import BlockMixedEmbedding
    from dnis.embeddings.multiplexed import MultiplexedEmbedding
    from dnis.embeddings.multiwidth import MultiWidthEmbedding
    from dnis.embeddings.projected import ProjectedBlockEmbedding
    from dnis.embeddings.qr import QREmbedding
    from dnis.embeddings.soft_selection import SoftSelectionEmbedding

    layout = FieldLayout.from_dataset(dataset)
    blocks = dataset_blocks(dataset, 6)
    cards = layout.cardinalities
    quarter = [max(1, c // 4) for c in cards]
    readable = readable_rows(layout)  # sequence padding rows: no mask may keep them
    # MDE-like widths: each field's most frequent block full width, halving block by block
    rank = [blocks.field[:k].count(f) for k, f in enumerate(blocks.field)]
    widths = [max(1, dim >> r) for r in rank]
    return {
        "fused d=64 (uniform, reference)": lambda: FusedEmbedding(layout, dim),
        "soft selection (DNIS search)": lambda: model_step(
            SoftSelectionEmbedding(layout, dim, blocks)
        ),
        "block mixed 25% (DNIS retrain)": lambda: BlockMixedEmbedding(
            layout, dim, blocks, torch.rand(blocks.num_blocks, dim) < 0.25
        ),
        "soft threshold (PEP search)": lambda: SoftThresholdEmbedding(layout, dim),
        "masked 25% (PEP retrain, DSL)": lambda: MaskedEmbedding(
            layout, dim, (torch.rand(layout.total_rows, dim) < 0.25) & readable.unsqueeze(1)
        ),
        "multi-width (AutoDim search)": lambda: model_step(
            MultiWidthEmbedding(layout, dim, [2, 8, 16, 24, 32, 64])
        ),
        "projected blocks (MDE, AutoDim retrain)": lambda: ProjectedBlockEmbedding(
            layout, dim, blocks, widths
        ),
        "gated (OptFS search)": lambda: GatedEmbedding(layout, dim),
        "hashed 25% (hashing)": lambda: HashedEmbedding(layout, dim, quarter),
        "quotient-remainder (QR)": lambda: QREmbedding(
            layout, dim, [max(1, c // 8) for c in cards]
        ),
        "multiplexed 25% (Unified)": lambda: MultiplexedEmbedding(
            layout, dim, max(1, layout.total_rows // 4)
        ),
    }


def step_times(modules: dict[str, torch.nn.Module], batches: list[torch.Tensor], repeats: int):
    """Median ms of forward + backward of one batch per module (gradients dropped after each).

    Round-robin: every round times each module once, so load from other jobs falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(repeats + 2):
        ids = batches[i % len(batches)]
        for name, module in modules.items():
            module.train()
            started = time.perf_counter()
            module(ids).sum().backward()
            elapsed = time.perf_counter() - started
            module.zero_grad(set_to_none=True)
            if i >= 2:  # the first two rounds warm up allocators and caches
                times[name].append(elapsed)
    return {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from dnis import models
    from dnis.data.loader import batches

    dataset = load("movielens-latest-small", "ctr")
    generator = torch.Generator().manual_seed(0)
    train = batches(dataset.train, args.batch, shuffle=True, generator=generator)
    samples = [ids for ids, _ in (next(train) for _ in range(8))]
    builders = layers(dataset, args.dim)
    modules = {name: build() for name, build in builders.items()}
    reference_name = next(iter(builders))  # the fused table
    scale = "DeepFM (MLP 400-400-400) around the fused table: the whole model"
    modules[scale] = models.build(
        "deepfm", dataset.schema, builders[reference_name](), hidden=[400, 400, 400]
    )
    times = step_times(modules, samples, args.repeats)
    reference = times[reference_name]
    lines = [
        "# Training-step cost of each method's input layer",
        "",
        f"Forward + backward of the input layer alone (no model, no optimizer), median of "
        f"{args.repeats} batches of {args.batch} MovieLens latest-small CTR rows "
        f"({len(dataset.schema.names)} fields, width {args.dim}, 6 frequency blocks per "
        "field, structures at about 25% of the parameters where a layer has one), against the "
        "fused table in the same process. `benchmarks/embedding_step.py`.",
        "",
        f"Machine: {machine()}; 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(other jobs stretch every row alike; the ratios are what to read).",
        "",
        "| input layer | ms per step | vs fused |",
        "|---|---:|---:|",
        *[f"| {name} | {ms:.2f} | {ms / reference:.2f}x |" for name, ms in times.items()],
        "",
        "The last row, the whole DeepFM step with the fused table, is for scale: what a layer "
        "adds to a training step is its ms here minus the fused table's.",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(args.output, "embedding-step", text)


if __name__ == "__main__":
    main()
