"""The paper's central claim, measured: DNIS against the uniform-width grid at equal parameters.

For each (dataset, task, model) setting: the uniform grid d in {1, 2, 4, 8, 16, 32, 64} and DNIS
at budgets of 10%, 25% and 50% of the d=64 model's embedding parameters, 3 seeds each, every run
with the same data, split, training config and early stopping. DNIS searches once per seed and
retrains per budget. Cells run in parallel processes (one torch thread each) and are cached as
JSON, so an interrupted run resumes. The summary goes to its section of docs/results.md:

- per setting, mean +- std of the test metric and the embedding parameters of every cell,
- for each DNIS budget, the best uniform model with no more parameters, and the difference,
- DNIS search time over one plain training run of the d=64 model (same data, same epochs cap).

    .venv/bin/python benchmarks/dnis_vs_uniform.py --jobs 2            # full run (slow on 2 cores)
    .venv/bin/python benchmarks/dnis_vs_uniform.py --quick --jobs 2    # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_section
from _grid import run_grid

ROOT = Path(__file__).resolve().parents[1]
GRID = (1, 2, 4, 8, 16, 32, 64)
BUDGETS = (0.1, 0.25, 0.5)
FULL_DIM = 64

# Training settings per model, chosen on validation data (tune_mf.py and quality_vs_peers.py).
TRAIN = {
    "mf": {"epochs": 25, "batch_size": 256, "lr": 3e-3, "embedding_l2": 0.1, "patience": 3},
    "fm": {"epochs": 25, "batch_size": 1024, "lr": 1e-3, "embedding_l2": 1e-2, "patience": 3},
    "deepfm": {"epochs": 25, "batch_size": 1024, "lr": 1e-3, "embedding_l2": 1e-2, "patience": 3},
}
SEARCH = {
    "num_blocks": 6,
    "warmup_epochs": 2,
    "search_epochs": 6,
    "alpha_lr": 0.01,
    "alpha_l1": 1e-4,
    "granularity": "block",
    "retrain": "finetune",
}
SETTINGS = [  # (dataset, task, model, needs a path under --data)
    ("movielens-latest-small", "rating", "mf", None),
    ("movielens-latest-small", "ctr", "fm", None),
    ("movielens-100k", "rating", "mf", "movielens-100k"),
    ("movielens-100k", "ctr", "fm", "movielens-100k"),
    ("criteo", "ctr", "fm", "criteo-8k"),
]


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One uniform training or one DNIS search with its retrains, in a fresh process."""
    import torch

    torch.set_num_threads(1)
    from dnis import data, models
    from dnis.search import DnisConfig, dnis, uniform
    from dnis.train import TrainConfig

    path = Path(cell["data"]) / cell["folder"] if cell["folder"] else None
    quick = cell["quick"]
    ds = data.load(cell["dataset"], cell["task"], path=path, seed=cell["seed"])
    train_args = dict(TRAIN[cell["model"]], seed=cell["seed"])
    search_args = {**SEARCH, **cell.get("variant", {})}
    if quick:
        train_args.update(epochs=2)
        search_args.update(warmup_epochs=1, search_epochs=1)
    train = TrainConfig(**train_args)

    def make(embedding):
        return models.build(cell["model"], ds.schema, embedding)

    started = time.perf_counter()
    if cell["method"] == "uniform":
        results = [uniform(make, ds, dim=cell["dim"], full_dim=FULL_DIM, train=train)]
    else:
        results = dnis(
            make,
            ds,
            dim=FULL_DIM,
            budget=list(BUDGETS),
            config=DnisConfig(**search_args),
            train=train,
        )
    out = [r.to_dict() for r in results]
    return {**cell, "results": out, "wall_seconds": time.perf_counter() - started}


def cells(
    seeds: int, settings: list[tuple], variants: list[dict[str, Any]], data: str, quick: bool
) -> list[dict[str, Any]]:
    out = []
    for dataset, task, model, folder in settings:
        for seed in range(seeds):
            base = {"dataset": dataset, "task": task, "model": model, "folder": folder,
                    "seed": seed, "data": data, "quick": quick}  # fmt: skip
            out += [{**base, "method": "dnis", "dim": FULL_DIM, "variant": v} for v in variants]
            out += [{**base, "method": "uniform", "dim": d} for d in GRID]
    return out


def variant_label(cell: dict[str, Any]) -> str:
    """Empty for the default DNIS settings, else e.g. "[granularity=element]"."""
    variant = cell.get("variant") or {}
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(variant.items())) + "]" if variant else ""


def cell_key(cell: dict[str, Any]) -> str:
    return (
        f"{cell['dataset']}-{cell['task']}-{cell['model']}-{cell['method']}{variant_label(cell)}"
        f"-{cell['dim']}-s{cell['seed']}"
    )


def parse_variant(text: str) -> dict[str, Any]:
    """ "granularity=element,num_blocks=10" -> {"granularity": "element", "num_blocks": 10}."""
    import yaml

    return {
        k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in text.split(",") if item)
    }


