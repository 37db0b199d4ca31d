"""Joint image + keypoint augmentations for sagittal lumbar-spine MRI, cheap enough for the CPU.

Every transform takes the image as a float tensor (C, H, W) - C neighbouring sagittal slices
as channels, intensities roughly in [0, 1] - together with the points (K, 2) as (x, y) in
input pixels (pixel centres at integers), their presence mask (K,) and the pixel spacing
(row, column) in mm, and draws all of its randomness from a NumPy `Generator`, so one seed
fixes the whole augmentation of one item.

Geometry: one random affine (rotation, isotropic scale, translation, small shear) is built as
a 3x3 matrix in pixel coordinates; the points are mapped by it and the image is resampled
once with `grid_sample` through its inverse, so image and points cannot disagree. Points
that leave the image become absent. Scaling by s makes each output pixel cover 1/s of the
millimetres it covered, so the spacing becomes spacing / s (shear and rotation are small and
ignored for the spacing).

Flips: none in the image plane. A horizontal flip of a sagittal image swaps anterior and
posterior (disc disease is posterior: bulges and herniations point into the canal), and a
vertical flip swaps the levels (L1 would sit below L5); both make anatomically impossible
images whose labels no longer mean what they say. The one valid mirror is left/right across
the mid-sagittal plane, which for a stack of neighbouring sagittal slices is reversing the
slice (channel) order: `slice_flip_p`.

Intensity (MRI has no absolute scale, and coils shade): gamma, contrast/brightness, a smooth
multiplicative bias field, Gaussian or Rician noise, and cutout (DeVries & Taylor 2017,
"Improved regularization of convolutional neural networks with cutout": zero random
rectangles of the input).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths and probabilities of each augmentation; a probability of 0 switches it off."""

    affine_p: float = 0.9
    rotate_deg: float = 10.0
    scale: float = 0.15
    translate: float = 0.06
    shear_deg: float = 3.0
    slice_flip_p: float = 0.5
    gamma_p: float = 0.5
    gamma: float = 0.3
    contrast_p: float = 0.5
    contrast: float = 0.2
    brightness: float = 0.1
    bias_field_p: float = 0.5
    bias_field: float = 0.3
    noise_p: float = 0.5
    noise_std: float = 0.04
    rician: bool = True
    cutout_p: float = 0.3
    cutout_count: int = 2
    cutout_size: float = 0.15


# ---------------------------------------------------------------------------- geometry
def random_affine_matrix(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    rotate_deg: float,
    scale: float,
    translate: float,
    shear_deg: float,
) -> tuple[np.ndarray, float]:
    """A random 3x3 forward map in pixel coordinates (about the image centre) and its scale.

    Rotation uniform in +-rotate_deg, scale log-uniform in [1/(1+scale), 1+scale], shift
    uniform in +-translate of each side, shear uniform in +-shear_deg along x.
    """
    h, w = image_size
    angle = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    log_s = math.log1p(scale)
    s = math.exp(rng.uniform(-log_s, log_s))
    tx, ty = rng.uniform(-translate, translate, size=2) * (w, h)
    shear = math.tan(math.radians(rng.uniform(-shear_deg, shear_deg)))
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    linear = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]) @ np.array(
        [[s, s * shear, 0], [0, s, 0], [0, 0, 1]]
    )
    back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], dtype=np.float64)
    return back @ linear @ centre, s


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 affine matrix in closed form (np.linalg.inv costs milliseconds under
    BLAS thread contention in data-loader workers)."""
    (a, b, tx), (c, d, ty) = matrix[0], matrix[1]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    return np.array([[ia, ib, -(ia * tx + ib * ty)], [ic, id_, -(ic * tx + id_ * ty)], [0, 0, 1]])


def warp_image(image: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Resample (C, H, W) so that input pixel p lands at `matrix @ p` (bilinear, zeros outside)."""
    _, h, w = image.shape
    # Pixel -> normalised coordinates of grid_sample with align_corners=False: u = (2x + 1) / W - 1.
    to_norm = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    theta = to_norm @ invert_affine(matrix) @ invert_affine(to_norm)
    # The sampling grid as one broadcast sum of a column term (W, 2) and a row term (H, 2),
    # both tiny NumPy arrays: cheaper than affine_grid's (H*W, 3) matmul.
    u = (2 * np.arange(w) + 1) / w - 1
    v = (2 * np.arange(h) + 1) / h - 1
    cols = torch.from_numpy((u[:, None] * theta[:2, 0]).astype(np.float32))
    rows = torch.from_numpy((v[:, None] * theta[:2, 1] + theta[:2, 2]).astype(np.float32))
    grid = (rows[:, None, :] + cols[None, :, :]).unsqueeze(0).to(image.dtype)
    return F.grid_sample(image.unsqueeze(0), grid, mode="bilinear", align_corners=False)[0]


