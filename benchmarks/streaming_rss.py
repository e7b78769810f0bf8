"""Peak memory of `dnis train` from disk: streaming DeepFM on 1M vs 10M synthetic CTR rows.

For each size, a Criteo-shaped CSV file is generated in chunks (label, 13 numeric columns I1..I13
with 10% missing, 26 categorical columns C1..C26 of 8-hex-digit ids drawn from Zipf distributions
over fixed id universes of 4 to 20,000 ids, 5% missing; the label is a logistic function of some
of them). Then, in a fresh Python process each time, the command line runs
`dnis train --config <size>.yaml` (`dnis.cli.main`) with `dataset.streaming: true`: it builds
(cold) or reuses (warm) the on-disk cache, trains DeepFM (width 16, MLP 400-400-400, batch 4096,
Adam) for one epoch with its validation, evaluates the test split and writes the run folder. Each
child reports the peak RSS of the whole command (VmHWM from /proc/self/status: resident memory,
mapped file pages included), the peak once the dataset is loaded (the child wraps the run's
`load_dataset` to note it) and the time of each phase.

The id universes are fixed so that the model is the same size at every row count (nearly every id
already appears in 1M rows): the ratio of peak RSS measures the data path, which is what must not
grow with rows. `--in-memory` also measures the in-memory loader (`streaming: false`) on the
smallest size.

    .venv/bin/python benchmarks/streaming_rss.py --rows 1000000 10000000 [--threads 2]
    .venv/bin/python benchmarks/streaming_rss.py --rows 20000 200000 --no-write   # smoke run

Files, configs and run folders go to --data-dir (default /tmp/dnis-streaming-bench, outside the
repository); results to the "Streaming" section of docs/performance.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUMERIC, CATEGORICAL = 13, 26
UNIVERSES = np.geomspace(4, 20_000, CATEGORICAL).astype(int)
EXPONENT = 1.05
GEN_CHUNK = 250_000
WIDTH, BATCH, HIDDEN, LR = 16, 4096, (400, 400, 400), 1e-3


def schema_dict() -> dict[str, Any]:
    features = [{"name": f"I{i + 1}", "kind": "numeric"} for i in range(NUMERIC)]
    features += [{"name": f"C{i + 1}"} for i in range(CATEGORICAL)]
    return {"features": features, "label": "label"}


def generate(path: Path, rows: int, seed: int = 0) -> float:
    """Write the CSV in chunks (never the whole file in memory); returns seconds taken."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    started = time.perf_counter()
    setup = np.random.default_rng(seed)
    dictionaries, effects, probabilities = [], [], []
    for f, size in enumerate(UNIVERSES):
        codes = (
            (np.arange(size, dtype=np.uint64) + np.uint64(f * 1_000_003))
            * np.uint64(2_654_435_761)
            % np.uint64(2**32)
        )
        dictionaries.append(pa.array([f"{int(c):08x}" for c in codes]))
        effects.append(setup.normal(0, 0.6, size) if f % 3 == 0 else np.zeros(size))
        p = 1.0 / np.arange(1, size + 1) ** EXPONENT
        probabilities.append(np.cumsum(p / p.sum()))
    weights = setup.normal(0, 0.3, NUMERIC)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as sink:
        for number, start in enumerate(range(0, rows, GEN_CHUNK)):
            m = min(GEN_CHUNK, rows - start)
            rng = np.random.default_rng([seed, number])
            columns: dict[str, Any] = {}
            logit = np.full(m, -1.3)
            numeric = np.floor(rng.lognormal(1.5, 1.2, (NUMERIC, m)))
            for i in range(NUMERIC):
                logit += weights[i] * (np.log1p(numeric[i]) - 1.5)
                missing = rng.random(m) < 0.1
                columns[f"I{i + 1}"] = pa.array(numeric[i].astype(np.int64), mask=missing)
            for f in range(CATEGORICAL):
                ids = np.minimum(np.searchsorted(probabilities[f], rng.random(m)), UNIVERSES[f] - 1)
                logit += effects[f][ids]
                missing = rng.random(m) < 0.05
                indices = pa.array(ids.astype(np.int32), mask=missing)
                columns[f"C{f + 1}"] = pa.DictionaryArray.from_arrays(
                    indices, dictionaries[f]
                ).cast(pa.string())
            label = (rng.random(m) < 1 / (1 + np.exp(-logit))).astype(np.int8)
            table = pa.table({"label": pa.array(label), **columns})
            if number == 0:  # a plain header line (pyarrow would quote the names)
                sink.write((",".join(table.column_names) + "\n").encode())
            options = pacsv.WriteOptions(include_header=False, quoting_style="none")
            pacsv.write_csv(table, sink, options)
    tmp.replace(path)
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process' peak resident memory (VmHWM; getrusage's ru_maxrss where /proc is missing).

    VmHWM belongs to the process' own address space, while ru_maxrss also keeps the high-water
    mark of the process that forked it (Linux carries it across exec), which would count the
    parent's memory in the child's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_config(folder: Path, file: Path, cache: Path, mode: str, threads: int) -> Path:
    """The run's config: what a user would write for this file (streaming unless `memory`)."""
    import yaml

    config = {
        "name": f"bench-{file.stem}-{mode}",
        "output_dir": str(folder / "runs"),
        "threads": threads,
        "dataset": {
            "format": "csv",
            "path": str(file),
            "task": "ctr",
            "streaming": mode != "memory",
            "cache_dir": str(cache),
            "schema": schema_dict(),
        },
        "model": {"name": "deepfm", "params": {"hidden": list(HIDDEN)}},
        "embedding": {"dim": WIDTH},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "patience": 0},
    }
    path = folder / f"{file.stem}-{mode}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def child(args: argparse.Namespace) -> None:
    """One measured `dnis train` in this (fresh) process; print its numbers as JSON."""
    import dnis.app.train as run
    from dnis.app.config import load_config
    from dnis.cli import main
    from dnis.data.cache import DiskSplit

    loaded: dict[str, Any] = {}
    load_dataset = run.load_dataset

    def timed_load(*pargs: Any, **kwargs: Any) -> Any:
        """The run's own load (start_run looks it up at call time), timed."""
        started = time.perf_counter()
        dataset = load_dataset(*pargs, **kwargs)
        loaded.update(
            seconds=time.perf_counter() - started,
            rss=peak_rss_mb(),
            streamed=isinstance(dataset.train, DiskSplit),
        )
        return dataset

    run.load_dataset = timed_load
    started = time.perf_counter()
    if main(["train", "--config", args.config, "--quiet"]) != 0:
        raise SystemExit("dnis train failed")
    command_seconds = time.perf_counter() - started
    if loaded["streamed"] != (args.mode != "memory"):
        raise SystemExit(f"{args.mode}: the command did not load the data the config asks for")
    final = json.loads(
        (load_config(args.config).run_dir() / "final.json").read_text(encoding="utf-8")
    )
    print(
        json.dumps(
            {
                "mode": args.mode,
                "rows": final["dataset"]["rows"],
                "ids": sum(final["dataset"]["fields"].values()),
                "parameters": final["params"]["total"],
                "load_seconds": loaded["seconds"],
                "train_seconds": final["train_seconds"],
                "command_seconds": command_seconds,
                "valid": final["valid"],
                "test": final["test"],
                "rss_after_load_mb": loaded["rss"],
                "rss_peak_mb": peak_rss_mb(),
            }
        )
    )