def summarize(done: list[dict[str, Any]], machine: str) -> str:
    lines = [
        "# DNIS against the uniform-width grid\n",
        f"Generated by `benchmarks/dnis_vs_uniform.py` on {machine}. Test metric mean +- std "
        "over seeds; params are embedding parameters; budgets are fractions of the d=64 model. "
        "Search s is DNIS's warm-up + bilevel search; train s is the (re)training.\n",
        f"DNIS settings: {SEARCH}. Training: {TRAIN}.\n",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in done:
        groups.setdefault((cell["dataset"], cell["task"], cell["model"]), []).append(cell)
    for (dataset, task, model), group in groups.items():
        metric = group[0]["results"][0]["metric"]
        higher = metric in ("auc",) or metric.startswith(("ndcg", "recall"))
        rows: dict[tuple, list[dict[str, Any]]] = {}
        for cell in group:
            for r in cell["results"]:
                key = (
                    ("DNIS" + variant_label(cell), f"{r['budget']:g}")
                    if cell["method"] == "dnis"
                    else ("uniform", f"d={cell['dim']}")
                )
                rows.setdefault(key, []).append(r)
        lines.append(f"\n## {dataset} · {task} · {model} (test {metric})\n")
        lines.append(f"| method | setting | params | test {metric} | search s | train s | seeds |")
        lines.append("|---|---|---|---|---|---|---|")
        stats = {}
        for key, rs in sorted(
            rows.items(), key=lambda kv: np.mean([r["embedding_params"] for r in kv[1]])
        ):
            values = np.array([r["metrics"]["test"][metric] for r in rs])
            params = float(np.mean([r["embedding_params"] for r in rs]))
            stats[key] = (params, values.mean(), values.std())
            lines.append(
                f"| {key[0]} | {key[1]} | {params:,.0f} | {values.mean():.4f} +- {values.std():.4f} | "
                f"{np.mean([r['search_seconds'] for r in rs]):.1f} | "
                f"{np.mean([r['retrain_seconds'] for r in rs]):.1f} | {len(rs)} |"
            )
        lines.append(
            "\nAt each budget, DNIS against the best uniform model with no more parameters:\n"
        )
        lines.append(
            f"| DNIS | budget | params | DNIS {metric} | best uniform <= params | its {metric} | DNIS - uniform | verdict |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        uniforms = {k: v for k, v in stats.items() if k[0] == "uniform"}
        for key, (params, mean, _) in stats.items():
            if not key[0].startswith("DNIS"):
                continue
            fitting = {k: v for k, v in uniforms.items() if v[0] <= params}
            if not fitting:
                lines.append(
                    f"| {key[0]} | {key[1]} | {params:,.0f} | {mean:.4f} | none fits | | | DNIS only |"
                )
                continue
            best_key = max(fitting, key=lambda k: fitting[k][1] if higher else -fitting[k][1])
            best = fitting[best_key][1]
            delta = mean - best
            wins = delta >= 0 if higher else delta <= 0
            lines.append(
                f"| {key[0]} | {key[1]} | {params:,.0f} | {mean:.4f} | {best_key[1]} | {best:.4f} | "
                f"{delta:+.4f} | {'DNIS at least as good' if wins else 'uniform better'} |"
            )
        full = [r for key, rs in rows.items() if key == ("uniform", f"d={FULL_DIM}") for r in rs]
        searches = [
            r["search_seconds"] for key, rs in rows.items() if key[0].startswith("DNIS") for r in rs
        ]
        if full and searches:
            plain = float(np.mean([r["retrain_seconds"] for r in full]))
            ratio = float(np.mean(searches)) / plain
            lines.append(
                f"\nSearch cost: DNIS search {np.mean(searches):.1f} s vs one plain d=64 training "
                f"{plain:.1f} s: ratio {ratio:.2f} (target <= 3).\n"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "benchmarks" / "results" / "dnis_vs_uniform"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--only", nargs="*", help="dataset names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, latest-small only")
    parser.add_argument("--machine", help="describe where the cached cells ran (for the summary)")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="write the summary from the cached cells, run nothing",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[""],
        metavar="K=V,K=V",
        help='DNIS settings to run besides SEARCH, "" = the defaults, e.g. "" granularity=element',
    )
    args = parser.parse_args()
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    if args.quick:
        settings, args.seeds = settings[:1], 1
    missing = [s[3] for s in settings if s[3] and not (args.data / s[3]).exists()]
    if missing:
        raise SystemExit(
            f"data folders missing under {args.data}: {missing} (use --data or --only)"
        )
    variants = [parse_variant(v) for v in args.variants]
    grid = cells(args.seeds, settings, variants, str(args.data), args.quick)
    grid.sort(key=lambda c: (c["method"] != "dnis", -c["dim"]))  # long DNIS cells first
    suffix = "-quick" if args.quick else ""
    done = run_grid(grid, run_cell, args.cache, lambda c: cell_key(c) + suffix, args.jobs,
                    run=not args.summarize_only)  # fmt: skip
    machine = args.machine or (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} processes x 1 torch thread"
    )
    text = summarize(done, machine)
    write_section(args.output, "dnis-vs-uniform", text)
    print(text)


if __name__ == "__main__":
    main()
