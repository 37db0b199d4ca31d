"""The diagnostics' figures: reliability diagram, ERF maps, validation overlays (matplotlib,
Agg backend, imported lazily), written atomically as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lit_spine.data.labels import POINT_NAMES
from lit_spine.diagnostics_measures import MASS_SHARES
from lit_spine.utils import atomic_write_bytes


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_reliability(
    curves: dict[str, dict[str, Any]], path: Path, title: str = "Reliability diagram"
) -> Path:
    """Observed frequency against mean confidence per bin, one line per entry of `curves`."""
    plt = _plt()
    fig, (ax, axn) = plt.subplots(
        2, 1, figsize=(5.2, 5.8), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, cal in curves.items():
        bins = [b for b in cal["bins"] if b["n"]]
        ece = cal.get("ece")
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            ms=4,
            label=f"{label} (ECE {ece:.3f})" if ece is not None else label,
        )
        axn.plot([b["confidence"] for b in bins], [b["n"] for b in bins], marker=".", ms=4)
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    axn.set_yscale("log")
    axn.set_xlabel("predicted probability (bin mean)")
    axn.set_ylabel("pairs per bin")
    axn.grid(alpha=0.3)
    return _save(fig, path)


def plot_erf(
    maps: dict[str, np.ndarray],
    sizes: dict[str, dict[str, Any]],
    path: Path,
    theoretical_px: Sequence[int] | None = None,
) -> Path:
    """ERF maps side by side (log colour scale), with the 50%/90% mass circles."""
    plt = _plt()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle, Rectangle

    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.8), squeeze=False)
    for ax, (label, erf) in zip(axes[0], maps.items(), strict=True):
        h, w = erf.shape
        positive = erf[erf > 0]
        vmin = max(float(positive.min()) if positive.size else 1e-12, float(erf.max()) * 1e-4)
        im = ax.imshow(
            np.maximum(erf, vmin), cmap="magma", norm=LogNorm(vmin=vmin, vmax=erf.max() or 1)
        )
        size = sizes.get(label, {})
        for share, color in zip(MASS_SHARES, ("cyan", "lime"), strict=True):
            r = size.get(f"r{int(share * 100)}_px")
            if r is not None:
                ax.add_patch(
                    Circle((w // 2, h // 2), r, fill=False, color=color, lw=1.2,
                           label=f"{int(share * 100)}% mass: r={r:.0f} px")
                )  # fmt: skip
        if theoretical_px:
            th, tw = theoretical_px
            ax.add_patch(
                Rectangle((w // 2 - tw / 2, h // 2 - th / 2), tw, th, fill=False, color="silver",
                          ls="--", lw=1, label=f"theoretical {th}x{tw} px")
            )  # fmt: skip
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle("Effective receptive field: |d peak / d input|, share of mass", fontsize=9)
    return _save(fig, path)


def overlay_figure(
    image: np.ndarray, gt_xy, present, pred_xy, title: str, names: Sequence[str] = POINT_NAMES
):
    """A matplotlib figure of one slice with true (green o) and predicted (red x) points,
    each labelled by its point name (`names`, the task's point_names)."""
    plt = _plt()
    lo, hi = float(np.min(image)), float(np.max(image))
    fig, ax = plt.subplots(figsize=(4, 4), dpi=90)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    for k, name in enumerate(names):
        if present[k]:
            ax.plot(*gt_xy[k], "o", ms=6, mfc="none", mec="lime")
            ax.plot(
                [gt_xy[k][0], pred_xy[k][0]], [gt_xy[k][1], pred_xy[k][1]], color="yellow", lw=0.6
            )
        ax.plot(*pred_xy[k], "x", ms=5, color="red")
        ax.text(pred_xy[k][0] + 3, pred_xy[k][1], name, color="yellow", fontsize=5)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    return fig


def figure_to_array(fig) -> np.ndarray:
    """RGB uint8 array of a matplotlib figure (closes it)."""
    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _plt().close(fig)
    return array
