"""Inputs and timers the bench (and the tests of what it times) use: an evaluation set of
random studies, the seconds scoring it takes, and the images/s one pass of a loader delivers.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch.utils.data import DataLoader

    from lit_spine.metrics import GroundTruthArrays, PredictionArrays
    from lit_spine.task import Vocabulary


def random_case(
    n_studies: int, seed: int = 0, vocab: str | Vocabulary = "tianchi2020"
) -> tuple[GroundTruthArrays, PredictionArrays, np.ndarray]:
    """A random but realistic evaluation set of the tianchi2020 task: 11 GT points per study
    (a few missing, some multi-label), 11-20 noisy predictions per study (duplicates, extra
    labels), anisotropic spacing. Used by the benchmark and the tests."""
    import numpy as np

    from lit_spine.metrics import GroundTruthArrays, PredictionArrays
    from lit_spine.task import get_task, get_vocabulary

    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    spec = get_task("tianchi2020")
    n_points, disc_points = spec.num_points, spec.points_of_kind("disc")
    rng = np.random.default_rng(seed)
    n_vert, n_classes = len(vocab.vertebra), vocab.num_classes
    spacing = rng.uniform(0.55, 1.0, size=(n_studies, 2))
    # Anatomy-like layout: points stacked top to bottom, 18 px apart, jittered per study.
    base = np.stack(
        [
            rng.uniform(100, 160, (n_studies, n_points)),
            60.0 + np.arange(n_points) * 18.0 + rng.normal(0, 3, (n_studies, n_points)),
        ],
        axis=-1,
    )
    study = np.repeat(np.arange(n_studies), n_points)
    point = np.tile(np.arange(n_points), n_studies)
    keep = rng.random(len(study)) > 0.03
    study, point = study[keep], point[keep]
    is_disc = np.isin(point, disc_points)
    lo, hi = np.where(is_disc, n_vert, 0), np.where(is_disc, n_classes, n_vert)
    labels = np.zeros((len(point), n_classes), dtype=bool)
    labels[np.arange(len(point)), rng.integers(lo, hi)] = True
    extra = rng.random(len(point)) < 0.08
    labels[np.flatnonzero(extra), rng.integers(lo, hi)[extra]] = True
    gt = GroundTruthArrays(study, point, base[study, point], labels)

    n_pred = rng.integers(11, 21, size=n_studies)
    p_study = np.repeat(np.arange(n_studies), n_pred)
    p_point = rng.integers(0, n_points, size=len(p_study))
    p_disc = np.isin(p_point, disc_points)
    p_cls = rng.integers(np.where(p_disc, n_vert, 0), np.where(p_disc, n_classes, n_vert))
    p_xy = base[p_study, p_point] + rng.normal(0, 5, (len(p_study), 2))
    score = np.round(rng.random(len(p_point)), 3)
    pred = PredictionArrays(p_study, p_point, p_cls, p_xy, score)
    return gt, pred, spacing


def benchmark_scoring(n_studies: int = 10000, seed: int = 0, repeats: int = 3) -> float:
    """Seconds `score_detections` takes for `n_studies` random studies (best of `repeats`)."""
    from torch.utils import benchmark

    from lit_spine.metrics import score_detections

    gt, pred, spacing = random_case(n_studies, seed)
    timer = benchmark.Timer(
        stmt="score(gt, pred, spacing)",
        globals={"score": score_detections, "gt": gt, "pred": pred, "spacing": spacing},
    )
    return min(timer.timeit(1).median for _ in range(repeats))


def loader_throughput(loader: DataLoader, batches: int | None = None, warmup: int = 2) -> float:
    """Images per second one pass of `loader` delivers (after `warmup` batches)."""
    n_images, start = 0, None
    for b, batch in enumerate(loader):
        if b == warmup:
            start, n_images = time.perf_counter(), 0
        n_images += int(batch["image"].shape[0])
        if batches is not None and b + 1 >= warmup + batches:
            break
    if start is None:
        return math.nan
    return n_images / max(time.perf_counter() - start, 1e-9)
