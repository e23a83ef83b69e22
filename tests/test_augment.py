"""Tests of biounet.data: the paper's elastic deformation and the joint augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from biounet.data import AugmentConfig, augment, augment_batch, elastic_displacement, random_grid_values, warp

try:
    import elasticdeform
except ImportError as error:  # a wheel built against NumPy 1.x fails to import under NumPy 2
    elasticdeform, REASON = None, f"elasticdeform (test dependency) cannot be imported: {error}"
else:
    REASON = ""
needs_elasticdeform = pytest.mark.skipif(elasticdeform is None, reason=REASON)

ONLY = AugmentConfig.identity()


def smooth_image(height: int, width: int) -> np.ndarray:
    """Band-limited test image (shortest wavelength 25 px), values in about [-2.3, 2.3]."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    return np.sin(yy / 7) + np.cos(xx / 5) + 0.3 * np.sin((xx + yy) / 4)


def coarse_grid(seed: int, shape: tuple[int, int] = (3, 4)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 10.0, size=(2, *shape))


@needs_elasticdeform
def test_displacement_matches_elasticdeform():
    height, width = 97, 130
    grid = coarse_grid(0)
    field = elastic_displacement((height, width), torch.from_numpy(grid)[None])[0].numpy()
    # elasticdeform returns no field, but deforming the coordinate ramps linearly reveals it.
    rows, cols = np.mgrid[:height, :width].astype(np.float64)
    for axis, ramp in enumerate((rows, cols)):
        expected = elasticdeform.deform_grid(ramp, grid, order=1, mode="nearest") - ramp
        source = (rows + field[0], cols + field[1])
        inside = (source[0] >= 0) & (source[0] <= height - 1) & (source[1] >= 0) & (source[1] <= width - 1)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(field[axis][inside], expected[inside], rtol=0, atol=1e-9)


def test_displacement_interpolates_the_grid_values_at_the_control_points():
    grid = coarse_grid(1)  # 3 x 4 points on 97 x 130 pixels: rows 0, 48, 96 and columns 0, 43, 86, 129
    field = elastic_displacement((97, 130), torch.from_numpy(grid)[None])[0].numpy()
    np.testing.assert_allclose(field[:, ::48, ::43], grid, rtol=0, atol=1e-9)


@needs_elasticdeform
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bilinear_warp_equals_elasticdeform_linear(dtype):
    image, grid = smooth_image(97, 130), coarse_grid(2)
    expected = elasticdeform.deform_grid(image, grid, order=1, mode="mirror")
    batch = torch.tensor(image, dtype=dtype)[None, None]
    out, _, _ = warp(batch, torch.from_numpy(grid)[None], interpolation="bilinear")
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-5)


@needs_elasticdeform
def test_bicubic_warp_agrees_with_elasticdeform_cubic_within_interpolation_tolerance():
    """Both are cubic and exact at pixel centres, but torch uses Keys' kernel (a = -0.75) and
    elasticdeform an interpolating cubic B-spline. On this smooth image (shortest wavelength
    25 px) their difference is bounded by their interpolation errors: below 1% of the image's
    range at every pixel and 0.2% on average. A different grid gives a far larger difference,
    so the tolerance does test the geometry."""
    image, grid = smooth_image(97, 130), coarse_grid(3)
    value_range = np.ptp(image)
    out = warp(torch.from_numpy(image)[None, None], torch.from_numpy(grid)[None])[0][0, 0].numpy()
    difference = np.abs(out - elasticdeform.deform_grid(image, grid, order=3, mode="mirror"))
    assert difference.max() < 0.01 * value_range
    assert difference.mean() < 0.002 * value_range
    other = elasticdeform.deform_grid(image, coarse_grid(4), order=3, mode="mirror")
    assert np.abs(out - other).max() > 0.2 * value_range


@needs_elasticdeform
def test_nearest_labels_and_weights_equal_elasticdeform_order_0():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 50, size=(97, 130))
    weights = rng.random((97, 130))
    grid = coarse_grid(6)
    image = torch.zeros(1, 1, 97, 130, dtype=torch.float64)
    _, out_labels, out_weights = warp(
        image,
        torch.from_numpy(grid)[None],
        labels=torch.from_numpy(labels)[None],
        weights=torch.from_numpy(weights)[None],
    )
    expected_labels, expected_weights = elasticdeform.deform_grid([labels, weights], grid, order=0, mode="mirror")
    np.testing.assert_array_equal(out_labels[0].numpy(), expected_labels)
    np.testing.assert_array_equal(out_weights[0].numpy(), expected_weights)


