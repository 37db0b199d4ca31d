"""How a prediction is scored (docs/metric.md): heatmap decoding, label selection, the metric.

Three layers, each usable alone:

- `decode_heatmaps` and `select_predictions` run on the device and turn network outputs
  into small padded tensors of prediction rows (one row per point and label).
- `score_detections` is the one scoring core: pure, vectorised numpy on flat arrays
  (`GroundTruthArrays`, `PredictionArrays`, one pixel spacing per study). It computes
  (1) the brief's point detection at radius R: TP/FP/FN, precision, recall, F1, AP per class
  and mAP; (2) the 2020 baseline's macro-F1 and key-point recall; (3) localisation errors.
- `SpineDetectionMetric` (torchmetrics) accumulates rows over batches, syncs them across
  DDP processes and calls the same core, as does `lit-spine evaluate` (lit_spine.evaluate),
  so both give identical numbers on identical predictions.

Rules a plain statement of the metric leaves open, fixed here (docs/metric.md states them; the
tests pin each one):

- Distances: dx * column spacing, dy * row spacing, d = sqrt(dx^2 + dy^2) in float64; a hit
  is d < R (strictly), also for the baseline radius and the SDR radii.
- Detection: a prediction hitting several instances of its class goes to the nearest (the
  lower instance index on an exact tie: GT points in input order, then class order); among
  predictions assigned to one instance the nearest is TP, ties going to the earliest row in
  input order; the others are ignored. AP sorts non-ignored rows by score with a stable sort
  (ties keep input order) and integrates the all-point interpolated monotone envelope.
- Undefined ratios (0/0) count as 0 for precision, recall and F1 (pooled, per class and in
  the baseline); AP of a class without ground truth is None and stays out of mAP.
- Baseline macro-F1 (section 2): per study and identification the highest-score row is the
  prediction (first in input order on ties). Its label set is the labels of all rows of
  that identification at exactly the same coordinates, so a point written once as "v2,v5"
  and a point written twice (once per label) score alike. A hit ground-truth instance of
  class c counts as predicted-as c (diagonal) when c is in that label set, otherwise as
  predicted-as the selected row's own label. The mean runs over the classes that have
  ground truth or a predicted-as count (classes with neither are left out).
- Localisation (section 3) is per ground-truth point (a multi-label point counts once),
  using the same selected prediction. MRE and median use points that have a prediction;
  SDR at r is the share of all ground-truth points with a prediction at d < r (a missing
  prediction is a failure).

Heatmap decoding refines the argmax with a separable parabola fit of the log-probability in
the 3x3 neighbourhood: exact for a Gaussian peak, the 1-D form of the Taylor step of DARK
(Zhang et al., "Distribution-Aware Coordinate Representation for Human Pose Estimation",
CVPR 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_spine.data.targets import heatmap_to_input_coords
from lit_spine.task import Task, Vocabulary, get_task, get_vocabulary


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


# ---------------------------------------------------------------------------- decoding
def decode_heatmaps(
    heatmaps: torch.Tensor, stride: float = 1, logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each channel: points (B, K, 2) [x, y] in input pixels and scores (B, K) in [0, 1].

    `heatmaps` (B, K, h, w) are logits (score = sigmoid of the peak logit) or, with
    `logits=False`, probabilities (score = the peak value). The integer argmax is refined by
    a parabola through the log-probabilities of its two neighbours on each axis (offset
    clamped to half a pixel, none at the border or on a flat/non-concave profile), then
    mapped to input pixels with `lit_spine.data.targets.heatmap_to_input_coords`.
    Everything stays on the heatmaps' device.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, K, h, w), got shape {tuple(heatmaps.shape)}")
    b, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, k, h * w)
    peak, idx = flat.max(dim=-1)
    iy, ix = idx // w, idx % w
    scores = torch.sigmoid(peak) if logits else peak.clamp(0.0, 1.0)

    def log_prob_at(dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability at the peak's neighbour (dy, dx) and whether it lies inside."""
        yy, xx = iy + dy, ix + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        lin = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(-1)
        v = flat.gather(-1, lin).squeeze(-1)
        return (F.logsigmoid(v) if logits else v.clamp_min(1e-12).log()), inside

    centre, _ = log_prob_at(0, 0)

    def offset(lo: tuple, hi: tuple) -> torch.Tensor:
        (v_lo, in_lo), (v_hi, in_hi) = lo, hi
        curvature = v_lo - 2 * centre + v_hi
        ok = in_lo & in_hi & (curvature < 0)
        off = 0.5 * (v_lo - v_hi) / torch.where(ok, curvature, torch.ones_like(curvature))
        return torch.where(ok, off.clamp(-0.5, 0.5), torch.zeros_like(off))

    dx = offset(log_prob_at(0, -1), log_prob_at(0, 1))
    dy = offset(log_prob_at(-1, 0), log_prob_at(1, 0))
    xy_hm = torch.stack([ix.to(heatmaps.dtype) + dx, iy.to(heatmaps.dtype) + dy], dim=-1)
    return heatmap_to_input_coords(xy_hm, stride), scores


