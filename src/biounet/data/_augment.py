r"""Data augmentation of the U-Net paper (sec. 3.1): elastic deformations, shifts, rotations,
flips and gray-value variations, applied jointly to an image, its labels and its weight map.

Every geometric part is folded into ONE sampling grid, so each image is resampled once:

.. math::

    \text{out}(p) = \text{in}\bigl(c + A\,(p - c) + t + u(p)\bigr)

with ``p`` an output pixel (row, column), ``c`` the image centre, ``A`` a 2x2 matrix (rotation,
multiple of 90 degrees, flips), ``t`` a shift and ``u`` the elastic displacement field. The
image is interpolated (bicubic or bilinear), labels and weight maps take the nearest pixel, so
labels keep their exact integer values. Outside the image the input is mirrored about the
border pixels (``d c b | a b c d | c b a``: scipy's ``"mirror"``, torch's ``"reflection"`` with
``align_corners=True``). Everything runs batched on torch tensors (CPU or CUDA), with one set of
random parameters per sample drawn from a :class:`torch.Generator`.

The elastic displacement follows the paper and ``elasticdeform.deform_grid`` (van Tulder):
random vectors on a coarse grid (3x3, N(0, 10 px)) whose first and last points lie on the
first and last pixel of each axis, interpolated to every pixel by an interpolating cubic
B-spline (mirror boundary).

References
----------
O. Ronneberger, P. Fischer, T. Brox. "U-Net: Convolutional Networks for Biomedical Image
Segmentation." MICCAI 2015, sec. 3.1. G. van Tulder, elasticdeform,
https://github.com/gvtulder/elasticdeform
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from biounet.errors import InputError

Interpolation = Literal["bicubic", "bilinear"]

__all__ = ["AugmentConfig", "augment", "augment_batch", "elastic_displacement", "random_grid_values", "warp"]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """All augmentation parameters; every part is switched off by its zero / ``False`` value.

    The defaults are :meth:`paper`. Intensity parameters assume an image scaled to about
    [0, 1] (e.g. by :func:`biounet.io.normalize_percentile`).

    Attributes
    ----------
    elastic_grid : (int, int)
        Control points of the coarse displacement grid per axis (rows, columns), each >= 2.
    elastic_std : float
        Standard deviation of the grid displacements in pixels; 0 disables the deformation.
    interpolation : {"bicubic", "bilinear"}
        Image interpolation (labels and weights always take the nearest pixel).
    max_shift : float
        Shift in pixels, uniform in ``[-max_shift, max_shift]`` per axis.
    max_rotation : float
        Rotation angle in degrees, uniform in ``[-max_rotation, max_rotation]`` (<= 180).
    rot90 : bool
        Also rotate by a random multiple of 90 degrees.
    flip : bool
        Flip rows and columns, each with probability 1/2.
    gamma : float
        Gamma correction ``x -> lo + (hi - lo) ((x - lo) / (hi - lo)) ** g`` with
        ``g = exp(U(-gamma, gamma))`` and ``lo, hi`` the sample's minimum and maximum.
    contrast : float
        ``x -> m + f (x - m)`` with ``f ~ U(1 - contrast, 1 + contrast)``, ``m`` the sample mean.
    brightness : float
        ``x -> x + b`` with ``b ~ U(-brightness, brightness)``.
    noise_std : float
        Standard deviation of additive Gaussian noise.
    """

    elastic_grid: tuple[int, int] = (3, 3)
    elastic_std: float = 10.0
    interpolation: Interpolation = "bicubic"
    max_shift: float = 10.0
    max_rotation: float = 180.0
    rot90: bool = False
    flip: bool = True
    gamma: float = 0.2
    contrast: float = 0.2
    brightness: float = 0.1
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        grid = self.elastic_grid
        if not (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(n, int) and n >= 2 for n in grid)):
            raise InputError(f"AugmentConfig: elastic_grid must be a tuple of 2 ints >= 2, got {grid!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise InputError(
                f"AugmentConfig: interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}"
            )
        for name in ("elastic_std", "max_shift", "max_rotation", "gamma", "contrast", "brightness", "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InputError(f"AugmentConfig: {name} must be a finite number >= 0, got {value!r}")
        if self.max_rotation > 180:
            raise InputError(f"AugmentConfig: max_rotation must be <= 180 degrees, got {self.max_rotation!r}")
        if self.contrast >= 1:
            raise InputError(f"AugmentConfig: contrast must be < 1, got {self.contrast!r}")

    @classmethod
    def paper(cls) -> AugmentConfig:
        """The paper's setting: a 3x3 grid with N(0, 10 px) displacements, bicubic.

        The paper names shifts, rotations and gray-value variations without their ranges; the
        ranges here (10 px, any angle, flips, gamma/contrast 0.2, brightness 0.1, noise 0.02)
        are ours.
        """
        return cls()

    @classmethod
    def identity(cls) -> AugmentConfig:
        """Every part switched off: the output equals the input."""
        return cls(elastic_std=0.0, max_shift=0.0, max_rotation=0.0, flip=False, gamma=0.0, contrast=0.0,
                   brightness=0.0, noise_std=0.0)  # fmt: skip


def random_grid_values(
    n: int,
    grid: tuple[int, int] = (3, 3),
    std: float = 10.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random coarse displacement grids: ``std * N(0, 1)``, shape ``(n, 2, *grid)``, float32.

    Channel 0 holds the row (y) displacements, channel 1 the column (x) ones, in pixels, as
    ``elasticdeform.deform_grid`` expects its ``displacement`` argument. The values are drawn on
    the generator's device (default: ``device``) and returned on ``device``.
    """
    if n < 1 or len(grid) != 2 or min(grid) < 2:
        raise InputError(f"random_grid_values: need n >= 1 and a grid of 2 sizes >= 2, got n={n}, grid={grid}")
    values = torch.randn((n, 2, *grid), generator=generator, device=_rng_device(generator, device))
    return (values * std).to(device)


