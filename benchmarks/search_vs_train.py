"""DNIS search time vs one plain training run of the same model (issue 7: search <= 1.5x plain).

In one process, on the same data, with the same model and the same training settings
(`TrainConfig`), one after the other:

1. plain training: the full-width model (`dnis.search.uniform` with `dim = full_dim`: a
   `FusedEmbedding` of width D, `Trainer.fit`, early stopping on validation with patience 3,
   best epoch restored, then the test evaluation);
2. the DNIS search with the default `DnisConfig` search settings (`dnis.search.search`), once
   with `search.patience` 0 (the default: all search epochs) and once with 3 (the plain run's
   early-stopping patience, applied to the bilevel epochs; `--search-patience`), and with
   each `--alpha-every` k (`search.alpha_every`: an alpha step after every k-th model step): the
   warm-up epoch(s) of plain training, then the bilevel epochs (each training batch is a model
   step and an alpha step on a validation batch), a validation evaluation after every epoch, and
   the valid/test evaluation of the searched model;
3. the retrain at budget 0.25 (`dnis.search.retrain`: prune, materialise the compact table,
   fine-tune with early stopping).

Each stage is timed by wall clock and by CPU time of this process (`time.process_time`): on a
shared machine other jobs stretch the wall time of a 1-thread run, much less its CPU time. A
`Progress` callback stamps every epoch's start, every batch's end and every epoch's end, so each
epoch splits into its training steps and its evaluation (validation + bookkeeping); the alpha
steps of the bilevel epochs are timed by wrapping `dnis.search.dnis._alpha_step`, so the steps
split further into model steps and alpha steps. The verdict compares search / plain (warm-up +
bilevel epochs + the searched model's evaluation, against the whole plain run) with 1.5x.

Settings: DeepFM (width 16, MLP 400-400-400) on MovieLens latest-small CTR, and MF (width 64) on
MovieLens latest-small ratings; TrainConfig epochs 20, patience 3, batch 1024, lr and embedding
L2 as in benchmarks/compare_methods.py; 1 torch thread. `--profile` adds a torch.profiler table
of one plain epoch against one bilevel epoch (top operators by self CPU time).

    .venv/bin/python benchmarks/search_vs_train.py [--models deepfm mf] [--profile]
    .venv/bin/python benchmarks/search_vs_train.py --quick --no-write   # smoke run (1 epoch each)

Results go to the "search-time" section of docs/performance.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5  # search seconds / plain-training seconds
BUDGET = 0.25
# model -> (task, width, model params, TrainConfig fields); lr and embedding_l2 as compare_methods
SETTINGS: dict[str, tuple[str, int, dict[str, Any], dict[str, Any]]] = {
    "deepfm": (
        "ctr",
        16,
        {"hidden": (400, 400, 400)},
        {"epochs": 20, "patience": 3, "batch_size": 1024, "lr": 1e-3, "embedding_l2": 1e-2},
    ),
    "mf": (
        "rating",
        64,
        {},
        {"epochs": 20, "patience": 3, "batch_size": 1024, "lr": 3e-3, "embedding_l2": 0.1},
    ),
}
DATASET = "movielens-latest-small"


# ------------------------------------------------------------------------------------- clocks


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


@dataclass
class Epoch:
    """One epoch's clock stamps: (wall, cpu) at its start, after its last batch, at its end."""

    kind: str  # "train" (a Trainer epoch: plain, warm-up or retrain) or "bilevel"
    start: tuple[float, float]
    last_batch: tuple[float, float] | None = None
    end: tuple[float, float] | None = None
    batches: int = 0
    alpha: list[float] = field(default_factory=lambda: [0.0, 0.0])  # alpha-step wall, cpu
    record: dict[str, Any] = field(default_factory=dict)  # the epoch's record (valid metrics)

    def part(self, which: str, cpu: bool) -> float:
        i = 1 if cpu else 0
        assert self.end is not None
        last = self.last_batch or self.start
        if which == "total":
            return self.end[i] - self.start[i]
        if which == "steps":
            return last[i] - self.start[i]
        if which == "alpha":
            return self.alpha[i]
        if which == "model":
            return last[i] - self.start[i] - self.alpha[i]
        return self.end[i] - last[i]  # "eval": validation and bookkeeping after the last batch