def measure(folder: Path, file: Path, cache: Path, mode: str, threads: int) -> dict[str, Any]:
    config = write_config(folder, file, cache, mode, threads)
    command = [sys.executable, __file__, "--child", "--config", str(config), "--mode", mode]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({mode}, {file}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__} "
        f"({threads} threads), Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/dnis-streaming-bench"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    parser.add_argument("--in-memory", action="store_true", help="also the in-memory loader")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/performance.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="cold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for rows in sorted(args.rows):
        file = args.data_dir / f"ctr-{rows}.csv"
        if not file.exists():
            started = time.perf_counter()
            code = f"import streaming_rss as b; b.generate(__import__('pathlib').Path({str(file)!r}), {rows})"
            subprocess.run(
                [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, check=True
            )
            seconds = time.perf_counter() - started
            print(f"generated {file} ({file.stat().st_size / 2**30:.2f} GiB) in {seconds:.0f} s")
        cache = args.data_dir / f"cache-{rows}"
        shutil.rmtree(cache, ignore_errors=True)
        results[rows] = {}
        modes = ["cold", "warm"] + (["memory"] if args.in_memory and rows == min(args.rows) else [])
        for mode in modes:
            result = measure(args.data_dir, file, cache, mode, args.threads)
            results[rows][mode] = result
            print(
                f"{rows:>11,} rows {mode:>6}: peak RSS {result['rss_peak_mb']:,.0f} MiB "
                f"(after load {result['rss_after_load_mb']:,.0f}), load {result['load_seconds']:.0f} s, "
                f"train {result['train_seconds']:.0f} s, command {result['command_seconds']:.0f} s, "
                f"valid AUC {result['valid']['auc']:.4f}",
                flush=True,
            )
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(args.data_dir / "runs", ignore_errors=True)
    report = render(results, args.threads)
    print(report)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import write_section

        page = ROOT / "docs" / "performance.md"
        if not page.exists():
            page.write_text(
                "# Performance\n\nMeasured numbers of the benchmark scripts in `benchmarks/`, "
                "with the machine each ran on.\n",
                encoding="utf-8",
            )
        write_section(page, "streaming", report)


def render(results: dict[int, dict[str, dict[str, Any]]], threads: int) -> str:
    sizes = sorted(results)
    lines = [
        "# Streaming",
        "",
        "Peak resident memory of `dnis train --config ...` on a CSV file with "
        "`dataset.streaming: true`, by `benchmarks/streaming_rss.py`: DeepFM (width 16, MLP "
        "400-400-400, batch 4096, Adam), one epoch with its validation, then the test split, the "
        "whole command (config, data, training, run folder) in a fresh process each time. *cold*: "
        "the command builds the cache (scan, count, encode) and trains; *warm*: it reuses the "
        "cache. Peak RSS is the process' VmHWM (resident memory, mapped file pages included); "
        "*after load* is the peak once the dataset is ready; *train* is the epoch and its "
        "validation, *command* the whole `dnis train`.",
        "",
        f"Machine: {machine(threads)}.",
        "",
        "| rows | run | peak RSS (MiB) | after load (MiB) | load (s) | train (s) | command (s) | "
        "valid AUC | test AUC | ids | parameters |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in sizes:
        for mode, r in results[rows].items():
            run = {"cold": "streaming, cold", "warm": "streaming, warm", "memory": "in memory"}
            lines.append(
                f"| {rows:,} | {run[mode]} | {r['rss_peak_mb']:,.0f} | {r['rss_after_load_mb']:,.0f} "
                f"| {r['load_seconds']:.0f} | {r['train_seconds']:.0f} | "
                f"{r['command_seconds']:.0f} | {r['valid']['auc']:.4f} | {r['test']['auc']:.4f} | "
                f"{r['ids']:,} | {r['parameters']:,} |"
            )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        lines.append("")
        for mode in ("cold", "warm"):
            ratio = results[large][mode]["rss_peak_mb"] / results[small][mode]["rss_peak_mb"]
            verdict = "PASS" if ratio <= 1.3 else "FAIL"
            lines.append(
                f"- Peak RSS ratio {large:,} / {small:,} rows ({mode}): **{ratio:.3f}** "
                f"(goal <= 1.3: {verdict})"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
