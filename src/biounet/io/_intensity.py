"""Intensity scaling: percentile normalisation (the network's input) and 8-bit display."""

from __future__ import annotations

import numpy as np

from biounet.errors import InputError


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, axis: int | tuple[int, ...] | None = None
) -> np.ndarray:
    """Scale intensities so that the ``low`` and ``high`` percentiles map to 0 and 1.

    ``out = (x - p_low) / max(p_high - p_low, eps)`` in float32, not clipped (as in CSBDeep
    and StarDist). With ``axis`` the percentiles are taken over those axes only (e.g. the
    spatial axes, so that each channel is scaled on its own). A constant image becomes 0.

    Raises
    ------
    ValueError
        If ``0 <= low < high <= 100`` does not hold or the image has non-finite pixels.
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"normalize_percentile: need 0 <= low < high <= 100, got low={low}, high={high}")
    image = np.asarray(image)
    data = image.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError("normalize_percentile: the image has NaN or infinite pixels")
    lo, hi = np.percentile(data, [low, high], axis=axis, keepdims=axis is not None)
    return rescale_intensity(data, lo, hi)


def rescale_intensity(data: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
    """``(x - low) / max(high - low, 1e-12)`` in float32: ``low`` maps to 0, ``high`` to 1, not clipped."""
    scale = np.maximum(np.asarray(high) - low, np.float32(1e-12))
    return ((data - low) / scale).astype(np.float32, copy=False)


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map an image to uint8 for display, by percentiles, clipped."""
    scaled = normalize_percentile(image, low, high)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
