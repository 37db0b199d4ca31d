"""Losses for SpineNet outputs: heatmap regression plus per-point disease classification.

Heatmap: "mse" (SimpleBaseline targets; squared error summed per heatmap) on raw outputs, or "focal": CenterNet's penalty-reduced
pixel focal loss (Zhou et al. 2019, https://arxiv.org/abs/1904.07850) on sigmoid outputs,
alpha = 2, beta = 4, normalised by the number of peaks.

Classes: a point carries a multi-hot set of its type's codes (batch["labels"], (B, P, K) for
the P points of the task, 11 for tianchi2020; vertebra rows use the first Kv columns). Disc
codes are mostly exclusive but some co-occur (tianchi2020 v5 and seed7 v7, herniation into the vertebral body, come with another code),
so the default is multi-label: a sigmoid per code with binary cross-entropy ("ce"/"bce")
or the sigmoid focal loss of RetinaNet (torchvision.ops.sigmoid_focal_loss; Lin et al. 2017, https://arxiv.org/abs/1708.02002;
gamma 2, alpha 0.25). With ``multi_label=False`` the codes share a softmax and the target is
the multi-hot row normalised to sum 1 ("ce", or "focal" with the softmax focal term).
Label smoothing (Szegedy et al. 2016) moves targets toward 1/2 per code (sigmoid) or
toward 1/K (softmax). `class_probabilities` applies the matching sigmoid or softmax.
Absent points (batch["present"] False) count in neither loss; a present point whose grade
is missing (batch["graded"] False, RSNA 2024 items only) counts in the heatmap loss but not
in the class loss, so no label is invented for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from lit_spine.task import Task, get_task
from lit_spine.utils import choose

HEATMAP_LOSSES = ("mse", "focal")
CLASS_LOSSES = ("ce", "bce", "focal")


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each point's heatmap, averaged over present points only.

    Summing (not averaging) over pixels keeps the loss's size independent of the heatmap's
    resolution and comparable to the classification loss; a per-pixel mean is ~1000x smaller
    at 32x32 and lets the class loss dominate the shared features.
    """
    per_point = (pred - target).pow(2).flatten(2).sum(-1)  # (B, P)
    weight = present.to(per_point.dtype)
    return (per_point * weight).sum() / weight.sum().clamp(min=1)


def heatmap_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    present: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> torch.Tensor:
    """CenterNet focal loss on sigmoid(logits); the positive is each present channel's peak pixel."""
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = log_p.exp()
    mask = present.to(logits.dtype)[:, :, None, None]
    # The positive is each channel's target peak: with sub-pixel points it is below 1.
    peak = target.amax(dim=(-2, -1), keepdim=True)
    pos = ((target >= peak) & (peak > 0)).to(logits.dtype) * mask
    neg = (1 - pos) * mask
    pos_loss = -((1 - p) ** alpha * log_p * pos).sum()
    neg_loss = -((1 - target).clamp(min=0) ** beta * p**alpha * log_not_p * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def sigmoid_focal(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """RetinaNet focal loss per element (soft targets allowed): torchvision's, alpha None = off."""
    return sigmoid_focal_loss(
        logits, target, alpha=-1.0 if alpha is None else alpha, gamma=gamma, reduction="none"
    )


def class_probabilities(
    outputs: dict[str, torch.Tensor], multi_label: bool = True
) -> dict[str, torch.Tensor]:
    """Per-code probabilities matching the loss: sigmoid (multi-label) or softmax."""
    fn = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, -1))
    return {"vertebra": fn(outputs["vertebra_logits"]), "disc": fn(outputs["disc_logits"])}


class SpineLoss:
    """Weighted sum of a heatmap loss and a per-point class loss; returns the parts too."""

    def __init__(
        self,
        heatmap_loss: str = "mse",
        heatmap_weight: float = 1.0,
        class_weight: float = 1.0,
        class_loss: str = "ce",
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = 0.25,
        multi_label: bool = True,
        task: str | Task = "tianchi2020",
    ):
        self.task = get_task(task) if isinstance(task, str) else task
        self.heatmap_loss = choose(heatmap_loss, HEATMAP_LOSSES, "heatmap_loss")
        self.class_loss = choose(class_loss, CLASS_LOSSES, "class_loss")
        if class_loss == "bce" and not multi_label:
            raise ValueError("class_loss='bce' is per-code sigmoid: it needs multi_label=True")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.heatmap_weight, self.class_weight = heatmap_weight, class_weight
        self.label_smoothing = label_smoothing
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        self.multi_label = multi_label

    def classification(
        self, logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        """Loss of (B, P, K) logits against multi-hot targets, summed over codes, mean over present points."""
        target = target.to(logits.dtype)
        eps, k = self.label_smoothing, logits.shape[-1]
        if self.multi_label:
            target = target * (1 - eps) + eps / 2
            if self.class_loss == "focal":
                per_code = sigmoid_focal(logits, target, self.focal_gamma, self.focal_alpha)
            else:
                per_code = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            per_point = per_code.sum(-1)
        else:
            target = target / target.sum(-1, keepdim=True).clamp(min=1e-6)
            target = target * (1 - eps) + eps / k
            log_p = torch.log_softmax(logits, -1)
            weight = (1 - log_p.exp()) ** self.focal_gamma if self.class_loss == "focal" else 1.0
            per_point = -(weight * target * log_p).sum(-1)
        mask = present.to(per_point.dtype)
        return (per_point * mask).sum() / mask.sum().clamp(min=1)

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """dict(loss, heatmap, cls) from SpineNet outputs and a batch (heatmap, present, labels)."""
        present = batch["present"].bool()
        heatmap_fn = heatmap_mse if self.heatmap_loss == "mse" else heatmap_focal
        heatmap = heatmap_fn(
            outputs["heatmaps"], batch["heatmap"].to(outputs["heatmaps"].dtype), present
        )
        labels = batch["labels"]
        vertebra, disc = outputs["vertebra_logits"], outputs["disc_logits"]
        v_idx = list(self.task.points_of_kind("vertebra"))
        d_idx = list(self.task.points_of_kind("disc"))
        graded = present & batch["graded"].bool() if "graded" in batch else present
        cls = vertebra.new_zeros(())
        if v_idx:
            cls = self.classification(
                vertebra, labels[:, v_idx, : vertebra.shape[-1]], graded[:, v_idx]
            )
        if d_idx:
            cls = cls + self.classification(
                disc, labels[:, d_idx, : disc.shape[-1]], graded[:, d_idx]
            )
        loss = self.heatmap_weight * heatmap + self.class_weight * cls
        return {"loss": loss, "heatmap": heatmap, "cls": cls}
