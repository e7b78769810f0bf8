"""budget_curve.png and its table: a nested model (`dnis.search.nested`) cut to budgets from 1%
to 100% of the full embedding, from its one training, beside the points of the methods that train
a model per budget. Rows are result dicts (`SearchResult.to_dict()` plus `seed`); those of nested
methods carry the curve of their training under `curve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dnis.app.report.search_report import (
    LOWER_IS_BETTER,
    finish_axes,
    metric_table,
    save_figure,
)  # noqa: E402

MONOTONE_ABOVE = 0.05  # the curve is checked for drops between consecutive budgets above this


def curve_frame(rows: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """One row per (method, seed, curve budget): params and the valid and test metric. A
    training's curve is repeated in each of its budgets' rows; it is read once per seed."""
    points, seen = [], set()
    for row in rows:
        if not row.get("curve") or (row["method"], row["seed"]) in seen:
            continue
        seen.add((row["method"], row["seed"]))
        points += [
            {
                "method": row["method"], "seed": row["seed"], "budget": p["budget"],
                "params": p["params"], "valid": p["valid"][metric], "test": p["test"][metric],
            }
            for p in row["curve"]
        ]  # fmt: skip
    return pd.DataFrame(points)


def summarize_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of the test metric per (method, budget) over seeds, with mean params."""
    grouped = frame.groupby(["method", "budget"], sort=True)
    return grouped.agg(
        params=("params", "mean"), mean=("test", "mean"), std=("test", "std"),
        seeds=("seed", "count"),
    ).reset_index()  # fmt: skip


def drops(curves: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """Steps between consecutive budgets above `MONOTONE_ABOVE` where the larger budget is worse
    by more than one std (the larger of the two points' stds over seeds)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    found = []
    for method, group in curves.groupby("method"):
        group = group[group["budget"] > MONOTONE_ABOVE].sort_values("budget")
        for low, high in zip(group.itertuples(), group.iloc[1:].itertuples(), strict=False):
            loss = sign * (low.mean - high.mean)
            noise = max(low.std, high.std)
            if loss > 0 and not pd.isna(noise) and loss > noise:
                found.append({
                    "method": method, "from budget": f"{low.budget:.3g}",
                    "to budget": f"{high.budget:.3g}", "drop": f"{loss:.4f}", "std": f"{noise:.4f}",
                })  # fmt: skip
    return found


def curve_figure(curves: pd.DataFrame, points: pd.DataFrame | None, metric: str) -> plt.Figure:
    """The curves as lines with a one-std band; `points` (method, params, mean, std) as markers."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for name, group in curves.groupby("method"):
        group = group.sort_values("params")
        (line,) = axis.plot(group["params"], group["mean"], "-", linewidth=2, label=f"{name} (cut)")
        if group["std"].notna().any():
            low, high = group["mean"] - group["std"], group["mean"] + group["std"]
            axis.fill_between(group["params"], low, high, color=line.get_color(), alpha=0.2)
    if points is not None:
        markers = "osD^vP*Xh<>p"
        for i, (name, group) in enumerate(points.groupby("method")):
            group = group.sort_values("params")
            axis.errorbar(
                group["params"], group["mean"], yerr=group["std"], fmt=markers[i % len(markers)],
                capsize=3, label=name, color="black" if name == "uniform" else None,
            )  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("embedding parameters (log scale)")
    finish_axes(axis, metric)
    return figure


def write_budget_curve(
    rows: list[dict[str, Any]], points: pd.DataFrame | None, metric: str, path: Path
) -> str:
    """Write `path` (the figure) when some row has a curve, and return the markdown section (the
    curve per nested method and the monotonicity check); "" when no row has one. `points`: the
    per-budget cells to draw beside the curves, those of the nested methods left out."""
    frame = curve_frame(rows, metric)
    if frame.empty:
        return ""
    curves = summarize_curves(frame)
    if points is not None:
        points = points[~points["method"].isin(set(curves["method"]))]
    save_figure(curve_figure(curves, points, metric), path)
    shown = [
        {
            "method": r.method, "budget": f"{r.budget:.3g}", "params": f"{int(round(r.params)):,}",
            f"test {metric}": f"{r.mean:.4f}" + ("" if pd.isna(r.std) else f" ± {r.std:.4f}"),
            "seeds": r.seeds,
        }
        for r in curves.itertuples()
    ]  # fmt: skip
    text = (
        f"\n## Budget curve ({path.name})\n\nEach nested training cut to budgets from 1% to 100% "
        "of the full embedding (log-spaced; budgets below the smallest prefix left out), no "
        "retraining; mean ± std over seeds.\n\n" + metric_table(shown, list(shown[0]))
    )
    if curves["std"].isna().all():
        return text + "\nMonotonicity: one seed, no std to read a drop against.\n"
    found = drops(curves, metric)
    if not found:
        return text + (
            f"\nMonotone: no drop larger than one std between consecutive budgets above "
            f"{MONOTONE_ABOVE:.0%}.\n"
        )
    return text + (
        f"\nDrops larger than one std between consecutive budgets above {MONOTONE_ABOVE:.0%}:\n\n"
        + metric_table(found, list(found[0]))
    )
