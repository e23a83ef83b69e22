"""Synthetic images of clumps of touching cells with their instance labels (the embedded default data)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as label_components
from skimage.segmentation import relabel_sequential

from biounet.data._tiles import as_pair
from biounet.errors import InputError

Style = Literal["fluorescence", "phase"]


def synthetic_cells(
    n: int,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    style: Style = "fluorescence",
    *,
    radius: tuple[float, float] = (7.0, 13.0),
    clump_size: tuple[int, int] = (1, 12),
    gaps: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of clumps of touching, irregular cells with their instance labels.

    Cells grow in clumps: each new cell is placed beside a random cell of its clump at 70-90%
    of the sum of their radii, so neighbours overlap and are cut apart by a multiplicatively
    weighted Voronoi (Apollonius) diagram whose cell outlines carry random harmonics
    ``r(theta) = r (1 + sum_k a_k cos(k theta + phi_k))``, k = 2..4, and a smooth wobble. Each
    pair of touching cells is then pulled apart by 0, 1 or 2 px of background (probabilities
    ``gaps``), so many cells touch with no visible gap at all.

    ``"fluorescence"``: bright textured cells dimming towards their outlines (so touching
    cells show only a faint dip between them) on a dark background. ``"phase"``: phase
    contrast, ``I = b - alpha (phi - G_s * phi) - beta phi`` for the optical thickness ``phi``
    (a high-pass of the phase, as the phase ring makes it): darker cells with bright halos
    around them and brighter seams where they touch, on mid-grey. Both are multiplied by a
    smooth uneven illumination, blurred by a Gaussian PSF and turned into camera counts with
    Poisson shot noise, Gaussian read noise and an offset of 100. The labels do not depend on
    ``style``: both styles of one seed show the same cells.

    Parameters
    ----------
    n : int
        Number of images. Image ``i`` depends only on ``seed`` and ``i``, not on ``n``.
    shape : (int, int)
        Image height and width (at least 16 x 16).
    seed : int
        Seed; the output is the same for the same arguments on any machine.
    style : {"fluorescence", "phase"}
        Imaging modality.
    radius : (float, float)
        Range of the cells' mean radii in pixels.
    clump_size : (int, int)
        Range of the number of cells per clump.
    gaps : (float, float, float)
        Probabilities of a 0, 1 and 2 px background gap between two touching cells.

    Returns
    -------
    list of (image, labels)
        ``image``: ``(H, W)`` uint16 camera counts (normalise before training, e.g. with
        :func:`biounet.io.normalize_percentile`); ``labels``: ``(H, W)`` uint16 instance
        labels, 0 = background, cells numbered 1..N in raster order.
    """
    if not isinstance(n, int | np.integer) or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    shape = as_pair(shape, "shape")
    if min(shape) < 16:
        raise InputError(f"shape must be at least (16, 16), got {shape}")
    if style not in ("fluorescence", "phase"):
        raise InputError(f"style must be 'fluorescence' or 'phase', got {style!r}")
    if not 0 < radius[0] <= radius[1]:
        raise InputError(f"radius must be a range 0 < low <= high, got {radius}")
    if not 1 <= clump_size[0] <= clump_size[1]:
        raise InputError(f"clump_size must be a range 1 <= low <= high, got {clump_size}")
    if len(gaps) != 3 or min(gaps) < 0 or not math.isclose(sum(gaps), 1.0):
        raise InputError(f"gaps must be three probabilities that sum to 1, got {gaps}")
    out = []
    for child in np.random.SeedSequence(seed).spawn(n):
        rng = np.random.default_rng(child)
        labels = _cell_labels(rng, shape, radius, clump_size, gaps)
        render = _fluorescence if style == "fluorescence" else _phase_contrast
        out.append((render(rng, labels), labels))
    return out


def _cell_labels(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radius: tuple[float, float],
    clump_size: tuple[int, int],
    gaps: tuple[float, float, float],
) -> np.ndarray:
    """Instance labels (uint16, 1..N) of clumps of touching cells."""
    mean_size = (clump_size[0] + clump_size[1]) / 2
    n_clumps = max(1, round(0.3 * shape[0] * shape[1] / (mean_size * math.pi * np.mean(radius) ** 2)))
    centres, radii = _grow_clumps(rng, shape, radius, clump_size, n_clumps)
    labels = _apollonius_cells(rng, shape, centres, radii)
    labels = _open_gaps(rng, labels, gaps)
    return _one_piece_each(labels, min_area=round(0.5 * math.pi * radius[0] ** 2))


