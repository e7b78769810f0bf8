"""Top-k full-ranking evaluation on 100,000 items: time and peak memory per `row_budget`.

`TopKTask.evaluate` ranks every item for every evaluated user (the user's earlier items masked)
and scores users in chunks of `row_budget // items` users, so the user x item score matrix is
never held whole. This measures, per model and `row_budget`, the seconds of one evaluation of the
test split and the peak memory it adds, against the size of the whole score matrix
(users x items x 4 bytes, float32) that an unchunked evaluation would hold.

Data: synthetic implicit feedback, generated once in the parent process: `--items` items (100,000)
and `--users` users (2,000; NeuMF, slower per user, evaluates the first
`--neumf-users`, 500), every item some user's early interaction (so every item is in the
training vocabulary and is ranked), then `--extra` interactions per user drawn from a Zipf
distribution over the items with later timestamps; leave-last-out split (the last interaction of
each user is the test item, the one before it the validation item), so every user is evaluated.

Each (model, row_budget) runs in a fresh Python process with 1 torch thread: it loads the data,
builds the model (untrained: the weights do not change the cost), resets the peak-RSS mark
(`echo 5 > /proc/self/clear_refs`; Linux >= 4.0) and runs `evaluate("test")`. Peak added memory =
VmHWM after the evaluation - VmRSS before it (resident memory, torch allocations included, which
tracemalloc does not see). Models: BPR-MF and NeuMF (MLP 64-32-16), width `--dim`. The
smallest `row_budget` of the first model runs once more with glibc's mmap threshold fixed
(`MALLOC_MMAP_THRESHOLD_`), which shows how much of the peak is allocator heap growth.

    .venv/bin/python benchmarks/topk_eval.py [--users 2000] [--row-budgets 131072 1048576 4194304]
    .venv/bin/python benchmarks/topk_eval.py --quick --no-write   # smoke run (500 users, 20k items)

Results go to the "topk-eval" section of docs/performance.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"bprmf": "BPR-MF", "neumf": "NeuMF (MLP 64-32-16)"}
BUDGETS = (1 << 17, 1 << 20, 1 << 22)
MMAP_THRESHOLD = 1 << 20


# ---------------------------------------------------------------------------------------- data


def make_frame(users: int, items: int, extra: int, seed: int = 0):
    """Implicit feedback: item k is an early interaction of user k % users; then `extra` Zipf
    draws per user with later timestamps (the last two become the validation and test items)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cover_users = np.arange(items) % users
    cover_items = np.arange(items)
    p = 1.0 / np.arange(1, items + 1) ** 0.8
    extra_items = rng.choice(items, size=users * extra, p=p / p.sum())
    extra_users = np.repeat(np.arange(users), extra)
    user = np.concatenate([cover_users, extra_users])
    item = np.concatenate([cover_items, extra_items])
    ts = np.concatenate([np.arange(items), items + np.arange(users * extra)])
    return pd.DataFrame({"user": user.astype(str), "item": item.astype(str), "ts": ts})


