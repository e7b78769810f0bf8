"""Grid search of biased MF's training hyper-parameters on the VALIDATION split (test never read).

The winners are copied by hand into `quality_vs_peers.py` (MF_PARAMS). Usage:

    .venv/bin/python benchmarks/tune_mf.py --dataset movielens-100k
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from _common import ML100K, load

from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.tasks import make_task
from dnis.train import TrainConfig, Trainer

GRID = {
    "dim": (64, 128),
    "lr": (1e-3, 3e-3),
    "embedding_l2": (0.02, 0.05, 0.1),
    "batch_size": (256, 1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    for key in GRID:
        parser.add_argument(f"--{key.replace('_', '-')}", nargs="+", type=float, default=None,
                            help=f"values of {key} (default {GRID[key]})")  # fmt: skip
    args = parser.parse_args()
    grid = {k: tuple(getattr(args, k) or GRID[k]) for k in GRID}
    for key in ("dim", "batch_size"):
        grid[key] = tuple(int(v) for v in grid[key])
    torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription
    path = ML100K if args.dataset == "movielens-100k" else None
    ds = load(args.dataset, "rating", path=path, seed=0)
    task = make_task(ds)
    rows = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        torch.manual_seed(0)
        embedding = FusedEmbedding(FieldLayout.from_dataset(ds), params["dim"])
        model = build("mf", ds.schema, embedding, biased=True)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=params["batch_size"],
            lr=params["lr"],
            optimizer="adam",
            embedding_l2=params["embedding_l2"],
            patience=args.patience,
            seed=0,
        )
        started = time.perf_counter()
        result = Trainer(model, task, config).fit()
        seconds = time.perf_counter() - started
        rows.append((result.valid["rmse"], result.valid["mae"], result.best_epoch, params, seconds))
        print(
            f"{params} best_epoch={result.best_epoch} valid_rmse={result.valid['rmse']:.4f} "
            f"valid_mae={result.valid['mae']:.4f} {seconds:.1f}s",
            flush=True,
        )
    rows.sort(key=lambda r: r[0])
    lines = [
        f"# MF tuning on {args.dataset} (validation split, seed 0, Adam, patience {args.patience})",
        "",
        "| valid RMSE | valid MAE | best epoch | dim | lr | embedding_l2 | batch | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rmse, mae, epoch, p, seconds in rows:
        lines.append(
            f"| {rmse:.4f} | {mae:.4f} | {epoch} | {p['dim']} | {p['lr']:g} | "
            f"{p['embedding_l2']:g} | {p['batch_size']} | {seconds:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"mf_tuning_{args.dataset}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