def elastic_displacement(shape: tuple[int, int], grid_values: torch.Tensor) -> torch.Tensor:
    """Per-pixel displacements interpolated from coarse grids by a cubic B-spline.

    Control point ``k`` of an axis with ``n`` points and ``L`` pixels sits at pixel
    ``k (L - 1) / (n - 1)``; the field is the interpolating cubic B-spline through the grid
    values with mirror boundary, exactly as in ``elasticdeform.deform_grid``. It is separable,
    so it is computed as ``B_y @ G @ B_x.T`` with small interpolation matrices.

    Parameters
    ----------
    shape : (int, int)
        Image size (H, W).
    grid_values : Tensor, shape (N, 2, gy, gx)
        Displacements in pixels at the control points (row, column channels).

    Returns
    -------
    Tensor, shape (N, 2, H, W)
        Displacements in pixels, dtype and device of ``grid_values``.
    """
    _check_grid_values(grid_values, None, "elastic_displacement")
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"elastic_displacement: shape must be (H, W) with H, W >= 1, got {shape}")
    rows = _spline_matrix(shape[0], grid_values.shape[2])
    cols = _spline_matrix(shape[1], grid_values.shape[3])
    like = {"dtype": grid_values.dtype, "device": grid_values.device}
    return torch.as_tensor(rows, **like) @ grid_values @ torch.as_tensor(cols.T, **like)


@functools.lru_cache(maxsize=32)
def _spline_matrix(length: int, points: int) -> np.ndarray:
    """(length, points) matrix interpolating ``points`` control values onto ``length`` pixels."""
    positions = np.arange(length) * ((points - 1) / (length - 1)) if length > 1 else np.zeros(1)
    columns = [ndi.map_coordinates(unit, positions[None], order=3, mode="mirror") for unit in np.eye(points)]
    return np.stack(columns, axis=1)