def test_matrix_and_offset_follow_scipy_affine_transform():
    """out(p) = in(c + A (p - c) + t) is scipy's affine_transform with offset c - A c + t."""
    image = smooth_image(40, 57)
    angle = np.deg2rad(33.0)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.0, -1.0])
    shift = np.array([2.5, -4.0])
    centre = (np.array(image.shape) - 1) / 2
    expected = ndi.affine_transform(image, matrix, offset=centre - matrix @ centre + shift, order=1, mode="mirror")
    out, _, _ = warp(
        torch.from_numpy(image)[None, None],
        matrix=torch.from_numpy(matrix)[None],
        offset=torch.from_numpy(shift)[None],
        interpolation="bilinear",
    )
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=0, atol=1e-10)


def test_borders_are_whole_sample_mirrored():
    image = np.arange(5 * 7, dtype=np.float64).reshape(5, 7)
    labels = np.arange(5 * 7).reshape(5, 7)
    out, out_labels, _ = warp(
        torch.from_numpy(image)[None, None],
        labels=torch.from_numpy(labels)[None],
        offset=torch.tensor([[-3.0, 4.0]]),
    )
    expected = np.pad(labels, 10, mode="reflect")[7:12, 14:21]  # numpy "reflect": d c b | a b c d
    np.testing.assert_array_equal(out_labels[0].numpy(), expected)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-9)


def test_identity_config_returns_the_input():
    image = torch.rand(2, 3, 20, 31, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 9, (2, 20, 31), generator=torch.Generator().manual_seed(1))
    out, out_labels, _ = augment_batch(image, labels, config=ONLY)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    assert torch.equal(out_labels, labels)


@pytest.mark.parametrize("flip", [False, True])
def test_rot90_and_flips_are_exact_permutations(flip):
    image = torch.rand(6, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6 * 16 * 16).reshape(6, 16, 16)
    config = AugmentConfig(**{**vars(ONLY), "rot90": True, "flip": flip})
    out, out_labels, _ = augment_batch(image, labels, config=config, generator=torch.Generator().manual_seed(2))
    flips = [(), (-1,), (-2,), (-2, -1)] if flip else [()]

    def turned(x: torch.Tensor, dims: tuple[int, ...], k: int) -> torch.Tensor:
        return torch.rot90(x.flip(dims) if dims else x, k, dims=(-2, -1))

    seen, mirrored = set(), False
    for i in range(6):
        found = [(d, k) for d in flips for k in range(4) if torch.equal(out_labels[i], turned(labels[i], d, k))]
        assert found, f"sample {i} is not a rotation/flip of its input"
        torch.testing.assert_close(out[i], turned(image[i], *found[0]), atol=1e-9, rtol=0)
        seen.add(tuple(out_labels[i, 0, :2].tolist()))
        mirrored |= len(found[0][0]) == 1  # one flip: a reflection, which no rotation gives
    assert len(seen) > 1  # the samples were not all turned the same way
    assert mirrored == flip


def test_random_shift_and_rotation_stay_in_their_ranges():
    n, size = 16, 65  # odd size: the centre pixel (32, 32) is the rotation centre
    labels = torch.arange(size * size).reshape(1, size, size).expand(n, size, size)
    config = AugmentConfig(**{**vars(ONLY), "max_shift": 5.0, "max_rotation": 30.0})
    generator = torch.Generator().manual_seed(9)
    _, out, _ = augment_batch(torch.zeros(n, 1, size, size), labels, config=config, generator=generator)
    centre = torch.stack([out[:, 32, 32] // size, out[:, 32, 32] % size], 1) - 32  # source of the centre: the shift
    right = torch.stack([out[:, 32, 52] // size, out[:, 32, 52] % size], 1) - 32 - centre  # 20 px to the right
    angle = torch.rad2deg(torch.atan2(-right[:, 0].double(), right[:, 1].double()))
    assert centre.abs().max() <= 6 and len(set(map(tuple, centre.tolist()))) > 3
    assert angle.abs().max() <= 30 + 4 and angle.std() > 5


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_labels_keep_exact_values_under_the_paper_augmentation(dtype):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200, (2, 48, 40), generator=gen)
    labels = (ids + (2**40 if dtype == torch.int64 else 0)).to(dtype)  # int64 ids beyond float32's 2**24
    weights = labels.double() * 0.5 + 1.0
    image = torch.rand(2, 1, 48, 40, generator=gen)
    _, out_labels, out_weights = augment_batch(image, labels, weights, generator=gen)
    assert out_labels.dtype == dtype and out_weights.dtype == torch.float64
    assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist())
    assert torch.equal(out_weights, out_labels.double() * 0.5 + 1.0)  # the weights moved with the labels


def test_reproducible_with_a_seeded_generator_and_independent_per_sample():
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)).expand(3, 1, 32, 32)
    labels = torch.arange(32 * 32).reshape(1, 32, 32).expand(3, 32, 32)
    first = augment_batch(image, labels, generator=torch.Generator().manual_seed(7))
    again = augment_batch(image, labels, generator=torch.Generator().manual_seed(7))
    other = augment_batch(image, labels, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[1][0], first[1][1]) and not torch.equal(first[1][1], first[1][2])


