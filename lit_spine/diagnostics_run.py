"""One diagnostics pass: collect the net's outputs on a loader, score them, and run every
measurement of `lit_spine.diagnostics_measures` into one result dict (diagnostics.json) and
its flat scalars (W&B summary fields). No Trainer needed."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_spine.data.labels import Vocabulary
from lit_spine.diagnostics_measures import (
    BatchNormDrift,
    _task,
    batch_statistics_copy,
    batchnorm_layers,
    calibration,
    calibration_pairs,
    effective_receptive_field,
    erf_size,
    per_level_localisation,
)
from lit_spine.losses import SpineLoss, class_probabilities
from lit_spine.metrics import SpineDetectionMetric, decode_heatmaps, select_predictions
from lit_spine.task import Task


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
