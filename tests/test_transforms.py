"""Joint image + point augmentations and Gaussian heatmap targets."""

import numpy as np
import pytest
import torch
from spine_helpers import geometry_only

from lit_spine.data.labels import DISC_POINTS, VERTEBRA_POINTS, get_vocabulary
from lit_spine.data.targets import (
    gaussian_heatmaps,
    heatmap_to_input_coords,
    input_to_heatmap_coords,
    per_type_labels,
)
from lit_spine.data.transforms import (
    AugmentConfig,
    SpineAugment,
    add_noise,
    bias_field,
    random_affine_matrix,
    transform_points,
    warp_image,
)

SIZE = (96, 128)  # non-square on purpose: catches swapped axes
GEOMETRY_ONLY = geometry_only(rotate_deg=25.0, scale=0.3, translate=0.1, shear_deg=5.0)


def dot_image(x: int, y: int, size=SIZE) -> torch.Tensor:
    """One bright pixel at (x, y), slightly blurred so bilinear resampling keeps a clear peak."""
    image = torch.zeros(1, 1, *size)
    image[0, 0, y, x] = 1.0
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256.0)[None, None]
    return torch.nn.functional.conv2d(image, kernel, padding=2)[0]


def argmax_xy(image: torch.Tensor) -> np.ndarray:
    flat = int(image[0].argmax())
    return np.array([flat % image.shape[-1], flat // image.shape[-1]], dtype=np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_affine_moves_image_and_point_together(seed):
    rng = np.random.default_rng(seed)
    h, w = SIZE
    x, y = int(rng.integers(30, w - 30)), int(rng.integers(25, h - 25))
    image = dot_image(x, y)
    point = np.array([[x, y]], dtype=np.float32)
    out, pts, present, _ = SpineAugment(GEOMETRY_ONLY)(
        image, point, np.array([True]), np.array([0.8, 0.8], np.float32), rng
    )
    if present[0]:
        assert np.abs(argmax_xy(out) - pts[0]).max() <= 1.0


def test_warp_identity_and_known_shift():
    image = dot_image(40, 30)
    torch.testing.assert_close(warp_image(image, np.eye(3)), image, atol=1e-5, rtol=0)
    shift = np.array([[1, 0, 7], [0, 1, -5], [0, 0, 1]], dtype=np.float64)
    assert argmax_xy(warp_image(image, shift)).tolist() == [47, 25]


def test_points_leaving_the_image_become_absent():
    h, w = SIZE
    points = np.array([[10, 10], [w - 11, h - 11], [w / 2, h / 2]], dtype=np.float32)
    shift = np.array([[1, 0, 20], [0, 1, 20], [0, 0, 1]], dtype=np.float64)
    moved, present = transform_points(points, np.array([True, True, False]), shift, SIZE)
    assert present.tolist() == [True, False, False]  # pushed out; absent stays absent
    np.testing.assert_allclose(moved[0], [30, 30])


def test_scale_divides_spacing():
    rng = np.random.default_rng(3)
    matrix, s = random_affine_matrix(rng, SIZE, 0.0, 0.3, 0.0, 0.0)
    assert abs(matrix[0, 0] - s) < 1e-9 and s != 1.0
    # Without rotation, shear and shift, the scale is the growth of distances from the centre.
    cfg = AugmentConfig(
        **{**GEOMETRY_ONLY.__dict__, "rotate_deg": 0.0, "shear_deg": 0.0, "translate": 0.0}
    )
    centre = np.array([(SIZE[1] - 1) / 2, (SIZE[0] - 1) / 2], np.float32)
    points = np.stack([centre, centre + 10]).astype(np.float32)
    _, moved, _, spacing = SpineAugment(cfg)(
        torch.rand(1, *SIZE),
        points,
        np.ones(2, bool),
        np.array([0.8, 0.6], np.float32),
        np.random.default_rng(3),
    )
    scale = np.linalg.norm(moved[1] - moved[0]) / np.linalg.norm(points[1] - points[0])
    assert scale != pytest.approx(1.0)
    np.testing.assert_allclose(spacing, np.array([0.8, 0.6]) / scale, rtol=1e-5)


def test_slice_flip_reverses_channels_only():
    cfg = AugmentConfig(**{**GEOMETRY_ONLY.__dict__, "affine_p": 0.0, "slice_flip_p": 1.0})
    image = torch.rand(3, *SIZE)
    points = np.array([[5.0, 6.0]], np.float32)
    out, pts, _, _ = SpineAugment(cfg)(
        image, points, np.array([True]), np.ones(2, np.float32), np.random.default_rng(0)
    )
    assert torch.equal(out, image.flip(0))
    np.testing.assert_array_equal(pts, points)


def test_full_pipeline_is_deterministic_and_leaves_input_alone():
    everything = AugmentConfig(
        affine_p=1, slice_flip_p=1, gamma_p=1, contrast_p=1, bias_field_p=1, noise_p=1, cutout_p=1
    )
    aug = SpineAugment(everything)
    image = torch.rand(3, *SIZE)
    before = image.clone()
    args = (np.array([[50.0, 40.0]], np.float32), np.array([True]), np.ones(2, np.float32))
    a = aug(image, *args, np.random.default_rng([0, 1, 2]))
    b = aug(image, *args, np.random.default_rng([0, 1, 2]))
    c = aug(image, *args, np.random.default_rng([0, 2, 2]))
    assert torch.equal(image, before)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == image.shape and a[0].dtype == torch.float32
    assert torch.isfinite(a[0]).all()


def test_rician_noise_is_positive_and_has_the_right_spread():
    image = torch.full((2, 64, 64), 0.5)
    gaussian = add_noise(image, np.random.default_rng(0), 0.05, rician=False)
    assert abs(float((gaussian - image).std()) - 0.05) < 0.005
    rician = add_noise(torch.zeros(2, 64, 64), np.random.default_rng(0), 0.05, rician=True)
    assert float(rician.min()) >= 0
    # Magnitude of complex N(0, s^2) noise is Rayleigh: mean s * sqrt(pi / 2).
    assert abs(float(rician.mean()) - 0.05 * np.sqrt(np.pi / 2)) < 0.005


def test_bias_field_is_smooth_and_positive():
    field = bias_field(np.random.default_rng(0), SIZE, 0.3)
    assert field.shape == SIZE and float(field.min()) > 0
    assert (
        float(field.diff(dim=0).abs().max()) < 0.05 and float(field.diff(dim=1).abs().max()) < 0.05
    )


# ---------------------------------------------------------------------------- heatmap targets
@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_coordinate_conventions_round_trip(stride):
    xy = np.random.default_rng(stride).uniform(-0.5, 127.5, size=(11, 2))
    np.testing.assert_allclose(
        heatmap_to_input_coords(input_to_heatmap_coords(xy, stride), stride), xy
    )
    # Heatmap pixel i covers input pixels [i * stride, (i + 1) * stride): centre (i + .5) s - .5.
    centres = heatmap_to_input_coords(np.arange(4.0), stride)
    np.testing.assert_allclose(
        centres, [np.arange(k * stride, (k + 1) * stride).mean() for k in range(4)]
    )
    assert torch.is_tensor(input_to_heatmap_coords(torch.tensor(xy), stride))


@pytest.mark.parametrize("stride", [2, 4])
def test_heatmap_peak_sits_on_the_point(stride):
    rng = np.random.default_rng(0)
    h, w = SIZE
    points = rng.uniform(4, (w - 5, h - 5), size=(11, 2)).astype(np.float32)
    present = np.ones(11, bool)
    present[3] = False
    points[3] = np.nan  # absent points may carry NaN: their channel must be all zeros, not NaN
    heat = gaussian_heatmaps(points, present, SIZE, stride, sigma=1.5)
    assert heat.shape == (11, h // stride, w // stride) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat[3].max() == 0
    for k in np.flatnonzero(present):
        y_hm, x_hm = np.unravel_index(heat[k].argmax(), heat[k].shape)
        back = heatmap_to_input_coords(np.array([x_hm, y_hm], np.float32), stride)
        # The argmax pixel is the nearest heatmap pixel: within half a heatmap pixel.
        assert np.abs(back - points[k]).max() <= stride / 2 + 1e-4
        assert 0.8 < heat[k].max() <= 1.0


def test_heatmap_peak_is_exactly_one_on_a_pixel_centre():
    point = heatmap_to_input_coords(np.array([[5.0, 7.0]], np.float32), 4)
    heat = gaussian_heatmaps(point, np.array([True]), (64, 64), 4, sigma=2.0)
    assert heat[0, 7, 5] == pytest.approx(1.0) and heat[0].argmax() == 7 * 16 + 5
    assert heat[0, 7, 7] == pytest.approx(np.exp(-4 / 8), rel=1e-5)


def test_heatmap_size_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        gaussian_heatmaps(np.zeros((1, 2)), np.ones(1, bool), (30, 32), 4)


@pytest.mark.parametrize("name", ["tianchi2020", "seed7"])
def test_per_type_labels_put_each_code_in_its_own_column(name):
    vocab = get_vocabulary(name)
    glob = np.zeros((2, 11, vocab.num_classes), bool)
    l2, l4_l5 = VERTEBRA_POINTS[1], DISC_POINTS[4]
    glob[0, l2, vocab.class_index("vertebra", "v2")] = True
    glob[1, l4_l5, vocab.class_index("disc", "v3")] = True
    glob[1, l4_l5, vocab.class_index("disc", "v5")] = True
    out = per_type_labels(glob, vocab)
    assert out.shape == (2, 11, max(len(vocab.vertebra), len(vocab.disc)))
    assert np.flatnonzero(out[0, l2]).tolist() == [1]
    assert np.flatnonzero(out[1, l4_l5]).tolist() == [2, 4]
    assert out.sum() == 3
    with pytest.raises(ValueError, match="classes"):
        per_type_labels(glob[..., :-1], vocab)