def test_gray_value_parts():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(4, 1, 64, 64, generator=gen, dtype=torch.float64)
    out, _, _ = augment_batch(image, config=AugmentConfig(**{**vars(ONLY), "brightness": 0.3}), generator=gen)
    shift = (out - image).flatten(1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-9, rtol=0)
    assert shift[:, 0].abs().max() <= 0.3 and shift[:, 0].unique().numel() == 4
    out, _, _ = augment_batch(image, config=AugmentConfig(**{**vars(ONLY), "contrast": 0.5}), generator=gen)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), image.mean(dim=(1, 2, 3)), atol=1e-9, rtol=0)
    out, _, _ = augment_batch(image, config=AugmentConfig(**{**vars(ONLY), "gamma": 0.5}), generator=gen)
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), image.amin(dim=(1, 2, 3)), atol=1e-9, rtol=0)
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), image.amax(dim=(1, 2, 3)), atol=1e-9, rtol=0)
    order = image.flatten(1).argsort(dim=1)
    assert (out.flatten(1).gather(1, order).diff(dim=1) >= -1e-12).all()  # gamma is monotonic
    out, _, _ = augment_batch(image, config=AugmentConfig(**{**vars(ONLY), "noise_std": 0.1}), generator=gen)
    assert abs(float((out - image).std()) - 0.1) < 0.005


def test_random_grid_values_shape_and_std():
    values = random_grid_values(500, (3, 5), 10.0, generator=torch.Generator().manual_seed(0))
    assert values.shape == (500, 2, 3, 5) and values.dtype == torch.float32
    assert abs(float(values.std()) - 10.0) < 0.3 and abs(float(values.mean())) < 0.3


def test_numpy_convenience_matches_the_batched_call():
    rng = np.random.default_rng(0)
    image, labels = rng.random((2, 24, 30)), rng.integers(0, 5, (24, 30)).astype(np.uint16)
    weights = rng.random((24, 30))
    out, out_labels, out_weights = augment(image, labels, weights, seed=11)
    assert out.shape == (2, 24, 30) and out.dtype == np.float32
    assert out_labels.dtype == np.uint16 and out_weights.dtype == np.float32
    expected = augment_batch(
        torch.from_numpy(image.astype(np.float32))[None],
        torch.from_numpy(labels)[None],
        torch.from_numpy(weights.astype(np.float32))[None],
        generator=torch.Generator().manual_seed(11),
    )
    np.testing.assert_array_equal(out, expected[0][0].numpy())
    np.testing.assert_array_equal(out_labels, expected[1][0].numpy())
    assert augment(image[0], seed=1)[0].shape == (24, 30)


def test_inputs_are_not_modified():
    image = torch.rand(2, 1, 16, 16)
    labels = torch.randint(0, 3, (2, 16, 16))
    before = image.clone(), labels.clone()
    augment_batch(image, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image, before[0]) and torch.equal(labels, before[1])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros((1, 1, 4, 4)),), "torch.Tensor"),
        ((torch.zeros(1, 4, 4),), r"\(N, C, H, W\)"),
        ((torch.zeros(1, 1, 4, 4, dtype=torch.int32),), "floating"),
        ((torch.zeros(1, 1, 4, 4, dtype=torch.float16),), "float32 or float64"),
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5)), r"labels must .* \(2, 4, 4\)"),
        ((torch.zeros(2, 1, 4, 4), None, torch.zeros(1, 4, 4)), "weights"),
    ],
)
def test_invalid_batches_raise_clear_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        augment_batch(*args)


def test_invalid_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="grid_values"):
        warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 1, 3))
    with pytest.raises(ValueError, match="matrix"):
        warp(torch.zeros(1, 1, 8, 8), matrix=torch.eye(3)[None])
    with pytest.raises(ValueError, match="interpolation"):
        warp(torch.zeros(1, 1, 8, 8), interpolation="nearest")
    with pytest.raises(ValueError, match="grid_values"):
        elastic_displacement((8, 8), torch.zeros(2, 3, 3))
    for bad in ({"elastic_grid": (1, 3)}, {"elastic_std": -1.0}, {"max_rotation": 270.0}, {"contrast": 1.0},
                {"interpolation": "nearest"}, {"noise_std": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            AugmentConfig(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator():
    image = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 20, (3, 64, 64), generator=torch.Generator().manual_seed(1))
    cpu = augment_batch(image, labels, generator=torch.Generator().manual_seed(5))
    gpu = augment_batch(image.cuda(), labels.cuda(), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 1e-3  # nearest ties may round differently
