"""Grid search of our models' training hyper-parameters on the VALIDATION split (test never read).

- rating (default): biased MF, early stopping on valid RMSE.
- ctr (`--task ctr --model fm|deepfm`): FM / DeepFM on latest-small (label rating >= 4), early
  stopping on valid AUC; `--dropout` and `--hidden` (e.g. 400-400-400) are DeepFM's MLP.

(BPR-MF for top-k has its own search: `tune_topk.py`.) The winners are copied by hand into
`quality_vs_peers.py` (MF_PARAMS, CTR_PARAMS). Usage:

    .venv/bin/python benchmarks/tune_mf.py --dataset movielens-100k
    .venv/bin/python benchmarks/tune_mf.py --dataset movielens-latest-small --task ctr --model fm \
        --dim 32 64 --lr 1e-3 --embedding-l2 1e-2 --batch-size 1024 --epochs 25
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
MLP_GRID = {"dropout": (0.0,), "hidden": ("400-400-400",)}  # DeepFM only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--task", default="rating", choices=("rating", "ctr"))
    parser.add_argument("--model", default=None, help="mf (rating); fm or deepfm (ctr)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    for key in GRID:
        parser.add_argument(f"--{key.replace('_', '-')}", nargs="+", type=float, default=None,
                            help=f"values of {key} (default {GRID[key]})")  # fmt: skip
    parser.add_argument("--dropout", nargs="+", type=float, default=None)
    parser.add_argument("--hidden", nargs="+", default=None, help="MLP widths, e.g. 400-400-400")
    args = parser.parse_args()
    model_name = args.model or ("mf" if args.task == "rating" else "fm")
    grid = {k: tuple(getattr(args, k) or GRID[k]) for k in GRID}
    for key in ("dim", "batch_size"):
        grid[key] = tuple(int(v) for v in grid[key])
    if model_name == "deepfm":
        grid["dropout"] = tuple(args.dropout or MLP_GRID["dropout"])
        grid["hidden"] = tuple(args.hidden or MLP_GRID["hidden"])
    torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription
    path = ML100K if args.dataset == "movielens-100k" else None
    ds = load(args.dataset, args.task, path=path, seed=0)
    task = make_task(ds)
    metric, other = ("rmse", "mae") if args.task == "rating" else ("auc", "logloss")
    rows = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        torch.manual_seed(0)
        embedding = FusedEmbedding(FieldLayout.from_dataset(ds), params["dim"])
        extra: dict = {"biased": True} if model_name == "mf" else {}
        if model_name == "deepfm":
            extra = {
                "dropout": params["dropout"],
                "hidden": tuple(int(h) for h in params["hidden"].split("-")),
            }
        model = build(model_name, ds.schema, embedding, **extra)
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
        rows.append((result.valid[metric], result.valid[other], result.best_epoch, params, seconds))
        print(
            f"{params} best_epoch={result.best_epoch} valid_{metric}={result.valid[metric]:.4f} "
            f"valid_{other}={result.valid[other]:.4f} {seconds:.1f}s",
            flush=True,
        )
    rows.sort(key=lambda r: -r[0] if task.higher_is_better else r[0])
    keys = list(grid)
    lines = [
        f"# {model_name} tuning on {args.dataset} {args.task} "
        f"(validation split, seed 0, Adam, patience {args.patience}, <= {args.epochs} epochs)",
        "",
        f"| valid {metric} | valid {other} | best epoch | " + " | ".join(keys) + " | seconds |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for score, second, epoch, p, seconds in rows:
        cells = [f"{p[k]:g}" if isinstance(p[k], float) else str(p[k]) for k in keys]
        lines.append(
            f"| {score:.4f} | {second:.4f} | {epoch} | " + " | ".join(cells) + f" | {seconds:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    name = (
        f"{model_name}_tuning_{args.dataset}"
        if args.task != "rating"
        else f"mf_tuning_{args.dataset}"
    )
    out = args.out or Path(__file__).parent / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
