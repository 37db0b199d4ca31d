"""The RSNA 2024 competition's sample-weighted log loss per condition (docs/datasets.md).

Per level, the three severity probabilities are normalised to sum 1 and clipped to
[eps, 1 - eps]; each graded level contributes -log p(true grade) with weight 1 (Normal/Mild),
2 (Moderate) or 4 (Severe); the score is the weighted mean. Levels without a grade (-1) are
left out. A grade outside {-1, 0, 1, 2}, or a graded level whose probabilities are not
finite and non-negative with a positive sum, raises ValueError naming the level and its
values (`check_levels`; `RsnaCanalLogLoss.compute` too), never a NaN score. The
competition's conditions are spinal canal stenosis, neural foraminal narrowing and
subarticular stenosis: its metric finds a row's condition by the substring 'spinal',
'foraminal' or 'subarticular', so the left and the right side of the foramina (and of the
subarticular recesses) are one condition, one weighted log loss over the levels of both
sides; the foraminal task logs that pooled loss. A task with several competition conditions
would log the mean of their losses, as the competition averages its conditions.
`rsna_any_severe_logloss` is the competition's fourth term, the study-level "any severe
spinal canal stenosis" log loss (docs/datasets.md).
Hand-written: a few numpy/torch lines (scikit-learn's log_loss is not a dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

SEVERITY_WEIGHTS = (1.0, 2.0, 4.0)
EPS = 1e-15
# task -> (logged name under val/, the point columns of each competition condition, None =
# one condition over all points). Left and right foramina are one condition: one group.
RSNA_LOGLOSS: dict[str, tuple[str, tuple[tuple[int, ...], ...] | None]] = {
    "rsna2024_canal": ("rsna_canal_logloss", None),
    "rsna2024_foraminal": ("rsna_foraminal_logloss", (tuple(range(10)),)),
}


def check_levels(probs: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """The graded-level mask of probs (..., 3) and grades (...) after checking them: a grade
    outside {-1, 0, 1, 2}, or a graded level whose probabilities are not finite and
    non-negative with a positive sum, raises ValueError naming its index and value (it would
    give an IndexError, NaN, or a negative probability's near-perfect score)."""
    if probs.shape[:-1] != grades.shape or probs.shape[-1] != len(SEVERITY_WEIGHTS):
        raise ValueError(f"probs {tuple(probs.shape)} and grades {tuple(grades.shape)} differ")
    bad = (grades < -1) | (grades >= len(SEVERITY_WEIGHTS))
    if bad.any():
        at = ", ".join(str(int(i)) for i in bad.nonzero()[0])
        raise ValueError(
            f"grades[{at}] = {int(grades[bad][0])} ({int(bad.sum())} such level(s)): a grade "
            "is 0, 1, 2 (Normal/Mild, Moderate, Severe) or -1 (ungraded)"
        )
    keep = grades >= 0
    p = probs[keep]
    bad = ~torch.isfinite(p).all(-1) | (p < 0).any(-1) | (p.sum(-1) <= 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        at = ", ".join(str(int(j)) for j in keep.nonzero()[i])
        raise ValueError(
            f"probs[{at}] = {p[i].tolist()} (grade {int(grades[keep][i])}; {int(bad.sum())} "
            "such level(s)): the probabilities of a graded level must be finite and "
            "non-negative with a positive sum"
        )
    return keep


def rsna_weighted_logloss(probs: torch.Tensor, grades: torch.Tensor, eps: float = EPS) -> float:
    """probs (N, L, 3) non-negative, grades (N, L) int in {0, 1, 2} or -1 (ungraded); bad
    values raise ValueError (`check_levels`)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    grades = torch.as_tensor(grades, dtype=torch.long)
    keep = check_levels(probs, grades)
    if not keep.any():
        raise ValueError("no graded level: the log loss is undefined")
    p = probs[keep]
    y = grades[keep]
    p = (p / p.sum(-1, keepdim=True)).clamp(eps, 1 - eps)
    w = torch.tensor(SEVERITY_WEIGHTS, dtype=torch.float64)[y]
    nll = -torch.log(p.gather(-1, y[:, None]).squeeze(-1))
    return float((w * nll).sum() / w.sum())


def rsna_any_severe_logloss(
    studies: Sequence[tuple[Sequence[float], Sequence[int]]], eps: float = EPS
) -> float:
    """The competition's any_severe_spinal term: per study, (the `severe` probabilities, the
    grades) of its scored spinal canal levels. A study's label is whether any level is
    Severe (grade 2), its prediction the largest `severe` probability of its levels as the
    file gives it (not renormalised), clipped to [eps, 1 - eps], and its weight that of its
    worst grade (1/2/4: the largest of its levels' weights); the score is the weighted mean
    binary log loss over the studies. A study without a level is left out; none raises."""
    num = den = 0.0
    for severe, grades in studies:
        if not len(grades):
            continue
        worst = max(int(g) for g in grades)
        if not 0 <= worst < len(SEVERITY_WEIGHTS) or min(int(g) for g in grades) < 0:
            raise ValueError(f"grades {list(grades)}: a scored level's grade is 0, 1 or 2")
        p = max(float(v) for v in severe)
        if not math.isfinite(p) or p < 0:
            raise ValueError(f"severe probabilities {list(severe)} are not finite and >= 0")
        p = min(max(p, eps), 1 - eps)
        w = SEVERITY_WEIGHTS[worst]
        num -= w * math.log(p if worst == len(SEVERITY_WEIGHTS) - 1 else 1 - p)
        den += w
    if den == 0:
        raise ValueError("no study with a scored spinal canal level: the term is undefined")
    return num / den


class RsnaCanalLogLoss(Metric):
    """Accumulates probabilities and grades; logged as `val/rsna_canal_logloss` (or, with
    `groups`, the mean over competition conditions of one pooled log loss per group of point
    columns; the foraminal task has one group, both sides)."""

    full_state_update = False

    def __init__(self, groups: tuple[tuple[int, ...], ...] | None = None) -> None:
        super().__init__()
        self.groups = groups
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("grades", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, grades: torch.Tensor) -> None:
        self.probs.append(probs.detach().double())
        self.grades.append(grades.detach().long())

    def compute(self) -> torch.Tensor:
        probs = torch.cat(self.probs) if isinstance(self.probs, list) else self.probs
        grades = torch.cat(self.grades) if isinstance(self.grades, list) else self.grades
        if self.groups is None:
            return torch.tensor(rsna_weighted_logloss(probs, grades), dtype=torch.float64)
        check_levels(probs, grades)  # indices of the whole (N, L), not of one group
        scored = [list(g) for g in self.groups if (grades[:, list(g)] >= 0).any()]
        if not scored:
            raise ValueError("no graded level: the log loss is undefined")
        losses = [rsna_weighted_logloss(probs[:, g], grades[:, g]) for g in scored]
        return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
