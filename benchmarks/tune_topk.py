"""Search of BPR-MF's training hyper-parameters on the VALIDATION split (test never read).

latest-small top-k (leave-last-out; full ranking of every item, the user's training items masked),
BPR loss, Adam, early stopping on valid NDCG@20 (best epoch restored). Staged search:

1. a seeded random sample of `--samples` configs from the full space below;
2. one-factor-at-a-time moves around the best so far (each other value of every parameter, and
   embedding_l2 past the space's edge), repeated while the best changes;
3. the settings used before this search, for reference.

Validation is the library's `TopKTask.evaluate`; `--check` first asserts that its per-user NDCG
equals a brute-force numpy computation on the first 300 users (so the tuning numbers are the
metric a user gets). The winner is copied by hand into `quality_vs_peers.py` (BPR_PARAMS).

    .venv/bin/python benchmarks/tune_topk.py --check --samples 12
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import load

from dnis.embeddings import FieldLayout, FusedEmbedding
from dnis.models import build
from dnis.tasks import make_task
from dnis.tasks.topk import KS, TopKTask
from dnis.train import TrainConfig, Trainer

SPACE: dict[str, tuple[Any, ...]] = {
    "dim": (32, 64),
    "lr": (1e-3, 3e-3, 1e-2),
    "embedding_l2": (0.0, 1e-4, 1e-3, 1e-2),
    "batch_size": (256, 1024, 4096),
    "init_std": (0.01, 0.1),
}
EDGE: dict[str, tuple[Any, ...]] = {"embedding_l2": (3e-2, 1e-1)}
# the settings before this search (best epoch 1 under patience 3), rerun for reference
REFERENCE = {"dim": 64, "lr": 1e-3, "embedding_l2": 1e-3, "batch_size": 1024, "init_std": 0.01}
DATASET = "movielens-latest-small"


def brute_force(ds, model, task: TopKTask, users: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid NDCG@K (K = KS) of the first `users` evaluated users by plain numpy (every item
    scored, the user's training items masked unless held out, OOV never ranked), and the
    library's per-user values for them."""
    w = model.embedding.weight.detach().numpy()
    off = model.embedding.field_offsets.numpy()
    u_table = w[off[model.user_field] : off[model.user_field] + task.num_users]
    i_table = w[off[model.item_field] : off[model.item_field] + task.num_items]
    train, valid = ds.train.ids.numpy(), ds.valid.ids.numpy()
    evaluated, values = task.per_user(model, "valid")
    ndcg_columns = [2 * i + 1 for i in range(len(KS))]  # columns: recall@K, ndcg@K per K
    expected = []
    for user in evaluated[:users].tolist():
        relevant = set(valid[valid[:, task.user_slot] == user, task.item_slot].tolist()) - {0}
        s = i_table @ u_table[user]
        seen = set(train[train[:, task.user_slot] == user, task.item_slot].tolist()) - relevant
        s[list(seen)] = -np.inf
        s[0] = -np.inf
        top = np.argsort(-s, kind="stable")
        row = []
        for k in KS:
            hits = [i for i, item in enumerate(top[:k]) if item in relevant]
            ideal = sum(1 / np.log2(i + 2) for i in range(min(len(relevant), k)))
            row.append(sum(1 / np.log2(i + 2) for i in hits) / ideal if ideal else 0.0)
        expected.append(row)
    return np.array(expected), values[:users][:, ndcg_columns].numpy()


def run(ds, task, params: dict[str, Any], epochs: int, patience: int):
    torch.manual_seed(0)
    embedding = FusedEmbedding(FieldLayout.from_dataset(ds), params["dim"], params["init_std"])
    model = build("bprmf", ds.schema, embedding)
    config = TrainConfig(
        epochs=epochs,
        batch_size=params["batch_size"],
        lr=params["lr"],
        embedding_l2=params["embedding_l2"],
        patience=patience,
        seed=0,
    )
    started = time.perf_counter()
    result = Trainer(model, task, config).fit()
    return model, result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=12, help="stage-1 random configs")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1e9, help="stop starting runs after (s)")
    parser.add_argument("--check", action="store_true", help="verify the fast evaluator first")
    parser.add_argument("--no-stage2", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "topk_tuning.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = load(DATASET, "topk", seed=0)
    task = make_task(ds)
    assert isinstance(task, TopKTask)
    check_lines: list[str] = []
    if args.check:
        params = {"dim": 32, "lr": 1e-2, "embedding_l2": 0.0, "batch_size": 1024, "init_std": 0.1}
        model, _, _ = run(ds, task, params, epochs=5, patience=0)
        brute, lib = brute_force(ds, model, task, users=300)
        assert brute.any(), "a check on zeros alone checks nothing: train longer"
        assert np.allclose(brute, lib, atol=1e-9), (brute, lib)
        check_lines = [
            f"Evaluator check (5-epoch model {params}): numpy brute force on the first 300 valid "
            f"users, NDCG@{KS} {brute.mean(0).round(6).tolist()} == the library's "
            f"{lib.mean(0).round(6).tolist()}.",
            "",
        ]
        print(*check_lines, flush=True)
    rng = random.Random(0)
    seen: set[tuple] = set()
    rows: list[tuple[float, dict[str, Any], int, float, str]] = []
    start = time.perf_counter()

    def trial(params: dict[str, Any], stage: str) -> None:
        key = tuple(params.values())
        if key in seen or time.perf_counter() - start > args.budget:
            return
        seen.add(key)
        _, result, seconds = run(ds, task, params, args.epochs, args.patience)
        score = result.valid[task.metric]
        rows.append((score, params, result.best_epoch, seconds, stage))
        print(f"[{stage}] {params} best_epoch={result.best_epoch} "
              f"valid_{task.metric}={score:.4f} {seconds:.1f}s", flush=True)  # fmt: skip

    for _ in range(args.samples):
        trial({k: rng.choice(v) for k, v in SPACE.items()}, "1")
    if not args.no_stage2:
        # one-factor moves around the best so far, repeated while the best changes (3 rounds max);
        # embedding_l2 also tries values past the space's edge (the stage-1 winner sat on it)
        for round_ in range(3):
            best = max(rows, key=lambda r: r[0])[1]
            for key, values in SPACE.items():
                for value in values + EDGE.get(key, ()):
                    trial({**best, key: value}, f"2.{round_ + 1}")
            if max(rows, key=lambda r: r[0])[1] == best:
                break
    trial(REFERENCE, "ref")
    rows.sort(key=lambda r: -r[0])
    lines = [
        f"# BPR-MF tuning on {DATASET} top-k (validation split, seed 0, Adam, "
        f"patience {args.patience}, <= {args.epochs} epochs)",
        "",
        *check_lines,
        f"| valid {task.metric} | best epoch | dim | lr | embedding_l2 | batch | init_std | seconds | stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for score, p, epoch, seconds, stage in rows:
        lines.append(
            f"| {score:.4f} | {epoch} | {p['dim']} | {p['lr']:g} | {p['embedding_l2']:g} | "
            f"{p['batch_size']} | {p['init_std']:g} | {seconds:.1f} | {stage} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
