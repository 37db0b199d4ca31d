"""Gaussian heatmap targets at the model's output stride, and the coordinate convention.

Coordinate convention (shared by the targets here and the heatmap decoder in
`lit_spine.metrics`; both must use these two functions):

- Input coordinates are pixel coordinates of the network input, pixel centres at integers:
  ``x = 0`` is the centre of the first column, the image spans ``[-0.5, W - 0.5]``.
- Heatmap pixel ``i`` covers input pixels ``[i * stride, (i + 1) * stride)``; its centre
  lies at input coordinate ``(i + 0.5) * stride - 0.5``.
- Hence ``x_hm = (x + 0.5) / stride - 0.5`` and ``x = (x_hm + 0.5) * stride - 0.5``, the
  same mapping that ``F.interpolate(..., align_corners=False)`` and ``avg_pool2d`` use.

A target channel holds ``exp(-d^2 / (2 sigma^2))`` around the point in heatmap pixels
(peak exactly 1 when the point falls on a heatmap pixel centre) and is all zeros for a
point that is not present.

Class targets: the cache stores labels multi-hot over `Vocabulary.classes` (vertebra codes,
then disc codes); the model, loss and metric read them per point type,
(P, max(Kv, Kd)) for the task's P points (11 for tianchi2020) with column j = code j of the
point's own type (`per_type_labels`).
"""

from __future__ import annotations

import numpy as np
import torch

from lit_spine.data.labels import Vocabulary
from lit_spine.task import Task, get_task

ArrayLike = np.ndarray | torch.Tensor


def input_to_heatmap_coords(xy: ArrayLike, stride: int) -> ArrayLike:
    """Map input-pixel coordinates (..., 2) to heatmap-pixel coordinates at `stride`."""
    return (xy + 0.5) / stride - 0.5


def heatmap_to_input_coords(xy_hm: ArrayLike, stride: int) -> ArrayLike:
    """Map heatmap-pixel coordinates (..., 2) back to input-pixel coordinates."""
    return (xy_hm + 0.5) * stride - 0.5


def heatmap_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(height, width) of the heatmap for an input of (height, width) at `stride`."""
    h, w = image_size
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not divisible by the heatmap stride {stride}")
    return h // stride, w // stride


def gaussian_heatmaps(
    points: np.ndarray,
    present: np.ndarray,
    image_size: tuple[int, int],
    stride: int,
    sigma: float = 2.0,
) -> np.ndarray:
    """Gaussian targets (K, H/stride, W/stride) float32 for K points (K, 2) in input pixels.

    `sigma` is in heatmap pixels. Separable: one 1-D Gaussian per axis and point, then an
    outer product, so the cost is K * H * W multiplications and no exp over the full map.
    """
    hh, hw = heatmap_size(image_size, stride)
    present = np.asarray(present, dtype=bool)
    # Absent points may carry NaN coordinates; park them at 0 before the (masked) exp.
    xy = np.where(present[:, None], np.asarray(points, dtype=np.float32), 0.0)
    xy = input_to_heatmap_coords(xy, stride)
    inv = np.float32(-0.5 / (sigma * sigma))
    gx = np.exp(inv * (np.arange(hw, dtype=np.float32)[None, :] - xy[:, :1]) ** 2)
    gy = np.exp(inv * (np.arange(hh, dtype=np.float32)[None, :] - xy[:, 1:]) ** 2)
    gy *= present[:, None]
    return gy[:, :, None] * gx[:, None, :]


def per_type_labels(
    labels: np.ndarray, vocab: Vocabulary, task: str | Task = "tianchi2020"
) -> np.ndarray:
    """(..., P, num_classes) multi-hot over `vocab.classes` -> (..., P, max(Kv, Kd)) per type,
    for the P points of `task`."""
    spec = get_task(task) if isinstance(task, str) else task
    n_vert, n_disc = len(vocab.vertebra), len(vocab.disc)
    if labels.shape[-1] != n_vert + n_disc:
        raise ValueError(
            f"labels have {labels.shape[-1]} columns; vocabulary {vocab.name!r} "
            f"has {n_vert + n_disc} classes"
        )
    out = np.zeros((*labels.shape[:-1], max(n_vert, n_disc)), dtype=labels.dtype)
    if labels.shape[-2] != spec.num_points:
        raise ValueError(
            f"labels have {labels.shape[-2]} points; task {spec.name!r} has {spec.num_points}"
        )
    vert, disc = list(spec.points_of_kind("vertebra")), list(spec.points_of_kind("disc"))
    out[..., vert, :n_vert] = labels[..., vert, :n_vert]
    out[..., disc, :n_disc] = labels[..., disc, n_vert:]
    return out
