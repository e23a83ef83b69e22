"""Lazy opening of images larger than memory (TIFF and OME-Zarr as Dask arrays) and their intensity percentiles."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from biounet.errors import InputError
from biounet.io._intensity import Background, check_background, oriented_range
from biounet.io._pixel_size import ngff_unit, tiff_pixel_size
from biounet.io._zarr import is_zarr

log = logging.getLogger(__name__)


#: Percentiles are exact up to this many pixels per image and channel; beyond it, float
#: images are sampled on a regular grid of at most this many pixels (8- and 16-bit images
#: stay exact: their percentiles come from a streamed histogram).
MAX_EXACT_PERCENTILE_PIXELS = 2**24


_AXIS_LETTER = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


@dataclass(frozen=True)
class LazyImage:
    """An image opened without reading its pixels.

    Attributes
    ----------
    array : dask.array.Array
        The pixels, read chunk by chunk on demand.
    axes : str
        One tifffile letter per axis (``Y``, ``X``, ``Z``, ``C``, ``T``, ``Q`` unknown).
    zarr_format : int or None
        2 or 3 for Zarr inputs, None otherwise.
    scale : dict of str to float
        Pixel size per axis letter (``"X"``, ``"Y"``, ``"Z"``, ``"T"``) from OME-Zarr, OME-TIFF
        or ImageJ metadata (empty if unknown).
    units : dict of str to str
        The unit of each axis in ``scale`` that has one, by its NGFF name (``"micrometer"``).
    """

    array: da.Array
    axes: str
    zarr_format: int | None = None
    scale: dict[str, float] | None = None
    units: dict[str, str] | None = None


class _TiffRegions:
    """Regions of a TIFF's first series, read through tifffile's Zarr store (tile by tile).

    Picklable: only the path travels; each process opens the file on first use (two
    threads may both open it; both stores read the same pixels).
    """

    def __init__(self, path: Path) -> None:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: the TIFF holds no image series")
            series = tif.series[0]
            self.shape, self.dtype, self.axes = tuple(series.shape), np.dtype(series.dtype), series.axes
            self.scale, self.units = tiff_pixel_size(tif)
        self.path = path
        self.ndim = len(self.shape)
        self._array: zarr.Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._array is None:
            import tifffile

            self._array = zarr.open(tifffile.imread(self.path, aszarr=True, series=0, level=0), mode="r")
        return np.asarray(self._array[index])


def open_image(path: str | Path) -> LazyImage:
    """Open a Zarr array, an OME-Zarr image or a TIFF without reading its pixels.

    Parameters
    ----------
    path : str or Path
        A Zarr v2 or v3 array; an OME-Zarr (NGFF 0.4 or 0.5) image group, of which the first
        (full-resolution) multiscale level is read; or a TIFF file, read tile by tile (or
        strip by strip) through tifffile's Zarr store.

    Returns
    -------
    LazyImage
        Axes come from the NGFF ``axes``, the xarray ``_ARRAY_DIMENSIONS`` attribute or the
        TIFF metadata; otherwise ``Q...YX``.

    Raises
    ------
    ValueError
        If the path is missing or not a readable image; the message names it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if is_zarr(path):
            return _open_zarr(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            reader = _TiffRegions(path)
            chunks = tuple(1024 if a in "YX" else -1 if a in "CS" else 1 for a in reader.axes)
            array = da.from_array(reader, chunks=chunks, meta=np.empty((0,) * reader.ndim, reader.dtype))
            return LazyImage(array, reader.axes, scale=reader.scale, units=reader.units)
    except ValueError as exc:
        raise InputError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    except Exception as exc:  # corrupt files raise whatever the decoder raises
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    raise InputError(f"{path}: not a Zarr array, OME-Zarr image or TIFF file")


def _open_zarr(path: Path) -> LazyImage:
    """A Zarr array, or the first dataset of an OME-Zarr image group, with its axes and scale.

    Reads ``multiscales`` itself, not through ome-zarr-models: that validates only NGFF 0.4
    and 0.5 and refuses the older metadata (0.1-0.3, axes as plain names) read here.
    """
    node = zarr.open(str(path), mode="r")
    zarr_format = node.metadata.zarr_format
    scale: dict[str, float] = {}
    units: dict[str, str] = {}
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise InputError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata; give an array inside it")
        image = multiscales[0]
        dataset = image["datasets"][0]
        array = node[dataset["path"]]
        names = [axis["name"] if isinstance(axis, dict) else axis for axis in image.get("axes", [])]
        axes = "".join(_AXIS_LETTER.get(str(n).lower(), "Q") for n in names)
        for transform in dataset.get("coordinateTransformations", []):
            if transform.get("type") == "scale" and len(transform.get("scale", [])) == len(axes):
                scale = {a: float(v) for a, v in zip(axes, transform["scale"], strict=True) if a in "TZYX"}
        for letter, axis in zip(axes, image.get("axes", []), strict=False):
            unit = ngff_unit(axis.get("unit")) if isinstance(axis, dict) else None
            if unit and letter in scale:
                units[letter] = unit
    else:
        array = node
        names = array.attrs.get("_ARRAY_DIMENSIONS") or getattr(array.metadata, "dimension_names", None)
        axes = "".join(_AXIS_LETTER.get(str(n).lower(), "Q") for n in names) if names else ""
    if not isinstance(array, zarr.Array):
        raise InputError(f"{path}: the OME-Zarr dataset is not an array")
    if len(axes) != array.ndim:
        axes = "Q" * (array.ndim - 2) + "YX"
    return LazyImage(da.from_zarr(array), axes, zarr_format, scale, units)


def intensity_percentiles(
    items: da.Array, low: float, high: float, *, max_pixels: int = MAX_EXACT_PERCENTILE_PIXELS,
    background: Background = "as-is",
) -> np.ndarray:  # fmt: skip
    """The ``low`` and ``high`` percentiles of every item and channel of (items, channels, *spatial).

    The values equal ``numpy.percentile`` (linear interpolation) over each whole item and
    channel, as :func:`biounet.io.normalize_percentile` takes them, without loading the
    image: 8- and 16-bit integer (and boolean) images through a histogram summed chunk by
    chunk (exact at any size); other types exactly up to ``max_pixels`` pixels, beyond that
    on the regular sub-grid with step ``ceil((n / max_pixels) ** (1 / d))`` along each of the
    ``d`` spatial axes (a deterministic sample of at most ``max_pixels`` pixels).
    With ``background="dark"`` the pair is swapped, ``(high, low)``, for an item and channel
    whose background is bright (:func:`biounet.io.has_bright_background`, from its median):
    :func:`biounet.io.rescale_intensity` then inverts it, as
    :func:`biounet.io.normalize_percentile` does; with ``"inverted"`` for every item and channel.

    Returns
    -------
    ndarray of float64, shape (items, channels, 2)
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"intensity_percentiles: need 0 <= low < high <= 100, got low={low}, high={high}")
    if items.ndim < 3:
        raise InputError(f"intensity_percentiles: items must be (items, channels, *spatial), got shape {items.shape}")
    check_background(background)
    quantiles = (low, 50.0, high)
    if items.dtype.kind in "biu" and items.dtype.itemsize <= 2:
        values = _percentiles_from_histogram(items, quantiles)
    else:
        values = _percentiles_of_sample(items, quantiles, max_pixels)
    lo, hi = oriented_range(values[..., 0], values[..., 1], values[..., 2], background)
    return np.stack([lo, hi], axis=-1)


def _percentiles_of_sample(items: da.Array, quantiles: Sequence[float], max_pixels: int) -> np.ndarray:
    pixels = math.prod(items.shape[2:])
    step = math.ceil((pixels / max_pixels) ** (1 / (items.ndim - 2)) - 1e-9) if pixels > max_pixels else 1
    if step > 1:
        log.info("percentiles from a grid sample with step %d (%d px per item and channel)", step, pixels)
    out = np.empty((*items.shape[:2], len(quantiles)))
    for n in range(items.shape[0]):
        sample = items[(n, slice(None), *(slice(None, None, step),) * (items.ndim - 2))].compute()
        sample = sample.reshape(sample.shape[0], -1).astype(np.float32, copy=False)
        if not np.isfinite(sample).all():
            raise InputError("image: has NaN or infinite pixels")
        out[n] = np.percentile(sample, list(quantiles), axis=1).T
    return out


def _percentiles_from_histogram(items: da.Array, quantiles: Sequence[float]) -> np.ndarray:
    info = np.iinfo(items.dtype) if items.dtype.kind != "b" else np.iinfo(np.uint8)
    bins = int(info.max) - int(info.min) + 1
    spatial = items.ndim - 2
    counts = items.map_blocks(
        _block_histogram, int(info.min), bins, dtype=np.int64, new_axis=items.ndim,
        chunks=(*items.chunks[:2], *((1,) * len(c) for c in items.chunks[2:]), (bins,)),
    ).sum(axis=tuple(range(2, 2 + spatial))).compute()  # fmt: skip
    values = np.arange(int(info.min), int(info.max) + 1, dtype=np.float64)
    out = np.empty((*items.shape[:2], len(quantiles)))
    for index in np.ndindex(*items.shape[:2]):
        out[index] = [_percentile_of_histogram(counts[index], values, q) for q in quantiles]
    return out


def _block_histogram(block: np.ndarray, first: int, bins: int) -> np.ndarray:
    flat = block.reshape(*block.shape[:2], -1).astype(np.int64) - first
    hist = np.stack([np.stack([np.bincount(c, minlength=bins) for c in item]) for item in flat])
    return hist.reshape(*block.shape[:2], *(1,) * (block.ndim - 2), bins)


def _percentile_of_histogram(counts: np.ndarray, values: np.ndarray, q: float) -> float:
    """``numpy.percentile(data, q)`` (method "linear") of the data whose histogram is ``counts``."""
    cumulative = np.cumsum(counts)
    quantile = q / 100.0
    position = cumulative[-1] * quantile + (1 - quantile) - 1  # numpy's virtual index (alpha = beta = 1)
    below = math.floor(position)
    fraction = position - below
    a, b = (values[np.searchsorted(cumulative, k, side="right")] for k in (below, min(below + 1, cumulative[-1] - 1)))
    return float(b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction)  # numpy's _lerp
