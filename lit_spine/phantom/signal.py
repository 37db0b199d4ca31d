"""Signal model of the phantom: tissue ids to MR signal, as an acquisition would see it.

`tissue_lut` gives the relative signal of every tissue id on T2, T1 and fat-suppressed T2
(CSF on T2 = 1; typical relative intensities listed in ``docs/phantom.md``), with the
study's marrow, Modic and nucleus values. `PVMap` stores a supersampled tissue map compactly
so that mixed edge pixels average their sub-pixels (partial volume); `acquire` applies
texture, blur, coil shading (`coil_bias`) and Rician magnitude noise; `to_uint16` stores the
result as DICOM pixel values. The smooth random fields (texture, shading) are a bilinear
upsampling of a coarse Gaussian grid written as two small matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lit_spine.phantom import anatomy as pa
from lit_spine.phantom.anatomy import Anatomy
from lit_spine.phantom.pathology import SEQUENCES

_BASE_SIGNAL = {  # tissue: (T2, T1, fat-suppressed T2), CSF on T2 = 1
    pa.AIR: (0.0, 0.0, 0.0),
    pa.FAT: (0.78, 0.95, 0.10),
    pa.MUSCLE: (0.20, 0.34, 0.22),
    pa.VISCERA: (0.34, 0.38, 0.32),
    pa.BOWEL_FLUID: (0.85, 0.12, 0.85),
    pa.VESSEL: (0.05, 0.07, 0.05),
    pa.EPIDURAL_FAT: (0.70, 0.90, 0.10),
    pa.CSF: (1.0, 0.12, 1.0),
    pa.NERVE: (0.24, 0.32, 0.26),
    pa.LIGAMENT: (0.06, 0.08, 0.06),
    pa.CORTEX: (0.045, 0.06, 0.045),
    pa.POST_MARROW: (0.40, 0.58, 0.16),
    pa.SACRAL_MARROW: (0.42, 0.62, 0.16),
    pa.PSOAS: (0.20, 0.34, 0.22),
    pa.BOWEL_GAS: (0.02, 0.02, 0.02),
}
_MODIC_SIGNAL = {1: (0.66, 0.28, 0.60), 2: (0.58, 0.82, 0.13), 3: (0.12, 0.12, 0.09)}


def tissue_lut(anat: Anatomy, sequence: str) -> np.ndarray:
    """Relative signal per tissue id (256 entries) for 'T2', 'T1' or 'T2FS'."""
    k = SEQUENCES.index(sequence)
    lut = np.zeros(256, np.float32)
    for tissue, values in _BASE_SIGNAL.items():
        lut[tissue] = values[k]
    for b, body in enumerate(anat.bodies):
        if body.marrow_id == pa.SACRAL_MARROW:
            continue
        lut[body.marrow_id] = (anat.marrow_t2[b], anat.marrow_t1[b], 0.16)[k]
        mt = body.signs.modic_type
        lut[body.modic_id] = _MODIC_SIGNAL[mt][k] if mt else lut[body.marrow_id]
    for d, lesion in enumerate(anat.discs):
        lut[pa.ANNULUS0 + d] = (0.12, 0.20, 0.12)[k]
        deg = (0.9 - lesion.nucleus_t2) / 0.8
        lut[pa.NUCLEUS0 + d] = (lesion.nucleus_t2, 0.34 - 0.12 * deg, 0.95 * lesion.nucleus_t2)[k]
        lut[pa.FRAGMENT0 + d] = (
            max(lesion.nucleus_t2, 0.35) * 0.85,
            0.32,
            0.8 * max(lesion.nucleus_t2, 0.35),
        )[k]
    return lut * anat.contrast_jitter[k].astype(np.float32)


def interp_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells + 1) linear-interpolation weights from a coarse grid to n samples."""
    pos = np.linspace(0, cells, n, dtype=np.float32)
    lo = np.minimum(pos.astype(int), cells - 1)
    w = np.zeros((n, cells + 1), np.float32)
    w[np.arange(n), lo] = 1 - (pos - lo)
    w[np.arange(n), lo + 1] = pos - lo
    w.flags.writeable = False
    return w


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth zero-mean random field of unit-ish amplitude (bilinear upsampling of a grid)."""
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return interp_matrix(shape[0], cells) @ small @ interp_matrix(shape[1], cells).T


def coil_bias(
    rng: np.random.Generator, shape: tuple[int, int], amp: float, posterior: str
) -> np.ndarray:
    """Multiplicative coil shading: brighter near the posterior (spine) coil, smooth elsewhere."""
    y = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    post = x if posterior == "cols" else y
    g = rng.normal(0, 0.5, 4) * amp
    log_b = (
        amp * 0.8 * post
        + g[0] * x
        + g[1] * y
        + g[2] * x * y
        + g[3] * (x * x + y * y)
        - amp * 0.5 * post * post
    )
    return np.exp(log_b).astype(np.float32)


@dataclass
class PVMap:
    """A supersampled tissue map in compact form: one id per output pixel plus, for the edge
    pixels whose sub-pixels differ, all their sub-pixel ids (partial volume)."""

    base: np.ndarray  # (rows, cols) uint8, one sub-pixel per pixel
    edge: np.ndarray  # flat indices of mixed pixels
    subs: np.ndarray  # (ss * ss, n_edge) uint8 sub-pixel ids of the mixed pixels

    @classmethod
    def from_supersampled(cls, tm: np.ndarray, ss: int) -> PVMap:
        parts = [tm[i::ss, j::ss] for i in range(ss) for j in range(ss)]
        base = np.ascontiguousarray(parts[(ss * ss) // 2 if ss > 1 else 0])
        mixed = np.zeros(base.shape, bool)
        for q in parts:
            mixed |= q != base
        edge = np.flatnonzero(mixed)
        subs = np.stack([q.ravel()[edge] for q in parts]) if ss > 1 else np.zeros((1, 0), np.uint8)
        return cls(base, edge, subs)

    def signal(self, lut: np.ndarray) -> np.ndarray:
        img = lut[self.base]
        if self.edge.size:
            img.ravel()[self.edge] = lut[self.subs].mean(0)
        return img


def acquire(
    tissue: PVMap,
    lut: np.ndarray,
    texture: np.ndarray,
    bias: np.ndarray,
    blur_px: float,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    img = tissue.signal(lut)
    img *= texture
    if blur_px > 0.05:
        img = ndimage.gaussian_filter(img, blur_px, truncate=2.0)
    img *= bias
    # Rician magnitude noise; the quadrature channel reuses the field flipped (independent
    # enough pixel by pixel, and half the cost of a second draw).
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n1 *= np.float32(noise)
    img += n1
    np.square(img, out=img)
    np.square(n1, out=n1)
    img += n1[::-1, ::-1]
    return np.sqrt(img, out=img)


def to_uint16(img: np.ndarray, scale: float, bits: int) -> np.ndarray:
    out = img * np.float32(scale)
    np.rint(out, out=out)
    np.clip(out, 0, (1 << bits) - 1, out=out)
    return out.astype(np.uint16)
