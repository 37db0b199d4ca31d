"""The one scoring core of the metric (docs/metric.md): pure, vectorised numpy on flat arrays.

`score_detections` takes `GroundTruthArrays`, `PredictionArrays` and one pixel spacing per
study and computes (1) the brief's point detection at radius R: TP/FP/FN, precision, recall,
F1, AP per class and mAP; (2) the 2020 baseline's macro-F1 and key-point recall; (3)
localisation errors, into a `DetectionReport`. `lit_spine.metrics.SpineDetectionMetric` and
`lit-spine evaluate` both call it. Matching, AP and the baseline rules are hand-written: no
library implements this brief's metric (torchmetrics has none for point detection).

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lit_spine.task import Task, Vocabulary, get_task, get_vocabulary


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


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
