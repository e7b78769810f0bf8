"""The `dnis compare` outputs: compare.csv (every run), compare.md (mean +- std, Pareto cells
marked) and pareto.png (test metric against embedding parameters, one line per method)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dnis.app.report.budget_curve import write_budget_curve  # noqa: E402
from dnis.app.report.search_report import (
    LOWER_IS_BETTER,
    finish_axes,
    metric_table,
    save_figure,
)  # noqa: E402
from dnis.io import write_text  # noqa: E402


def flatten(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per method x budget x seed with the test metrics as columns."""
    flat = []
    for r in feasible(rows):
        flat.append({
            "method": r["method"], "budget": r["budget"], "seed": r["seed"],
            "embedding_params": r["embedding_params"], "memory_bytes": r["memory_bytes"],
            **{f"test_{k}": v for k, v in r["metrics"]["test"].items() if k != "users"},
            **{f"valid_{k}": v for k, v in r["metrics"]["valid"].items() if k != "users"},
            "search_seconds": r["search_seconds"], "retrain_seconds": r["retrain_seconds"],
            "train_epochs": r.get("train_epochs"), "epoch_cap_hit": r.get("epoch_cap_hit"),
            "latency_ms": r.get("latency_ms"), "peak_memory_mb": r.get("peak_memory_mb"),
            "budget_unit": r.get("budget_unit", "params"), "budget_bytes": r.get("budget_bytes"),
            "fallback": int(r.get("choice", {}).get("structure") == "uniform"),
        })  # fmt: skip
    return pd.DataFrame(flat)