def transform_points(
    points: np.ndarray, present: np.ndarray, matrix: np.ndarray, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Map points (K, 2) by a 3x3 matrix; those landing outside the image become absent."""
    h, w = image_size
    out = points @ matrix[:2, :2].T + matrix[:2, 2]
    inside = (out[:, 0] >= 0) & (out[:, 0] <= w - 1) & (out[:, 1] >= 0) & (out[:, 1] <= h - 1)
    return out.astype(np.float32), present & inside


# ---------------------------------------------------------------------------- intensity
def bias_field(
    rng: np.random.Generator, image_size: tuple[int, int], strength: float, order: int = 3
) -> torch.Tensor:
    """A smooth positive field (H, W): exp of a random low-frequency cosine series.

    log field = sum_{i,j<=order} c_ij cos(pi i y / H) cos(pi j x / W), c_ij ~ N(0, strength /
    (1 + i + j)), so coarse shading dominates; separable, hence two small matmuls.
    """
    h, w = image_size
    k = np.arange(order + 1)
    coef = (
        rng.normal(0.0, 1.0, size=(order + 1, order + 1)) * strength / (1 + k[:, None] + k[None, :])
    )
    basis_y = np.cos(np.pi * np.outer((np.arange(h) + 0.5) / h, k))
    basis_x = np.cos(np.pi * np.outer((np.arange(w) + 0.5) / w, k))
    log_field = torch.from_numpy((basis_y @ coef).astype(np.float32)) @ torch.from_numpy(
        basis_x.T.astype(np.float32)
    )
    return log_field.exp_()


@functools.lru_cache(maxsize=4)
def _noise_bank(height: int, width: int) -> torch.Tensor:
    """Standard normals (2H, 2W) from a fixed seed, the same in every process."""
    gen = torch.Generator().manual_seed(20200)
    return torch.randn((2 * height, 2 * width), generator=gen)


def add_noise(
    image: torch.Tensor, rng: np.random.Generator, std: float, rician: bool
) -> torch.Tensor:
    """Gaussian noise, or Rician: the magnitude of the image plus complex Gaussian noise.

    Drawing H*W normals per channel would cost more than the rest of the pipeline together,
    so each channel (and each complex component) takes a crop at a random offset of a fixed
    bank of normals twice the image size in each direction: H * W different fields.
    """
    c, h, w = image.shape
    bank = _noise_bank(h, w)
    offsets = rng.integers(0, (h, w), size=(c, 2 if rician else 1, 2))
    out = torch.empty_like(image)
    for ch, ((y0, x0), *imag) in enumerate(offsets):
        real = torch.add(image[ch], bank[y0 : y0 + h, x0 : x0 + w], alpha=std)
        if imag:
            ((y1, x1),) = imag
            torch.hypot(real, bank[y1 : y1 + h, x1 : x1 + w] * std, out=out[ch])
        else:
            out[ch] = real
    return out


def cutout(
    image: torch.Tensor, rng: np.random.Generator, max_count: int, max_size: float
) -> torch.Tensor:
    """Zero 1..max_count rectangles, each side up to `max_size` of the image side, all channels."""
    _, h, w = image.shape
    for _ in range(int(rng.integers(1, max_count + 1))):
        rh = max(1, int(rng.uniform(0.25, 1.0) * max_size * h))
        rw = max(1, int(rng.uniform(0.25, 1.0) * max_size * w))
        y0 = int(rng.integers(0, h - rh + 1))
        x0 = int(rng.integers(0, w - rw + 1))
        image[:, y0 : y0 + rh, x0 : x0 + rw] = 0
    return image


# ---------------------------------------------------------------------------- the pipeline
class SpineAugment:
    """Random geometry then intensity augmentation of one item, all randomness from one `rng`."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __call__(
        self,
        image: torch.Tensor,
        points: np.ndarray,
        present: np.ndarray,
        spacing_mm: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Augment (image (C, H, W), points (K, 2), present (K,), spacing (2,)); returns new ones."""
        cfg = self.config
        size = tuple(image.shape[-2:])
        # Draw every decision up front, in a fixed order, so the stream of random numbers
        # (and hence the item) does not depend on the image content.
        do = rng.uniform(size=7) < (
            cfg.slice_flip_p,
            cfg.affine_p,
            cfg.bias_field_p,
            cfg.gamma_p,
            cfg.contrast_p,
            cfg.noise_p,
            cfg.cutout_p,
        )
        if do[0] and image.shape[0] > 1:
            image = image.flip(0)
        if do[1]:
            matrix, s = random_affine_matrix(
                rng, size, cfg.rotate_deg, cfg.scale, cfg.translate, cfg.shear_deg
            )
            image = warp_image(image, matrix)
            points, present = transform_points(points, present, matrix, size)
            spacing_mm = (np.asarray(spacing_mm, dtype=np.float32) / s).astype(np.float32)
        else:
            image = image.clone()
        if do[2]:
            image.mul_(bias_field(rng, size, cfg.bias_field))
        if do[3]:
            g = math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
            peak = float(image.max())
            if peak > 0:
                image = image.clamp_(min=0).div_(peak).pow_(g).mul_(peak)
        if do[4]:
            c = math.exp(rng.uniform(-cfg.contrast, cfg.contrast))
            b = rng.uniform(-cfg.brightness, cfg.brightness)
            mean = float(image.mean())
            image.sub_(mean).mul_(c).add_(mean + b)
        if do[5]:
            image = add_noise(image, rng, rng.uniform(0, cfg.noise_std), cfg.rician)
        if do[6]:
            image = cutout(image, rng, cfg.cutout_count, cfg.cutout_size)
        return image, points, present, spacing_mm
