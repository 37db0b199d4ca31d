"""Drawing primitives of the phantom's slices: a tissue-id canvas and polygon helpers.

`Canvas` maps 2-D local millimetre points of a slice to (supersampled) pixels through one
affine map and paints tissue ids with Pillow polygons and lines, in painter's order. The
helpers build outlines used by both the sagittal and the axial renderer: ellipses, inner
offsets, offset chains along the spine, the lamina / spinous-process outline and runs of a
boolean vector.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from lit_spine.phantom.anatomy import AIR, Anatomy, unit


def ellipse(centre, ax1, r1: float, r2: float, n: int = 28) -> np.ndarray:
    """Polygon of an ellipse with semi-axis r1 along unit vector ax1 and r2 perpendicular."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ax1 = unit(np.asarray(ax1, float))
    ax2 = np.array([-ax1[1], ax1[0]])
    return np.asarray(centre) + np.outer(r1 * np.cos(th), ax1) + np.outer(r2 * np.sin(th), ax2)


def inset(poly: np.ndarray, d: float) -> np.ndarray:
    """Move each vertex `d` mm towards the centroid (a cheap inner offset of a convex-ish shape)."""
    c = poly.mean(0)
    vec = c - poly
    dist = np.linalg.norm(vec, axis=1, keepdims=True) + 1e-9
    return poly + vec / dist * np.minimum(d, 0.8 * dist)


class Canvas:
    """A slice being drawn: maps 2-D local mm coordinates to pixels and paints tissue ids.

    `to_anatomy(points, x_hint)` lifts (N, 2) local points to (N, 3) anatomy points; the plane
    (origin, row and column directions, spacings) projects them to (column, row) pixels.
    """

    def __init__(self, anat: Anatomy, plane, to_anatomy, supersample: int = 1):
        self.plane = plane
        self.to_anatomy = to_anatomy
        self.ss = int(supersample)
        rot = anat.rotation
        self.r = rot.T @ plane.row_dir / plane.col_spacing * self.ss
        self.c = rot.T @ plane.col_dir / plane.row_spacing * self.ss
        self.origin = rot.T @ (plane.origin - anat.translation)
        # Sub-pixel centres sit symmetrically inside each output pixel.
        self.shift = 0.5 * (self.ss - 1)
        # Both lifts (sagittal and axial) are affine in the local 2-D points, so the whole
        # local -> pixel map is one 2x2 matrix and an offset.
        basis = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        pix = self._px_slow(basis)
        self.t0 = pix[0]
        self.m = pix[1:] - pix[0]
        self.image = Image.new("L", (plane.cols * self.ss, plane.rows * self.ss), AIR)
        self.draw = ImageDraw.Draw(self.image)

    def _px_slow(self, pts: np.ndarray) -> np.ndarray:
        a = self.to_anatomy(np.asarray(pts, float)) - self.origin
        return np.column_stack([a @ self.r, a @ self.c]) + self.shift

    def px(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) local points to (N, 2) pixel (column, row) of the (supersampled) canvas."""
        return np.atleast_2d(np.asarray(pts, float)) @ self.m + self.t0

    def poly(self, pts, tissue: int) -> None:
        if pts is None or len(pts) < 3:
            return
        self.draw.polygon(self.px(pts).ravel().tolist(), fill=int(tissue))

    def line(self, pts, tissue: int, width_mm: float = 1.0) -> None:
        w = max(1, int(round(width_mm * self.ss / self.plane.col_spacing)))
        self.draw.line(self.px(pts).ravel().tolist(), fill=int(tissue), width=w)

    def labels(self) -> np.ndarray:
        return np.asarray(self.image)


def offset_line(points: np.ndarray, dirs: np.ndarray, dist) -> np.ndarray:
    return points + np.asarray(dist, float).reshape(-1, 1) * dirs


def spine_lines(anat: Anatomy):
    """Posterior corner chain (bottom up) with posterior directions, extended beyond the ends."""
    pts, dirs, canal = [], [], []
    for b in range(len(anat.bodies) - 1, -1, -1):
        body = anat.bodies[b]
        for p in (body.pi, body.ps):
            pts.append(p)
            dirs.append(-body.u)
            canal.append(anat.canal_depth[b])
    pts, dirs, canal = np.array(pts), np.array(dirs), np.array(canal)
    return pts, dirs, canal


def process_outline(
    top: np.ndarray, bot: np.ndarray, tip_c: np.ndarray, tip_h: float, nb: np.ndarray, club: bool
) -> np.ndarray:
    """Outline of a lamina + spinous process (or facet pillar) from its base on the canal.

    The base (top..bot) narrows into a waist and ends in a rounded (club-shaped) tip, instead
    of a flat quadrilateral.
    """
    base_c = 0.5 * (top + bot)
    axis = tip_c - base_c
    length = float(np.linalg.norm(axis)) + 1e-9
    ax_u = axis / length
    t = np.array([0.0, 0.18, 0.42, 0.68, 0.86])
    waist = 0.62 if club else 0.8
    # Half-heights along the process: base, lamina, waist, shaft, tip.
    h0 = 0.5 * float(np.linalg.norm(top - bot))
    prof = np.array(
        [
            h0,
            0.8 * h0 + 0.2 * tip_h,
            waist * tip_h + (1 - waist) * 0.5 * h0,
            (0.9 if club else 0.85) * tip_h,
            tip_h,
        ]
    )
    sign = 1.0 if float((top - bot) @ nb) >= 0 else -1.0
    side = sign * nb
    upper = base_c + np.outer(t * length, ax_u) + prof[:, None] * side
    lower = base_c + np.outer(t * length, ax_u) - prof[:, None] * side
    upper[0], lower[0] = top, bot
    th = np.linspace(0.5 * np.pi, -0.5 * np.pi, 7)[1:-1]
    end_c = base_c + t[-1] * length * ax_u
    r_len = (1.0 - t[-1]) * length
    cap = end_c + np.outer(np.cos(th) * r_len, ax_u) + np.outer(np.sin(th) * tip_h, side)
    return np.vstack([upper, cap, lower[::-1]])


def true_runs(mask: np.ndarray) -> list[slice]:
    """Slices of the consecutive True runs of a boolean vector."""
    idx = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [slice(int(i), int(j)) for i, j in zip(idx[::2], idx[1::2])]


def extend_chain(pts: np.ndarray, dist: float = 160.0) -> np.ndarray:
    lo = pts[0] + unit(pts[0] - pts[2]) * dist
    hi = pts[-1] + unit(pts[-1] - pts[-3]) * dist
    return np.vstack([lo, pts, hi])
