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

The scoring core and its result types live in `lit_spine.metrics_scoring` (with the rules
the metric fixes); they are re-exported here, so `lit_spine.metrics` stays the one import.

Heatmap decoding refines the argmax with a separable parabola fit of the log-probability in
the 3x3 neighbourhood: exact for a Gaussian peak, the 1-D form of the Taylor step of DARK
(Zhang et al., "Distribution-Aware Coordinate Representation for Human Pose Estimation",
CVPR 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_spine.data.targets import heatmap_to_input_coords
from lit_spine.metrics_scoring import (
    ClassResult,
    DetectionReport,
    GroundTruthArrays,
    LocalisationResult,
    PredictionArrays,
    _task,
    check_radii,
    radius_problem,
    score_detections,
)
from lit_spine.task import Task, Vocabulary, get_vocabulary

# The public names; the scoring core's are re-exported from lit_spine.metrics_scoring.
__all__ = [
    "ClassResult",
    "DetectionReport",
    "GroundTruthArrays",
    "LocalisationResult",
    "PredictionArrays",
    "PredictionRows",
    "SpineDetectionMetric",
    "check_radii",
    "decode_heatmaps",
    "radius_problem",
    "score_detections",
    "select_predictions",
]


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
