"""The plots of a run: layer errors, sparsity and solver histories of a prune report, and a sweep's error (and
perplexity) against sparsity. Each returns a matplotlib Figure (rendered off-screen); callers save or log it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from alps_solver import SparsityPattern

__all__ = ["HISTORY_PLOT_LAYERS", "layer_rows", "plot_layer_errors", "plot_layer_sparsity", "plot_solver_history",
           "plot_sweep", "save_figure"]

HISTORY_PLOT_LAYERS = 4  # solver histories drawn: spread evenly over the model's layers


def layer_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every layer record, blocks in order, each with its block index and global layer index."""
    rows = []
    for block in report["blocks"]:
        for layer in block["layers"]:
            rows.append({**layer, "block": block["index"], "index": len(rows)})
    return rows


def save_figure(figure: Any, path) -> None:
    """Save ``figure`` as PNG and free it."""
    figure.savefig(path, format="png")
    figure.clear()


def _figure(*panels: tuple[str, str, str]):
    """A figure with one axes per (title, xlabel, ylabel), side by side."""
    import matplotlib

    matplotlib.use("Agg")  # render to files only, whatever the environment's display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels) + 4 * (len(panels) == 1), 4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, xlabel, ylabel) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    return figure, axes


def _block_ticks(axes: Any, layers: list[dict[str, Any]]) -> None:
    starts = [layer["index"] for layer in layers
              if layer["index"] == 0 or layers[layer["index"] - 1]["block"] != layer["block"]]
    for start in starts[1:]:
        axes.axvline(start - 0.5, color="grey", linewidth=0.5, alpha=0.5)


def plot_layer_errors(report: Mapping[str, Any]):
    """Relative error per layer (after, and before, the backsolve); blocks separated by grey lines."""
    layers = layer_rows(report)
    figure, (axes,) = _figure(("Relative reconstruction error per layer", "layer (global index)", "relative error"))
    x = [layer["index"] for layer in layers]
    axes.plot(x, [layer["rel_error"] for layer in layers], marker=".", label="final")
    before = [layer.get("rel_error_before_backsolve") for layer in layers]
    if any(value is not None for value in before):
        axes.plot(x, [math.nan if v is None else v for v in before], marker=".", alpha=0.6, label="before backsolve")
    _block_ticks(axes, layers)
    axes.legend()
    return figure


def plot_layer_sparsity(report: Mapping[str, Any]):
    """Achieved and target sparsity per layer."""
    layers = layer_rows(report)
    figure, (axes,) = _figure(("Sparsity per layer", "layer (global index)", "sparsity"))
    x = [layer["index"] for layer in layers]
    axes.bar(x, [layer["achieved_sparsity"] for layer in layers], label="achieved")
    axes.plot(x, [layer["target_sparsity"] for layer in layers], color="black", linestyle="--", label="target")
    axes.set_ylim(0, 1)
    axes.legend()
    return figure


def plot_solver_history(report: Mapping[str, Any], count: int = HISTORY_PLOT_LAYERS):
    """rho and support change over the iterations for up to ``count`` layers spread over the model."""
    layers = [layer for layer in layer_rows(report) if layer.get("solver", {}).get("history")]
    figure, (rho_axes, change_axes) = _figure(("ADMM penalty", "iteration", "rho (log scale)"),
                                              ("Support change", "iteration", "fraction of the support changed"))
    if not layers:
        rho_axes.text(0.5, 0.5, "no solver history (one-shot method)", ha="center", transform=rho_axes.transAxes)
        return figure
    step = max(1, math.ceil(len(layers) / count))
    for layer in layers[::step][:count]:
        history = layer["solver"]["history"]
        label = f"{layer['block']}.{layer['name']}"
        iterations = [point["iteration"] for point in history]
        rho_axes.plot(iterations, [point["rho"] for point in history], label=label)
        change_axes.plot(iterations, [point["support_change_frac"] for point in history], label=label)
    rho_axes.set_yscale("log")
    change_axes.set_yscale("symlog", linthresh=1e-3)
    rho_axes.legend(fontsize="small")
    return figure



def plot_sweep(model: str, rows: list[dict[str, Any]]):
    """Mean layer error against sparsity, one line per method and pattern kind; a perplexity panel per
    evaluated data set when the rows carry perplexities."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the environment's display
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "completed"]
    datasets = sorted({name for r in done for name in r.get("perplexity", {})})
    panels = [("mean relative layer error", lambda r: r["mean_rel_error"])]
    panels += [(f"perplexity ({name})", lambda r, name=name: r.get("perplexity", {}).get(name)) for name in datasets]
    colors = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(r["method"] for r in done))}
    figure = Figure(figsize=(5 * len(panels), 4), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, value) in zip(axes, panels):
        ax.set_title(f"{model}: {label}", fontsize="medium")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for row in done:
            if value(row) is not None:
                kind = SparsityPattern.parse(row["pattern"]).kind.value
                lines.setdefault((row["method"], kind), []).append((row["sparsity"], value(row)))
        for (method, kind), points in sorted(lines.items()):
            points.sort()
            unstructured = kind == "unstructured"
            ax.plot([x for x, _ in points], [y for _, y in points], color=colors[method],
                    marker="o" if unstructured else "s", linestyle="-" if unstructured else "--",
                    label=method if unstructured else f"{method} ({kind})")
        if lines:
            ax.legend(fontsize="small")
    return figure