class PredictionRows(NamedTuple):
    """Padded prediction rows (B, P, ...) with a validity mask; the first arguments of
    `SpineDetectionMetric.update`."""

    points: torch.Tensor  # (B, P, 2) float, [x, y] input pixels
    point_index: torch.Tensor  # (B, P) long, index into the task's point_names
    cls: torch.Tensor  # (B, P) long, index into vocab.classes
    score: torch.Tensor  # (B, P) float in [0, 1]
    valid: torch.Tensor  # (B, P) bool


def select_predictions(
    points: torch.Tensor,
    point_scores: torch.Tensor,
    vertebra_probs: torch.Tensor,
    disc_probs: torch.Tensor,
    vocab: str | Vocabulary = "tianchi2020",
    multi_label_threshold: float = 0.5,
    task: str | Task = "tianchi2020",
) -> PredictionRows:
    """One prediction row per point and label: the top label, plus every other label with
    probability >= `multi_label_threshold`; score = point score x label probability.

    `points` (B, P, 2), `point_scores` (B, P) for the P points of `task`; `vertebra_probs`
    (B, Pv, Kv) and `disc_probs` (B, Pd, Kd) are probabilities (softmax or sigmoid) over the
    vocabulary's codes (tianchi2020: P = 11, Pv = 5, Pd = 6). Row order (the metric's input
    order) is the one `lit_spine.predict` writes: vertebra points, then disc points, each top
    to bottom, top label first, then other labels in code order.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    spec = _task(task)
    vertebra_points, disc_points = spec.points_of_kind("vertebra"), spec.points_of_kind("disc")
    n_vert, n_disc = len(vocab.vertebra), len(vocab.disc)
    b = points.shape[0]
    if vertebra_probs.shape[1:] != (len(vertebra_points), n_vert) or disc_probs.shape[1:] != (
        len(disc_points),
        n_disc,
    ):
        raise ValueError(
            f"class probabilities must be (B, {len(vertebra_points)}, {n_vert}) and "
            f"(B, {len(disc_points)}, {n_disc}) for vocabulary {vocab.name!r}, got "
            f"{tuple(vertebra_probs.shape)} and {tuple(disc_probs.shape)}"
        )
    k_max = max(n_vert, n_disc)
    device = points.device
    probs = torch.cat(
        [
            F.pad(vertebra_probs.float(), (0, k_max - n_vert), value=-1.0),
            F.pad(disc_probs.float(), (0, k_max - n_disc), value=-1.0),
        ],
        dim=1,
    )  # (B, P, k_max) in emission point order; -1 marks codes the type lacks
    point_order = torch.tensor(vertebra_points + disc_points, dtype=torch.long, device=device)
    class_offset = torch.tensor(
        [0] * len(vertebra_points) + [n_vert] * len(disc_points), dtype=torch.long, device=device
    )
    top = probs.argmax(-1, keepdim=True)
    code = torch.arange(k_max, device=device).expand_as(probs)
    is_top = code == top
    emit = is_top | (probs >= multi_label_threshold)
    # Sort key: point slot, then top label first, then code order; unemitted rows last.
    slot = torch.arange(len(point_order), device=device)[None, :, None]
    key = slot * (k_max + 1) + torch.where(is_top, 0, code + 1)
    key = torch.where(emit, key, torch.iinfo(torch.long).max).reshape(b, -1)
    n_rows = int(emit.sum(dim=(1, 2)).max().item()) if b else 0
    order = key.argsort(dim=1, stable=True)[:, :n_rows]

    slot_of_row, code_of_row = order // k_max, order % k_max
    row_valid = emit.reshape(b, -1).gather(1, order)
    row_score = (point_scores[:, point_order, None].float() * probs.clamp_min(0)).clamp(0, 1)
    row_score = row_score.reshape(b, -1).gather(1, order)
    row_xy = points[:, point_order].gather(1, slot_of_row[..., None].expand(b, n_rows, 2))
    row_cls = class_offset[slot_of_row] + code_of_row
    return PredictionRows(row_xy, point_order[slot_of_row], row_cls, row_score, row_valid)


# ---------------------------------------------------------------------------- flat arrays
@dataclass(frozen=True)
class GroundTruthArrays:
    """Ground-truth points of many studies, one row per annotated point."""

    study: np.ndarray  # (N,) int64, index into the spacing array
    point: np.ndarray  # (N,) int64, index into the task's point_names
    xy: np.ndarray  # (N, 2) float64, [x = column, y = row] in pixels of the study's image
    labels: np.ndarray  # (N, C) bool, multi-hot over vocab.classes


@dataclass(frozen=True)
class PredictionArrays:
    """Predictions, one row per (point, label); row order is the input order."""

    study: np.ndarray  # (M,) int64
    point: np.ndarray  # (M,) int64
    cls: np.ndarray  # (M,) int64, index into vocab.classes
    xy: np.ndarray  # (M, 2) float64
    score: np.ndarray  # (M,) float64 in [0, 1]


# ---------------------------------------------------------------------------- results
@dataclass
class ClassResult:
    """Per-class figures: detection at R (section 1) and the baseline's confusion (section 2)."""

    name: str
    n_gt: int
    tp: int
    fp: int
    fn: int
    ignored: int
    precision: float
    recall: float
    f1: float
    ap: float | None
    baseline_predicted_as: int
    baseline_diagonal: int
    baseline_wrong: int
    baseline_not_hit: int
    baseline_precision: float
    baseline_recall: float
    baseline_f1: float


