"""Every search method on one Pareto table per setting: the `dnis compare` grid, benchmarked.

Settings: MovieLens latest-small and MovieLens-100K, rating (MF) and CTR (DeepFM); every
registered method (DNIS, uniform, random, MDE, hashing, QR and the learned competitors); budgets
10%, 25% and 50% of the d=64 embedding; 3 seeds. Each setting is one `dnis compare` run
(resumable: finished cells are cached in its run folder); the settings run side by side, each with
`--jobs` cell processes. The tables and Pareto plots go to the "compare" section of
docs/results.md and docs/compare-<setting>.png.

    .venv/bin/python benchmarks/compare_methods.py --jobs 1                  # the full grid (hours on 2 cores)
    .venv/bin/python benchmarks/compare_methods.py --jobs 4 --device cuda    # 4 settings x 4 cells on one GPU
    .venv/bin/python benchmarks/compare_methods.py --quick                   # smoke run
    .venv/bin/python benchmarks/compare_methods.py --defaults --tasks rating  # the fair grid

`--defaults` runs the fair grid instead: configs with no `train:`/`search:` sections, so every
method gets the library's defaults and the same early stopping (section "fair-grid"). With
`--bytes` as well, the budgets count stored bytes (`compare.budget_unit: bytes`): 1/8, 1/16 and
1/32 of the fp32 full-width embedding's bytes, where the quantized methods (int8, int4,
dnis-precision) compete (section "byte-grid").

    .venv/bin/python benchmarks/compare_methods.py --defaults --bytes --only movielens-100k \
        --tasks rating --methods uniform magprune int8 int4 dnis dnis-precision
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import write_section

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["dnis", "uniform", "random", "mde", "hashing", "qr"]


def all_methods() -> list[str]:
    """DNIS and the classic baselines first, then every other registered method."""
    from dnis.search.methods import METHODS

    return BASELINES + sorted(set(METHODS) - set(BASELINES))


TRAIN = {
    "mf": {"epochs": 25, "batch_size": 256, "lr": 3e-3, "embedding_l2": 0.1, "patience": 3},
    "deepfm": {"epochs": 25, "batch_size": 1024, "lr": 1e-3, "embedding_l2": 1e-2, "patience": 3},
}
SETTINGS = [  # (dataset, task, model, folder under --data or None)
    ("movielens-latest-small", "rating", "mf", None),
    ("movielens-latest-small", "ctr", "deepfm", None),
    ("movielens-100k", "rating", "mf", "movielens-100k"),
    ("movielens-100k", "ctr", "deepfm", "movielens-100k"),
    ("movielens-latest-small", "topk", "bprmf", None),  # the fair grid only (--defaults)
    ("gowalla", "topk", "bprmf", "gowalla"),  # the fair grid only (--defaults)
]


SHORT = {"movielens-100k": "ml100k", "movielens-latest-small": "latest-small", "gowalla": "gowalla"}


BYTE_BUDGETS = [0.125, 0.0625, 0.03125]  # 1/8, 1/16, 1/32 of the fp32 full-width bytes


def defaults_config(
    setting: tuple, data: Path, output: Path, seeds: int, methods: list[str], device: str,
    in_bytes: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The fair protocol as a user gets it: the data, the model, the width and the budgets, and
    nothing tuned; every method trains with the library's defaults (early stopping on validation,
    the same patience and cap) and DNIS with its default search."""
    dataset, task, model, folder = setting
    path = str((data / folder).resolve()) if folder else None
    raw = {
        "name": f"grid-{SHORT[dataset]}-{task}-{model}",
        "output_dir": str(output),
        "dataset": {"name": dataset, "task": task, **({"path": path} if path else {})},
        "model": {"name": model},
        "embedding": {"dim": 64},
        **({"train": {"device": device}} if device != "cpu" else {}),
        "search": {"budgets": [0.1, 0.25, 0.5]},
        "compare": {"methods": methods, "budgets": [0.1, 0.25, 0.5], "seeds": seeds},
    }
    if in_bytes:
        raw["name"] += "-bytes"
        raw["compare"].update(budget_unit="bytes", budgets=BYTE_BUDGETS)
    return raw


def setting_config(
    setting: tuple, data: Path, output: Path, seeds: int, quick: bool, methods: list[str],
    jobs: int, device: str,
) -> dict[str, Any]:  # fmt: skip
    dataset, task, model, folder = setting
    train = {**(dict(TRAIN[model], epochs=1) if quick else TRAIN[model]), "device": device}
    return {
        "name": f"compare-{dataset}-{task}",
        "seed": 0,
        "output_dir": str(output),
        "dataset": {"name": dataset, "task": task, "path": str(data / folder) if folder else None},
        "model": {
            "name": model,
            "params": {"hidden": [400, 400, 400]} if model == "deepfm" else {},
        },
        "embedding": {"dim": 64},
        "train": train,
        "search": {"warmup_epochs": 1 if quick else 2, "search_epochs": 1 if quick else 6},
        "compare": {
            "methods": methods,
            "budgets": [0.1, 0.25, 0.5],
            "seeds": seeds,
            "jobs": jobs,
            "options": method_options(model, methods, quick),
        },
    }


