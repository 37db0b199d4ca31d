"""The diagnostics' measurements, plain functions on arrays and tensors (no Trainer):
localisation and per-level errors with the off-by-one rate, calibration (ECE and the
reliability bins), the BatchNorm train/eval drift, and the effective receptive field.
`lit_spine.diagnostics` describes each and runs them at the end of `fit`.

Written by hand (no library does them): the off-by-one rule, the BatchNorm drift, the
re-centred ERF average and the reliability-diagram bins (torchmetrics returns only the ECE;
the bins here use its binning, equal-width [low, high) over [0, 1] plus one bin for exactly
1.0, and the tests check that they reproduce its ECE).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_spine.data.labels import POINT_NAMES
from lit_spine.task import Task, get_task


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
    is a disc (the tianchi2020 names). A name with a side after the level ('L1/L2 left', the
    foraminal task) has neighbours only on its own side."""
    if kinds is None:
        kinds = ["disc" if "-" in n else "vertebra" for n in names]
    if len(kinds) != len(names):
        raise ValueError(f"{len(names)} point names but {len(kinds)} point kinds")
    sides = [n.split(" ", 1)[1] if " " in n else "" for n in names]
    out = []
    for k, kind in enumerate(kinds):
        same = [j for j, other in enumerate(kinds) if other == kind and sides[j] == sides[k]]
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
    # torchmetrics' bucketing, on the same float32 values and edges: bin i holds confidences
    # in [edge_i, edge_i+1), and a confidence of exactly 1.0 has a bin of its own (listed only
    # when it holds one), so the bins reproduce the ECE: sum of n/N |accuracy - confidence|.
    edges32 = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(torch.from_numpy(confidence).float(), edges32, right=True) - 1).numpy()
    edges = edges32.double().numpy()
    bins = []
    for i in range(n_bins + 1):
        sel = index == i
        n = int(sel.sum())
        if i == n_bins and not n:
            break
        bins.append(
            {
                "low": float(edges[i]),
                "high": float(edges[min(i + 1, n_bins)]),
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
    """Mean |d output peak / d input| re-centred on each peak: a (2H-1, 2W-1) map, sum 1.

    For every image and output channel (heatmap point; `channels`, default all) the gradient
    of the channel's maximum with respect to the input, summed over input channels in
    absolute value, is shifted so the peak's input location is the window centre, then
    averaged. The window is large enough to hold the whole image wherever the peak is, so no
    gradient is cut off (a smaller one lost what lay beyond it from an off-centre peak, and
    the normalisation to sum 1 hid the loss). `fn(images)` returns (B, K, h, w) maps or a
    dict with "heatmaps".
    """
    images = images.detach().clone().float().requires_grad_(True)
    _, _, height, width = images.shape
    half_h, half_w = height - 1, width - 1
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