@dataclass
class LocalisationResult:
    """Radial errors of one point group ('all', 'vertebra', 'disc')."""

    n_points: int
    n_missing: int
    mre_mm: float
    median_re_mm: float
    sdr: dict[float, float]


@dataclass
class DetectionReport:
    """Everything `score_detections` computes; `flat()` for loggers, `to_dict()` for JSON."""

    vocab: str
    radius_mm: float
    baseline_radius_mm: float
    n_studies: int
    n_gt_points: int
    n_predictions: int
    classes: dict[str, ClassResult]
    map: float | None
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    baseline_macro_f1: float
    keypoint_recall: float
    confusion: np.ndarray  # (C, C) counts, rows = predicted class, columns = true class
    localisation: dict[str, LocalisationResult] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Scalar metrics keyed for logging; undefined values (AP without GT) are NaN."""
        nan = float("nan")
        loc = self.localisation["all"]
        out = {
            "map": nan if self.map is None else self.map,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "baseline_macro_f1": self.baseline_macro_f1,
            "keypoint_recall": self.keypoint_recall,
            "mre_mm": loc.mre_mm,
            "median_re_mm": loc.median_re_mm,
        }
        out.update({f"sdr/{r:g}mm": v for r, v in loc.sdr.items()})
        for group in ("vertebra", "disc"):
            out[f"mre_mm/{group}"] = self.localisation[group].mre_mm
            out[f"median_re_mm/{group}"] = self.localisation[group].median_re_mm
        out.update(
            {f"ap/{name}": nan if c.ap is None else c.ap for name, c in self.classes.items()}
        )
        return {k: float(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        """JSON-ready dict (undefined values as None -> null)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        loc = self.localisation["all"]
        return {
            "vocab": self.vocab,
            "radius_mm": self.radius_mm,
            "baseline_radius_mm": self.baseline_radius_mm,
            "n_studies": self.n_studies,
            "n_gt_points": self.n_gt_points,
            "n_predictions": self.n_predictions,
            "map": self.map,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "ap": {name: c.ap for name, c in self.classes.items()},
            "baseline_macro_f1": self.baseline_macro_f1,
            "keypoint_recall": self.keypoint_recall,
            "mre_mm": clean(loc.mre_mm),
            "median_re_mm": clean(loc.median_re_mm),
            "sdr": {f"{r:g}": v for r, v in loc.sdr.items()},
            "classes": {
                name: {k: clean(v) for k, v in vars(c).items() if k != "name"}
                for name, c in self.classes.items()
            },
            "localisation": {
                group: {
                    "n_points": r.n_points,
                    "n_missing": r.n_missing,
                    "mre_mm": clean(r.mre_mm),
                    "median_re_mm": clean(r.median_re_mm),
                    "sdr": {f"{k:g}": v for k, v in r.sdr.items()},
                }
                for group, r in self.localisation.items()
            },
            "confusion": {
                "classes": list(self.classes),
                "rows_predicted_columns_true": self.confusion.tolist(),
            },
        }