def feasible(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of trained models (not the budgets a method could not meet)."""
    return [r for r in rows if "infeasible" not in r]


def grid_metric(rows: list[dict[str, Any]]) -> str:
    """The task's primary metric, read from the first trained row."""
    return feasible(rows)[0]["metric"]


def budget_unit(frame: pd.DataFrame) -> str:
    """What the grid's budgets count: "params", or "bytes" (cells of older runs: params)."""
    if "budget_unit" not in frame.columns or frame.empty:
        return "params"
    return str(frame["budget_unit"].iloc[0])


def summarize(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and std per (method, budget), with a `pareto` flag on the non-dominated cells: by
    parameters, or by stored bytes where the grid's budgets count bytes (`size` is that axis)."""
    column = f"test_{metric}"
    for missing in {"train_epochs", "epoch_cap_hit", "budget_bytes", "fallback"} - set(
        frame.columns
    ):
        frame = frame.assign(**{missing: float("nan")})  # cells of older runs
    size = "memory_bytes" if budget_unit(frame) == "bytes" else "params"
    grouped = frame.groupby(["method", "budget"], sort=True)
    table = grouped.agg(
        params=("embedding_params", "mean"),
        memory_bytes=("memory_bytes", "mean"),
        mean=(column, "mean"),
        std=(column, "std"),
        seeds=("seed", "count"),
        search_s=("search_seconds", "mean"),
        train_s=("retrain_seconds", "mean"),
        epochs=("train_epochs", "mean"),
        capped=("epoch_cap_hit", "sum"),
        latency_ms=("latency_ms", "first"),
        peak_memory_mb=("peak_memory_mb", "first"),
        budget_bytes=("budget_bytes", "first"),
        fallback=("fallback", "sum"),  # seeds in which DNIS kept its uniform fallback
    ).reset_index()
    table["std"] = table["std"].fillna(0.0)
    table["size"] = table[size]
    # a cell storing more bytes than its byte budget (an fp32 method's index structures)
    budget_bytes = pd.to_numeric(table["budget_bytes"], errors="coerce")
    table["over"] = (size == "memory_bytes") & (table["memory_bytes"] > budget_bytes)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    score = sign * table["mean"]
    table["pareto"] = [
        not ((table["size"] <= p) & (score >= s) & ((table["size"] < p) | (score > s))).any()
        for p, s in zip(table["size"], score, strict=True)
    ]
    table.attrs["unit"] = budget_unit(frame)
    return table


def dnis_standing(table: pd.DataFrame, metric: str, ours: str = "dnis") -> list[dict[str, Any]]:
    """Per budget: DNIS (or the DNIS method `ours`, e.g. dnis-precision in a byte grid) against
    the best other method at that budget, and by how much.

    Every method is held to the same budget, so the budget is the fair unit of comparison; a
    cell that stores more than its byte budget (`over`) is not a competitor at that budget.
    `margin` is ours minus the best other method, signed so that > 0 means ours is better;
    `noise` is the two cells' stds combined (sqrt of the sum of squares)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    label = "DNIS" if ours == "dnis" else ours
    out = []
    for budget, group in table.groupby("budget", sort=True):
        mine, others = group[group["method"] == ours], group[group["method"] != ours]
        if "over" in others.columns:
            others = others[~others["over"].astype(bool)]
        if mine.empty or others.empty:
            continue
        dnis = mine.iloc[0]
        best = others.loc[(sign * others["mean"]).idxmax()]
        margin = sign * (dnis["mean"] - best["mean"])
        noise = float((dnis["std"] ** 2 + best["std"] ** 2) ** 0.5)
        rank = 1 + int((sign * others["mean"] > sign * dnis["mean"]).sum())
        if "over" in mine.columns and bool(dnis["over"]):
            verdict = f"{label} over its byte budget"
        elif margin >= 0:
            verdict = f"{label} best"
        elif min(dnis["seeds"], best["seeds"]) < 2:
            verdict = f"behind {best['method']} (one seed: no std to read it against)"
        elif -margin <= noise:
            verdict = f"behind {best['method']}, within one std"
        else:
            verdict = f"behind {best['method']} by more than the stds"
        if dnis["fallback"] > 0:  # not the search's structure: say so (`search.fallback`)
            kept = f"{int(dnis['fallback'])} of {int(dnis['seeds'])}"
            verdict += f" (the uniform fallback was kept in {kept} seeds)"
        out.append(
            {
                "budget": f"{budget:g}",
                f"{label} {metric}": f"{dnis['mean']:.4f} ± {dnis['std']:.4f}",
                "best other": best["method"],
                f"its {metric}": f"{best['mean']:.4f} ± {best['std']:.4f}",
                f"{label} margin": f"{margin:+.4f}",
                f"{label} rank": f"{rank} of {len(group)}",
                "verdict": verdict,
            }
        )
    return out


def pareto_figure(table: pd.DataFrame, metric: str) -> plt.Figure:
    """Metric against parameters (stored bytes, where the grid counts bytes), one line per
    method. The x axis is symlog, linear below the smallest non-zero count, so a cell that keeps
    no embedding (OutRank dropping every field) is drawn at 0 rather than vanishing from a log
    axis while the table still lists it."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: every method its own
    markers = "osD^vP*Xh<>p"
    unit = "embedding bytes" if table.attrs.get("unit") == "bytes" else "embedding parameters"
    for i, (name, group) in enumerate(table.groupby("method")):
        group = group.sort_values("size")
        axis.errorbar(
            group["size"], group["mean"], yerr=group["std"], capsize=3, label=name,
            color="black" if name == "uniform" else colors[(2 * i) % 20 + (2 * i) // 20],
            linestyle="--" if name == "uniform" else "-",  # the baseline every method must beat
            marker=markers[i % len(markers)], linewidth=2.5 if name == "dnis" else 1.2,
        )  # fmt: skip
    best = table[table["pareto"]]
    axis.scatter(best["size"], best["mean"], s=160, facecolors="none", edgecolors="black",
                 label="Pareto-optimal")  # fmt: skip
    positive = table.loc[table["size"] > 0, "size"]
    if (table["size"] <= 0).any():
        floor = 10 ** np.floor(np.log10(positive.min())) if len(positive) else 1.0
        axis.set_xscale("symlog", linthresh=floor, linscale=0.5)
        axis.set_xlim(left=-0.1 * floor)
        axis.set_xlabel(f"{unit} (log scale above {floor:,.0f}; 0 at the left)")
    else:
        axis.set_xscale("log")
        axis.set_xlabel(f"{unit} (log scale)")
    finish_axes(axis, metric)
    return figure


def plot_pareto(table: pd.DataFrame, metric: str, path: Path) -> None:
    save_figure(pareto_figure(table, metric), path)


def write_compare_report(
    rows: list[dict[str, Any]], out_dir: str | Path, metric: str, title: str
) -> Path:
    out = Path(out_dir)
    frame = flatten(rows)
    write_text(out / "compare.csv", frame.to_csv(index=False))
    table = summarize(frame, metric)
    shown = [
        {
            "method": r.method, "budget": f"{r.budget:g}", "params": f"{int(round(r.params)):,}",
            "memory": f"{r.memory_bytes / 1024:.1f} KiB",
            f"test {metric}": f"{r.mean:.4f} ± {r.std:.4f}" + (" ★" if r.pareto else ""),
            "seeds": r.seeds, "search s": f"{r.search_s:.1f}", "train s": f"{r.train_s:.1f}",
            "epochs": None if pd.isna(r.epochs) else f"{r.epochs:.1f}" + (" (cap)" if r.capped else ""),
            "latency ms/batch": None if pd.isna(r.latency_ms) else f"{r.latency_ms:.2f}",
            "peak MiB": None if pd.isna(r.peak_memory_mb) else f"{r.peak_memory_mb:.1f}",
        }
        for r in table.itertuples()
    ]  # fmt: skip
    unit = table.attrs["unit"]
    for row, r in zip(shown, table.itertuples(), strict=True):
        if r.over:  # an fp32 method's index structures, on top of its byte budget
            row["memory"] += f" ({r.memory_bytes / r.budget_bytes:.2f} of budget)"
    counted = "bytes stored" if unit == "bytes" else "parameters"
    text = (
        f"# {title}\n\nTest {metric}, mean ± std over seeds; ★ = Pareto-optimal (no other cell has "
        f"as few {counted} and a metric as good). Epochs: of the final model's training, mean over "
        "seeds, every method early-stopped on validation with the same patience and cap ((cap): "
        "some seed stopped at the cap). Latency and peak memory: the first seed's model, "
        "one batch, a fresh process."
    )
    if unit == "bytes":
        text += (
            " Budgets count stored bytes, as a fraction of the full-width fp32 embedding's; "
            "memory is every stored tensor (values at their precision, scales, index "
            "structures), and (x of budget) marks a cell whose index structures take it over "
            "(such a cell is no competitor in the standings below)."
        )
    text += "\n\n" + metric_table(shown, list(shown[0]))
    for ours in ("dnis", "dnis-precision"):
        standing = dnis_standing(table, metric, ours)
        label = "DNIS" if ours == "dnis" else ours
        if standing:
            text += (
                f"\n{label} against the best other method at each budget (margin > 0: {label} "
                "better; the stds combined are the noise a margin is read against):\n\n"
                + metric_table(standing, list(standing[0]))
            )
    infeasible = sorted({(r["method"], r["budget"], r["infeasible"]) for r in rows
                         if "infeasible" in r})  # fmt: skip
    if infeasible:
        text += "\nNot run (the budget is below the method's smallest structure):\n\n" + "".join(
            f"- {name} at {budget}: {reason}\n" for name, budget, reason in infeasible
        )
    text += write_budget_curve(rows, table, metric, out / "budget_curve.png")
    write_text(out / "compare.md", text)
    plot_pareto(table, metric, out / "pareto.png")
    return out / "compare.md"
