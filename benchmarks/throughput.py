"""Training throughput of our DeepFM next to a minimal hand-written PyTorch loop doing the same work.

Data: the synthetic CTR generator with 26 categorical fields (20 signal + 6 noise, Zipf ids) and 13
numeric fields (bucketised into ids by our encoder), Criteo-shaped. Both sides train on the very
same id/label tensors, width 16, batch 4096, MLP 400-400-400, linear terms + FM + MLP, Adam.

- ours: `Trainer.train_epoch` (our `batches` loader, `CTRTask.loss`, the trainer's optimizer and
  per-batch checks), i.e. exactly what `Trainer.fit` runs per epoch, minus validation.
- handwritten: one `nn.Embedding` over all fields with per-field offsets, a width-1 one for the
  linear terms, the FM term and the MLP, a randperm shuffle and `torch.optim.Adam`.

One warm-up epoch each, then `--repeats` epochs of each, alternating; the median samples/s of each
side and the ratio ours / handwritten (goal >= 0.8) are printed with the machine.

    .venv/bin/python benchmarks/throughput.py [--rows 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine
from torch import nn
from torch.nn import functional as F

from dnis.data.synthetic import load_synthetic
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.tasks import make_task
from dnis.train import TrainConfig, Trainer

WIDTH = 16
BATCH = 4096
HIDDEN = (400, 400, 400)
LR = 1e-3


class HandDeepFM(nn.Module):
    """The reference: what a practitioner would write for DeepFM over single-slot fields."""

    def __init__(
        self, cardinalities: list[int], dim: int, hidden: tuple[int, ...], sparse: bool = False
    ) -> None:
        """`sparse`: both tables make sparse gradients (for `torch.optim.SparseAdam`)."""
        super().__init__()
        sizes = torch.tensor([0, *cardinalities[:-1]])
        self.register_buffer("offsets", torch.cumsum(sizes, 0))
        rows = sum(cardinalities)
        self.embedding = nn.Embedding(rows, dim, sparse=sparse)
        self.linear = nn.Embedding(rows, 1, sparse=sparse)
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.linear.weight)
        self.bias = nn.Parameter(torch.zeros(()))
        layers: list[nn.Module] = []
        width = len(cardinalities) * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids + self.offsets
        e = self.embedding(ids)  # [B, F, d]
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return self.linear(ids).sum((1, 2)) + self.bias + fm + self.mlp(e.flatten(1)).squeeze(1)


def hand_epoch(model: HandDeepFM, optimizer, ids, labels, generator) -> None:
    order = torch.randperm(len(ids), generator=generator)
    for start in range(0, len(ids), BATCH):
        index = order[start : start + BATCH]
        loss = F.binary_cross_entropy_with_logits(model(ids[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000, help="rows generated (80%% train)")
    parser.add_argument("--vocab", type=int, default=10_000, help="ids per categorical field")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs of each side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    ds = load_synthetic(
        task="ctr",
        n_rows=args.rows,
        ranks=(8, 8, 8, 6, 6, 6, 4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1),
        noise_fields=6,
        numeric_fields=13,
        vocab=args.vocab,
        seed=0,
    )
    train = ds.train
    n = len(train)
    print(
        f"data: {n} training rows, {len(ds.schema.features)} fields "
        f"({sum(ds.cardinalities)} ids), generated in {time.perf_counter() - started:.1f}s"
    )

    torch.manual_seed(0)
    ours = build(
        "deepfm", ds.schema, FusedEmbedding(FieldLayout.from_dataset(ds), WIDTH), hidden=HIDDEN
    )
    trainer = Trainer(ours, make_task(ds), TrainConfig(epochs=1, batch_size=BATCH, lr=LR, seed=0))
    torch.manual_seed(0)
    hand = HandDeepFM(ds.cardinalities, WIDTH, HIDDEN)
    hand_optimizer = torch.optim.Adam(hand.parameters(), lr=LR)
    hand.train()
    generator = torch.Generator().manual_seed(0)

    def run_ours(epoch: int) -> float:
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)  # the exact per-epoch path of Trainer.fit
        return n / (time.perf_counter() - t0)

    def run_hand() -> float:
        t0 = time.perf_counter()
        hand_epoch(hand, hand_optimizer, train.ids, train.labels, generator)
        return n / (time.perf_counter() - t0)

    run_ours(1)  # warm-up (allocator, Adam state, kernels)
    run_hand()
    ours_rates, hand_rates = [], []
    for r in range(args.repeats):
        if r % 2 == 0:  # alternate which side goes first
            ours_rates.append(run_ours(r + 2))
            hand_rates.append(run_hand())
        else:
            hand_rates.append(run_hand())
            ours_rates.append(run_ours(r + 2))
    ours_rate, hand_rate = statistics.median(ours_rates), statistics.median(hand_rates)
    params_ours = sum(p.numel() for p in ours.parameters())
    params_hand = sum(p.numel() for p in hand.parameters())
    print(f"machine: {machine()}")
    print(f"DeepFM width {WIDTH}, batch {BATCH}, MLP {HIDDEN}, Adam lr {LR}; parameters "
          f"ours {params_ours}, handwritten {params_hand}")  # fmt: skip
    print(
        f"ours samples/s:        {ours_rate:,.0f}  (runs: {', '.join(f'{x:,.0f}' for x in ours_rates)})"
    )
    print(
        f"handwritten samples/s: {hand_rate:,.0f}  (runs: {', '.join(f'{x:,.0f}' for x in hand_rates)})"
    )
    ratio = ours_rate / hand_rate
    print(
        f"ratio ours/handwritten: {ratio:.3f} (goal >= 0.8: {'PASS' if ratio >= 0.8 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