def make_data(users: int, items: int, extra: int, path: Path) -> dict[str, Any]:
    import torch

    from dnis.data.dataset import build_dataset
    from dnis.data.schema import FeatureSpec, Schema

    started = time.perf_counter()
    schema = Schema(
        features=(FeatureSpec("user"), FeatureSpec("item")), user="user", item="item", time="ts"
    )
    frame = make_frame(users, items, extra)
    ds = build_dataset(frame, schema, "topk", name="synthetic-topk", split="leave_last_out")
    torch.save({"dataset": ds}, path)
    return {
        "rows": len(frame),
        "users": len(ds.test),
        "items": ds.cardinalities[1],  # OOV row included: every one is scored
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------- the child


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    return {k: 1024 * int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def child(model_name: str, data_path: str, row_budget: int, dim: int, users: int) -> None:
    import dataclasses
    import gc

    import torch

    torch.set_num_threads(1)
    from dnis.data.dataset import Split
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.models import build
    from dnis.tasks.topk import TopKTask

    ds = torch.load(data_path, weights_only=False)["dataset"]
    ds = dataclasses.replace(ds, test=Split(ds.test.ids[:users], ds.test.labels[:users]))
    torch.manual_seed(0)
    model = build(model_name, ds.schema, FusedEmbedding(FieldLayout.from_dataset(ds), dim, 0.1))
    task = TopKTask(ds, row_budget=row_budget)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = memory()
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = task.evaluate(model, "test")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = memory()
    result = {
        "seconds": wall,
        "cpu_seconds": cpu,
        "rss_before": before["VmRSS"],
        "hwm_reset": before["VmHWM"],
        "peak": after["VmHWM"],
        "added": after["VmHWM"] - before["VmRSS"],
        "chunk_users": max(1, row_budget // task.num_items),
        "users": int(metrics["users"]),
        "items": task.num_items,
        "ndcg@10": metrics["ndcg@10"],
        "params": sum(p.numel() for p in model.parameters()),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(
    model: str,
    data_path: Path,
    budget: int,
    dim: int,
    users: int,
    timeout: float,
    fixed_mmap: bool = False,
) -> dict[str, Any]:
    from _common import run_child as run

    args = ["--child", model, "--data", str(data_path), "--row-budget", str(budget)]
    args += ["--dim", str(dim), "--users", str(users)]
    # glibc: with the threshold fixed, every block >= 1 MiB is mmapped and unmapped when freed
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if fixed_mmap else None
    return run(__file__, args, timeout, env)


# ----------------------------------------------------------------------------------- reporting


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(
    info: dict[str, Any],
    results: list[tuple[str, int, dict[str, Any]]],
    args: argparse.Namespace,
    machine: str,
    note: str,
) -> str:
    matrix = info["users"] * info["items"] * 4
    lines = [
        f"# Top-k evaluation on {info['items'] - 1:,} items",
        "",
        f"Full-ranking evaluation (`TopKTask.evaluate`, test split) of {info['users']:,} users "
        f"over {info['items']:,} items (OOV row included; every item is scored for every user, "
        f"the user's training and validation items masked): synthetic implicit feedback, "
        f"{info['rows']:,} interactions, leave-last-out. Width {args.dim}; untrained models (the "
        "weights do not change the cost). One fresh process per setting, 1 torch thread. Peak "
        "added memory = peak RSS during the evaluation (VmHWM, reset just before it) - RSS "
        "before it. The whole user x item score matrix in float32 would take "
        f"{info['users']:,} x {info['items']:,} x 4 bytes = **{mib(matrix)}** for all users (each "
        "row: its users x items x 4 bytes; NeuMF, slower per user, evaluates the first "
        f"{args.neumf_users:,} users). `benchmarks/topk_eval.py`.",
        "",
        f"Machine: {machine}. {note}".rstrip(),
        "",
        "| model | users | row_budget | users per chunk | seconds | CPU s | ms per user | "
        "peak added memory | whole score matrix | peak / matrix | RSS before | NDCG@10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, budget, r in results:
        label = MODELS[model] + (" \\*" if r.get("fixed_mmap") else "")
        if "skipped" in r:
            lines.append(f"| {label} | | {budget:,} | skipped: {r['skipped']} |" + " |" * 8)
            continue
        whole = r["users"] * r["items"] * 4
        lines.append(
            f"| {label} | {r['users']:,} | {budget:,} | {r['chunk_users']} | "
            f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{1000 * r['seconds'] / r['users']:.1f} | {mib(r['added'])} | {mib(whole)} | "
            f"{r['added'] / whole:.3f} | {mib(r['rss_before'])} | {r['ndcg@10']:.4f} |"
        )
    for model, how in (
        ("bprmf", "one matrix product of the chunk's user factors with every item's (MF's "
                  "`factors`): the scores, 4 bytes per pair, and the masks"),
        ("neumf", "every pair through the forward pass: the chunk's id grid "
                  f"({8 * 2} bytes per pair, 2 int64 slots), the user and item vectors looked up "
                  f"for every pair ({2 * args.dim * 4} bytes at width {args.dim}), the MLP's "
                  "activations and the scores"),
    ):  # fmt: skip
        per_pair = [
            r["added"] / (r["chunk_users"] * r["items"])
            for name, _, r in results
            if name == model and "added" in r and r["chunk_users"] > 1
        ]
        if per_pair:
            lines += [
                "",
                f"{MODELS[model]}: peak added memory per scored (user, item) pair of a chunk "
                f"{min(per_pair):,.0f} to {max(per_pair):,.0f} bytes (chunks of more than one "
                f"user): {how}.",
            ]
    big = 20_000 * info["items"] * 4
    lines += [
        "",
        f"At 20,000 users the whole score matrix would take {mib(big)}; the chunked evaluation's "
        "time grows linearly with users (ms per user above) and its peak memory follows "
        "`row_budget` only, except where the chunk's tensors are below glibc's 32 MiB mmap "
        "ceiling (see \\* below).",
    ]
    if any(r.get("fixed_mmap") for _, _, r in results):
        lines += [
            "",
            "\\* the same setting run with `MALLOC_MMAP_THRESHOLD_="
            f"{MMAP_THRESHOLD}` (glibc then returns every freed block of 1 MiB or more to the "
            "system). By default glibc raises its mmap threshold after such a block is freed (up "
            "to 32 MiB), so chunk tensors below 32 MiB come from the heap, which can grow and "
            "fragment from chunk to chunk: with the pairwise path (one user's 100k items through "
            "the forward pass) that peak depended on how the heap happened to fragment and "
            "differed from run to run. With the threshold fixed the peak is about one chunk, but "
            "every chunk's tensors are mapped and faulted in again, which costs time when chunks "
            "are many and small.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2_000, help="users (all evaluated)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--extra", type=int, default=5, help="Zipf interactions per user")
    parser.add_argument("--dim", type=int, default=32, help="embedding width")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--row-budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument(
        "--neumf-users", type=int, default=500, help="users for NeuMF (slower per user)"
    )
    parser.add_argument(
        "--no-fixed-mmap",
        action="store_true",
        help="skip the extra run with glibc's mmap threshold fixed at 1 MiB",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 users, 20k items")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per setting")
    parser.add_argument("--note", default="", help="extra text after the machine line")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    parser.add_argument("--data", help=argparse.SUPPRESS)  # the child's data file
    parser.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--row-budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.row_budget, args.dim, args.users)
        return
    if args.quick:
        args.users, args.items, args.neumf_users = 500, 20_000, 200

    import torch
    from _common import machine, write_section

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="topk-eval-") as tmp:
        data_path = Path(tmp) / "data.pt"
        info = make_data(args.users, args.items, args.extra, data_path)
        print(
            f"data: {info['rows']:,} interactions, {info['users']:,} users, {info['items']:,} "
            f"items, built in {info['seconds']:.0f} s",
            flush=True,
        )
        settings = [(m, b, False) for m in args.models for b in args.row_budgets]
        if not args.no_fixed_mmap:  # the smallest chunks once more with glibc's threshold fixed
            settings.insert(1, (args.models[0], min(args.row_budgets), True))
        for model, budget, fixed in settings:
            users = min(args.users, args.neumf_users) if model == "neumf" else args.users
            r = run_child(model, data_path, budget, args.dim, users, args.timeout, fixed)
            r["fixed_mmap"] = fixed
            results.append((model, budget, r))
            shown = r.get("skipped") or (
                f"{r['users']:,} users in {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), "
                f"peak added {mib(r['added'])}, {r['chunk_users']} users per chunk"
            )
            label = MODELS[model] + (" *" if fixed else "")
            print(f"{label:24s} row_budget {budget:>10,}: {shown}", flush=True)
    load = max(load, os.getloadavg()[0])
    shared = f"shared with other jobs (1-minute load average up to {load:.1f} at start/end)"
    note = ("Smoke run (--quick); " + args.note) if args.quick else args.note
    text = report(info, results, args, f"{machine()}; {shared}", note)
    print()
    print(text)
    if not args.no_write:
        write_section(args.out, "topk-eval", text)
        print(f"written to the 'topk-eval' section of {args.out}")


if __name__ == "__main__":
    main()
