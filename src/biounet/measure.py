"""Measuring segmented objects: one row per object (area, centroid, bounding box, mean intensity), and CSV tables.

:func:`measure_objects` wraps :func:`skimage.measure.regionprops_table` for arrays in memory
and computes the same columns chunk by chunk for Dask arrays (labels larger than memory,
such as the streamed ``*_labels.ome.zarr`` of ``biounet predict``); :func:`write_objects_csv`
writes the table. ``biounet predict --measure`` writes ``<stem>_objects.csv`` with them.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import InputError
from biounet.io._files import PathLike, atomic_write

log = logging.getLogger(__name__)

#: The per-object properties of :func:`measure_objects` (scikit-image's names).
PROPERTIES = ("label", "area", "centroid", "bbox", "intensity_mean")


def measure_objects(
    labels: Any,
    image: Any = None,
    *,
    spatial_dims: int | None = None,
    stack_axes: str | None = None,
) -> dict[str, np.ndarray]:
    """One row per object of ``labels``: label, area, centroid, bounding box, mean intensity.

    Parameters
    ----------
    labels : ndarray or dask array of integers
        ``(*stack, *spatial)``: 0 is background, every other value one object. A stack of
        2D planes (``spatial_dims=2``) is measured plane by plane, so an object never spans
        two planes and a label may repeat in another plane.
    image : ndarray or dask array, optional
        The intensities: the shape of ``labels``, or that shape and a last axis of channels.
        Without it there are no intensity columns.
    spatial_dims : {2, 3}, optional
        How many trailing axes are the object's space (default: all axes of ``labels``, which
        must then be 2 or 3).
    stack_axes : str, optional
        One letter per stack axis (e.g. ``"Z"``, ``"T"``: tifffile's letters), naming their
        index columns; unnamed by default (``index_0``, ...).

    Returns
    -------
    dict of str to ndarray
        Columns in this order, one value per object, rows sorted by stack index and label:

        * one integer index column per stack axis, named by its lower-case letter (``z``,
          ``t``; ``index_<i>`` for unnamed or repeated letters);
        * ``label``; ``area`` (pixels, or voxels);
        * ``centroid_<axis>`` per spatial axis (``y``, ``x``, and ``z`` first in 3D): the
          mean pixel coordinate, in pixels;
        * ``bbox_min_<axis>``, ``bbox_max_<axis>``: the bounding box, minimum included and
          maximum excluded (so ``labels[bbox_min_y:bbox_max_y, bbox_min_x:bbox_max_x]``
          holds the object);
        * ``intensity_mean`` (one channel) or ``intensity_mean_<c>`` per channel ``c``: the
          mean of ``image`` over the object's pixels.

    Notes
    -----
    Arrays in memory go through :func:`skimage.measure.regionprops_table` plane by plane;
    Dask arrays are reduced chunk by chunk (per chunk sums, counts, minima and maxima per
    object, merged), one pass over ``labels`` and ``image`` with memory bounded by the chunks
    and the number of objects. Both give the same values (to float64 rounding of the means).
    """
    lazy = hasattr(labels, "__dask_graph__") or hasattr(image, "__dask_graph__")
    labels_shape = tuple(labels.shape)
    spatial_dims = len(labels_shape) if spatial_dims is None else spatial_dims
    if spatial_dims not in (2, 3) or len(labels_shape) < spatial_dims:
        raise InputError(f"labels: need 2 or 3 spatial axes after any stack axes, got shape {labels_shape} with "
                         f"spatial_dims={spatial_dims}")  # fmt: skip
    if np.dtype(labels.dtype).kind not in "biu":
        raise InputError(f"labels: must be integers, got {labels.dtype}")
    channels = None
    if image is not None:
        image_shape = tuple(image.shape)
        if image_shape != labels_shape and image_shape[:-1] != labels_shape:
            raise InputError(f"image: shape {image_shape} must be the labels' {labels_shape}, or that and a last "
                             "axis of channels")  # fmt: skip
        if np.dtype(image.dtype).kind not in "biuf":
            raise InputError(f"image: must hold real numbers, got {image.dtype}")
        channels = image_shape[-1] if image_shape != labels_shape else None
    n_stack = len(labels_shape) - spatial_dims
    columns = _column_names(n_stack, spatial_dims, stack_axes, image is not None, channels)
    if lazy:
        table = _measure_chunked(labels, image, n_stack, spatial_dims, channels)
    else:
        table = _measure_in_memory(np.asarray(labels), None if image is None else np.asarray(image), n_stack,
                                   spatial_dims, channels)  # fmt: skip
    return dict(zip(columns, table, strict=True))


def _column_names(
    n_stack: int, spatial_dims: int, stack_axes: str | None, intensity: bool, channels: int | None
) -> list[str]:
    if stack_axes is not None and len(stack_axes) != n_stack:
        raise InputError(f"stack_axes: {stack_axes!r} names {len(stack_axes)} axes, the labels have {n_stack} stack "
                         "axes")  # fmt: skip
    letters = [a.lower() for a in (stack_axes or "")]
    named = bool(letters) and len(set(letters)) == len(letters) and not set(letters) & {"q", "i", "y", "x"}
    spatial = "zyx"[3 - spatial_dims :]
    names = letters if named else [f"index_{i}" for i in range(n_stack)]
    names += ["label", "area", *(f"centroid_{a}" for a in spatial)]
    names += [f"bbox_min_{a}" for a in spatial] + [f"bbox_max_{a}" for a in spatial]
    if intensity:
        names += ["intensity_mean"] if channels is None else [f"intensity_mean_{c}" for c in range(channels)]
    return names


def _measure_in_memory(
    labels: np.ndarray, image: np.ndarray | None, n_stack: int, spatial_dims: int, channels: int | None
) -> list[np.ndarray]:
    from skimage.measure import regionprops_table

    stack_shape = labels.shape[:n_stack]
    n_intensity = 0 if image is None else channels or 1
    parts: list[list[np.ndarray]] = []
    for index in np.ndindex(stack_shape):
        plane = labels[index]
        props = ("label", "area", "centroid", "bbox") + (("intensity_mean",) if image is not None else ())
        table = regionprops_table(plane, None if image is None else image[index], properties=props)
        rows = len(table["label"])
        part = [np.full(rows, i, np.int64) for i in index]
        part += [table["label"].astype(np.int64), table["area"].astype(np.int64)]
        part += [table[f"centroid-{k}"].astype(np.float64) for k in range(spatial_dims)]
        part += [table[f"bbox-{k}"].astype(np.int64) for k in range(2 * spatial_dims)]
        if n_intensity == 1:
            part.append(table["intensity_mean"].astype(np.float64))
        elif n_intensity:
            part += [table.get(f"intensity_mean-{c}", np.zeros(0)).astype(np.float64) for c in range(n_intensity)]
        parts.append(part)
    n_columns = n_stack + 2 + 3 * spatial_dims + n_intensity
    return [np.concatenate([p[k] for p in parts]) for k in range(n_columns)]


#: Labels fit in 32 bits (uint32 label images): the object key is ``stack index * 2**32 + label``.
_LABEL_BITS = 32


def _measure_chunked(labels: Any, image: Any, n_stack: int, spatial_dims: int, channels: int | None) -> list[np.ndarray]:
    import dask
    import dask.array as da

    labels = labels if hasattr(labels, "__dask_graph__") else da.from_array(np.asarray(labels))
    if image is not None:
        image = image if hasattr(image, "__dask_graph__") else da.from_array(np.asarray(image))
        image = image.rechunk(labels.chunks + ((channels,),) if channels is not None else labels.chunks)
    stack_shape = labels.shape[:n_stack]
    if math.prod(stack_shape) >= 2 ** (63 - _LABEL_BITS):
        raise InputError(f"labels: {math.prod(stack_shape)} stack planes are too many to measure")
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in labels.chunks]
    label_blocks = labels.to_delayed()
    image_blocks = None if image is None else image.to_delayed()
    tasks = []
    for block in np.ndindex(labels.numblocks):
        offset = tuple(int(starts[axis][i]) for axis, i in enumerate(block))
        pixels = None if image_blocks is None else image_blocks[block + ((0,) if channels is not None else ())]
        tasks.append(dask.delayed(_block_sums)(label_blocks[block], pixels, offset, stack_shape, spatial_dims))
    partial = [p for p in dask.compute(*tasks) if p is not None]
    return _merge_sums(partial, stack_shape, spatial_dims, 0 if image is None else channels or 1)


def _block_sums(
    labels: np.ndarray, image: np.ndarray | None, offset: tuple[int, ...], stack_shape: tuple[int, ...],
    spatial_dims: int,
) -> tuple[np.ndarray, ...] | None:  # fmt: skip
    """Per object of one block: key, pixel count, coordinate sums, minima, maxima, intensity sums."""
    labels = np.asarray(labels)
    where = np.nonzero(labels)
    if not where[0].size:
        return None
    n_stack = len(stack_shape)
    values = labels[where].astype(np.int64)
    coords = [c.astype(np.int64) + o for c, o in zip(where, offset, strict=True)]
    plane = np.ravel_multi_index(coords[:n_stack], stack_shape) if n_stack else np.zeros_like(values)
    keys, inverse = np.unique((plane << _LABEL_BITS) + values, return_inverse=True)
    n = keys.size
    space = coords[n_stack:]
    count = np.bincount(inverse, minlength=n)
    sums = np.stack([np.bincount(inverse, weights=c, minlength=n) for c in space])
    lows = np.full((spatial_dims, n), np.iinfo(np.int64).max)
    highs = np.full((spatial_dims, n), -1)
    for axis, c in enumerate(space):
        np.minimum.at(lows[axis], inverse, c)
        np.maximum.at(highs[axis], inverse, c)
    if image is None:
        intensity = np.zeros((0, n))
    else:
        pixels = np.asarray(image)[where].astype(np.float64)
        pixels = pixels.reshape(pixels.shape[0], -1)
        intensity = np.stack([np.bincount(inverse, weights=pixels[:, c], minlength=n) for c in range(pixels.shape[1])])
    return keys, count, sums, lows, highs, intensity


def _merge_sums(
    partial: list[tuple[np.ndarray, ...]], stack_shape: tuple[int, ...], spatial_dims: int, n_intensity: int
) -> list[np.ndarray]:
    n_stack = len(stack_shape)
    if not partial:
        return [np.zeros(0, np.int64)] * (n_stack + 2) + [np.zeros(0)] * spatial_dims + \
            [np.zeros(0, np.int64)] * (2 * spatial_dims) + [np.zeros(0)] * n_intensity  # fmt: skip
    keys, inverse = np.unique(np.concatenate([p[0] for p in partial]), return_inverse=True)
    n = keys.size
    count = np.bincount(inverse, weights=np.concatenate([p[1] for p in partial]), minlength=n).astype(np.int64)

    def total(k: int) -> np.ndarray:
        values = np.concatenate([p[k] for p in partial], axis=1)
        return np.stack([np.bincount(inverse, weights=row, minlength=n) for row in values]) if len(values) else values

    lows = np.full((spatial_dims, n), np.iinfo(np.int64).max)
    highs = np.full((spatial_dims, n), -1)
    for axis in range(spatial_dims):
        np.minimum.at(lows[axis], inverse, np.concatenate([p[3][axis] for p in partial]))
        np.maximum.at(highs[axis], inverse, np.concatenate([p[4][axis] for p in partial]))
    planes = np.unravel_index(keys >> _LABEL_BITS, stack_shape) if n_stack else ()
    columns = [np.asarray(i, np.int64) for i in planes]
    columns += [keys & ((1 << _LABEL_BITS) - 1), count]
    columns += list(total(2) / count)
    columns += list(lows) + list(highs + 1)
    columns += list(total(5) / count) if n_intensity else []
    return columns


def write_objects_csv(path: PathLike, table: Mapping[str, np.ndarray]) -> Path:
    """Write a table of columns (as :func:`measure_objects` returns) to a CSV file atomically.

    One header row with the column names, then one row per object; integers are written as
    integers, floats in their shortest exact form (``repr``), so reading the file back gives
    the same float64 values.
    """
    columns = [np.asarray(v) for v in table.values()]
    if len({c.shape for c in columns}) > 1 or any(c.ndim != 1 for c in columns):
        raise InputError(f"{path}: every column must be 1D and of one length, got shapes {[c.shape for c in columns]}")
    rows = zip(*(c.tolist() for c in columns), strict=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        writer.writerows(rows)
    log.debug("%s: %d object(s)", path, len(columns[0]) if columns else 0)
    return Path(path)
