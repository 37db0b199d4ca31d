"""The report's figures: learning curves per cell, per-factor bars, metric against batch size.

matplotlib (Agg backend, imported only when a figure is drawn). Each function draws one PNG
from the cells or runs the analysis already holds and returns its path, or None when the
sweep has nothing to show in it (no curves, no factors, no norm and batch-size factors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.report_cells import Cell, Run
from lit_spine.report_stats import mean_ci


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(cells: list[Cell], names: dict[str, str], column: str, path: Path) -> Path | None:
    """Mean learning curve per cell with a min-max band over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for cell in cells:
        curves = [run_folder.read_curve(r.dir, column) for r in cell.runs]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        per_epoch = [[c[e] for c in curves if e in c] for e in epochs]
        mean = [sum(v) / len(v) for v in per_epoch]
        (line,) = ax.plot(
            epochs, mean, marker="o", ms=3, label=f"{cell.label(names)} (n={len(cell.runs)})"
        )
        if len(cell.runs) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=line.get_color(),
                alpha=0.15,
            )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel="epoch", ylabel=column, title=f"{column} per cell (mean, band = min..max over seeds)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _error_bar(s: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the mean to the bootstrap interval's ends; (0, 0) without an interval."""
    if math.isnan(s["boot_low"]) or math.isnan(s["boot_high"]):
        return 0.0, 0.0
    return max(0.0, s["mean"] - s["boot_low"]), max(0.0, s["boot_high"] - s["mean"])


def plot_factor_bars(
    marginals: dict[str, list[tuple[Any, dict]]], names: dict[str, str], metric: str, path: Path
) -> Path | None:
    """One panel per factor: marginal mean with its 95% confidence interval."""
    if not marginals:
        return None
    plt = _plt()
    width = max(6.0, 4.2 * len(marginals))
    fig, axes = plt.subplots(1, len(marginals), figsize=(width, 4.4), squeeze=False)
    for ax, (key, rows) in zip(axes[0], marginals.items()):
        labels = [str(v) for v, _ in rows]
        means = [s["mean"] for _, s in rows]
        errs = list(zip(*(_error_bar(s) for _, s in rows)))
        ax.bar(labels, means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set(title=names[key], ylabel=metric)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{metric} by factor\n(mean over runs, error bar = 95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_norm_vs_batch(
    runs: Sequence[Run], factors: Sequence[str], metric: str, path: Path
) -> Path | None:
    """Metric against batch size, one line per norm (pooling any other factors)."""
    norm = next((k for k in factors if k.split(".")[-1] == "norm"), None)
    batch = next((k for k in factors if k.split(".")[-1] == "batch_size"), None)
    if norm is None or batch is None:
        return None
    runs = [
        r for r in runs if isinstance(r.config.get(batch), int | float)
    ]  # caveats name the rest
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for norm_value in dict.fromkeys(r.config.get(norm) for r in runs):
        xs, means, errs = [], [], []
        for bs in sorted({r.config.get(batch) for r in runs}, key=float):
            s = mean_ci(
                [
                    r.number([metric])
                    for r in runs
                    if r.config.get(norm) == norm_value and r.config.get(batch) == bs
                ]
            )
            if s["n"]:
                xs.append(float(bs))
                means.append(s["mean"])
                errs.append(_error_bar(s))
        yerr = list(zip(*errs)) if errs else None
        ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, label=str(norm_value))
    ax.set_xscale("log", base=2)
    sizes = sorted({float(r.config.get(batch)) for r in runs})
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.set(
        xlabel="batch size (images per worker)",
        ylabel=metric,
        title=f"{metric} vs batch size per norm (95% bootstrap CI)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
