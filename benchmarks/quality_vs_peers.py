"""Quality of our models next to established peers, on the same splits.

- rating (MovieLens-100K and latest-small, random 80/10/10, seed 0): our biased MF vs Surprise
  `SVD()` with its default settings; RMSE and MAE on test.
- ctr (latest-small, label rating >= 4): our FM and DeepFM vs scikit-learn `LogisticRegression` on
  the same one-hot / multi-hot features; AUC and logloss on test.
- topk (latest-small, leave-last-out): our BPR-MF vs a most-popular ranker, both through our
  `TopKTask.evaluate` (full ranking, known items masked); Recall@10/20 and NDCG@10/20.

Peers see exactly our splits: their inputs are rebuilt from our encoded ids, and an id 0 (a value
unseen in training) becomes a token that the peer never saw in training either, so both sides treat
it as unknown. Our hyper-parameters were chosen on the validation split only (`tune_mf.py` for MF);
every model reads the test split once. Peers need the `bench` extra
(`pip install -e .[bench]`); without it their rows say "unavailable".

    .venv/bin/python benchmarks/quality_vs_peers.py            # full run -> results/quality.md
    .venv/bin/python benchmarks/quality_vs_peers.py --quick    # smoke run: latest-small, few epochs
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ML100K, have, load, machine

from dnis.data.dataset import EncodedDataset
from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.models.base import Model
from dnis.tasks import make_task
from dnis.train import TrainConfig, Trainer

SEED = 0
SMALL = "movielens-latest-small"
ML100K_NAME = "movielens-100k"

# Biased MF, chosen by `tune_mf.py` on the VALIDATION split only (Adam; early stopping on valid
# RMSE, patience 3, best epoch restored; 60 epochs at most). Grid searched, as far as the time
# allowed (logs in results/mf_tuning_*.log):
# - movielens-100k: dim 64 x lr {1e-3, 3e-3} x embedding_l2 {0.02, 0.05, 0.1} x batch {256, 1024}
#   (all 12), plus dim 128 at lr 1e-3 (l2 0.02: 0.9094, no better). Best valid RMSE 0.8979.
# - latest-small: dim 64, batch 256, (lr 1e-3: l2 {0.02, 0.05}), (lr 3e-3: l2 {0.05, 0.1}), plus
#   lr 1e-3 / l2 0.02 / batch 1024. Best valid RMSE 0.8316 (Surprise SVD's valid RMSE: 0.859).
MF_PARAMS: dict[str, dict[str, Any]] = {
    ML100K_NAME: {"dim": 64, "lr": 3e-3, "embedding_l2": 0.1, "batch_size": 256},
    SMALL: {"dim": 64, "lr": 3e-3, "embedding_l2": 0.1, "batch_size": 256},
}
MF_EPOCHS = 60
# CTR: FM / DeepFM chosen on valid AUC with `tune_mf.py --task ctr` (Adam, patience 3, 25 epochs at
# most; logs in results/{fm,deepfm}_tuning_*.md). FM: dim {32, 64} x lr {1e-3, 3e-3}, embedding_l2
# 1e-2, batch 1024 -> dim 64, lr 1e-3 (valid AUC 0.8068). DeepFM at FM's winner, MLP 400-400-400,
# dropout {0, 0.3} -> dropout 0 (valid AUC 0.7980).
CTR_PARAMS: dict[str, dict[str, Any]] = {
    "fm": {"dim": 64, "lr": 1e-3, "embedding_l2": 1e-2, "batch_size": 1024, "epochs": 25},
    "deepfm": {"dim": 64, "lr": 1e-3, "embedding_l2": 1e-2, "batch_size": 1024, "epochs": 25,
               "dropout": 0.0, "hidden": (400, 400, 400)},
}  # fmt: skip
LR_C_GRID = (0.03, 0.1, 0.3, 1.0)  # inverse L2 strength of LogisticRegression, picked on valid
# BPR-MF, chosen on valid NDCG@10 by `tune_topk.py` (Adam, patience 5, 100 epochs at most; staged
# search over dim {32, 64}, lr {1e-3, 3e-3, 1e-2}, embedding_l2 {0, 1e-4, 1e-3, 1e-2 (+3e-2, 0.1)},
# batch {256, 1024, 4096}, init_std {0.01, 0.1}; log in results/topk_tuning.md).
BPR_PARAMS: dict[str, Any] = {
    "dim": 32, "lr": 1e-2, "embedding_l2": 1e-2, "batch_size": 1024, "init_std": 0.01,
    "patience": 5, "epochs": 100,
}  # fmt: skip
QUICK_EPOCHS = 2
# --quick (smoke test) trades quality for speed: bigger batches, a faster lr, few epochs.
QUICK_PARAMS: dict[str, Any] = {"dim": 32, "lr": 1e-2, "embedding_l2": 0.05, "batch_size": 1024}
QUICK_CTR_TOPK: dict[str, Any] = {"dim": 16, "lr": 1e-2, "embedding_l2": 1e-3, "batch_size": 4096}


@dataclass
class Row:
    dataset: str
    task: str
    model: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = float("nan")
    note: str = ""


# ----------------------------------------------------------------------------------------- ours


def train_ours(
    ds: EncodedDataset, model_name: str, params: dict[str, Any], epochs: int, **model_params: Any
) -> tuple[Model, dict[str, float], float, int]:
    """Train with our Trainer (early stopping on valid); test metrics, wall seconds, best epoch."""
    torch.manual_seed(SEED)
    embedding = FusedEmbedding(
        FieldLayout.from_dataset(ds), params["dim"], init_std=params.get("init_std", 0.01)
    )
    if model_name == "deepfm":
        for key in ("hidden", "dropout"):
            if key in params:
                model_params.setdefault(key, params[key])
    model = build(model_name, ds.schema, embedding, **model_params)
    task = make_task(ds)
    config = TrainConfig(
        epochs=epochs,
        batch_size=params["batch_size"],
        lr=params["lr"],
        optimizer=params.get("optimizer", "adam"),
        embedding_l2=params["embedding_l2"],
        weight_decay=params.get("weight_decay", 0.0),
        patience=params.get("patience", 3),
        seed=SEED,
    )
    started = time.perf_counter()
    result = Trainer(model, task, config).fit()
    seconds = time.perf_counter() - started
    return model, task.evaluate(model, "test"), seconds, result.best_epoch


class MostPop(Model):
    """Scores every item by its number of training interactions (same score for every user)."""

    def __init__(self, schema, embedding) -> None:
        super().__init__(schema, embedding)
        self.item_slot = schema.slot_range(schema.item).start
        self.register_buffer(
            "popularity", torch.zeros(embedding.layout.cardinalities[schema.index(schema.item)])
        )

    def fit(self, train_ids: torch.Tensor) -> MostPop:
        items = train_ids[:, self.item_slot]
        counts = torch.bincount(items, minlength=len(self.popularity)).float()
        self.popularity = counts[: len(self.popularity)]
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.popularity[ids[:, self.item_slot]]


# ---------------------------------------------------------------------------------------- peers


def surprise_svd(ds: EncodedDataset) -> Row:
    from surprise import SVD, Dataset, Reader, accuracy

    user = ds.schema.slot_range(ds.schema.user or "user").start
    item = ds.schema.slot_range(ds.schema.item or "item").start

    def triples(split: str) -> list[tuple[str, str, float]]:
        data = ds.split(split)
        ids = data.ids.numpy()
        # Our id 0 is "unseen in training": give it a token Surprise never saw in training either.
        users = [f"u{i}" if i else "unknown" for i in ids[:, user]]
        items = [f"i{i}" if i else "unknown" for i in ids[:, item]]
        return list(zip(users, items, data.labels.double().tolist(), strict=True))

    import pandas as pd

    train = pd.DataFrame(triples("train"), columns=["user", "item", "rating"])
    scale = (float(train["rating"].min()), float(train["rating"].max()))
    trainset = Dataset.load_from_df(train, Reader(rating_scale=scale)).build_full_trainset()
    algo = SVD(random_state=SEED)  # defaults: 100 factors, 20 epochs, lr 0.005, reg 0.02
    started = time.perf_counter()
    algo.fit(trainset)
    seconds = time.perf_counter() - started
    predictions = algo.test(triples("test"))
    metrics = {
        "rmse": accuracy.rmse(predictions, verbose=False),
        "mae": accuracy.mae(predictions, verbose=False),
    }
    return Row(ds.name, "rating", "Surprise SVD (defaults)", metrics, seconds)


def one_hot(ds: EncodedDataset, split: str):
    """Sparse [N, sum of cardinalities] matrix: one column per (field, id), as our fused table.

    Categorical and numeric slots are one-hot (id 0 = OOV is a real column, as our OOV row is);
    sequence fields are multi-hot over their non-padding ids, weighted 1/count when our pooling is
    the mean, so the logistic regression sees the same field vectors our linear terms do.
    """
    from scipy import sparse

    layout = FieldLayout.from_dataset(ds)
    ids = ds.split(split).ids
    n, slots = ids.shape
    columns = (ids + layout.slot_offsets()).numpy()
    slot_fields = np.asarray(layout.slot_fields)
    sequence_slot = np.asarray(layout.sequence_fields)[slot_fields]
    keep = (ids.numpy() != 0) | ~sequence_slot[None, :]
    counts = np.zeros((n, layout.num_fields))
    np.add.at(counts, (np.repeat(np.arange(n), slots), np.tile(slot_fields, n)), keep.ravel())
    mean = np.asarray(layout.mean_pooled)[slot_fields]
    weight = np.where(mean[None, :], 1.0 / np.maximum(counts[:, slot_fields], 1.0), 1.0) * keep
    rows = np.repeat(np.arange(n), slots)
    matrix = sparse.csr_matrix(
        (weight.ravel(), (rows, columns.ravel())), shape=(n, layout.total_rows)
    )
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def sklearn_lr(ds: EncodedDataset, quick: bool) -> Row:
    from sklearn.linear_model import LogisticRegression

    from dnis.tasks.metrics import auc, logloss

    x = {s: one_hot(ds, s) for s in ("train", "valid", "test")}
    y = {s: ds.split(s).labels.numpy() for s in ("train", "valid", "test")}
    best: tuple[float, float] | None = None
    started = time.perf_counter()
    for c in LR_C_GRID[:1] if quick else LR_C_GRID:
        model = LogisticRegression(C=c, max_iter=1000).fit(x["train"], y["train"])
        score = auc(
            torch.from_numpy(model.decision_function(x["valid"])), torch.from_numpy(y["valid"])
        )
        if best is None or score > best[0]:
            best = (score, c)
    assert best is not None
    model = LogisticRegression(C=best[1], max_iter=1000).fit(x["train"], y["train"])
    seconds = time.perf_counter() - started
    logits = torch.from_numpy(model.decision_function(x["test"]))
    labels = torch.from_numpy(y["test"]).float()
    metrics = {"auc": auc(logits, labels), "logloss": logloss(logits, labels)}
    note = f"C={best[1]:g} (picked on valid AUC; seconds include the C search)"
    return Row(ds.name, "ctr", "sklearn LogisticRegression (one-hot)", metrics, seconds, note)


# ------------------------------------------------------------------------------------ sections


def rating_rows(names: list[str], quick: bool) -> list[Row]:
    rows = []
    for name in names:
        ds = load(name, "rating", path=ML100K if name == ML100K_NAME else None, seed=SEED)
        params = QUICK_PARAMS if quick else MF_PARAMS[name]
        _, metrics, seconds, epoch = train_ours(
            ds, "mf", params, QUICK_EPOCHS if quick else MF_EPOCHS, biased=True
        )
        rows.append(
            Row(
                name,
                "rating",
                "dnis MF (biased)",
                metrics,
                seconds,
                f"{params}, best epoch {epoch}",
            )
        )
        if have("surprise"):
            rows.append(surprise_svd(ds))
        else:
            rows.append(
                Row(name, "rating", "Surprise SVD", note="unavailable (pip install -e .[bench])")
            )
    return rows


def ctr_rows(quick: bool) -> list[Row]:
    ds = load(SMALL, "ctr", seed=SEED)
    rows = []
    for model_name, label in (("fm", "dnis FM"), ("deepfm", "dnis DeepFM")):
        params = QUICK_CTR_TOPK if quick else CTR_PARAMS[model_name]
        epochs = 1 if quick else params["epochs"]
        _, metrics, seconds, epoch = train_ours(ds, model_name, params, epochs)
        rows.append(Row(SMALL, "ctr", label, metrics, seconds, f"{params}, best epoch {epoch}"))
    if have("sklearn") and have("scipy"):
        rows.append(sklearn_lr(ds, quick))
    else:
        rows.append(
            Row(
                SMALL,
                "ctr",
                "sklearn LogisticRegression",
                note="unavailable (pip install -e .[bench])",
            )
        )
    return rows


def topk_rows(quick: bool) -> list[Row]:
    ds = load(SMALL, "topk", seed=SEED)
    params = QUICK_CTR_TOPK if quick else BPR_PARAMS
    epochs = 1 if quick else BPR_PARAMS["epochs"]
    _, metrics, seconds, epoch = train_ours(ds, "bprmf", params, epochs)
    rows = [Row(SMALL, "topk", "dnis BPR-MF", metrics, seconds, f"{params}, best epoch {epoch}")]
    started = time.perf_counter()
    pop = MostPop(ds.schema, FusedEmbedding(FieldLayout.from_dataset(ds), 1)).fit(ds.train.ids)
    seconds = time.perf_counter() - started
    rows.append(Row(SMALL, "topk", "MostPop", make_task(ds).evaluate(pop, "test"), seconds))
    return rows


# -------------------------------------------------------------------------------------- report

METRICS = {
    "rating": ("rmse", "mae"),
    "ctr": ("auc", "logloss"),
    "topk": ("recall@10", "recall@20", "ndcg@10", "ndcg@20"),
}


def table(rows: list[Row], task: str) -> list[str]:
    names = METRICS[task]
    lines = [
        "| dataset | task | model | " + " | ".join(names) + " | train s | notes |",
        "|---" * (len(names) + 5) + "|",
    ]
    for row in (r for r in rows if r.task == task):
        values = [f"{row.metrics[m]:.4f}" if m in row.metrics else "unavailable" for m in names]
        seconds = "" if math.isnan(row.seconds) else f"{row.seconds:.1f}"
        lines.append(
            f"| {row.dataset} | {task} | {row.model} | "
            + " | ".join(values)
            + f" | {seconds} | {row.note} |"
        )
    return lines


def checks(rows: list[Row]) -> list[str]:
    """The goals this benchmark guards, each PASS/FAIL (or n/a without the peer)."""
    out = []

    def find(dataset: str, model_prefix: str) -> Row | None:
        for r in rows:
            if r.dataset == dataset and r.model.startswith(model_prefix) and r.metrics:
                return r
        return None

    mf100k = find(ML100K_NAME, "dnis MF")
    if mf100k is not None:
        ok = mf100k.metrics["rmse"] <= 0.935
        out.append(f"- {'PASS' if ok else 'FAIL'}: MF test RMSE on MovieLens-100K "
                   f"{mf100k.metrics['rmse']:.4f} <= 0.935")  # fmt: skip
    for dataset in (ML100K_NAME, SMALL):
        ours, svd = find(dataset, "dnis MF"), find(dataset, "Surprise SVD")
        if ours is None:
            continue
        if svd is None:
            out.append(f"- n/a: MF vs Surprise SVD on {dataset} (Surprise unavailable)")
            continue
        ok = ours.metrics["rmse"] <= svd.metrics["rmse"]
        out.append(
            f"- {'PASS' if ok else 'FAIL'}: MF test RMSE {ours.metrics['rmse']:.4f} <= "
            f"Surprise SVD {svd.metrics['rmse']:.4f} on {dataset}"
        )
    ctr = [r for r in (find(SMALL, "dnis FM"), find(SMALL, "dnis DeepFM")) if r is not None]
    lr = find(SMALL, "sklearn LogisticRegression")
    if ctr and lr is None:
        out.append(f"- n/a: FM/DeepFM vs LogisticRegression on {SMALL} (scikit-learn unavailable)")
    elif ctr and lr is not None:
        best = max(ctr, key=lambda r: r.metrics["auc"])
        ok = best.metrics["auc"] > lr.metrics["auc"]
        out.append(
            f"- {'PASS' if ok else 'FAIL'}: {best.model} test AUC {best.metrics['auc']:.4f} > "
            f"LogisticRegression {lr.metrics['auc']:.4f} on {SMALL}"
        )
    bpr, pop = find(SMALL, "dnis BPR-MF"), find(SMALL, "MostPop")
    if bpr is not None and pop is not None:
        ok = bpr.metrics["ndcg@10"] > pop.metrics["ndcg@10"]
        out.append(
            f"- {'PASS' if ok else 'FAIL'}: BPR-MF test NDCG@10 {bpr.metrics['ndcg@10']:.4f} > "
            f"MostPop {pop.metrics['ndcg@10']:.4f} on {SMALL}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: latest-small, few epochs")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "quality.md"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [SMALL] if args.quick else [ML100K_NAME, SMALL]
    rows = rating_rows(names, args.quick) + ctr_rows(args.quick) + topk_rows(args.quick)
    lines = [
        "# dnis quality vs peers" + (" (quick smoke run)" if args.quick else ""),
        "",
        f"Machine: {machine()}. Seed {SEED}; test split read once per model. "
        "Train seconds are wall time of fitting, validation passes included.",
        "",
    ]
    for task in ("rating", "ctr", "topk"):
        lines += table(rows, task) + [""]
    if args.quick:
        lines += ["Checks: skipped (quick mode trains too briefly to judge quality)", ""]
    else:
        lines += ["Checks:", *checks(rows), ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.json is not None:
        args.json.write_text(
            json.dumps([r.__dict__ for r in rows], indent=1, default=str), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
