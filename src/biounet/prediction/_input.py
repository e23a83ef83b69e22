"""Arranging an image as the network's input items and normalising them as the model was trained."""

from __future__ import annotations

import numpy as np

from biounet.errors import InputError
from biounet.io._intensity import Background, normalize_percentile, rescale_intensity
from biounet.model import UNet, UNetConfig


def model_items(image: np.ndarray, config: UNetConfig, channel_axis: int | None = None) -> tuple[np.ndarray, bool]:
    """Arrange ``image`` as (items, channels, *spatial) without converting it; say whether it was a stack.

    2D models take a 2D image ``(Y, X)``, a stack ``(Z, Y, X)`` (segmented slice by slice)
    or either with a channel axis named by ``channel_axis``. 3D models take ``(Z, Y, X)`` or
    ``(Z, Y, X)`` with a channel axis. The channel axis is never guessed. A dask array
    stays a lazy dask array (the out-of-core predictor arranges its input here too).
    """
    arr = image if hasattr(image, "__dask_graph__") else np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"image: unsupported pixel type {arr.dtype}; expected integers or floats")
    if arr.size == 0:
        raise InputError(f"image: empty image of shape {arr.shape}")
    if channel_axis is None:
        if config.in_channels != 1:
            raise InputError(
                f"image: the model takes {config.in_channels} channels; say which axis holds them (channel_axis)"
            )
        arr = np.expand_dims(arr, 0)
        channel_axis = 0
    elif not -arr.ndim <= channel_axis < arr.ndim:
        raise InputError(f"channel_axis={channel_axis} is out of range for an image of shape {arr.shape}")
    arr = np.moveaxis(arr, channel_axis, 0)
    if arr.shape[0] != config.in_channels:
        raise InputError(
            f"image: {arr.shape[0]} channels on axis {channel_axis}, but the model takes {config.in_channels}"
        )
    spatial = arr.ndim - 1
    if spatial == config.dims:
        return arr[None], False
    if spatial == config.dims + 1:
        return np.moveaxis(arr, 1, 0), True
    expected = "(Y, X) or a stack (Z, Y, X)" if config.dims == 2 else "(Z, Y, X)"
    raise InputError(f"image: shape {np.shape(image)} does not fit a {config.dims}D model; expected {expected}")


def as_model_input(image: np.ndarray, config: UNetConfig, channel_axis: int | None = None) -> tuple[np.ndarray, bool]:
    """Bring ``image`` to (items, channels, *spatial) float32 (see :func:`model_items`); say whether it was a stack."""
    items, stacked = model_items(image, config, channel_axis)
    data = items.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError("image: has NaN or infinite pixels")
    return data, stacked


def normalize_items(
    items: np.ndarray, normalization: tuple[float, float] | None, intensity_range: np.ndarray | None = None,
    background: Background = "as-is",
) -> np.ndarray:  # fmt: skip
    """Percentile-normalise each item and channel of (items, channels, *spatial) on its own.

    ``background`` is the model's (:attr:`biounet.ModelInfo.background`): ``"dark"`` inverts
    the items with a bright background, as :func:`biounet.io.normalize_percentile` does. With
    ``intensity_range`` (``(channels, 2)``: the values to map to 0 and 1 per channel,
    measured beforehand, e.g. over a whole image that is predicted chunk by chunk, and
    already swapped where an image is to be inverted) those values are used instead of the
    percentiles of ``items``: ``(x - low) / (high - low)`` as in
    :func:`biounet.io.rescale_intensity`.
    """
    if normalization is None:
        return items
    if intensity_range is None:
        spatial = tuple(range(2, items.ndim))
        return normalize_percentile(items, normalization[0], normalization[1], axis=spatial, background=background)
    shape = (1, -1) + (1,) * (items.ndim - 2)
    low, high = (np.asarray(intensity_range, np.float64)[:, k].reshape(shape) for k in (0, 1))
    return rescale_intensity(items, low, high)


def check_intensity_range(intensity_range: object, channels: int) -> np.ndarray | None:
    if intensity_range is None:
        return None
    values = np.asarray(intensity_range, dtype=np.float64)
    if values.shape == (2,):
        values = np.tile(values, (channels, 1))
    if values.shape != (channels, 2) or not np.isfinite(values).all():
        raise InputError(
            f"intensity_range: expected finite (low, high) values of shape (2,) or ({channels}, 2), "
            f"got shape {np.shape(intensity_range)}"
        )
    return values


def check_context(context: object, dims: int) -> list[tuple[int, int]]:
    if context is None:
        return [(0, 0)] * dims
    pairs = [tuple(int(v) for v in pair) for pair in context]  # type: ignore[union-attr]
    if len(pairs) != dims or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise InputError(f"context: expected {dims} pairs (before, after) of non-negative ints, got {context!r}")
    return pairs  # type: ignore[return-value]


def converts_to_luminance(model: UNet, n_channels: int) -> bool:
    """Whether ``model`` turns an image of ``n_channels`` channels into its luminance (``model.info.color``).

    Only RGB (3 channels) into a 1-channel network; every other mismatch is an error of the caller's.
    """
    return model.info.color == "luminance" and model.config.in_channels == 1 and n_channels == 3