def warp(
    image: torch.Tensor,
    grid_values: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    matrix: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    interpolation: Interpolation = "bicubic",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Resample a batch once at ``c + matrix (p - c) + offset + u(p)``.

    ``u`` is :func:`elastic_displacement` of ``grid_values``, so ``warp(x, g)`` is the torch
    counterpart of ``elasticdeform.deform_grid(x, g, mode="mirror")``.

    Parameters
    ----------
    image : Tensor, shape (N, C, H, W), float32 or float64
        Images, interpolated with ``interpolation``: torch's bicubic is Keys' cubic convolution
        (a = -0.75), bilinear is exact linear interpolation.
    grid_values : Tensor, shape (N, 2, gy, gx), optional
        Coarse (row, column) displacement grids in pixels. Default: no deformation.
    labels, weights : Tensor, shape (N, H, W), optional
        Resampled by the nearest pixel (ties to even), so values are copied, never mixed
        (integers up to 2**53 in magnitude).
    matrix : Tensor, shape (N, 2, 2), optional
        Linear map of the centred (row, column) output coordinates. Default: identity.
    offset : Tensor, shape (N, 2), optional
        (row, column) shift in pixels. Default: 0.
    interpolation : {"bicubic", "bilinear"}
        Image interpolation.

    Returns
    -------
    (image, labels, weights)
        Resampled tensors (None where the input was None), same shapes and dtypes.

    Notes
    -----
    The sampling grid is separable: each coordinate is ``R_y K R_x^T`` with
    ``R_y = [B_y, 1, y - c_y]`` (B-spline matrix of :func:`elastic_displacement`, constant,
    centred row index) and ``R_x`` likewise, and a small per-sample matrix ``K`` that holds the
    grid values, the affine map and grid_sample's normalisation. So building the grid costs
    one small matrix product; the resampling is one ``grid_sample`` for the image and one for
    labels and weights together.
    """
    _check_batch(image, labels, weights)
    if interpolation not in ("bicubic", "bilinear"):
        raise InputError(f"warp: interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    n, _, height, width = image.shape
    for name, value, expected in (("matrix", matrix, (n, 2, 2)), ("offset", offset, (n, 2))):
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != expected):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"warp: {name} must be a tensor of shape {expected}, got {got}")
    if grid_values is not None:
        _check_grid_values(grid_values, n, "warp")
    grid = _sampling_grid((height, width), grid_values, matrix, offset, n, image.dtype, image.device)
    out = F.grid_sample(image, grid, mode=interpolation, padding_mode="reflection", align_corners=True)
    labels, weights = _sample_nearest([labels, weights], grid)
    return out, labels, weights


def _sampling_grid(
    shape: tuple[int, int],
    grid_values: torch.Tensor | None,
    matrix: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """grid_sample's (N, H, W, 2) grid of normalised (x, y) source coordinates (see :func:`warp`)."""
    f64 = {"dtype": torch.float64, "device": device}
    points = (0, 0) if grid_values is None else tuple(grid_values.shape[2:])
    basis = []
    for length, k in zip(shape, points):
        spline = torch.as_tensor(_spline_matrix(length, k), **f64) if k else torch.zeros(length, 0, **f64)
        index = torch.arange(length, **f64)[:, None]
        basis.append(torch.cat([spline, torch.ones_like(index), index - (length - 1) / 2], dim=1))
    centre = torch.tensor([(s - 1) / 2 for s in shape], **f64)
    linear = torch.eye(2, **f64).expand(n, 2, 2) if matrix is None else matrix.to(**f64)
    shift = centre + (0 if offset is None else offset.to(**f64))
    kernel = torch.zeros(n, 2, points[0] + 2, points[1] + 2, **f64)  # channel 0 = rows, 1 = columns
    if grid_values is not None:
        kernel[:, :, : points[0], : points[1]] = grid_values.to(**f64)
    kernel[:, :, points[0], points[1]] = shift
    kernel[:, :, points[0] + 1, points[1]] = linear[:, :, 0]
    kernel[:, :, points[0], points[1] + 1] = linear[:, :, 1]
    scale = torch.tensor([2 / max(s - 1, 1) for s in shape], **f64)
    kernel = kernel * scale[:, None, None]
    kernel[:, :, points[0], points[1]] -= 1
    like = {"dtype": dtype, "device": device}
    coords = basis[0].to(**like) @ kernel.flip(1).to(**like) @ basis[1].to(**like).T  # (N, [x, y], H, W)
    return coords.permute(0, 2, 3, 1).contiguous()


def _sample_nearest(values: list[torch.Tensor | None], grid: torch.Tensor) -> list[torch.Tensor | None]:
    """Nearest-pixel resampling of (N, H, W) tensors; values are copied through float32 or float64."""
    present = [v for v in values if v is not None]
    if not present:
        return values
    work = torch.float32
    for v in present:
        largest = int(v.abs().max()) if v.dtype in (torch.int32, torch.int64) else 0
        if largest > 2**53:
            raise InputError(f"labels: values up to {largest} exceed 2**53 and cannot be resampled exactly")
        if largest > 2**24 or v.dtype == torch.float64:
            work = torch.float64
    stacked = torch.stack([v.to(work) for v in present], dim=1)
    sampled = F.grid_sample(stacked, grid.to(work), mode="nearest", padding_mode="reflection", align_corners=True)
    channels = iter(sampled.unbind(1))
    return [None if v is None else next(channels).to(v.dtype) for v in values]


def augment_batch(
    image: torch.Tensor,
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    *,
    config: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Apply one random augmentation per sample, jointly to images, labels and weights.

    The geometric parts (elastic deformation, rotation, 90-degree rotation, flips, shift) are
    composed into one sampling grid (see :func:`warp`); the gray-value parts (gamma, contrast,
    brightness, noise, in this order) change the image only.

    Parameters
    ----------
    image : Tensor, shape (N, C, H, W), float32 or float64
        Images, on CPU or CUDA.
    labels : Tensor, shape (N, H, W), optional
        Label images (any dtype); values are only copied, never mixed.
    weights : Tensor, shape (N, H, W), optional
        Weight maps; nearest-pixel resampling as for the labels.
    config : AugmentConfig, optional
        Parameters; default :meth:`AugmentConfig.paper`.
    generator : torch.Generator, optional
        Source of all random numbers, which are drawn on its device (so a CPU generator gives
        the same augmentation on CPU and CUDA). Default: torch's global generator.

    Returns
    -------
    (image, labels, weights)
        Augmented tensors; None where the input was None. The inputs are not modified.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y, w = augment_batch(torch.rand(2, 1, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long),
    ...                         config=AugmentConfig.paper(), generator=g)
    >>> x.shape, y.shape, w is None
    (torch.Size([2, 1, 64, 64]), torch.Size([2, 64, 64]), True)
    """
    _check_batch(image, labels, weights)
    config = AugmentConfig.paper() if config is None else config
    n, device = image.shape[0], image.device
    grid = None
    if config.elastic_std > 0:
        grid = random_grid_values(n, config.elastic_grid, config.elastic_std, generator=generator, device=device)
    matrix = torch.eye(2, dtype=torch.float64, device=device).repeat(n, 1, 1)
    if config.max_rotation > 0:
        angle = torch.deg2rad(_uniform((n,), config.max_rotation, generator, device))
        cos, sin = torch.cos(angle), torch.sin(angle)
        matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) @ matrix
    if config.rot90:
        quarter = torch.randint(4, (n,), generator=generator, device=_rng_device(generator, device))
        matrix = _QUARTER_TURNS.to(device)[quarter.to(device)] @ matrix
    if config.flip:
        signs = torch.where(_uniform((n, 2), 1.0, generator, device) > 0, 1.0, -1.0)
        matrix = matrix * signs[:, None, :]  # mirrors the input rows / columns
    offset = _uniform((n, 2), config.max_shift, generator, device) if config.max_shift > 0 else None
    out, labels, weights = warp(
        image, grid, labels=labels, weights=weights, matrix=matrix, offset=offset, interpolation=config.interpolation
    )
    return _gray_values(out, config, generator), labels, weights


_QUARTER_TURNS = torch.tensor(
    [[[1.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]], [[-1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [-1.0, 0.0]]],
    dtype=torch.float64,
)


def _gray_values(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma, contrast, brightness and noise, with per-sample random parameters."""
    n, device = image.shape[0], image.device

    def per_sample(bound: float) -> torch.Tensor:
        return _uniform((n, 1, 1, 1), bound, generator, device).to(image.dtype)

    if config.gamma > 0:
        lo = image.amin(dim=(1, 2, 3), keepdim=True)
        span = (image.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(torch.finfo(image.dtype).tiny)
        image = lo + span * ((image - lo) / span) ** torch.exp(per_sample(config.gamma))
    if config.contrast > 0:
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        image = mean + (1 + per_sample(config.contrast)) * (image - mean)
    if config.brightness > 0:
        image = image + per_sample(config.brightness)
    if config.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator, device=_rng_device(generator, device))
        image = image + config.noise_std * noise.to(device, image.dtype)
    return image


def _uniform(
    size: tuple[int, ...], bound: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``U(-bound, bound)`` in float64, drawn on the generator's device, returned on ``device``."""
    draw = torch.rand(size, generator=generator, device=_rng_device(generator, device), dtype=torch.float64)
    return ((2 * draw - 1) * bound).to(device)


def augment(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    config: AugmentConfig | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`augment_batch` for one numpy sample, on the CPU.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (C, H, W)
        The image (converted to float32).
    labels, weights : ndarray, shape (H, W), optional
        Label image (dtype kept) and weight map (float32).
    config : AugmentConfig, optional
        Default :meth:`AugmentConfig.paper`.
    seed : int, optional
        Seed of a fresh :class:`torch.Generator`; None uses torch's global generator.

    Returns
    -------
    (image, labels, weights)
        Numpy arrays of the input shapes; None where the input was None.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise InputError(f"augment: image must have shape (H, W) or (C, H, W), got {image.shape}")
    batch = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(1, -1, *image.shape[-2:])
    label_batch = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))[None]
    weight_batch = None if weights is None else torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))[None]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out, lab, wts = augment_batch(batch, label_batch, weight_batch, config=config, generator=generator)
    return (
        out[0].reshape(image.shape).numpy(),
        None if lab is None else lab[0].numpy(),
        None if wts is None else wts[0].numpy(),
    )


