"""Per-run report of a search: dims.json, report.md, a dims heatmap and metric vs parameters."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dnis.io import atomic_write, write_json, write_text  # noqa: E402
from dnis.search.result import SearchResult  # noqa: E402

LOWER_IS_BETTER = {"rmse", "mae", "logloss"}


def finish_axes(axis: plt.Axes, metric: str) -> None:
    """The y label (the direction of the metric), grid and legend every metric plot shares."""
    axis.set_ylabel(f"test {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def save_figure(figure: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (dicts) restricted to `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def result_rows(results: Sequence[SearchResult], metric: str) -> list[dict[str, Any]]:
    return [
        {
            "method": r.method,
            "budget": r.asked or r.budget,  # a byte size as written; "fraction" beside it
            "params": r.embedding_params,
            "fraction": round(r.fraction, 4),
            "memory_bytes": r.memory_bytes,
            # the soft model before pruning: under the gradual schedule, at this budget
            f"valid_{metric} soft": r.before.get("valid", {}).get(metric, float("nan")),
            f"valid_{metric} pruned": r.pruned.get(metric, float("nan")),
            f"valid_{metric} retrained": r.metrics["valid"].get(metric, float("nan")),
            **fallback_columns(r, metric),
            **{f"test_{k}": v for k, v in r.metrics["test"].items() if k != "users"},
            "search_s": round(r.search_seconds, 1),
            "retrain_s": round(r.retrain_seconds, 1),
        }
        for r in results
    ]


def block_dims_matrix(dims: dict[str, Any]) -> tuple[list[str], np.ndarray] | None:
    """Fields x blocks matrix of kept dims (NaN where a field has fewer blocks)."""
    key = "block_dims" if "block_dims" in next(iter(dims.values())) else "block_mean_width"
    names = list(dims)
    width = max(len(v[key]) for v in dims.values())
    matrix = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        values = dims[name][key]
        matrix[i, : len(values)] = values
    return names, matrix


def plot_dims_heatmap(results: Sequence[SearchResult], path: Path, max_dim: int) -> None:
    figure, axes = plt.subplots(
        1, len(results), figsize=(4.5 * len(results), 0.45 * 12 + 1.5), squeeze=False
    )
    for axis, result in zip(axes[0], results, strict=True):
        names, matrix = block_dims_matrix(result.dims)
        image = axis.imshow(matrix, cmap="viridis", vmin=0, vmax=max_dim, aspect="auto")
        axis.set_yticks(range(len(names)), names)
        axis.set_xticks(range(matrix.shape[1]), [f"b{k}" for k in range(matrix.shape[1])])
        axis.set_xlabel("frequency block (most frequent first)")
        axis.set_title(f"budget {result.budget}: {result.embedding_params:,} params")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=7)
    figure.subplots_adjust(wspace=0.45)
    figure.colorbar(image, ax=axes[0].tolist(), label="kept dims")
    save_figure(figure, path)


def plot_metric_vs_params(
    results: Sequence[SearchResult],
    path: Path,
    metric: str,
    baselines: Sequence[dict[str, Any]] = (),
) -> None:
    """Test metric against embedding parameters (log x); baselines are {label, params, value} dicts."""
    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [r.embedding_params for r in results]
    ys = [r.metrics["test"][metric] for r in results]
    axis.plot(xs, ys, "o-", label="DNIS")
    if baselines:
        axis.plot(
            [b["params"] for b in baselines],
            [b["value"] for b in baselines],
            "s--",
            label="uniform",
        )
        for b in baselines:
            axis.annotate(b["label"], (b["params"], b["value"]), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("embedding parameters")
    axis.set_ylabel(f"test {metric}")
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def fallback_columns(result: SearchResult, metric: str) -> dict[str, Any]:
    """Under `search.fallback: uniform`: the uniform width's validation metric and which
    structure was kept (the metrics beside it are the kept model's)."""
    choice = result.choice
    if "structure" not in choice:
        return {}
    return {f"valid_{metric} uniform": choice["valid"]["uniform"], "kept": choice["structure"]}


def write_search_report(
    results: Sequence[SearchResult],
    out_dir: str | Path,
    *,
    metric: str | None = None,
    dim: int | None = None,
    title: str = "DNIS search",
    baselines: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write dims.json, results.json, report.md, dims.png and metric.png into `out_dir`; returns
    report.md. `metric` defaults to the results' own, `dim` (the heatmap's scale) to the width
    of the first result's model."""
    out = Path(out_dir)
    if metric is None:
        metric = results[0].metric
    if dim is None:
        model = results[0].model
        dim = int(model.embedding.dim) if model is not None else 64
    write_json(out / "dims.json", {str(r.budget): r.dims for r in results})
    write_json(out / "results.json", [r.to_dict() for r in results])
    rows = result_rows(results, metric)
    columns = list(rows[0])
    text = [f"# {title}\n", metric_table(rows, columns)]
    if baselines:
        text += [
            "\n## Uniform-width baselines\n",
            metric_table(baselines, ["label", "params", "value"]),
        ]
    for r in results:
        text.append(f"\n## Dims at budget {r.budget}\n")
        names, matrix = block_dims_matrix(r.dims)
        columns_b = ["field"] + [f"b{k}" for k in range(matrix.shape[1])]
        rows_b = [
            {
                "field": n,
                **{
                    f"b{k}": (None if np.isnan(v) else round(float(v), 2))
                    for k, v in enumerate(row)
                },
            }
            for n, row in zip(names, matrix, strict=True)
        ]
        text.append(metric_table(rows_b, columns_b))
    if results and results[0].history:
        text.append("\n## Search log (per epoch)\n")
        hist = [{k: v for k, v in h.items() if not isinstance(v, dict)} for h in results[0].history]
        text.append(metric_table(hist, list(hist[0])))
    write_text(out / "report.md", "\n".join(text))
    plot_dims_heatmap(results, out / "dims.png", max_dim=dim)
    plot_metric_vs_params(results, out / "metric.png", metric, baselines)
    return out / "report.md"