class Stamps:
    """A `dnis.train.progress.Progress` that records every epoch's clock stamps."""

    def __init__(self) -> None:
        self.epochs: list[Epoch] = []

    def epoch_start(self, epoch: int, batches: int) -> None:
        self.epochs.append(Epoch("train", now()))

    def batch_end(self) -> None:
        self.epochs[-1].last_batch = now()
        self.epochs[-1].batches += 1

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.epochs[-1].end = now()
        self.epochs[-1].record = record
        if "alpha_mean" in record:  # the bilevel search's epoch record
            self.epochs[-1].kind = "bilevel"

    def note(self, message: str) -> None:
        """The trainer's notes (e.g. that a stage stopped early) are not timed."""

    def alpha_step(self, wall: float, cpu: float) -> None:
        self.epochs[-1].alpha[0] += wall
        self.epochs[-1].alpha[1] += cpu


class TimedAlphaSteps:
    """Wraps `dnis.search.dnis._alpha_step` while in use, adding each call's time to `stamps`."""

    def __init__(self, stamps: Stamps) -> None:
        import importlib

        module = importlib.import_module("dnis.search.dnis")  # `dnis.search.dnis` is a function
        self.module, self.stamps = module, stamps
        self.original = getattr(module, "_alpha_step", None)

    def __enter__(self) -> bool:
        if self.original is None:
            return False  # renamed: the steps are not split into model and alpha steps
        original, stamps = self.original, self.stamps

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = now()
            out = original(*args, **kwargs)
            stamps.alpha_step(*since(start))
            return out

        self.module._alpha_step = timed
        return True

    def __exit__(self, *exc: object) -> None:
        if self.original is not None:
            self.module._alpha_step = self.original


# ------------------------------------------------------------------------------------ the runs


@dataclass
class Stage:
    name: str
    wall: float
    cpu: float
    epochs: list[Epoch]
    note: str = ""


def run_model(
    model_name: str,
    quick: bool,
    patience: int = 0,
    search_epochs: int | None = None,
    alpha_every: int = 1,
) -> dict[str, Any]:
    """The three stages of one model, one after the other in this process."""
    import dataclasses

    import torch

    from dnis import data, models
    from dnis.data.dataset import Split
    from dnis.search import DnisConfig
    from dnis.search.dnis import retrain, search
    from dnis.search.uniform import uniform
    from dnis.train import TrainConfig

    task, width, params, train_fields = SETTINGS[model_name]
    ds = data.load(DATASET, task, seed=0)
    train = TrainConfig(**{**train_fields, "epochs": 1 if quick else train_fields["epochs"]})
    config = DnisConfig(budgets=[BUDGET], patience=patience, alpha_every=alpha_every)
    if search_epochs is not None:
        config.search_epochs = search_epochs
    if quick:
        config = DnisConfig(
            warmup_epochs=1, search_epochs=1, budgets=[BUDGET], alpha_every=alpha_every
        )

    def make(embedding):
        return models.build(model_name, ds.schema, embedding, **params)

    # untimed: the first optimizer imports torch._dynamo (~2 s) and kernels warm up; pay it here
    small = dataclasses.replace(
        ds,
        train=Split(ds.train.ids[: 2 * train.batch_size], ds.train.labels[: 2 * train.batch_size]),
    )
    once = TrainConfig(**{**train_fields, "epochs": 1})
    uniform(make, small, dim=width, full_dim=width, train=once)
    search(make, small, dim=width, config=DnisConfig(search_epochs=1), train=once)

    torch.manual_seed(0)
    plain_stamps = Stamps()
    start = now()
    plain = uniform(make, ds, dim=width, full_dim=width, train=train, progress=plain_stamps)
    plain_clock = since(start)

    search_stamps = Stamps()
    start = now()
    with TimedAlphaSteps(search_stamps) as split_alpha:
        state = search(make, ds, dim=width, config=config, train=train, progress=search_stamps)
    search_clock = since(start)

    retrain_stamps = Stamps()
    start = now()
    result = retrain(state, make, BUDGET, config=config, train=train, progress=retrain_stamps)
    retrain_clock = since(start)

    metric = "auc" if task == "ctr" else "rmse"
    scores = [e.record[f"valid_{metric}"] for e in plain_stamps.epochs]
    best = (max if metric == "auc" else min)(scores)
    warmup = [e for e in search_stamps.epochs if e.kind == "train"]
    bilevel = [e for e in search_stamps.epochs if e.kind == "bilevel"]
    return {
        "model": model_name,
        "task": task,
        "width": width,
        "params": params,
        "train": train,
        "search": config,
        "rows": {s: len(ds.split(s)) for s in ("train", "valid", "test")},
        "batches": {"train": plain_stamps.epochs[0].batches, "valid": len(ds.valid)},
        "split_alpha": split_alpha,
        "stages": {
            "plain": Stage("plain training", *plain_clock, plain_stamps.epochs),
            "warmup": Stage("DNIS warm-up", *stage_clock(warmup), warmup),
            "bilevel": Stage("DNIS bilevel search", *stage_clock(bilevel), bilevel),
            "search": Stage("DNIS search (whole)", *search_clock, search_stamps.epochs),
            "retrain": Stage(f"DNIS retrain @{BUDGET:g}", *retrain_clock, retrain_stamps.epochs),
        },
        "plain_stopped": len(plain_stamps.epochs) < train.epochs,
        "plain_best": scores.index(best) + 1,
        "metric": metric,
        "plain_test": plain.metrics["test"][metric],
        "dnis_test": result.metrics["test"][metric],
        "dnis_params": result.embedding_params,
        "full_params": result.full_params,
    }


