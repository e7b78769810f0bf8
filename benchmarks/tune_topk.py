"""Search of BPR-MF's training hyper-parameters on the VALIDATION split (test never read).

latest-small top-k (leave-last-out; full ranking of every item, the user's training items masked),
BPR loss, Adam, early stopping on valid NDCG@10 (best epoch restored). Staged search:

1. a seeded random sample of `--samples` configs from the full space below;
2. one-factor-at-a-time moves around the best so far (each other value of every parameter, and
   embedding_l2 past the space's edge), repeated while the best changes;
3. the settings used before this search, for reference.

Validation uses `FastTopK`, which ranks with one matrix product U @ I^T instead of the library's
chunked model forward; `--check` first asserts it equals `TopKTask.evaluate` and a brute-force
numpy computation (so the tuning numbers are the library's metric). The winner is copied by hand into
`quality_vs_peers.py` (BPR_PARAMS).

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
from dnis.tasks.metrics import ranking_metrics
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


class FastTopK(TopKTask):
    """TopKTask whose evaluation scores all items with U @ I^T (valid for MF/BPR-MF only)."""

    @torch.no_grad()
    def evaluate(self, model, split: str, batch_size: int = 8192) -> dict[str, float]:
        emb = model.embedding
        users = emb.field_rows(model.user_field)
        items = emb.field_rows(model.item_field)
        data = self.dataset.split(split).ids
        u, targets = data[:, self.user_slot], data[:, self.item_slot]
        scores = users[u] @ items.T
        target_scores = scores.gather(1, targets.unsqueeze(1))
        r, known = self.seen[split].pairs(u)
        scores[r, known] = float("-inf")
        scores[:, 0] = float("-inf")
        ranks = (scores > target_scores).sum(dim=1)
        ranks = torch.where(targets == 0, torch.full_like(ranks, self.num_items), ranks)
        metrics = ranking_metrics(ranks, KS)
        metrics["users"] = float(len(data))
        return metrics


def brute_force_ndcg10(ds, model, task: TopKTask, users: int) -> tuple[float, float]:
    """NDCG@10 on valid by plain numpy for the first `users` rows, and the library's value."""
    w = model.embedding.weight.detach().numpy()
    off = model.embedding.field_offsets.numpy()
    u_table = w[off[model.user_field] : off[model.user_field] + task.num_users]
    i_table = w[off[model.item_field] : off[model.item_field] + task.num_items]
    train, valid = ds.train.ids.numpy(), ds.valid.ids.numpy()[:users]
    gains = []
    for user, target in valid[:, [task.user_slot, task.item_slot]]:
        s = i_table @ u_table[user]
        s[train[train[:, task.user_slot] == user, task.item_slot]] = -np.inf
        s[0] = -np.inf
        rank = int((s > s[target]).sum()) if target else task.num_items
        gains.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    sub = ds.valid.ids[:users]
    lib = task._ranks(model, sub, task.seen["valid"])
    return float(np.mean(gains)), ranking_metrics(lib, KS)["ndcg@10"]


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
    task, slow = FastTopK(ds), make_task(ds)
    assert isinstance(slow, TopKTask)
    check_lines: list[str] = []
    if args.check:
        params = {"dim": 32, "lr": 1e-2, "embedding_l2": 0.0, "batch_size": 1024, "init_std": 0.1}
        model, _, _ = run(ds, task, params, epochs=3, patience=0)
        fast, lib = task.evaluate(model, "valid"), slow.evaluate(model, "valid")
        assert all(abs(fast[k] - lib[k]) < 1e-9 for k in lib), (fast, lib)
        brute, lib_sub = brute_force_ndcg10(ds, model, slow, users=50)
        assert abs(brute - lib_sub) < 1e-9, (brute, lib_sub)
        check_lines = [
            f"Evaluator check (3-epoch model {params}): fast valid {fast['ndcg@10']:.6f} == "
            f"TopKTask.evaluate {lib['ndcg@10']:.6f}; numpy brute force on the first 50 valid users "
            f"{brute:.6f} == library ranks {lib_sub:.6f}.",
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
        score = result.valid["ndcg@10"]
        rows.append((score, params, result.best_epoch, seconds, stage))
        print(f"[{stage}] {params} best_epoch={result.best_epoch} "
              f"valid_ndcg@10={score:.4f} {seconds:.1f}s", flush=True)  # fmt: skip

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
        "| valid NDCG@10 | best epoch | dim | lr | embedding_l2 | batch | init_std | seconds | stage |",
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