def _rng_device(generator: torch.Generator | None, default: torch.device | str | None) -> torch.device | str | None:
    return generator.device if generator is not None else default


def _check_grid_values(grid_values: torch.Tensor, n: int | None, caller: str) -> None:
    """Shape (N, 2, gy >= 2, gx >= 2), with N = n when given."""
    if not isinstance(grid_values, torch.Tensor):
        raise TypeError(f"{caller}: grid_values must be a torch.Tensor, got {type(grid_values).__name__}")
    shape = tuple(grid_values.shape)
    if len(shape) != 4 or shape[1] != 2 or min(shape[2:]) < 2 or (n is not None and shape[0] != n):
        raise InputError(f"{caller}: grid_values must have shape ({n or 'N'}, 2, gy >= 2, gx >= 2), got {shape}")


def _check_batch(image: torch.Tensor, labels: torch.Tensor | None, weights: torch.Tensor | None) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor of shape (N, C, H, W), got {type(image).__name__}")
    if image.ndim != 4 or min(image.shape) < 1:
        raise InputError(f"image must have shape (N, C, H, W) with no empty axis, got {tuple(image.shape)}")
    if image.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"image must be a floating-point tensor, float32 or float64, got {image.dtype}")
    expected = (image.shape[0], *image.shape[2:])
    for name, value in (("labels", labels), ("weights", weights)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != expected:
            raise InputError(f"{name} must have shape (N, H, W) = {expected} to match image, got {tuple(value.shape)}")
        if value.device != image.device:
            raise InputError(f"{name} is on {value.device} but image is on {image.device}")