def method_options(model: str, methods: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    """Per-method settings that differ from the defaults, and why."""
    options: dict[str, dict[str, Any]] = {}
    if quick:
        options["random"] = {"trial_epochs": 1}
    if model == "deepfm":
        # PEP's default threshold lr (the training lr, 1e-3) never reaches the budgets with DeepFM
        # in its bounded search (every result would be the recorded magnitude fallback); 0.01 does.
        options["pep"] = {"threshold_lr": 0.01}
    return {name: value for name, value in options.items() if name in methods}


def run_setting(raw: dict[str, Any], summarize_only: bool = False) -> tuple[str, Path | None]:
    """One `dnis compare` run; its cells run in `compare.jobs` processes with one torch thread.

    With `summarize_only`, nothing is trained: the report is built from the cells already cached
    (None when there are none), and the missing cells are listed under it.
    """
    from dnis.app.compare import cell_path, compare
    from dnis.app.config import Config, parse
    from dnis.app.report.compare_report import grid_metric, write_compare_report

    config = parse(Config, raw, where=raw["name"])
    title = f"{config.dataset.name} · {config.dataset.task} · {config.model.name}"

    def done(name: str, seed: int, seconds: float) -> None:
        print(f"{raw['name']}: {name} seed {seed} done in {seconds:.0f} s", flush=True)

    if not summarize_only:
        rows = compare(config, on_cell=done)
        return title, write_compare_report(rows, config.run_dir(), grid_metric(rows), title)
    grid = [(m, seed) for m in config.compare.methods for seed in range(config.compare.seeds)]
    paths = [cell_path(config.run_dir(), *cell) for cell in grid]
    rows = [row for path in paths if path.exists() for row in json.loads(path.read_text())]
    if not rows:
        return title, None
    report = write_compare_report(rows, config.run_dir(), grid_metric(rows), title)
    missing = [
        f"{m} seed {seed}" for (m, seed), path in zip(grid, paths, strict=True) if not path.exists()
    ]
    if missing:
        with report.open("a", encoding="utf-8") as handle:
            handle.write(f"\nNot run yet: {', '.join(missing)}.\n")
    return title, report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1, help="cell processes per setting")
    parser.add_argument("--device", default="cpu", help="train.device of every cell (cpu, cuda)")
    parser.add_argument("--methods", nargs="*", help="methods to run (default: all registered)")
    parser.add_argument("--machine", default="", help="where the cells ran, for the page")
    parser.add_argument(
        "--summarize-only", action="store_true", help="write the page from the cached cells"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs-compare")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--only", nargs="*", help="dataset names to run (default: all)")
    parser.add_argument("--tasks", nargs="*", help="tasks to run, e.g. rating (default: all)")
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch, 1 seed, latest-small rating only"
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="the fair grid: configs with no train/search sections (section fair-grid)",
    )
    parser.add_argument(
        "--bytes", action="store_true", help="with --defaults: budgets in bytes (byte-grid)"
    )
    args = parser.parse_args()
    if args.bytes and not args.defaults:
        parser.error("--bytes runs the byte grid of the fair protocol: add --defaults")
    settings = [
        s
        for s in SETTINGS
        if (not args.only or s[0] in args.only)
        and (not args.tasks or s[1] in args.tasks)
        and (args.defaults or s[2] in TRAIN)  # the tuned grid has no top-k settings
    ]
    if args.quick:
        settings, args.seeds = settings[:1], 1
    methods = args.methods or all_methods()
    raws = [
        defaults_config(s, args.data, args.runs, args.seeds, methods, args.device, args.bytes)
        if args.defaults
        else setting_config(s, args.data, args.runs, args.seeds, args.quick, methods, args.jobs,
                            args.device)
        for s in settings
    ]  # fmt: skip
    for raw in raws:
        raw["compare"]["jobs"] = args.jobs
    with ThreadPoolExecutor(max_workers=len(raws)) as pool:  # each setting has its own processes
        reports = list(pool.map(lambda raw: run_setting(raw, args.summarize_only), raws))
    title, key = "# Every method against the others\n", "compare"
    if args.defaults:
        title, key = "# The fair grid: every method with the defaults\n", "fair-grid"
    if args.defaults and args.bytes:
        title, key = "# Accuracy per byte: every method with the defaults\n", "byte-grid"
    lines = [
        title,
        "Generated by `benchmarks/compare_methods.py"
        + (" --defaults" + (" --bytes" if args.bytes else "") + "`: configs that name only the "
           "data, the model, the width and the budgets, so every method trains with the "
           "library's defaults (early stopping on validation, patience 3, cap 100 epochs) and "
           "DNIS searches with its defaults"
           + ("; `dnis-random` is the control (DNIS's pipeline with a random structure of the "
              "same budget). " if "dnis-random" in methods else ". ")
           if args.defaults else "` ")
        + f"(one `dnis compare` run per setting; {args.seeds} seed(s); budgets are fractions of "
        + ("the d=64 fp32 embedding's bytes" if args.bytes else "the d=64 embedding")
        + f"; methods {', '.join(methods)}). {args.machine}\n",
    ]  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for title, report in reports:
        if report is None:
            lines.append(f"\n## {title}\n\nNot run yet.\n")
            continue
        plot = args.output.parent / f"{report.parent.name}.png"
        shutil.copyfile(report.parent / "pareto.png", plot)
        body = report.read_text(encoding="utf-8").split("\n", 1)[1]
        lines += [f"\n## {title}\n", body, f"\n![Pareto plot]({plot.name})\n"]
        curve = report.parent / "budget_curve.png"
        if curve.is_file():  # a nested method was in the grid
            copy = args.output.parent / f"{report.parent.name}-budget-curve.png"
            shutil.copyfile(curve, copy)
            lines.append(f"\n![Budget curve]({copy.name})\n")
    text = "\n".join(lines)
    write_section(args.output, key, text)
    print(text)


if __name__ == "__main__":
    main()
