"""Intensity scaling: percentile normalisation (the network's input) and 8-bit display."""

from __future__ import annotations

from typing import Literal

import numpy as np

from biounet.errors import InputError

#: What normalisation does to the polarity of an image: ``"as-is"`` keeps it; ``"dark"`` inverts
#: the images whose background is bright (:func:`has_bright_background`), so that the network
#: sees every image with bright objects on a dark background; ``"inverted"`` inverts every image
#: (a model for bright-background images only, such as a bioimage.io package of a ``"dark"``
#: model made for them: ``biounet.export_model(background="bright")``).
Background = Literal["as-is", "dark", "inverted"]
BACKGROUNDS: tuple[str, ...] = ("as-is", "dark", "inverted")
#: An image has a bright background when its median lies above this fraction of the way from its
#: low to its high percentile (see :func:`has_bright_background`).
BRIGHT_BACKGROUND_MEDIAN = 0.25


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, axis: int | tuple[int, ...] | None = None,
    background: Background = "as-is",
) -> np.ndarray:  # fmt: skip
    """Scale intensities so that the ``low`` and ``high`` percentiles map to 0 and 1.

    ``out = (x - p_low) / max(p_high - p_low, eps)`` in float32, not clipped (as in CSBDeep
    and StarDist). With ``axis`` the percentiles are taken over those axes only (e.g. the
    spatial axes, so that each channel is scaled on its own). A constant image becomes 0.
    With ``background="dark"`` an image (or channel) with a bright background
    (:func:`has_bright_background`) is inverted, ``out = (p_high - x) / (p_high - p_low)``:
    its high percentile maps to 0 and its low one to 1; ``background="inverted"`` inverts
    every image so.

    Raises
    ------
    ValueError
        If ``0 <= low < high <= 100`` does not hold or the image has non-finite pixels.
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"normalize_percentile: need 0 <= low < high <= 100, got low={low}, high={high}")
    check_background(background)
    image = np.asarray(image)
    data = image.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError("normalize_percentile: the image has NaN or infinite pixels")
    if background != "dark":  # no median needed
        lo, hi = np.percentile(data, [low, high], axis=axis, keepdims=axis is not None)
        lo, hi = oriented_range(lo, None, hi, background)
    else:
        lo, median, hi = np.percentile(data, [low, 50.0, high], axis=axis, keepdims=axis is not None)
        lo, hi = oriented_range(lo, median, hi, background)
    return rescale_intensity(data, lo, hi)


def check_background(background: object) -> None:
    if background not in BACKGROUNDS:
        raise InputError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")


def has_bright_background(low: np.ndarray | float, median: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
    """Whether an image's background is bright, from its low, median and high percentile values.

    ``median - low > 0.25 (high - low)`` (:data:`BRIGHT_BACKGROUND_MEDIAN`): the background
    covers most of a microscopy image, so the median is a background value; it lies near the
    low percentile when the objects are bright on a dark background (fluorescence) and far
    from it when they are dark on a bright one (brightfield, H&E). On the 120 images of the
    DSB 2018 subset of ``docs/results.md``, after luminance and percentiles 1 and 99.8, the
    median lies at 0.00-0.09 of the range on all 85 fluorescence images and at 0.45-0.95 on
    all 35 brightfield and H&E images.
    """
    return np.asarray(median) - low > BRIGHT_BACKGROUND_MEDIAN * (np.asarray(high) - low)


def oriented_range(
    low: np.ndarray | float, median: np.ndarray | float | None, high: np.ndarray | float, background: Background
) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` to map to 0 and 1: swapped where ``background="dark"`` and the background is
    bright, swapped everywhere for ``"inverted"``, as they are for ``"as-is"`` (``median`` is read
    for ``"dark"`` only)."""
    low, high = np.asarray(low), np.asarray(high)
    if background == "as-is":
        return low, high
    if background == "inverted":
        return high, low
    bright = has_bright_background(low, median, high)
    return np.where(bright, high, low), np.where(bright, low, high)


def rescale_intensity(data: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
    """``(x - low) / (high - low)`` in float32: ``low`` maps to 0, ``high`` to 1, not clipped.

    ``low > high`` inverts the image. Where ``|high - low| < 1e-12`` the divisor is ``1e-12``
    (a constant image becomes 0).
    """
    diff = np.asarray(high) - low
    scale = np.where(np.abs(diff) < 1e-12, np.asarray(1e-12, dtype=diff.dtype), diff)
    return ((data - low) / scale).astype(np.float32, copy=False)


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map an image to uint8 for display, by percentiles, clipped."""
    scaled = normalize_percentile(image, low, high)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