def _grow_clumps(
    rng: np.random.Generator, shape: tuple[int, int], radius: tuple[float, float], clump_size: tuple[int, int],
    n_clumps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres and radii: each clump grows by attaching cells to random members."""
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_clumps):
        members = [len(centres)]
        centres.append(rng.uniform((0, 0), shape))
        radii.append(rng.uniform(*radius))
        for _ in range(int(rng.integers(clump_size[0], clump_size[1] + 1)) - 1):
            for _attempt in range(20):
                parent = members[int(rng.integers(len(members)))]
                r, angle = rng.uniform(*radius), rng.uniform(0, 2 * np.pi)
                centre = centres[parent] + (radii[parent] + r) * rng.uniform(0.7, 0.9) * np.array(
                    [np.sin(angle), np.cos(angle)]
                )
                distance = np.hypot(*(np.array(centres) - centre).T)
                if np.all(distance >= 0.65 * (np.array(radii) + r)):
                    members.append(len(centres))
                    centres.append(centre)
                    radii.append(r)
                    break
    return np.array(centres), np.array(radii)


def _apollonius_cells(
    rng: np.random.Generator, shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Label each pixel with the cell of smallest normalised distance ``|x - c| / r(theta)`` if < 1."""
    best = np.ones(shape)
    labels = np.zeros(shape, dtype=np.int32)
    wobble = 0.06 * _smooth_noise(rng, shape, scale=6.0)
    for index, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        amplitudes, phases = rng.uniform(-0.12, 0.12, 3) / np.arange(1, 4), rng.uniform(0, 2 * np.pi, 3)
        reach = 1.5 * r
        y0, y1 = max(0, int(cy - reach)), min(shape[0], int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(shape[1], int(cx + reach) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.arange(y0, y1)[:, None] - cy, np.arange(x0, x1)[None, :] - cx
        theta = np.arctan2(dy, dx)
        outline = r * (1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amplitudes, phases)))
        distance = np.hypot(dy, dx) / outline + wobble[y0:y1, x0:x1]
        window = (slice(y0, y1), slice(x0, x1))
        closer = distance < best[window]
        best[window][closer] = distance[closer]
        labels[window][closer] = index
    return labels


def _open_gaps(rng: np.random.Generator, labels: np.ndarray, gaps: tuple[float, float, float]) -> np.ndarray:
    """Open a 0, 1 or 2 px background gap between each pair of touching cells.

    For a 1 px gap the cell with the smaller label gives up its contact pixels, for 2 px both.
    """
    n = int(labels.max())
    gap = np.triu(rng.choice(3, size=(n + 1, n + 1), p=gaps), 1)
    gap += gap.T
    remove = np.zeros(labels.shape, dtype=bool)
    for here, there, where in _neighbour_views(labels, remove):
        contact = (here > 0) & (there > 0) & (here != there)
        g = gap[here, there]
        where |= contact & ((g == 2) | ((g == 1) & (here < there)))
    return np.where(remove, 0, labels)


def _neighbour_views(labels: np.ndarray, out: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(a, b, o)`` view triples over all 4-neighbour pairs, in both directions."""
    yield labels[1:], labels[:-1], out[1:]
    yield labels[:-1], labels[1:], out[:-1]
    yield labels[:, 1:], labels[:, :-1], out[:, 1:]
    yield labels[:, :-1], labels[:, 1:], out[:, :-1]


def _one_piece_each(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each cell's largest 4-connected piece if it has ``min_area`` px; relabel 1..N."""
    pieces = label_components(labels, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    owner = np.zeros(sizes.size, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    largest = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    by_size = np.argsort(sizes, kind="stable")
    largest[owner[by_size]] = by_size  # the last (largest) piece of each owner wins
    keep = np.zeros(sizes.size, dtype=bool)
    keep[largest] = True
    keep &= sizes >= min_area
    keep[0] = False
    return relabel_sequential(np.where(keep[pieces], pieces, 0))[0].astype(np.uint16)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth Gaussian random field of unit variance, correlation length about ``scale`` px.

    White noise on a coarse grid of spacing ``scale`` px, interpolated by cubic B-splines
    (four knots per pixel and axis, separably), each pixel's weights scaled to unit norm.
    """
    (rows, row_w), (cols, col_w) = (_bspline_weights(n, scale) for n in shape)
    coarse = rng.standard_normal((rows[-1] + 4, cols[-1] + 4))
    along_y = sum(row_w[:, k, None] * coarse[rows + k] for k in range(4))
    return sum(col_w[None, :, k] * along_y[:, cols + k] for k in range(4))


def _bspline_weights(n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First knot (n,) and the four cubic B-spline weights (n, 4) of pixels 0..n-1, rows of unit norm."""
    t = np.arange(n) / scale
    first = np.floor(t).astype(np.intp)
    f = (t - first)[:, None]
    weights = np.hstack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6
    return first, weights / np.linalg.norm(weights, axis=1, keepdims=True)


def _cell_content(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Per-pixel cell content: a random level per cell, texture, dimming towards the outlines.

    Outlines include the contacts between cells, so touching cells are separated by a dip.
    """
    level = np.concatenate([[0.0], rng.uniform(0.5, 1.0, int(labels.max()))])
    outlines = np.zeros(labels.shape, dtype=bool)
    for here, there, where in _neighbour_views(labels, outlines):
        where |= (here > 0) & (here != there)
    depth = ndi.distance_transform_edt(~outlines & (labels > 0))
    texture = 1 + 0.15 * _smooth_noise(rng, labels.shape, scale=3.0)
    return level[labels] * texture * (1 - 0.45 * np.exp(-depth / 2.5))


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uneven illumination: a smooth field between about 0.6 and 1.4 of the mean."""
    return np.exp(0.15 * _smooth_noise(rng, shape, scale=max(shape) / 2))


def _camera(rng: np.random.Generator, intensity: np.ndarray, photons: float, blur: float) -> np.ndarray:
    """Blur, Poisson shot noise for ``photons`` per unit intensity, read noise, offset: uint16."""
    expected = photons * np.clip(ndi.gaussian_filter(intensity, blur), 0, None)
    counts = rng.poisson(expected) + rng.normal(100.0, 3.0, intensity.shape)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _fluorescence(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    intensity = (0.04 + _cell_content(rng, labels)) * _illumination(rng, labels.shape)
    return _camera(rng, intensity, photons=rng.uniform(150, 600), blur=rng.uniform(0.8, 1.5))


def _phase_contrast(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    thickness = _cell_content(rng, labels)
    halo = thickness - ndi.gaussian_filter(thickness, rng.uniform(3.0, 5.0))
    intensity = (0.5 - 0.4 * halo - 0.1 * thickness) * _illumination(rng, labels.shape)
    return _camera(rng, intensity, photons=rng.uniform(1500, 4000), blur=rng.uniform(0.7, 1.1))
