"""What a new user gets: the defaults-only configs against the tuned ones, through the CLI.

For each pair of configs (`configs/*-defaults.yaml`, which name only the data, the model, the width
and the budgets, and the tuned config of the same data and model), this runs `dnis train` (full
width) and `dnis search` (DNIS at the defaults config's budgets, the tuned config searched at the
same budgets) in fresh processes, exactly as a user types them, and reads the run folders. For
MovieLens-100K rating it adds Surprise's `SVD()` with its defaults on the same split (the `bench`
extra). `--ablate` also runs DNIS with each search option of the defaults config switched, one
at a time, and reports the validation metric after retraining, on which defaults are chosen.

    .venv/bin/python benchmarks/defaults_vs_tuned.py            # -> docs/results.md section
    .venv/bin/python benchmarks/defaults_vs_tuned.py --ablate   # + the search-option ablation
    .venv/bin/python benchmarks/defaults_vs_tuned.py --quick --no-write   # smoke run

Run folders go to --out (default /tmp/dnis-defaults); a finished run folder is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import ML100K, ROOT, have, load, machine, write_section

RESULTS = ROOT / "docs" / "results.md"


@dataclass(frozen=True)
class Pair:
    title: str
    defaults: str
    tuned: str  # the tuned config of the same model, with `tuned_sets` pointing it at this data
    tuned_sets: tuple[str, ...] = ()


PAIRS = [
    Pair("movielens-100k · rating · mf", "movielens-100k-rating-mf-defaults", "movielens-rating-mf",
         ("dataset.name=movielens-100k", "dataset.path=../shared/data/movielens-100k")),
    Pair("movielens-latest-small · ctr · deepfm", "movielens-ctr-deepfm-defaults", "movielens-ctr-deepfm"),
    Pair("synthetic · ctr · fm", "synthetic-ctr-fm-defaults", "synthetic-ctr-fm-dnis"),
]  # fmt: skip
# one search option switched at a time, on the defaults configs (validation decides defaults)
ABLATIONS = [
    ("search.schedule=static",),
    ("search.alpha_from=last_epoch_mean",),
    ("search.rank=saliency",),
    ("search.l1_step=proximal",),
    ("search.warmup_epochs=converge",),
    ("search.alpha_every=2",),
    ("search.alpha_every=4",),
    ("search.alpha_lr=0.003",),
    ("search.alpha_lr=0.03",),
    ("search.alpha_l1=0",),
    ("search.alpha_l1=0.001",),
    ("search.num_blocks=3",),
    ("search.num_blocks=10",),
    ("search.search_epochs=3",),
    ("train.batch_size=1024",),
]
QUICK = ("train.epochs=1", "search.warmup_epochs=0", "search.search_epochs=1")


def dnis(command: str, config: str, out: Path, sets: tuple[str, ...]) -> dict[str, Any]:
    """Run `dnis COMMAND --config configs/CONFIG.yaml` in a fresh process; its run folder's results."""
    args = [sys.executable, "-m", "dnis", command, "--config", f"configs/{config}.yaml", "--quiet",
            "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    run_dir = Path(_run_dir(config, out, sets))
    output = run_dir / ("final.json" if command == "train" else "results.json")
    if not output.is_file():  # a finished run folder is reused
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    saved = json.loads(output.read_text())
    if command == "train":  # seconds measured by the run itself (data loading excluded)
        return {"seconds": saved["wall_seconds"], **saved}
    seconds = saved[0]["search_seconds"] + sum(r["retrain_seconds"] for r in saved)
    return {"seconds": seconds, "results": saved}


def _run_dir(config: str, out: Path, sets: tuple[str, ...]) -> Path:
    from dnis.app.config import load_config

    return load_config(ROOT / "configs" / f"{config}.yaml", [f"output_dir={out}", *sets]).run_dir()


def budgets_of(config: str) -> list[float]:
    from dnis.app.config import load_config

    return load_config(ROOT / "configs" / f"{config}.yaml").search.budgets


def svd_row() -> str:
    if not have("surprise") or not (ML100K / "u.data").is_file():
        return "Surprise SVD (defaults): unavailable (pip install -e .[bench], ../shared/data)"
    from quality_vs_peers import surprise_svd

    row = surprise_svd(load("movielens-100k", "rating", path=ML100K, seed=0))
    return (
        f"Surprise `SVD()` with its defaults on the same split: test RMSE {row.metrics['rmse']:.4f}"
    )


def metric_of(results: list[dict[str, Any]]) -> str:
    return results[0]["metric"]


def pair_section(pair: Pair, out: Path, quick: bool) -> list[str]:
    budgets = budgets_of(pair.defaults)
    extra = QUICK if quick else ()
    lines = [f"## {pair.title}", ""]
    runs = {"defaults": (pair.defaults, ()), "tuned": (pair.tuned, pair.tuned_sets)}
    header = "| config | full width | " + " | ".join(f"DNIS {b:g}" for b in budgets) + " | time |"
    rows = []
    for label, (config, data) in runs.items():
        sets = (*data, *extra, f"search.budgets={budgets}")
        full = dnis("train", config, out, sets)
        search = dnis("search", config, out, sets)
        metric = metric_of(search["results"])
        cells = [f"{r['metrics']['test'][metric]:.4f}" for r in search["results"]]
        cap = " (cap)" if full.get("epoch_cap_hit") else ""
        rows.append(
            f"| {label} (`{config}`) | {full['test'][metric]:.4f}, {full['epochs_run']} ep{cap} | "
            + " | ".join(cells)
            + f" | {full['seconds'] + search['seconds']:.0f} s |"
        )
    lines += [f"Test {metric}; full width with its epochs (early-stopped unless marked (cap)).", ""]
    lines += [header, "|" + "---|" * (len(budgets) + 3), *rows, ""]
    if pair.defaults.startswith("movielens-100k-rating"):
        lines += [svd_row(), ""]
    return lines


def ablation_section(pairs: list[Pair], out: Path, quick: bool) -> list[str]:
    lines = ["## Search options on the defaults configs (validation metric after retraining)", ""]
    extra = QUICK if quick else ()
    for pair in pairs:
        budgets = budgets_of(pair.defaults)
        lines += [
            f"**{pair.title}**",
            "",
            "| option | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        ]
        lines.append("|" + "---|" * (len(budgets) + 1))
        for option in [(), *ABLATIONS]:
            search = dnis("search", pair.defaults, out, (*extra, *option))
            metric = metric_of(search["results"])
            cells = [f"{r['metrics']['valid'][metric]:.4f}" for r in search["results"]]
            lines.append(f"| {', '.join(option) or 'defaults'} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/dnis-defaults"))
    parser.add_argument(
        "--ablate",
        nargs="*",
        help="also switch each search option (on the pairs whose title "
        "contains one of these words; all pairs when none is given)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, no warm-up")
    parser.add_argument("--only", nargs="+", help="pairs whose title contains one of these")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch results.md")
    args = parser.parse_args()
    pairs = [p for p in PAIRS if not args.only or any(o in p.title for o in args.only)]
    lines = [
        "# Defaults on data nobody tuned for",
        "",
        "`configs/*-defaults.yaml` name only the data, the model, the width and the budgets; the "
        "tuned configs of the same data were chosen on validation. Both run through the CLI as a "
        f"user types it (`benchmarks/defaults_vs_tuned.py`), seed 0. Machine: {machine()}.",
        "",
    ]
    for pair in pairs:
        lines += pair_section(pair, args.out, args.quick)
    if args.ablate is not None:
        chosen = [p for p in pairs if not args.ablate or any(a in p.title for a in args.ablate)]
        lines += ablation_section(chosen, args.out, args.quick)
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.quick:
        write_section(RESULTS, "defaults", text)


if __name__ == "__main__":
    main()
