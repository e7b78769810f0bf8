"""Command line: parses arguments, loads the config, calls the library, renders progress."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from dnis import distributed
from dnis.app.config import Config, load_config
from dnis.errors import DnisError
from dnis.plugins import import_plugin
from dnis.train.progress import Progress

console = Console(stderr=True)


class RichProgress(Progress):
    """A bar per epoch and one line of metrics when it ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: RichBar | None = None

    def epoch_start(self, epoch: int, batches: int) -> None:
        self.bar = RichBar(
            TextColumn(f"[bold]{self.label}[/] epoch {epoch}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=batches)

    def batch_end(self) -> None:
        assert self.bar is not None
        self.bar.advance(self.task)

    def note(self, message: str) -> None:
        console.print(f"[yellow]{self.label}: {message}[/]", highlight=False)

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.stop()
        values = "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        console.print(f"[dim]{self.label}[/] {values}")


def cmd_datasets(args: argparse.Namespace) -> None:
    from dnis.data.catalog import datasets

    table = Table(title="datasets")
    for column in ("name", "tasks", "bundled", "description"):
        table.add_column(column)
    for entry in datasets():
        table.add_row(
            entry.name,
            ", ".join(entry.tasks),
            "yes" if entry.bundled else "path",
            entry.description,
        )
    Console().print(table)


def cmd_train(args: argparse.Namespace) -> None:
    from dnis.app.train import train

    config = distributed_config(args.config, args.set + track_overrides(args))
    progress = None if args.quiet or not distributed.is_main() else RichProgress(config.run_name())
    result = train(config, resume=args.resume, progress=progress)
    if distributed.is_main():
        print(
            json.dumps({"run_dir": str(result.run_dir), "test": result.metrics["test"]}, indent=2)
        )


def distributed_config(path: Path, overrides: list[str]) -> Config:
    """The config of a command that may run under torchrun: joins the process group the
    launcher describes (no-op without one); ranks other than 0 neither track nor print."""
    config = load_config(path, overrides)
    distributed.setup(config.train.device)
    if not distributed.is_main():
        config.tracking = dataclasses.replace(config.tracking, mlflow=False, tensorboard=False)
    return config


def cmd_search(args: argparse.Namespace) -> None:
    from dnis.app.report import metric_table
    from dnis.app.report.search_report import result_rows
    from dnis.app.search import method_run_dir, search_run

    overrides = list(args.set) + track_overrides(args)
    budgets = args.budgets or ([args.budget] if args.budget is not None else None)
    if budgets:
        overrides.append(f"search.budgets={list(budgets)}")
    config = distributed_config(args.config, overrides)
    progress = None if args.quiet or not distributed.is_main() else RichProgress(config.run_name())
    _, results = search_run(config, progress=progress, resume=args.resume, method=args.method)
    if not distributed.is_main():
        return
    rows = result_rows(results, results[0].metric)
    print(metric_table(rows, list(rows[0])))
    print(f"report: {method_run_dir(config, args.method) / 'report.md'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from dnis.app import track
    from dnis.app.compare import compare
    from dnis.app.report.compare_report import grid_metric, write_compare_report

    overrides = list(args.set) + track_overrides(args)
    for key in ("methods", "budgets", "seeds", "jobs", "budget_unit"):
        value = getattr(args, key)
        if value:
            overrides.append(
                f"compare.{key}={value!r}" if key != "methods" else f"compare.methods={list(value)}"
            )
    config = load_config(args.config, overrides)
    console.print(f"comparing {config.compare.methods} at budgets {config.compare.budgets} "
                  f"x {config.compare.seeds} seeds in {config.run_dir()}")  # fmt: skip

    def done(name: str, seed: int, seconds: float) -> None:
        console.print(f"  {name} seed {seed}: {seconds:.1f} s")

    track.check(config.tracking)
    with track.open_tracker(config, "compare") as tracker:  # here: it gets the report too
        rows = compare(config, on_cell=done, tracker=tracker)
        metric = grid_metric(rows)
        report = write_compare_report(
            rows, config.run_dir(), metric, f"dnis compare: {config.run_name()}"
        )
        track.log_files(tracker, config.run_dir(), COMPARE_ARTIFACTS)
    print(report.read_text(encoding="utf-8"))


COMPARE_ARTIFACTS = ("config.yaml", "compare.md", "compare.csv", "pareto.png", "cells")


def track_overrides(args: argparse.Namespace) -> list[str]:
    """`--track mlflow --track tensorboard` switches exactly those on (`--track none`: neither),
    over the config's `tracking:` section; without --track the config decides."""
    if not args.track:
        return []
    return [f"tracking.{kind}={str(kind in args.track).lower()}" for kind in TRACKERS]


TRACKERS = ("mlflow", "tensorboard")


def add_import(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module or a .py file first, e.g. one that registers your own method, "
        "model or dataset (repeat for several)",
    )


def add_track(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--track",
        action="append",
        choices=(*TRACKERS, "none"),
        help="log the run to MLflow (./mlruns unless tracking.mlflow_uri says otherwise) or "
        "TensorBoard (RUN_DIR/tensorboard); repeat for both; overrides the config's tracking "
        "section ('none': no tracking)",
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dnis.app.evaluate import evaluate

    print(json.dumps(evaluate(args.run_dir, args.split, args.budget), indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    """DNIS next to the uniform grid for each config; one table per config."""
    from dnis.app.demo import run_demo

    out = Console(width=None if sys.stdout.isatty() else 120)
    for section in run_demo(args.configs, args.grid, args.set, progress=RichProgress):
        out.print(rich_table(section.title, section.rows))
        if section.truth:
            out.print(rich_table("planted truth vs what DNIS found", section.truth))
        if section.report:
            out.print(f"report: {section.report}\n")


def cmd_export(args: argparse.Namespace) -> None:
    from dnis.export import export_run

    result = export_run(args.run_dir, args.format, budget=args.budget, output=args.output)
    m = result.manifest
    params = m["parameters"]
    budget = "full width" if m["budget"] is None else f"budget {m['budget']:g}"
    console.print(
        f"exported {m['model']} ({m['task']}, {budget}) as {m['format']} to {result.path}\n"
        f"  {m['model_file']}: {m['model_bytes']:,} bytes; embedding {params['embedding']:,} of "
        f"{params['full_embedding']:,} full-width parameters ({m['embedding_fraction']:.1%}), "
        f"{m['embedding_bytes']:,} bytes\n"
        f"  max |exported - PyTorch| on {m['check']['rows']} rows: {m['check']['max_abs_diff']:.2e}",
        highlight=False,
    )
    print(json.dumps({"path": str(result.path), "model_bytes": m["model_bytes"],
                      "bytes": m["bytes"], "budget": m["budget"]}, indent=2))  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> None:
    from dnis.export import load, predict_file

    predictor = load(args.source, budget=args.budget, trust=args.trust)
    bar = RichBar(
        TextColumn("[bold]scoring[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=args.quiet,
    )
    task = bar.add_task("rows", total=None)

    def advance(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        result = predict_file(
            predictor,
            args.input,
            args.output,
            batch_size=args.batch_size,
            keep=args.keep,
            on_batch=advance,
            encoding=args.encoding,
        )
    console.print(
        f"scored {result.rows:,} rows with {predictor.backend} -> {result.output} "
        f"(columns: {', '.join(result.columns)})",
        highlight=False,
    )


def budget_arg(text: str) -> float:
    """A --budget value: a finite number > 0 (a fraction in (0, 1] or a parameter count)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.25)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: give a fraction in (0, 1] (e.g. 0.25) or a parameter "
            "count > 1"
        )
    return value


def sized_budget_arg(text: str) -> float | str:
    """A `dnis search --budget` or `dnis compare --budgets` value: a budget (`budget_arg`) or a
    byte size such as 2MB."""
    from dnis.errors import ConfigError
    from dnis.search.prune import parse_byte_size

    try:
        return budget_arg(text)
    except argparse.ArgumentTypeError:
        try:
            parse_byte_size(text)
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a budget: give a fraction in (0, 1] (e.g. 0.25), a parameter "
                "count or a byte size (e.g. 2MB or 1.5MiB)"
            ) from None
        return text


def os_error_message(error: OSError) -> str:
    """What the file system refused, on which file, and the fix."""
    where = error.filename or "a file"
    reason = error.strerror or str(error)
    if isinstance(error, PermissionError):
        fix = (
            "make the folder writable, or choose another one (--set output_dir=PATH for runs, "
            "--output for exports and scores)"
        )
    elif isinstance(error, IsADirectoryError):
        fix = "pass a file, not a folder"
    elif error.errno == errno.ENOSPC:
        fix = "free disk space, or choose another output folder (--set output_dir=PATH)"
    else:
        fix = "check the path and its permissions"
    return f"{reason}: {where}; {fix}"


def rich_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in rows[0]:
        table.add_column(
            column, justify="right" if isinstance(rows[0][column], int | float) else "left"
        )
    for row in rows:
        table.add_row(*(_cell(k, v) for k, v in row.items()))
    return table


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.1f}" if key in ("seconds", "mean dims") else f"{value:.4f}"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="dnis", description="Neural input search for recommenders")
    sub = root.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list bundled and registered datasets").set_defaults(
        run=cmd_datasets
    )

    train = sub.add_parser("train", help="train one model with uniform embedding dims")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.01",
    )
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    add_track(train)
    add_import(train)
    train.set_defaults(run=cmd_train)

    search = sub.add_parser(
        "search", help="search dims (DNIS or --method M), prune to budgets, retrain"
    )
    search.add_argument("--config", required=True, type=Path)
    search.add_argument(
        "--method",
        default="dnis",
        help="a registered search method (default dnis); its options: compare.options.<method>",
    )
    search.add_argument(
        "--budget",
        type=sized_budget_arg,
        help="fraction of the full embedding, e.g. 0.25, or a byte size, e.g. 2MB (the share of "
        "the full-width fp32 table's bytes it holds)",
    )
    search.add_argument(
        "--budgets", type=sized_budget_arg, nargs="+", help="several budgets, one search"
    )
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--quiet", action="store_true")
    search.add_argument(
        "--resume", action="store_true", help="continue a killed search run from its checkpoints"
    )
    add_track(search)
    add_import(search)
    search.set_defaults(run=cmd_search)

    compare = sub.add_parser("compare", help="methods x budgets x seeds: the Pareto table")
    compare.add_argument("--config", required=True, type=Path)
    compare.add_argument("--methods", nargs="+", help="e.g. dnis uniform mde hashing qr random")
    compare.add_argument("--budgets", type=sized_budget_arg, nargs="+")
    compare.add_argument(
        "--budget-unit",
        choices=("params", "bytes"),
        help="what budgets count (compare.budget_unit)",
    )
    compare.add_argument("--seeds", type=int)
    compare.add_argument("--jobs", type=int, help="cells run in this many processes at once")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_track(compare)
    add_import(compare)
    compare.set_defaults(run=cmd_compare)

    evaluate = sub.add_parser("evaluate", help="re-evaluate a finished run")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--split", default="test", choices=("valid", "test"))
    evaluate.add_argument(
        "--budget",
        help="which model of the run folder: a search budget (e.g. 0.25) or 'full'; default: "
        "every model the folder holds",
    )
    add_import(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    demo = sub.add_parser("demo", help="train the example configs and print a results table")
    demo.add_argument("configs", nargs="+", type=Path)
    demo.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=[2, 8, 32],
        help="uniform widths trained beside each DNIS search",
    )
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(run=cmd_demo)

    export = sub.add_parser(
        "export",
        help="export a run's compact model with its encoders (TorchScript, ONNX or TorchRec tables)",
    )
    export.add_argument("run_dir", type=Path, help="a train or search run folder")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx", "torchrec"))
    export.add_argument(
        "--budget",
        help="which model of the run folder: a search budget (e.g. 0.25) or 'full' (the train "
        "run's model); needed when the folder holds several",
    )
    export.add_argument(
        "--output", type=Path, help="export folder (default: RUN_DIR/export-FORMAT[-BUDGET])"
    )
    add_import(export)
    export.set_defaults(run=cmd_export)

    predict = sub.add_parser("predict", help="score a CSV/Parquet file with a run or an export")
    predict.add_argument("source", type=Path, help="an export folder or a run folder")
    predict.add_argument("--input", required=True, type=Path, help=".csv, .tsv or .parquet")
    predict.add_argument(
        "--output", required=True, type=Path, help=".csv, .tsv or .parquet (by extension)"
    )
    predict.add_argument("--batch-size", type=int, default=8192)
    predict.add_argument("--budget", help="which model of a run folder: a budget or 'full'")
    predict.add_argument(
        "--keep",
        nargs="*",
        metavar="COLUMN",
        help="input columns copied next to the score (default: id columns; none if empty)",
    )
    predict.add_argument(
        "--encoding",
        help="text encoding of a CSV/TSV input (default: the training files' dataset.encoding)",
    )
    predict.add_argument(
        "--trust",
        action="store_true",
        help="allow a TorchScript export, which is code and runs when loaded: only for exports "
        "from a source you trust (ONNX exports and run folders need no flag)",
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    add_import(predict)
    predict.set_defaults(run=cmd_predict)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command not in DISTRIBUTED_COMMANDS:
            distributed.require_single(f"dnis {args.command}")
        for name in getattr(args, "imports", ()):
            import_plugin(name)  # your own method, model or dataset registers itself
        args.run(args)
    except DnisError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except OSError as error:  # the file system refused: say which file and what to do
        console.print(
            f"[bold red]error:[/] {os_error_message(error)}", highlight=False, soft_wrap=True
        )
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; rerun with --resume to continue from the last epoch")
        return 130
    finally:
        distributed.teardown()
    return 0


DISTRIBUTED_COMMANDS = ("train", "search")  # the commands that split their work under torchrun


if __name__ == "__main__":
    sys.exit(main())
