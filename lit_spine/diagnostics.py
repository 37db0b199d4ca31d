"""Diagnostics that explain a run's score: what a norm or drop method changed, and where.

Computed once at the end of `fit`, on the validation split, from the best checkpoint, by the
`Diagnostics` callback (which also sends validation overlays, tables and summary fields to
W&B). The computations are plain functions on tensors/arrays, testable without a Trainer:

- Localisation vs classification: radial error and success rates (the metric's own
  localisation, docs/metric.md), the class mAP at the decoded points beside the class mAP
  with the classifier reading the ground-truth points (classification given perfect
  localisation; `SpineNet.forward(images, points)`).
- Per level: per point of the task (`Task.point_names`, tianchi2020's 11 by default),
  radial error, hit rate within the radius, AP, and
  the off-by-one rate: a prediction that misses its own point but lands within the radius
  of the neighbouring level of the same type (the disc or vertebra above or below), the
  level-shift failure the RSNA 2024 lumbar-spine solutions report.
- Generalisation gap: loss and metric on a fixed subset of the training split (no
  augmentation, eval mode, best checkpoint) vs the same on the validation split.
- BatchNorm train/eval gap: the validation metric with running statistics (eval mode) vs
  batch statistics (BatchNorm layers in train mode on a copy, momentum 0 so running stats
  stay put), and per-layer drift between the two (Wu & He 2018 name this train/test
  discrepancy as the cause of BatchNorm's small-batch failure; docs/regularizers.md).
- Calibration: expected calibration error of the disease probabilities (torchmetrics'
  binary calibration error on (probability, outcome) pairs: every code for the multi-label
  sigmoid head, the top code for the softmax head) and a reliability diagram.
- Effective receptive field (Luo et al. 2016, "Understanding the effective receptive field
  in deep convolutional neural networks"): |d heatmap peak / d input| averaged over images
  and points, re-centred on each peak; its size as the radius holding 50% / 90% of the
  gradient mass, beside the theoretical field of `lit_spine.models.summary`.

Written by hand (no library does them): the off-by-one rule, the BatchNorm drift, the
re-centred ERF average and the reliability-diagram bins (torchmetrics returns only the ECE;
the bins here use its binning, equal-width over [0, 1], and the tests check both agree).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lit_spine.data.labels import POINT_NAMES, Vocabulary
from lit_spine.losses import SpineLoss, class_probabilities
from lit_spine.metrics import SpineDetectionMetric, decode_heatmaps, select_predictions
from lit_spine.task import Task, get_task
from lit_spine.utils import atomic_write_bytes, atomic_write_json


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


MASS_SHARES = (0.5, 0.9)


# ---------------------------------------------------------------------------- localisation
def radial_errors_mm(
    pred_xy: np.ndarray, gt_xy: np.ndarray, spacing_mm: np.ndarray, present: np.ndarray
) -> np.ndarray:
    """(N, K) distances in mm between predicted and true [x, y] points; NaN where not present.

    `spacing_mm` is (N, 2) [row, col] as everywhere in the suite: dx scales by the column
    spacing, dy by the row spacing.
    """
    d = (np.asarray(pred_xy, np.float64) - np.asarray(gt_xy, np.float64)) * np.asarray(
        spacing_mm, np.float64
    )[:, None, ::-1]
    dist = np.sqrt((d**2).sum(-1))
    return np.where(np.asarray(present, bool), dist, np.nan)


def neighbour_levels(
    names: Sequence[str] = POINT_NAMES, kinds: Sequence[str] | None = None
) -> list[tuple[int, ...]]:
    """For each point, the same-type points directly above and below it (a one-level shift).

    `kinds` gives each point's kind (a task's `point_kinds`); without it a name holding '-'
    is a disc (the tianchi2020 names)."""
    if kinds is None:
        kinds = ["disc" if "-" in n else "vertebra" for n in names]
    if len(kinds) != len(names):
        raise ValueError(f"{len(names)} point names but {len(kinds)} point kinds")
    out = []
    for k, kind in enumerate(kinds):
        same = [j for j, other in enumerate(kinds) if other == kind]
        pos = same.index(k)
        out.append(tuple(same[p] for p in (pos - 1, pos + 1) if 0 <= p < len(same)))
    return out


def per_level_localisation(
    pred_xy: np.ndarray,
    gt_xy: np.ndarray,
    present: np.ndarray,
    spacing_mm: np.ndarray,
    radius_mm: float,
    names: Sequence[str] = POINT_NAMES,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per level: n, mean radial error, hit rate (d < R) and off-by-one rate; plus overall rates.

    Off-by-one: the prediction for level k is not within R of its own true point but is
    within R of a present true point of a same-type neighbour (`neighbour_levels`). Rates
    are over the present true points of that level.
    """
    pred_xy, gt_xy = np.asarray(pred_xy, np.float64), np.asarray(gt_xy, np.float64)
    present = np.asarray(present, bool)
    if present.shape[-1] != len(names):
        raise ValueError(f"{present.shape[-1]} points per item but {len(names)} level names")
    own = radial_errors_mm(pred_xy, gt_xy, spacing_mm, present)
    shifted = np.zeros_like(present)
    for k, neighbours in enumerate(neighbour_levels(names, kinds)):
        for j in neighbours:
            d = radial_errors_mm(
                pred_xy[:, [k]], gt_xy[:, [j]], spacing_mm, present[:, [j]] & present[:, [k]]
            )[:, 0]
            with np.errstate(invalid="ignore"):
                shifted[:, k] |= (d < radius_mm) & ~(own[:, k] < radius_mm)
    levels = []
    for k, name in enumerate(names):
        n = int(present[:, k].sum())
        with np.errstate(invalid="ignore"):
            hits = int(np.count_nonzero(own[:, k] < radius_mm))
        levels.append(
            {
                "name": name,
                "n": n,
                "mre_mm": float(np.nanmean(own[:, k])) if n else None,
                "hit_rate": hits / n if n else None,
                "off_by_one_rate": int(shifted[:, k].sum()) / n if n else None,
            }
        )
    n_all = int(present.sum())
    with np.errstate(invalid="ignore"):
        hit_all = int(np.count_nonzero(own < radius_mm))
    return {
        "levels": levels,
        "hit_rate": hit_all / n_all if n_all else None,
        "off_by_one_rate": int(shifted.sum()) / n_all if n_all else None,
    }