# ---------------------------------------------------------------------------- scoring core
TP, FP, IGNORED = 1, 0, -1


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den with 0 where den == 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _ratio(2 * p * r, p + r)


def _distance_mm(a: np.ndarray, b: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Distance in mm between [x, y] pixel arrays a and b with spacing (..., [row, col])."""
    dx = (a[..., 0] - b[..., 0]) * spacing_mm[..., 1]
    dy = (a[..., 1] - b[..., 1]) * spacing_mm[..., 0]
    return np.sqrt(dx * dx + dy * dy)


def _first_per_group(keys: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal values in a sorted array."""
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return first


def radius_problem(value: object) -> str | None:
    """Why `value` is not a usable radius in mm (a finite number > 0), or None when it is."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        return f"expected a finite radius in mm > 0, got {value!r}"
    return None


def check_radii(radius_mm: float, baseline_radius_mm: float, sdr_radii_mm: Sequence[float]) -> None:
    """Raise ValueError naming the argument when a radius is NaN, infinite, zero or negative,
    or the SDR radii are empty or repeated (a NaN radius would silently hit nothing)."""
    for name, value in (("radius_mm", radius_mm), ("baseline_radius_mm", baseline_radius_mm)):
        if radius_problem(value) is not None:
            raise ValueError(f"{name}: {radius_problem(value)}")
    radii = tuple(sdr_radii_mm)
    if not radii or any(radius_problem(r) for r in radii) or len(set(radii)) != len(radii):
        raise ValueError(
            f"sdr_radii_mm: expected distinct radii, each finite and > 0 mm, got {radii!r}"
        )


def _validate(
    gt: GroundTruthArrays,
    pred: PredictionArrays,
    spacing: np.ndarray,
    vocab: Vocabulary,
    spec: Task,
):
    n_classes, n_points = vocab.num_classes, spec.num_points
    class_is_disc = np.arange(n_classes) >= len(vocab.vertebra)
    point_is_disc = np.array([k == "disc" for k in spec.point_kinds], dtype=bool)
    n_studies = len(spacing)
    if (
        spacing.ndim != 2
        or spacing.shape[1] != 2
        or not np.all(np.isfinite(spacing) & (spacing > 0))
    ):
        raise ValueError("spacing_mm must be (S, 2) positive finite [row, col] spacings")
    if gt.labels.shape != (len(gt.point), n_classes):
        raise ValueError(f"gt labels must be (N, {n_classes}), got {gt.labels.shape}")
    for name, arr in (("gt", gt), ("prediction", pred)):
        if len(arr.study) and (arr.study.min() < 0 or arr.study.max() >= n_studies):
            raise ValueError(f"{name} study index outside [0, {n_studies})")
        if len(arr.point) and (arr.point.min() < 0 or arr.point.max() >= n_points):
            raise ValueError(f"{name} point index outside [0, {n_points}) of task {spec.name!r}")
        if not np.all(np.isfinite(arr.xy)):
            raise ValueError(f"{name} coordinates must be finite")
    if len(pred.cls):
        if pred.cls.min() < 0 or pred.cls.max() >= n_classes:
            raise ValueError(f"prediction class outside [0, {n_classes})")
        if np.any(class_is_disc[pred.cls] != point_is_disc[pred.point]):
            raise ValueError("a prediction's class does not belong to its point's type")
        if not np.all((pred.score >= 0) & (pred.score <= 1)):
            raise ValueError("prediction scores must lie in [0, 1]")
    if np.any(gt.labels & (class_is_disc[None, :] != point_is_disc[gt.point][:, None])):
        raise ValueError("a ground-truth label does not belong to its point's type")


def score_detections(
    gt: GroundTruthArrays,
    pred: PredictionArrays,
    spacing_mm: np.ndarray,
    vocab: str | Vocabulary = "tianchi2020",
    radius_mm: float = 8.0,
    baseline_radius_mm: float = 6.0,
    sdr_radii_mm: Sequence[float] = (2.0, 4.0, 6.0, 8.0),
    task: str | Task = "tianchi2020",
) -> DetectionReport:
    """Score flat predictions against flat ground truth (docs/metric.md, rules in the module doc).

    `spacing_mm` (S, 2) holds [row, col] spacing per study index; studies without ground truth
    only contribute false positives, studies without predictions only false negatives. Point
    indices refer to `task`'s points.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    spec = _task(task)
    n_points = spec.num_points
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1, 2)
    gt = GroundTruthArrays(
        np.asarray(gt.study, dtype=np.int64),
        np.asarray(gt.point, dtype=np.int64),
        np.asarray(gt.xy, dtype=np.float64).reshape(-1, 2),
        np.asarray(gt.labels, dtype=bool),
    )
    pred = PredictionArrays(
        np.asarray(pred.study, dtype=np.int64),
        np.asarray(pred.point, dtype=np.int64),
        np.asarray(pred.cls, dtype=np.int64),
        np.asarray(pred.xy, dtype=np.float64).reshape(-1, 2),
        np.asarray(pred.score, dtype=np.float64),
    )
    check_radii(radius_mm, baseline_radius_mm, sdr_radii_mm)
    _validate(gt, pred, spacing, vocab, spec)
    n_classes, n_studies, m = vocab.num_classes, len(spacing), len(pred.study)

    # Ground-truth instances: one per (point, label), grouped by study.
    inst_row, inst_cls = np.nonzero(gt.labels)
    by_study = np.argsort(gt.study[inst_row], kind="stable")
    inst_row, inst_cls = inst_row[by_study], inst_cls[by_study]
    inst_study = gt.study[inst_row]
    n_inst = len(inst_row)
    n_gt = np.bincount(inst_cls, minlength=n_classes)

    # ---- 1. detection at R: each prediction against the instances of its study (padded).
    counts = np.bincount(inst_study, minlength=n_studies)
    width = int(counts.max()) if n_inst else 0
    starts = np.cumsum(counts) - counts
    slot = np.arange(n_inst) - starts[inst_study]
    pad_inst = np.full((n_studies, width), -1, dtype=np.int64)
    pad_inst[inst_study, slot] = np.arange(n_inst)
    status = np.full(m, FP, dtype=np.int64)
    if m and width:
        cand = pad_inst[pred.study]  # (M, width) instance ids, -1 padding
        cand_xy = gt.xy[inst_row][np.maximum(cand, 0)]
        d = _distance_mm(cand_xy, pred.xy[:, None, :], spacing[pred.study][:, None, :])
        same = (cand >= 0) & (inst_cls[np.maximum(cand, 0)] == pred.cls[:, None]) & (d < radius_mm)
        d = np.where(same, d, np.inf)
        nearest = d.argmin(axis=1)  # first slot on ties = lower instance index
        d_near = d[np.arange(m), nearest]
        hit = np.flatnonzero(np.isfinite(d_near))
        inst_of_hit = cand[hit, nearest[hit]]
        order = np.lexsort((hit, d_near[hit], inst_of_hit))
        winners = hit[order][_first_per_group(inst_of_hit[order])]
        status[hit] = IGNORED
        status[winners] = TP
    tp = np.bincount(pred.cls[status == TP], minlength=n_classes)
    fp = np.bincount(pred.cls[status == FP], minlength=n_classes)
    ignored = np.bincount(pred.cls[status == IGNORED], minlength=n_classes)
    fn = n_gt - tp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, n_gt)
    f1 = _f1(precision, recall)
    ap: list[float | None] = [None] * n_classes
    kept = np.flatnonzero(status != IGNORED)
    ranked = kept[np.lexsort((kept, -pred.score[kept], pred.cls[kept]))]
    ranked_cls = pred.cls[ranked]
    bounds = np.searchsorted(ranked_cls, np.arange(n_classes + 1))
    for c in range(n_classes):
        if n_gt[c] == 0:
            continue
        is_tp = status[ranked[bounds[c] : bounds[c + 1]]] == TP
        cum_tp = np.cumsum(is_tp)
        prec = cum_tp / np.arange(1, len(is_tp) + 1)
        envelope = np.maximum.accumulate(prec[::-1])[::-1]
        ap[c] = float(envelope[is_tp].sum() / n_gt[c])
    defined = [a for a in ap if a is not None]
    mean_ap = float(np.mean(defined)) if defined else None
    tp_all, fp_all, fn_all = int(tp.sum()), int(fp.sum()), int(fn.sum())
    p_all, r_all = float(_ratio(tp_all, tp_all + fp_all)), float(_ratio(tp_all, tp_all + fn_all))

    # ---- 2./3. one prediction per (study, identification): highest score, first on ties.
    key = pred.study * n_points + pred.point
    order = np.lexsort((np.arange(m), -pred.score, key))
    chosen = order[_first_per_group(key[order])]
    best = np.full(n_studies * n_points, -1, dtype=np.int64)
    best[key[chosen]] = chosen
    label_set = np.zeros((n_studies * n_points, n_classes), dtype=bool)
    if m:
        same_xy = np.all(pred.xy == pred.xy[best[key]], axis=1)
        label_set[key[same_xy], pred.cls[same_xy]] = True
    gt_key = gt.study * n_points + gt.point
    sel = best[gt_key]
    has = sel >= 0
    d_point = np.full(len(gt_key), np.nan)
    d_point[has] = _distance_mm(gt.xy[has], pred.xy[sel[has]], spacing[gt.study[has]])

    with np.errstate(invalid="ignore"):
        inst_hit = has[inst_row] & (d_point[inst_row] < baseline_radius_mm)
    inst_not_hit = ~has[inst_row]
    inst_wrong = has[inst_row] & ~inst_hit
    h = np.flatnonzero(inst_hit)
    diagonal = label_set[gt_key[inst_row[h]], inst_cls[h]]
    predicted_as = np.where(diagonal, inst_cls[h], pred.cls[sel[inst_row[h]]])
    confusion = np.bincount(
        predicted_as * n_classes + inst_cls[h], minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    diag = np.diag(confusion)
    n_predicted_as = confusion.sum(axis=1)
    b_precision, b_recall = _ratio(diag, n_predicted_as), _ratio(diag, n_gt)
    b_f1 = _f1(b_precision, b_recall)
    present = (n_gt > 0) | (n_predicted_as > 0)
    macro_f1 = float(b_f1[present].mean()) if present.any() else 0.0
    keypoint_recall = float(_ratio(len(h), n_inst))
    b_wrong = np.bincount(inst_cls[inst_wrong], minlength=n_classes)
    b_not_hit = np.bincount(inst_cls[inst_not_hit], minlength=n_classes)

    point_is_disc = np.array([k == "disc" for k in spec.point_kinds], dtype=bool)
    gt_is_disc = point_is_disc[gt.point]
    localisation = {}
    for group, mask in (
        ("all", np.ones(len(gt_key), bool)),
        ("vertebra", ~gt_is_disc),
        ("disc", gt_is_disc),
    ):
        dg = d_point[mask]
        found = dg[~np.isnan(dg)]
        with np.errstate(invalid="ignore"):
            sdr = {float(r): float(_ratio(np.count_nonzero(dg < r), len(dg))) for r in sdr_radii_mm}
        localisation[group] = LocalisationResult(
            n_points=len(dg),
            n_missing=len(dg) - len(found),
            mre_mm=float(found.mean()) if len(found) else float("nan"),
            median_re_mm=float(np.median(found)) if len(found) else float("nan"),
            sdr=sdr,
        )

    classes = {
        name: ClassResult(
            name=name,
            n_gt=int(n_gt[c]),
            tp=int(tp[c]),
            fp=int(fp[c]),
            fn=int(fn[c]),
            ignored=int(ignored[c]),
            precision=float(precision[c]),
            recall=float(recall[c]),
            f1=float(f1[c]),
            ap=ap[c],
            baseline_predicted_as=int(n_predicted_as[c]),
            baseline_diagonal=int(diag[c]),
            baseline_wrong=int(b_wrong[c]),
            baseline_not_hit=int(b_not_hit[c]),
            baseline_precision=float(b_precision[c]),
            baseline_recall=float(b_recall[c]),
            baseline_f1=float(b_f1[c]),
        )
        for c, name in enumerate(vocab.classes)
    }
    return DetectionReport(
        vocab=vocab.name,
        radius_mm=float(radius_mm),
        baseline_radius_mm=float(baseline_radius_mm),
        n_studies=n_studies,
        n_gt_points=len(gt_key),
        n_predictions=m,
        classes=classes,
        map=mean_ap,
        precision=p_all,
        recall=r_all,
        f1=float(_f1(p_all, r_all)),
        tp=tp_all,
        fp=fp_all,
        fn=fn_all,
        baseline_macro_f1=macro_f1,
        keypoint_recall=keypoint_recall,
        confusion=confusion,
        localisation=localisation,
    )


# ---------------------------------------------------------------------------- torchmetrics
class SpineDetectionMetric(Metric):
    """The spine metric over batches: stores flat prediction and ground-truth rows, syncs
    them across processes (cat) and scores them with `score_detections` in `compute`."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    # Rank in the high bits keeps study keys unique after the cross-process cat.
    _RANK_SHIFT = 40

    def __init__(
        self,
        vocab: str = "tianchi2020",
        radius_mm: float = 8.0,
        baseline_radius_mm: float = 6.0,
        sdr_radii_mm: Sequence[float] = (2.0, 4.0, 6.0, 8.0),
        task: str | Task = "tianchi2020",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_radii(radius_mm, baseline_radius_mm, sdr_radii_mm)
        self.vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
        self.task = _task(task)
        self.radius_mm = float(radius_mm)
        self.baseline_radius_mm = float(baseline_radius_mm)
        self.sdr_radii_mm = tuple(float(r) for r in sdr_radii_mm)
        self._last_report: DetectionReport | None = None
        for name in (
            "study_key",
            "spacing_mm",
            "gt_study",
            "gt_point",
            "gt_xy",
            "gt_labels",
            "pred_study",
            "pred_point",
            "pred_cls",
            "pred_xy",
            "pred_score",
        ):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred_points: torch.Tensor,
        pred_point_index: torch.Tensor,
        pred_class: torch.Tensor,
        pred_score: torch.Tensor,
        pred_valid: torch.Tensor,
        gt_points: torch.Tensor,
        gt_present: torch.Tensor,
        gt_labels: torch.Tensor,
        spacing_mm: torch.Tensor,
    ) -> None:
        """Add a batch: prediction rows (B, P, ...) as from `select_predictions`, ground truth
        `gt_points` (B, P, 2) [x, y], `gt_present` (B, P), `gt_labels` (B, P, K) multi-hot
        over the point's own type codes (K = max code count) or over all vocab classes
        (K = vocab.num_classes), and `spacing_mm` (B, 2) [row, col] in the same pixels."""
        b = gt_points.shape[0]
        device = gt_points.device
        offset = sum(int(t.numel()) for t in self.study_key)
        rank = (
            torch.distributed.get_rank()
            if (torch.distributed.is_available() and torch.distributed.is_initialized())
            else 0
        )
        keys = (rank << self._RANK_SHIFT) + offset + torch.arange(b, device=device)
        self.study_key.append(keys)
        self.spacing_mm.append(spacing_mm.detach().to(torch.float64).reshape(b, 2))

        gt_labels = self._global_labels(gt_labels.detach())
        bi, ki = torch.nonzero(gt_present.detach().bool(), as_tuple=True)
        self.gt_study.append(keys[bi])
        self.gt_point.append(ki)
        self.gt_xy.append(gt_points.detach()[bi, ki].to(torch.float64))
        self.gt_labels.append(gt_labels[bi, ki].to(torch.uint8))

        bi, ri = torch.nonzero(pred_valid.detach().bool(), as_tuple=True)
        self.pred_study.append(keys[bi])
        self.pred_point.append(pred_point_index.detach()[bi, ri].long())
        self.pred_cls.append(pred_class.detach()[bi, ri].long())
        self.pred_xy.append(pred_points.detach()[bi, ri].to(torch.float64))
        self.pred_score.append(pred_score.detach()[bi, ri].to(torch.float64))

    def _global_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, P, K) per-type multi-hot -> (B, P, C) multi-hot over vocab.classes."""
        labels = labels.bool()
        n_vert, n_disc = len(self.vocab.vertebra), len(self.vocab.disc)
        n_classes = n_vert + n_disc
        if labels.shape[-1] == n_classes:
            return labels
        if labels.shape[-1] != max(n_vert, n_disc):
            raise ValueError(
                f"gt_labels must be (B, P, {max(n_vert, n_disc)}) per-type or (B, P, "
                f"{n_classes}) global multi-hot for vocabulary {self.vocab.name!r}, "
                f"got {tuple(labels.shape)}"
            )
        out = labels.new_zeros(*labels.shape[:2], n_classes)
        vert = list(self.task.points_of_kind("vertebra"))
        disc = list(self.task.points_of_kind("disc"))
        out[:, vert, :n_vert] = labels[:, vert, :n_vert]
        out[:, disc, n_vert:] = labels[:, disc, :n_disc]
        return out

    def _arrays(self) -> tuple[GroundTruthArrays, PredictionArrays, np.ndarray]:
        def cat(name: str, shape_tail: tuple = (), dtype=np.float64) -> np.ndarray:
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                return np.zeros((0, *shape_tail), dtype=dtype)
            return dim_zero_cat(value).cpu().numpy()

        n_classes = self.vocab.num_classes
        study_key = cat("study_key", dtype=np.int64)
        uniq = np.unique(study_key)
        dense = {
            name: np.searchsorted(uniq, cat(name, dtype=np.int64))
            for name in ("study_key", "gt_study", "pred_study")
        }
        spacing = np.zeros((len(uniq), 2))
        spacing[dense["study_key"]] = cat("spacing_mm", (2,))
        gt = GroundTruthArrays(
            dense["gt_study"],
            cat("gt_point", dtype=np.int64),
            cat("gt_xy", (2,)),
            cat("gt_labels", (n_classes,), bool).astype(bool),
        )
        pred = PredictionArrays(
            dense["pred_study"],
            cat("pred_point", dtype=np.int64),
            cat("pred_cls", dtype=np.int64),
            cat("pred_xy", (2,)),
            cat("pred_score"),
        )
        return gt, pred, spacing

    def compute(self) -> dict[str, float]:
        """Flat scalar metrics (see `DetectionReport.flat`); the full report stays available
        through `compute_report()`."""
        gt, pred, spacing = self._arrays()
        self._last_report = score_detections(
            gt,
            pred,
            spacing,
            self.vocab,
            self.radius_mm,
            self.baseline_radius_mm,
            self.sdr_radii_mm,
            task=self.task,
        )
        return self._last_report.flat()

    def compute_report(self) -> DetectionReport:
        """The structured result (per-class TP/FP/FN, P/R/F1, AP, baseline, localisation)."""
        self.compute()  # syncs across processes; caches the report in `_last_report`
        return self._last_report

    def reset(self) -> None:
        super().reset()
        self._last_report = None
