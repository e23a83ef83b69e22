"""Pictures for people: instance labels drawn over an image."""

from __future__ import annotations

import numpy as np

from biounet.errors import InputError
from biounet.io._intensity import to_uint8


def label_overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.35) -> np.ndarray:
    """RGB uint8 picture of ``labels`` over a gray ``image``: tinted objects, bright outlines.

    Objects get the colours of matplotlib's "tab20" map (its ten dark shades, then the ten light
    ones, cycled), so the same label always has the same colour and labels 1-10 have ten
    different hues; outlines are drawn on the object's own boundary pixels.
    """
    from skimage.segmentation import find_boundaries

    if image.shape[:2] != labels.shape:
        raise InputError(f"label_overlay: image shape {image.shape} does not match labels shape {labels.shape}")
    gray = to_uint8(image if image.ndim == 2 else image.mean(axis=-1)).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    palette = _palette(int(labels.max()) + 1)
    colours = palette[labels]
    inside = labels > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colours[inside]
    edges = find_boundaries(labels, mode="inner") & inside
    rgb[edges] = colours[edges]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    """RGB (0-255) of labels ``0..n-1``: matplotlib's "tab20", dark shades then light ones, cycled; 0 is black."""
    import matplotlib

    table = np.asarray(matplotlib.colormaps["tab20"].colors, dtype=np.float32)[np.r_[0:20:2, 1:20:2]] * 255.0
    colours = table[(np.arange(n) - 1) % len(table)]
    colours[0] = 0.0  # background: never drawn
    return colours