# ---------------------------------------------------------------------------- collecting
def _batches(loader, max_batches: int | None):
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            return
        yield batch


@torch.no_grad()
def collect(
    net: nn.Module,
    loader,
    multi_label: bool,
    loss_fn: SpineLoss | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    true_points: bool = False,
    hooks: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run `net` over `loader` and keep everything the diagnostics need as numpy arrays.

    Returns decoded points/scores, class probabilities at the decoded points and, with
    `true_points`, at the ground-truth points (the classifier reads the true points where
    present); ground truth; and the mean loss per batch when `loss_fn` is given.
    """
    stride = int(net.heatmap_stride)
    keep: dict[str, list] = {}
    losses = []

    def add(name: str, t: torch.Tensor) -> None:
        keep.setdefault(name, []).append(t.detach().float().cpu().numpy())

    for batch in _batches(loader, max_batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        images, present = batch["image"], batch["present"].bool()
        outputs = net(images)
        points, scores = decode_heatmaps(outputs["heatmaps"].float(), stride)
        probs = class_probabilities(outputs, multi_label)
        if loss_fn is not None:
            losses.append(float(loss_fn(outputs, batch)["loss"]))
        add("points", points)
        add("scores", scores)
        add("vertebra_probs", probs["vertebra"])
        add("disc_probs", probs["disc"])
        if true_points:
            at = torch.where(present[..., None], batch["points"].float(), points)
            true_probs = class_probabilities(net(images, at), multi_label)
            add("true_vertebra_probs", true_probs["vertebra"])
            add("true_disc_probs", true_probs["disc"])
        add("gt_points", batch["points"])
        add("present", present)
        add("labels", batch["labels"])
        add("spacing_mm", batch["spacing_mm"])
    if not keep:
        raise ValueError("the diagnostics loader yielded no batches")
    out: dict[str, Any] = {k: np.concatenate(v) for k, v in keep.items()}
    out["present"] = out["present"].astype(bool)
    out["labels"] = out["labels"].astype(bool)
    out["loss"] = float(np.mean(losses)) if losses else None
    return out


def score(
    data: dict[str, Any],
    vocab: Vocabulary,
    radius_mm: float,
    baseline_radius_mm: float = 6.0,
    multi_label_threshold: float = 0.5,
    true_points: bool = False,
    level: int | None = None,
    task: str | Task = "tianchi2020",
):
    """The suite's metric (`SpineDetectionMetric`) on collected arrays of `task`'s points.

    `true_points`: prediction rows at the true points (score = class probability alone),
    i.e. classification given perfect localisation. `level`: only that point's ground truth
    and prediction rows (per-level AP).
    """
    present = torch.from_numpy(data["present"])
    points = torch.from_numpy(data["points"])
    scores = torch.from_numpy(data["scores"])
    prefix = ""
    if true_points:
        points = torch.where(present[..., None], torch.from_numpy(data["gt_points"]), points)
        scores = torch.where(present, torch.ones_like(scores), scores)
        prefix = "true_"
    rows = select_predictions(
        points,
        scores,
        torch.from_numpy(data[f"{prefix}vertebra_probs"]),
        torch.from_numpy(data[f"{prefix}disc_probs"]),
        vocab,
        multi_label_threshold=multi_label_threshold,
        task=task,
    )
    valid, gt_present = rows.valid, present
    if level is not None:
        valid = valid & (rows.point_index == level)
        gt_present = present & (torch.arange(present.shape[1]) == level)
    metric = SpineDetectionMetric(
        vocab=vocab, radius_mm=radius_mm, baseline_radius_mm=baseline_radius_mm,
        sync_on_compute=False, task=task,
    )  # fmt: skip
    metric.update(
        rows.points, rows.point_index, rows.cls, rows.score, valid,
        gt_points=torch.from_numpy(data["gt_points"]), gt_present=gt_present,
        gt_labels=torch.from_numpy(data["labels"]),
        spacing_mm=torch.from_numpy(data["spacing_mm"]),
    )  # fmt: skip
    return metric.compute_report()


# ---------------------------------------------------------------------------- calibration
def calibration_pairs(
    data: dict[str, Any], multi_label: bool, task: str | Task = "tianchi2020"
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs over present points with a label: every code's
    probability and whether the point has that code (sigmoid head), or the top probability
    and whether the top code is one of the point's codes (softmax head). A point without a
    label (an RSNA level without a grade) has no outcome and is left out."""
    spec = _task(task)
    conf, hit = [], []
    for kind in ("vertebra", "disc"):
        index = spec.points_of_kind(kind)
        probs = data[f"{kind}_probs"]  # (N, P, K)
        k = probs.shape[-1]
        if not index or not k:
            continue
        labels = data["labels"][:, list(index), :k]
        present = data["present"][:, list(index)] & labels.any(-1)
        probs, labels = probs[present], labels[present]
        if multi_label:
            conf.append(probs.reshape(-1))
            hit.append(labels.reshape(-1))
        else:
            top = probs.argmax(-1)
            conf.append(probs.max(-1))
            hit.append(labels[np.arange(len(top)), top])
    if not conf:
        return np.zeros(0, np.float64), np.zeros(0, bool)
    return np.concatenate(conf).astype(np.float64), np.concatenate(hit).astype(bool)


def calibration(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (torchmetrics, L1, equal-width bins) and the diagram's bins."""
    from torchmetrics.functional.classification import binary_calibration_error

    confidence = np.asarray(confidence, np.float64)
    outcome = np.asarray(outcome, bool)
    if not len(confidence):
        return {"ece": None, "n": 0, "n_bins": n_bins, "bins": []}
    ece = binary_calibration_error(
        torch.from_numpy(confidence).float(),
        torch.from_numpy(outcome).long(),
        n_bins=n_bins,
        norm="l1",
    )
    # torchmetrics' bucketing: bin i holds confidences in (edge_i, edge_i+1], 0 in the first.
    edges = np.linspace(0, 1, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        sel = index == i
        n = int(sel.sum())
        bins.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "n": n,
                "confidence": float(confidence[sel].mean()) if n else None,
                "accuracy": float(outcome[sel].mean()) if n else None,
            }
        )
    return {"ece": float(ece), "n": int(len(confidence)), "n_bins": n_bins, "bins": bins}


# ---------------------------------------------------------------------------- batchnorm
def batchnorm_layers(net: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (timm's BatchNormAct2d and SyncBatchNorm included) by name."""
    return {n: m for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def batch_statistics_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` in eval mode whose BatchNorm layers normalise with batch statistics.

    Momentum 0 keeps the running statistics unchanged however many batches pass; SyncBatchNorm
    becomes plain BatchNorm so that one process can run it without its peers.
    """
    twin = copy.deepcopy(net).eval()
    for name, m in batchnorm_layers(twin).items():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = nn.BatchNorm2d
        elif isinstance(m, nn.SyncBatchNorm):
            raise ValueError(f"{name}: {type(m).__name__} would wait for its DDP peers")
        m.train()
        m.momentum = 0.0
    return twin


class BatchNormDrift:
    """Hooks on every BatchNorm layer measuring batch vs running statistics of its input.

    Per layer and batch: mean over channels of |mu_batch - mu_running| / sqrt(var_running + eps)
    (the mean shift in running standard deviations) and of |log((var_batch + eps) /
    (var_running + eps))|; averaged over batches. Use as a context manager around eval passes.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = batchnorm_layers(net)
        self.sums: dict[str, np.ndarray] = {n: np.zeros(2) for n in self.layers}
        self.batches: dict[str, int] = {n: 0 for n in self.layers}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().float()
            if module.running_mean is None:
                return
            dims = [d for d in range(x.ndim) if d != 1]
            mu, var = x.mean(dims), x.var(dims, unbiased=False)
            r_mu, r_var = module.running_mean.float(), module.running_var.float()
            shift = ((mu - r_mu).abs() / (r_var + module.eps).sqrt()).mean()
            ratio = ((var + module.eps) / (r_var + module.eps)).log().abs().mean()
            self.sums[name] += [float(shift), float(ratio)]
            self.batches[name] += 1

        return hook

    def __enter__(self) -> BatchNormDrift:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict[str, dict[str, float]]:
        """Per layer: mean_shift_sd and log_var_ratio averaged over the batches seen."""
        return {
            n: {
                "mean_shift_sd": float(self.sums[n][0] / self.batches[n]),
                "log_var_ratio": float(self.sums[n][1] / self.batches[n]),
            }
            for n in self.layers
            if self.batches[n]
        }


# ---------------------------------------------------------------------------- ERF
def effective_receptive_field(
    fn: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    stride: int = 1,
    channels: Sequence[int] | None = None,
) -> np.ndarray:
    """Mean |d output peak / d input| re-centred on each peak: an (2H/2+1, 2W/2+1) map, sum 1.

    For every image and output channel (heatmap point; `channels`, default all) the gradient
    of the channel's maximum with respect to the input, summed over input channels in
    absolute value, is shifted so the peak's input location is the window centre, then
    averaged. `fn(images)` returns (B, K, h, w) maps or a dict with "heatmaps".
    """
    images = images.detach().clone().float().requires_grad_(True)
    _, _, height, width = images.shape
    half_h, half_w = height // 2, width // 2
    total = torch.zeros(2 * half_h + 1, 2 * half_w + 1, dtype=torch.float64, device=images.device)
    count = 0
    with torch.enable_grad():
        out = fn(images)
        maps = out["heatmaps"] if isinstance(out, dict) else out
        b, k, h, w = maps.shape
        for c in channels if channels is not None else range(k):
            peak, index = maps[:, c].reshape(b, -1).max(-1)
            (grad,) = torch.autograd.grad(peak.sum(), images, retain_graph=True)
            grad = grad.abs().sum(1).double()  # (B, H, W)
            # Heatmap pixel i is centred on input coordinate (i + 0.5) * stride - 0.5.
            cy = ((index // w).double() + 0.5) * stride - 0.5
            cx = ((index % w).double() + 0.5) * stride - 0.5
            padded = torch.nn.functional.pad(grad, (half_w, half_w, half_h, half_h))
            for i in range(b):
                y0, x0 = int(round(float(cy[i]))), int(round(float(cx[i])))
                y0, x0 = min(max(y0, 0), height - 1), min(max(x0, 0), width - 1)
                total += padded[i, y0 : y0 + 2 * half_h + 1, x0 : x0 + 2 * half_w + 1]
                count += 1
    total = (total / max(count, 1)).cpu()
    mass = float(total.sum())
    return (total / mass if mass > 0 else total).numpy()


def erf_size(erf: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0)) -> dict[str, Any]:
    """Radii (px and mm) holding each share of `MASS_SHARES` of an ERF map, and its support.

    `spacing_mm` [row, col] turns pixel offsets into millimetres; `support_px` is the
    (height, width) of the bounding box of the non-zero gradient.
    """
    h, w = erf.shape
    dy, dx = np.mgrid[:h, :w]
    dy, dx = dy - h // 2, dx - w // 2
    r_px = np.sqrt(dy**2 + dx**2).ravel()
    r_mm = np.sqrt((dy * spacing_mm[0]) ** 2 + (dx * spacing_mm[1]) ** 2).ravel()
    mass = erf.ravel() / max(float(erf.sum()), 1e-300)
    out: dict[str, Any] = {}
    for unit, r in (("px", r_px), ("mm", r_mm)):
        order = np.argsort(r, kind="stable")
        cum = np.cumsum(mass[order])
        for share in MASS_SHARES:
            i = min(int(np.searchsorted(cum, share - 1e-12)), len(cum) - 1)
            out[f"r{int(share * 100)}_{unit}"] = float(r[order][i])
    rows, cols = np.nonzero(erf > erf.max() * 1e-9) if erf.max() > 0 else ([], [])
    out["support_px"] = (
        [int(max(rows) - min(rows) + 1), int(max(cols) - min(cols) + 1)] if len(rows) else [0, 0]
    )
    return out


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


# ---------------------------------------------------------------------------- one run
def _level_ap(
    data, vocab, radius_mm, baseline_radius_mm, threshold, task: Task
) -> list[float | None]:
    return [
        score(data, vocab, radius_mm, baseline_radius_mm, threshold, level=k, task=task).map
        for k in range(task.num_points)
    ]


def run_diagnostics(
    net: nn.Module,
    val_loader,
    train_loader=None,
    *,
    vocab: Vocabulary,
    multi_label: bool = True,
    loss_fn: SpineLoss | None = None,
    radius_mm: float = 8.0,
    baseline_radius_mm: float = 6.0,
    multi_label_threshold: float = 0.5,
    device: torch.device | str = "cpu",
    train_batches: int | None = 4,
    erf_images: int = 4,
    n_bins: int = 15,
    init_erf: np.ndarray | None = None,
    task: str | Task | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All diagnostics of one network on its validation (and a training) loader.

    Returns the JSON-ready result and the arrays behind the plots (ERF maps).
    `init_erf` is the ERF map of the same network at initialisation (computed at fit start).
    `task` (default: the net's `task`, else tianchi2020) names the levels of the per-level
    table.
    """
    spec = _task(task or getattr(net, "task", None) or "tianchi2020")
    net = copy.deepcopy(net).to(device).eval()
    args = dict(vocab=vocab, radius_mm=radius_mm, baseline_radius_mm=baseline_radius_mm)
    args["task"] = spec
    args["multi_label_threshold"] = multi_label_threshold
    has_bn = bool(batchnorm_layers(net))
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = now - clock[0]
        clock[0] = now

    with BatchNormDrift(net) as drift:
        val = collect(net, val_loader, multi_label, loss_fn, device, true_points=True)
    lap("val_passes")
    val_report = score(val, **args)
    true_report = score(val, **args, true_points=True)
    loc = val_report.localisation["all"]
    result: dict[str, Any] = {"n_val_studies": int(len(val["present"])), "task": spec.name}
    result["localisation_vs_classification"] = {
        "mre_mm": _finite(loc.mre_mm),
        "median_re_mm": _finite(loc.median_re_mm),
        "sdr": {f"{r:g}": v for r, v in loc.sdr.items()},
        "map_decoded": val_report.map,
        "map_true_points": true_report.map,
        "map_gap": _diff(true_report.map, val_report.map),
    }
    levels = per_level_localisation(
        val["points"], val["gt_points"], val["present"], val["spacing_mm"], radius_mm,
        names=spec.point_names, kinds=spec.point_kinds,
    )  # fmt: skip
    for row, ap in zip(
        levels["levels"],
        _level_ap(val, vocab, radius_mm, baseline_radius_mm, multi_label_threshold, spec),
        strict=True,
    ):
        row["ap"] = ap
    result["per_level"] = levels
    lap("scoring")

    val_summary = {"loss": val["loss"], "map": val_report.map, "mre_mm": _finite(loc.mre_mm)}
    if train_loader is not None:
        train = collect(net, train_loader, multi_label, loss_fn, device, train_batches)
        train_report = score(train, **args)
        train_summary = {
            "loss": train["loss"],
            "map": train_report.map,
            "mre_mm": _finite(train_report.localisation["all"].mre_mm),
            "n_studies": int(len(train["present"])),
        }
        result["generalisation"] = {
            "train": train_summary,
            "val": val_summary,
            "gap": {k: _diff(train_summary[k], val_summary[k]) for k in ("loss", "map", "mre_mm")},
            "protocol": "train = the first studies of the training split without augmentation, "
            "eval mode, best checkpoint; gap = train - val",
        }

    lap("train_subset")
    twin = None
    if has_bn:
        try:
            twin = batch_statistics_copy(net)
        except ValueError as err:
            result["batchnorm"] = {"has_batchnorm": True, "note": f"batch statistics n/a: {err}"}
    if twin is not None:
        batch = collect(twin, val_loader, multi_label, loss_fn, device)
        batch_report = score(batch, **args)
        layers = drift.result()
        shifts = [v["mean_shift_sd"] for v in layers.values()]
        ratios = [v["log_var_ratio"] for v in layers.values()]
        result["batchnorm"] = {
            "has_batchnorm": True,
            "map_eval": val_report.map,
            "map_batch_stats": batch_report.map,
            "map_gap": _diff(val_report.map, batch_report.map),
            "mre_mm_eval": _finite(loc.mre_mm),
            "mre_mm_batch_stats": _finite(batch_report.localisation["all"].mre_mm),
            "loss_eval": val["loss"],
            "loss_batch_stats": batch["loss"],
            "mean_shift_sd": float(np.mean(shifts)) if shifts else None,
            "max_shift_sd": float(np.max(shifts)) if shifts else None,
            "log_var_ratio": float(np.mean(ratios)) if ratios else None,
            "layers": layers,
        }
    elif not has_bn:
        result["batchnorm"] = {
            "has_batchnorm": False,
            "map_eval": val_report.map,
            # Without BatchNorm, train-mode normalisation is eval-mode normalisation.
            "map_batch_stats": val_report.map,
            "map_gap": 0.0 if val_report.map is not None else None,
            "mre_mm_eval": _finite(loc.mre_mm),
            "mre_mm_batch_stats": _finite(loc.mre_mm),
            "mean_shift_sd": None,
            "max_shift_sd": None,
            "log_var_ratio": None,
            "layers": {},
            "note": "no BatchNorm layers: statistics are per sample, identical in train and "
            "eval mode by construction; drift n/a",
        }

    lap("batchnorm")
    conf, outcome = calibration_pairs(val, multi_label, spec)
    cal = calibration(conf, outcome, n_bins)
    cal["kind"] = (
        "every code's sigmoid probability vs its label"
        if multi_label
        else "top softmax probability vs correct"
    )
    cal["at"] = "decoded points"
    result["calibration"] = cal

    images, spacing = _first_images(val_loader, erf_images)
    stride = int(net.heatmap_stride)
    maps = {"trained": effective_receptive_field(net, images.to(device), stride)}
    if init_erf is not None:
        maps["init"] = init_erf
    mean_spacing = spacing.mean(0).tolist()
    erf = {
        "n_images": int(len(images)),
        "spacing_mm": mean_spacing,
        "points": list(spec.point_names),
    }
    for key, m in maps.items():
        erf[key] = erf_size(m, mean_spacing)
    try:
        from lit_spine.models.summary import receptive_field

        rf = receptive_field(net, images[:1].to(device))
        erf["theoretical_px"] = list(rf["size"])
        erf["global_context"] = bool(rf["global_context"])
    except ValueError as err:  # only global context: no local field to compare with
        erf["theoretical_px"] = None
        erf["theoretical_note"] = str(err)
    result["erf"] = erf
    lap("erf")
    result["seconds"] = seconds
    return result, maps


def _first_images(loader, n: int) -> tuple[torch.Tensor, np.ndarray]:
    images, spacing = [], []
    for batch in loader:
        images.append(batch["image"])
        spacing.append(batch["spacing_mm"].numpy())
        if sum(len(i) for i in images) >= n:
            break
    return torch.cat(images)[:n], np.concatenate(spacing)[:n]


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(a - b)


def flat_scalars(result: dict[str, Any], prefix: str = "diagnostics/") -> dict[str, float]:
    """The diagnostics' headline scalars under flat keys (W&B summary fields)."""
    out: dict[str, float] = {}
    sections = {
        "localisation_vs_classification": ("mre_mm", "map_decoded", "map_true_points", "map_gap"),
        "per_level": ("hit_rate", "off_by_one_rate"),
        "batchnorm": ("map_eval", "map_batch_stats", "map_gap", "mean_shift_sd"),
        "calibration": ("ece",),
        "cost": ("seconds", "fraction_of_fit"),
    }
    for section, keys in sections.items():
        for key in keys:
            value = (result.get(section) or {}).get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out[f"{prefix}{section}/{key}"] = float(value)
    gen = result.get("generalisation") or {}
    for key, value in (gen.get("gap") or {}).items():
        if value is not None:
            out[f"{prefix}generalisation/gap_{key}"] = float(value)
    for which in ("init", "trained"):
        for key, value in ((result.get("erf") or {}).get(which) or {}).items():
            if key.startswith("r"):
                out[f"{prefix}erf/{which}_{key}"] = float(value)
    return out


# ---------------------------------------------------------------------------- callback
class Diagnostics(pl.Callback):
    """Run the diagnostics at the end of fit (best checkpoint, validation split) and log them.

    Writes `diagnostics.json`, `diagnostics/reliability.png` and `diagnostics/erf.png`
    (+ `diagnostics/erf.npz`, the maps) into the run folder; on W&B: validation overlays
    every `overlay_every_n_epochs` epochs, the tables as `wandb.Table`, the scalars as
    summary fields (`define_metric`). Skipped under `fast_dev_run`.

    Args:
        enabled: False switches every diagnostic (and the overlays) off.
        train_batches: batches of the (un-augmented) training split for the generalisation
            gap; 0 skips it.
        erf_images: validation images averaged in the effective receptive field.
        n_bins: calibration bins.
        overlay_every_n_epochs: W&B overlay period in epochs (0: none).
        overlay_studies: number of fixed validation studies drawn (the first ones).
    """

    def __init__(
        self,
        enabled: bool = True,
        train_batches: int = 4,
        erf_images: int = 4,
        n_bins: int = 15,
        overlay_every_n_epochs: int = 5,
        overlay_studies: int = 4,
    ) -> None:
        self.enabled = enabled
        self.train_batches = train_batches
        self.erf_images = erf_images
        self.n_bins = n_bins
        self.overlay_every_n_epochs = overlay_every_n_epochs
        self.overlay_studies = overlay_studies
        self.run_dir: Path | None = None  # set by the CLI; else the trainer's default_root_dir
        self.init_erf: np.ndarray | None = None
        self.init_erf_seconds = 0.0
        self.result: dict[str, Any] | None = None
        self._t_fit = time.perf_counter()

    # -------------------------------------------------------------- state (resume keeps init ERF)
    def state_dict(self) -> dict[str, Any]:
        return {"init_erf": None if self.init_erf is None else torch.from_numpy(self.init_erf)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        erf = state_dict.get("init_erf")
        self.init_erf = None if erf is None else torch.as_tensor(erf).double().numpy()

    def _active(self, trainer) -> bool:
        return self.enabled and not trainer.fast_dev_run and trainer.state.fn == "fit"

    def _datamodule(self, trainer):
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "val_dataset"):
            rank_zero_warn("diagnostics: no SpineDataModule on the trainer; skipped")
            return None
        return dm

    def _loader(self, dataset, batch_size: int, n: int | None = None):
        from torch.utils.data import DataLoader, Subset

        if n is not None:
            dataset = Subset(dataset, range(min(n, len(dataset))))
        # A plain loader on this process: the datamodule's own shards itself under DDP.
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t_fit = time.perf_counter()
        if not self._active(trainer) or not trainer.is_global_zero or self.init_erf is not None:
            return
        if trainer.ckpt_path:  # resumed without a stored init ERF: the init weights are gone
            return
        dm = self._datamodule(trainer)
        if dm is None:
            return
        start = time.perf_counter()
        net = copy.deepcopy(pl_module.spine_net).eval()
        images, _ = _first_images(
            self._loader(dm.val_dataset, dm.hparams.batch_size), self.erf_images
        )
        self.init_erf = effective_receptive_field(
            net, images.to(pl_module.device), int(net.heatmap_stride)
        )
        self.init_erf_seconds = time.perf_counter() - start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if (
            not self._active(trainer)
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or self.overlay_every_n_epochs <= 0
            or trainer.current_epoch % self.overlay_every_n_epochs
        ):
            return
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        dm = self._datamodule(trainer) if loggers else None
        if dm is None:
            return
        batch = next(iter(self._loader(dm.val_dataset, self.overlay_studies, self.overlay_studies)))
        with torch.no_grad():
            outputs = pl_module(batch["image"].to(pl_module.device))
            points, _ = decode_heatmaps(outputs["heatmaps"].float(), pl_module.heatmap_stride)
        points = points.cpu().numpy()
        images, captions = [], []
        for i in range(len(points)):
            image = batch["image"][i]
            title = f"val study #{int(batch['index'][i])}, epoch {trainer.current_epoch}"
            fig = overlay_figure(
                image[image.shape[0] // 2].numpy(),
                batch["points"][i].numpy(),
                batch["present"][i].numpy(),
                points[i],
                title + ": true (green o) vs predicted (red x)",
                names=pl_module.task.point_names,
            )
            images.append(figure_to_array(fig))
            captions.append(title)
        for logger in loggers:
            logger.log_image(
                key="val/overlays", images=images, caption=captions, step=trainer.global_step
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or not trainer.is_global_zero:
            return
        dm = self._datamodule(trainer)
        if dm is None:
            return
        start = time.perf_counter()
        fit_seconds = start - self._t_fit
        net = copy.deepcopy(pl_module.spine_net)
        weights = _load_best(trainer, net)
        bs = dm.hparams.batch_size
        train_loader = None
        if self.train_batches > 0:
            train_ds = copy.copy(dm.train_dataset)
            train_ds.augment = None  # the gap is measured on the training images as they are
            train_loader = self._loader(train_ds, bs, self.train_batches * bs)
        hp = pl_module.hparams
        result, maps = run_diagnostics(
            net,
            self._loader(dm.val_dataset, bs),
            train_loader,
            vocab=pl_module.vocab,
            multi_label=hp.multi_label,
            loss_fn=pl_module.loss_fn,
            radius_mm=hp.radius_mm,
            baseline_radius_mm=hp.baseline_radius_mm,
            multi_label_threshold=hp.multi_label_threshold,
            device=pl_module.device,
            train_batches=self.train_batches,
            erf_images=self.erf_images,
            n_bins=self.n_bins,
            init_erf=self.init_erf,
            task=pl_module.task,
        )
        result = {
            "weights": weights,
            "split": "val",
            "norm": getattr(net, "norm", None),
            "radius_mm": float(hp.radius_mm),
            **result,
        }
        if self.init_erf is None:
            result["erf"]["init_note"] = "not available (run resumed without the init map)"
        out = Path(self.run_dir or trainer.default_root_dir)
        folder = out / "diagnostics"
        folder.mkdir(parents=True, exist_ok=True)
        plots = {
            "reliability": plot_reliability(
                {"validation": result["calibration"]},
                folder / "reliability.png",
                f"Reliability ({result['calibration']['kind']})",
            ),
            "erf": plot_erf(
                {k: maps[k] for k in ("init", "trained") if k in maps},
                result["erf"],
                folder / "erf.png",
                result["erf"].get("theoretical_px"),
            ),
        }
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **maps)
        atomic_write_bytes(folder / "erf.npz", buf.getvalue())
        end_seconds = time.perf_counter() - start
        seconds = end_seconds + self.init_erf_seconds
        total = fit_seconds + end_seconds  # the whole fit call, diagnostics included
        result["cost"] = {
            "seconds": seconds,
            "end_of_fit_s": end_seconds,
            "init_erf_s": self.init_erf_seconds,
            "phases_s": result.pop("seconds"),
            "fit_s": total,
            "fraction_of_fit": seconds / total if total > 0 else None,
            "note": "seconds = ERF at init (fit start) + end-of-fit diagnostics; "
            "fraction_of_fit = seconds / the whole fit call including them",
        }
        result["plots"] = {k: str(p.relative_to(out)) for k, p in plots.items()}
        atomic_write_json(out / "diagnostics.json", result)
        self.result = result
        print(
            f"lit-spine: diagnostics in {seconds:.1f} s "
            f"({100 * (result['cost']['fraction_of_fit'] or 0):.1f}% of the fit) "
            f"-> {out / 'diagnostics.json'}"
        )
        self._log_wandb(trainer, result, plots)

    def _log_wandb(self, trainer, result: dict[str, Any], plots: dict[str, Path]) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers:
            return
        import wandb

        scalars = flat_scalars(result)
        levels = result["per_level"]["levels"]
        level_cols = ["level", "n", "mre_mm", "hit_rate", "ap", "off_by_one_rate"]
        level_rows = [[r["name"], *(r[c] for c in level_cols[1:])] for r in levels]
        summary_rows = [[k.removeprefix("diagnostics/"), v] for k, v in scalars.items()]
        for logger in loggers:
            run = logger.experiment
            for key in scalars:
                run.define_metric(key, summary="last")
            logger.log_table("diagnostics/per_level", columns=level_cols, data=level_rows)
            logger.log_table(
                "diagnostics/summary", columns=["diagnostic", "value"], data=summary_rows
            )
            run.log({f"diagnostics/{k}_png": wandb.Image(str(p)) for k, p in plots.items()})
            run.log(scalars)
            for key, value in scalars.items():
                run.summary[key] = value


def _load_best(trainer, net: nn.Module) -> str:
    """Load the best checkpoint's network weights into `net`; say which weights were used."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if not path or not Path(path).is_file():
        rank_zero_warn("diagnostics: no best checkpoint; using the weights at the end of training")
        return "end of training (no best checkpoint)"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "net."
    weights = {
        k[len(prefix) :].replace("_orig_mod.", "", 1): v
        for k, v in state.items()
        if k.startswith(prefix)
    }
    net.load_state_dict(weights)
    return f"best checkpoint {path}"