def stage_clock(epochs: list[Epoch]) -> tuple[float, float]:
    return sum(e.part("total", False) for e in epochs), sum(e.part("total", True) for e in epochs)


def profile_epochs(model_name: str, rows: int) -> str:
    """torch.profiler: one plain epoch vs one bilevel epoch (no warm-up) on `rows` training rows;
    the top operators by self CPU time of each, as text."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dnis import data, models
    from dnis.data.dataset import Split
    from dnis.embeddings import FieldLayout, FusedEmbedding
    from dnis.search import DnisConfig
    from dnis.search.dnis import search
    from dnis.tasks import make_task
    from dnis.train import TrainConfig, Trainer

    task, width, params, train_fields = SETTINGS[model_name]
    ds = data.load(DATASET, task, seed=0)
    ds = dataclasses.replace(ds, train=Split(ds.train.ids[:rows], ds.train.labels[:rows]))
    train = TrainConfig(**{**train_fields, "epochs": 1, "patience": 0})
    torch.manual_seed(0)
    model = models.build(
        model_name, ds.schema, FusedEmbedding(FieldLayout.from_dataset(ds), width), **params
    )
    out = []
    with profile(activities=[ProfilerActivity.CPU]) as plain:
        Trainer(model, make_task(ds), train).fit()
    out.append(f"plain epoch ({rows:,} rows):\n" + table(plain))
    config = DnisConfig(warmup_epochs=0, search_epochs=1)
    with profile(activities=[ProfilerActivity.CPU]) as bilevel:
        search(
            lambda e: models.build(model_name, ds.schema, e, **params),
            ds,
            dim=width,
            config=config,
            train=train,
        )
    out.append(f"bilevel epoch ({rows:,} rows, + final valid/test evaluation):\n" + table(bilevel))
    return "\n\n".join(out)


def table(prof: Any) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


# ----------------------------------------------------------------------------------- reporting


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float) -> str:
    return "PASS" if value <= GOAL else "FAIL"


def report(runs: list[dict[str, Any]], machine: str, note: str) -> str:
    lines = [
        "# DNIS search time vs plain training",
        "",
        f"One process per model, {DATASET}, 1 torch thread; the stages run one after the other on "
        "the same data with the same model and `TrainConfig`: plain training of the full-width "
        "model (`uniform` with dim = full dim: early stopping on validation, patience 3, best "
        "epoch restored, test evaluation), the DNIS search with the default `DnisConfig` "
        "and the `search.patience` given in each heading (0: all search epochs) "
        "(warm-up, bilevel epochs, evaluation of the searched model), and the retrain at budget "
        f"{BUDGET:g} (prune, materialise, fine-tune with early stopping). Seconds by wall clock "
        "and by CPU time of the process (CPU time is what other jobs on a shared machine stretch "
        "less). Per epoch: steps = the training batches (for bilevel epochs, model steps + alpha "
        "steps, each training batch followed by one alpha step on a validation batch), eval = "
        "the validation evaluation and bookkeeping after the last batch. "
        "`benchmarks/search_vs_train.py`.",
        "",
        f"Machine: {machine}. {note}".rstrip(),
    ]
    for run in runs:
        lines += model_section(run)
    return "\n".join(lines) + "\n"


def model_section(run: dict[str, Any]) -> list[str]:
    """One model's heading, table and ratios."""
    lines: list[str] = []
    stages, train, search = run["stages"], run["train"], run["search"]
    plain, whole, retrain = stages["plain"], stages["search"], stages["retrain"]
    lines += [
        "",
        f"## {run['model']} ({run['task']}, width {run['width']}), search.patience "
        f"{search.patience}"
        + (f", search.alpha_every {search.alpha_every}" if search.alpha_every > 1 else ""),
        "",
        f"{run['rows']['train']:,} training rows ({run['batches']['train']} batches of "
        f"{train.batch_size}), {run['rows']['valid']:,} validation rows. TrainConfig: epochs "
        f"{train.epochs}, patience {train.patience}, batch {train.batch_size}, lr {train.lr:g}, "
        f"embedding_l2 {train.embedding_l2:g}. DnisConfig: warmup_epochs "
        f"{search.warmup_epochs}, search_epochs {search.search_epochs}, num_blocks "
        f"{search.num_blocks}, alpha_lr {search.alpha_lr:g}, patience {search.patience}, "
        f"alpha_every {search.alpha_every}. "
        "Model params: "
        f"{run['params'] or 'defaults'}.",
        "",
        "| stage | epochs | wall s | CPU s | wall s/epoch | CPU s/epoch | steps CPU s/epoch "
        "| model steps CPU s/epoch | alpha steps CPU s/epoch | eval CPU s/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("plain", "warmup", "bilevel", "search", "retrain"):
        lines.append(stage_row(stages[key], run["split_alpha"] and key == "bilevel"))
    total_wall, total_cpu = whole.wall + retrain.wall, whole.cpu + retrain.cpu
    lines.append(
        f"| DNIS search + retrain | {len(whole.epochs) + len(retrain.epochs)} | "
        f"{total_wall:.1f} | {total_cpu:.1f} | | | | | | |"
    )
    s_wall, s_cpu = ratio(whole.wall, plain.wall), ratio(whole.cpu, plain.cpu)
    t_wall, t_cpu = ratio(total_wall, plain.wall), ratio(total_cpu, plain.cpu)
    per_epoch = ratio(cpu_per_epoch(stages["bilevel"].epochs), cpu_per_epoch(plain.epochs))
    stopped = "early-stopped" if run["plain_stopped"] else "all of them"
    stopped += f"; best validation epoch {run['plain_best']}"
    lines += [
        "",
        f"Plain training ran {len(plain.epochs)} epoch(s) ({stopped}); the search ran "
        f"{search.warmup_epochs} + {len(stages['bilevel'].epochs)} epochs "
        + (
            f"(bilevel epochs early-stopped with patience {search.patience}). "
            if search.patience
            else "(search.patience 0: all search_epochs, whatever the data). "
        )
        + f"Test {run['metric']}: plain {run['plain_test']:.4f}, DNIS @{BUDGET:g} "
        f"{run['dnis_test']:.4f} ({run['dnis_params']:,} of {run['full_params']:,} "
        "embedding parameters).",
        "",
        f"- search / plain: **{s_wall:.2f}x** by wall clock ({verdict(s_wall)}), "
        f"**{s_cpu:.2f}x** by CPU time ({verdict(s_cpu)}); goal <= {GOAL}x.",
        f"- (search + retrain) / plain: {t_wall:.2f}x by wall clock, {t_cpu:.2f}x by CPU time.",
        f"- one bilevel epoch / one plain epoch (CPU time): {per_epoch:.2f}x.",
    ]
    fit = max_bilevel_epochs(run)
    if fit is not None:
        lines.append(
            f"- at the measured per-epoch costs, {GOAL}x the plain run allows about {fit} "
            f"bilevel epoch(s) after {search.warmup_epochs} warm-up epoch(s) (CPU time)."
        )
    return lines


def cpu_per_epoch(epochs: list[Epoch]) -> float:
    return ratio(sum(e.part("total", True) for e in epochs), len(epochs))


def max_bilevel_epochs(run: dict[str, Any]) -> int | None:
    """How many bilevel epochs would keep the whole search within GOAL x the plain run (CPU)."""
    stages = run["stages"]
    bilevel = stages["bilevel"].epochs
    if not bilevel:
        return None
    fixed = stages["search"].cpu - stages["bilevel"].cpu  # warm-up and final evaluation
    room = GOAL * stages["plain"].cpu - fixed
    return max(0, int(room // cpu_per_epoch(bilevel)))


def stage_row(stage: Stage, split_alpha: bool) -> str:
    n = len(stage.epochs)

    def per(which: str) -> str:
        return f"{sum(e.part(which, True) for e in stage.epochs) / n:.2f}" if n else ""

    model = per("model") if split_alpha else ""
    alpha = per("alpha") if split_alpha else ""
    wall_epoch = f"{stage.wall / n:.2f}" if n else ""
    cpu_epoch = f"{stage.cpu / n:.2f}" if n else ""
    return (
        f"| {stage.name} | {n} | {stage.wall:.1f} | {stage.cpu:.1f} | {wall_epoch} | {cpu_epoch} "
        f"| {per('steps')} | {model} | {alpha} | {per('eval')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of each stage")
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=40_960,
        default=0,
        metavar="ROWS",
        help="also profile one plain vs one bilevel epoch on ROWS training rows (default 40960)",
    )
    parser.add_argument(
        "--search-patience",
        type=int,
        nargs="+",
        default=[0, 3],
        metavar="N",
        help="search.patience values to run (0: all search_epochs; default: 0 and 3, the plain "
        "run's patience)",
    )
    parser.add_argument(
        "--search-epochs", type=int, help="search.search_epochs (default: DnisConfig's default)"
    )
    parser.add_argument(
        "--alpha-every",
        type=int,
        nargs="+",
        default=[1],
        metavar="K",
        help="search.alpha_every values to run (1: an alpha step after every model step)",
    )
    parser.add_argument("--note", default="", help="extra text after the machine line")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = parser.parse_args()

    import torch
    from _common import machine, write_section

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    runs = []
    for name in args.models:
        for patience in args.search_patience:
            for every in args.alpha_every:
                print(f"{name}: plain training, DNIS search (patience {patience}, alpha_every "
                      f"{every}), retrain ...")  # fmt: skip
                runs.append(run_model(name, args.quick, patience, args.search_epochs, every))
                print("\n".join(model_section(runs[-1])), flush=True)
    load = max(load, os.getloadavg()[0])
    shared = f"shared with other jobs (1-minute load average up to {load:.1f} at start/end)"
    note = ("Smoke run (--quick: 1 epoch per stage); " + args.note) if args.quick else args.note
    text = report(runs, f"{machine()}; {shared}", note)
    print()
    print(text)
    if args.profile:
        for name in args.models:
            print(f"\n=== torch.profiler, {name} ===\n{profile_epochs(name, args.profile)}")
    if not args.no_write:
        write_section(args.out, "search-time", text)
        print(f"written to the 'search-time' section of {args.out}")


if __name__ == "__main__":
    main()
