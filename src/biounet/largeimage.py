"""Out-of-core prediction: images larger than memory, chunk by chunk, with Dask and Zarr.

:func:`predict_dask` returns the class probabilities of an image of any size as a lazy
``dask.array``; :func:`predict_to_zarr` writes probabilities and instance labels to
OME-Zarr chunk by chunk, so peak memory is set by the chunk size, not by the image size;
:func:`open_image` opens Zarr arrays, OME-Zarr images and TIFFs without reading their pixels.
With a ``dask.distributed`` client active the same graph runs on a cluster.

How the result stays *exactly* that of :func:`biounet.predict` (valid padding):

* The image is mirror-padded with the in-memory predictor's rule
  (:func:`biounet.tiling.mirror_indices`, ``numpy.pad(mode="reflect")``). Dask's own
  ``boundary="reflect"`` repeats the edge pixel (``numpy``'s ``"symmetric"``) and would
  differ, so the padding is done here and ``map_overlap`` runs with ``boundary="none"``.
* Output chunks start and end at multiples of ``2**depth`` (the last one ends at the image
  end rounded up to one, the rounding filled by the same mirror), so every tile inside a
  chunk sees the max-pooling grid of the whole image.
* Each chunk reads the context of :func:`biounet.tiling.chunk_context` from its
  neighbours: the halo before it and ``halo + 4`` px after it for depth >= 3 (valid
  output sizes step by ``2**depth`` from 4 px).
* The intensity percentiles are measured once over the whole image
  (:func:`intensity_percentiles`) and handed to every chunk.

Instance labels are made consistent across chunk borders as in dask-image's ``label``:
each chunk is labelled on its own, the labels of foreground pixels that touch across a
chunk face are merged with a union-find (connected components of the graph of touching
pairs), and every chunk is relabelled through the resulting table, so one object keeps one
label. Objects are numbered 1..N per image (per plane of a stack), in the order of the
chunks and, inside a chunk, of the raster; the numbers differ from the in-memory
labelling, the objects do not.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.callbacks import Callback
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from biounet.inference import is_zarr
from biounet.io import atomic_folder
from biounet.model import UNet, UNetConfig
from biounet.tiling import (
    CompileMode, Precision, _check_intensity_range, chunk_context, mirror_indices, model_items, predict,
)  # fmt: skip

log = logging.getLogger(__name__)

#: Default output chunk per spatial axis, in pixels, for 2D and 3D models (rounded down to a
#: multiple of ``2**depth``).
DEFAULT_CHUNK_2D = 2048
DEFAULT_CHUNK_3D = 128
#: Percentiles are exact up to this many pixels per image and channel; beyond it, float
#: images are sampled on a regular grid of at most this many pixels (8- and 16-bit images
#: stay exact: their percentiles come from a streamed histogram).
MAX_EXACT_PERCENTILE_PIXELS = 2**24
#: Foreground threshold of 2-class models without one of their own, as in
#: :func:`biounet.postprocess.probabilities_to_labels`.
FOREGROUND_THRESHOLD = 0.5

#: Serialises compiled forward passes across Dask's worker threads.
_COMPILED_LOCK = threading.Lock()

_AXIS_LETTER = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


# ------------------------------------------------------------------------------------------
# Opening images lazily
# ------------------------------------------------------------------------------------------
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
        Pixel size per spatial axis letter, from OME-Zarr metadata (empty if unknown).
    """

    array: da.Array
    axes: str
    zarr_format: int | None = None
    scale: dict[str, float] | None = None


class _TiffRegions:
    """Regions of a TIFF's first series, read through tifffile's Zarr store (tile by tile).

    Picklable: only the path travels; each process opens the file on first use (two
    threads may both open it; both stores read the same pixels).
    """

    def __init__(self, path: Path) -> None:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError(f"{path}: the TIFF holds no image series")
            series = tif.series[0]
            self.shape, self.dtype, self.axes = tuple(series.shape), np.dtype(series.dtype), series.axes
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
        raise ValueError(f"{path}: no such file or folder")
    try:
        if is_zarr(path):
            return _open_zarr(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            reader = _TiffRegions(path)
            chunks = tuple(1024 if a in "YX" else -1 if a in "CS" else 1 for a in reader.axes)
            return LazyImage(da.from_array(reader, chunks=chunks, meta=np.empty((0,) * reader.ndim, reader.dtype)),
                             reader.axes)  # fmt: skip
    except ValueError as exc:
        raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    except Exception as exc:  # corrupt files raise whatever the decoder raises
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    raise ValueError(f"{path}: not a Zarr array, OME-Zarr image or TIFF file")


def _open_zarr(path: Path) -> LazyImage:
    node = zarr.open(str(path), mode="r")
    zarr_format = node.metadata.zarr_format
    scale: dict[str, float] = {}
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise ValueError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata; give an array inside it")
        image = multiscales[0]
        dataset = image["datasets"][0]
        array = node[dataset["path"]]
        names = [axis["name"] if isinstance(axis, dict) else axis for axis in image.get("axes", [])]
        axes = "".join(_AXIS_LETTER.get(str(n).lower(), "Q") for n in names)
        for transform in dataset.get("coordinateTransformations", []):
            if transform.get("type") == "scale" and len(transform.get("scale", [])) == len(axes):
                scale = {a: float(v) for a, v in zip(axes, transform["scale"], strict=True) if a in "ZYX"}
    else:
        array = node
        names = array.attrs.get("_ARRAY_DIMENSIONS") or getattr(array.metadata, "dimension_names", None)
        axes = "".join(_AXIS_LETTER.get(str(n).lower(), "Q") for n in names) if names else ""
    if not isinstance(array, zarr.Array):
        raise ValueError(f"{path}: the OME-Zarr dataset is not an array")
    if len(axes) != array.ndim:
        axes = "Q" * (array.ndim - 2) + "YX"
    return LazyImage(da.from_zarr(array), axes, zarr_format, scale)


# ------------------------------------------------------------------------------------------
# Normalisation over the whole image
# ------------------------------------------------------------------------------------------
def intensity_percentiles(
    items: da.Array, low: float, high: float, *, max_pixels: int = MAX_EXACT_PERCENTILE_PIXELS
) -> np.ndarray:
    """The ``low`` and ``high`` percentiles of every item and channel of (items, channels, *spatial).

    The values equal ``numpy.percentile`` (linear interpolation) over each whole item and
    channel, as :func:`biounet.io.normalize_percentile` takes them, without loading the
    image: 8- and 16-bit integer (and boolean) images through a histogram summed chunk by
    chunk (exact at any size); other types exactly up to ``max_pixels`` pixels, beyond that
    on the regular sub-grid with step ``ceil((n / max_pixels) ** (1 / d))`` along each of the
    ``d`` spatial axes (a deterministic sample of at most ``max_pixels`` pixels).

    Returns
    -------
    ndarray of float64, shape (items, channels, 2)
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"intensity_percentiles: need 0 <= low < high <= 100, got low={low}, high={high}")
    if items.ndim < 3:
        raise ValueError(f"intensity_percentiles: items must be (items, channels, *spatial), got shape {items.shape}")
    if items.dtype.kind in "biu" and items.dtype.itemsize <= 2:
        return _percentiles_from_histogram(items, (low, high))
    pixels = math.prod(items.shape[2:])
    step = math.ceil((pixels / max_pixels) ** (1 / (items.ndim - 2)) - 1e-9) if pixels > max_pixels else 1
    if step > 1:
        log.info("percentiles from a grid sample with step %d (%d px per item and channel)", step, pixels)
    out = np.empty((*items.shape[:2], 2))
    for n in range(items.shape[0]):
        sample = items[(n, slice(None), *(slice(None, None, step),) * (items.ndim - 2))].compute()
        sample = sample.reshape(sample.shape[0], -1).astype(np.float32, copy=False)
        if not np.isfinite(sample).all():
            raise ValueError("image: has NaN or infinite pixels")
        out[n] = np.percentile(sample, [low, high], axis=1).T
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
    out = np.empty((*items.shape[:2], 2))
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


# ------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkPlan:
    """How one spatial axis of ``size`` px is cut into output chunks.

    The padded axis holds ``margin`` mirrored px, then the output chunks ``chunks`` (all
    multiples of ``2**depth``, covering ``size`` rounded up to one), then ``margin`` px.
    """

    size: int
    margin: int
    chunks: tuple[int, ...]

    @property
    def padded_chunks(self) -> tuple[int, ...]:
        return (self.margin, *self.chunks, self.margin)


def plan_chunks(config: UNetConfig, size: int, chunk: int) -> ChunkPlan:
    """Output chunks along an axis: multiples of ``2**depth``, none smaller than the context.

    ``chunk`` is rounded down to a multiple of ``2**depth`` (and up to the context if it is
    smaller); the axis is covered up to ``size`` rounded up to a multiple of ``2**depth``; a
    last chunk smaller than the context is merged into the one before it.
    """
    if chunk < 1 or size < 1:
        raise ValueError(f"chunk and size must be positive, got chunk={chunk}, size={size}")
    stride = config.stride
    margin = max(chunk_context(config))
    smallest = -(-margin // stride) * stride
    chunk = max(chunk // stride * stride, smallest)
    length = max(-(-size // stride) * stride, smallest)
    chunks = [chunk] * (length // chunk) + ([length % chunk] if length % chunk else [])
    if len(chunks) > 1 and chunks[-1] < margin:
        rest = chunks.pop()
        chunks[-1] += rest
    return ChunkPlan(size, margin, tuple(chunks))


def predict_dask(
    model: UNet,
    image: np.ndarray | da.Array | zarr.Array,
    *,
    channel_axis: int | None = None,
    chunk: int | None = None,
    tile: int | Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | None = None,
    precision: Precision = "float32",
    intensity_range: np.ndarray | Sequence[float] | None = None,
    compile: bool | CompileMode = False,
) -> da.Array:
    """Class probabilities of an image of any size as a lazy dask array, chunk by chunk.

    Parameters
    ----------
    model : UNet
        The network (valid padding for results equal to :func:`biounet.predict`).
    image : array_like
        A numpy, dask or Zarr array laid out as for :func:`biounet.predict`: ``(Y, X)``, a
        stack ``(Z, Y, X)``, or either with a channel axis; ``(Z, Y, X)`` for 3D models.
        Never loaded whole.
    channel_axis : int, optional
        The axis holding the channels (required for multi-channel models).
    chunk : int, optional
        Output pixels per chunk and spatial axis (default 2048 for 2D, 128 for 3D models),
        rounded to a multiple of ``2**depth``. Memory per chunk grows with its square.
    tile, batch_size, device, precision, compile
        As for :func:`biounet.predict`, applied inside each chunk.
    intensity_range : array_like, optional
        ``(low, high)`` intensities (or one pair per channel) that the model's percentiles
        map to 0 and 1. Default: measured over the whole image first
        (:func:`intensity_percentiles`, one pass over the image).

    Returns
    -------
    dask.array.Array of float32
        ``(num_classes, *spatial)`` or ``(Z, num_classes, Y, X)`` for a stack; computing it
        (or storing it with ``dask.array.store``/``to_zarr``) runs the network chunk by
        chunk on the active Dask scheduler.

    Notes
    -----
    Each chunk carries :func:`biounet.tiling.chunk_context` px of its neighbours, read with
    ``dask.array.map_overlap``; see the module notes for why the result equals
    :func:`biounet.predict` to float32 rounding (valid padding). Test-time augmentation is
    not available here.
    """
    array = da.from_zarr(image) if isinstance(image, zarr.Array) else image
    array = array if hasattr(array, "__dask_graph__") else da.from_array(np.asarray(array))
    items, stacked = model_items(array, model.config, channel_axis)
    ranges = _ranges(model, items, intensity_range)
    prob = _predict_items(model, items, ranges, chunk=chunk, options=dict(
        tile=tile, batch_size=batch_size, device=device, precision=precision, compile=compile))  # fmt: skip
    return prob if stacked else prob[0]


def _ranges(model: UNet, items: da.Array, intensity_range: Any) -> np.ndarray | None:
    """(items, channels, 2) intensity ranges for the model's normalisation (None if it has none)."""
    if model.info.normalization is None:
        return None
    if intensity_range is None:
        return intensity_percentiles(items, *model.info.normalization)
    values = _check_intensity_range(intensity_range, items.shape[1])
    return np.broadcast_to(values, (items.shape[0], *values.shape))


def _predict_items(
    model: UNet, items: da.Array, ranges: np.ndarray | None, *, chunk: int | None, options: dict[str, Any]
) -> da.Array:
    """(items, classes, *spatial) probabilities of (items, channels, *spatial) pixels, lazily."""
    config = model.config
    if model.training:  # chunks run in parallel threads: none may switch a shared model's mode
        model = copy.deepcopy(model).eval()
    chunk = chunk or (DEFAULT_CHUNK_2D if config.dims == 2 else DEFAULT_CHUNK_3D)
    plans = [plan_chunks(config, size, chunk) for size in items.shape[2:]]
    padded = items
    for axis, plan in enumerate(plans, start=2):
        padded = _mirror_extend(padded, axis, plan.margin, sum(plan.padded_chunks) - plan.margin - plan.size)
    padded = padded.rechunk((1, -1, *(plan.padded_chunks for plan in plans)))
    before, after = chunk_context(config)
    spatial = range(2, items.ndim)
    prob = da.map_overlap(
        _predict_block,
        padded,
        depth={0: 0, 1: 0, **{axis: (before, after) for axis in spatial}},
        boundary="none",
        trim=False,
        allow_rechunk=False,
        chunks=(padded.chunks[0], (config.num_classes,), *padded.chunks[2:]),
        dtype=np.float32,
        meta=np.empty((0,) * items.ndim, np.float32),
        model=dask.delayed(model, pure=False, traverse=False),
        ranges=ranges,
        context=[(before, after)] * config.dims,
        options=options,
    )
    return prob[(slice(None), slice(None), *(slice(p.margin, p.margin + p.size) for p in plans))]


def _mirror_extend(array: da.Array, axis: int, before: int, after: int) -> da.Array:
    """Mirror-pad one axis of a dask array by the in-memory predictor's rule."""
    size = array.shape[axis]
    index = mirror_indices(size, before, after)
    parts = [da.take(array, index[:before], axis=axis), array, da.take(array, index[before + size :], axis=axis)]
    return da.concatenate(parts, axis=axis)


def _predict_block(
    window: np.ndarray,
    *,
    model: UNet,
    ranges: np.ndarray | None,
    context: list[tuple[int, int]],
    options: dict[str, Any],
    block_info: dict | None = None,
) -> np.ndarray:
    """Probabilities of one output chunk from its window (the chunk plus its context)."""
    assert block_info is not None
    where, grid = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    if any(k in (0, n - 1) for k, n in zip(where[2:], grid[2:], strict=True)):
        return np.zeros(block_info[None]["chunk-shape"], np.float32)  # a mirrored margin: sliced off, never computed
    item_range = None if ranges is None else ranges[where[0]]
    # torch.compile'd code (and its CUDA graphs) is not thread-safe: compiled chunks run one at a time
    with _COMPILED_LOCK if options.get("compile") else contextlib.nullcontext():
        prob = predict(model, window[0], channel_axis=0, intensity_range=item_range, context=context,
                       progress=False, **options)  # fmt: skip
    return prob[None]


# ------------------------------------------------------------------------------------------
# Labels consistent across chunks
# ------------------------------------------------------------------------------------------
def _label_block(foreground: np.ndarray, *, spatial_dims: int) -> np.ndarray:
    """Face-connected components of each item of a chunk (items first), labelled 1..n locally."""
    flat = foreground.reshape(-1, *foreground.shape[-spatial_dims:])
    structure = ndimage.generate_binary_structure(spatial_dims, 1)
    labels = np.stack([ndimage.label(item, structure)[0] for item in flat]).astype(np.uint32)
    return labels.reshape(foreground.shape)


def _block_summary(labels: np.ndarray, spatial_dims: int) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """The number of local labels of a chunk and its first and last slice along each spatial axis."""
    faces = []
    for axis in range(labels.ndim - spatial_dims, labels.ndim):
        faces.append((np.take(labels, 0, axis=axis).copy(), np.take(labels, -1, axis=axis).copy()))
    return int(labels.max(initial=0)), faces


def _relabel_table(summaries: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each chunk's labels and the table from offset labels to final labels.

    Chunk ``b``'s local label ``l > 0`` has the global number ``l + offsets[b]``. Two
    global labels are the same object when their pixels touch across a chunk face (the last
    slice of a chunk and the first slice of its neighbour, at the same position); the
    connected components of that graph are the objects, numbered 1..N per item (leading,
    non-spatial block index) in the order of their smallest global label.
    """
    grid = summaries.shape
    counts = np.array([s[0] for s in summaries.flat], dtype=np.int64).reshape(grid)
    offsets = (np.cumsum(counts) - counts.ravel()).reshape(grid)
    total = int(counts.sum())
    sources, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    lead = len(grid) - spatial_dims
    for block in np.ndindex(*grid):
        for face in range(spatial_dims):
            neighbour = list(block)
            neighbour[lead + face] += 1
            if neighbour[lead + face] == grid[lead + face]:
                continue
            last = summaries[block][1][face][1]
            first = summaries[tuple(neighbour)][1][face][0]
            touching = (last > 0) & (first > 0)
            sources.append(last[touching].astype(np.int64) + offsets[block])
            targets.append(first[touching].astype(np.int64) + offsets[tuple(neighbour)])
    u, v = np.concatenate(sources), np.concatenate(targets)
    graph = sparse.coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(total + 1, total + 1))
    members = connected_components(graph, directed=False)[1][1:]  # the component of every global label
    item_counts = counts.reshape(int(np.prod(grid[:lead], dtype=np.int64)), -1).sum(axis=1)
    item_of_label = np.repeat(np.arange(len(item_counts)), item_counts)  # items hold consecutive labels
    objects, first_seen = np.unique(members, return_index=True)
    order = np.argsort(first_seen)
    objects, item = objects[order], item_of_label[first_seen[order]]
    number = np.zeros(len(members) + 1, np.uint32)
    number[objects] = np.arange(len(objects)) - np.searchsorted(item, item) + 1  # 1..N within each item
    return offsets, np.concatenate([[0], number[members]]).astype(np.uint32)


def _relabel_block(
    labels: np.ndarray, table: np.ndarray, *, offsets: np.ndarray, block_info: dict | None = None
) -> np.ndarray:
    assert block_info is not None
    offset = offsets[tuple(block_info[0]["chunk-location"])]
    out = np.zeros(labels.shape, np.uint32)
    inside = labels > 0
    out[inside] = table[labels[inside].astype(np.int64) + offset]
    return out


def _store(array: da.Array, target: zarr.Array) -> Any:
    """Dask work that writes ``array`` into ``target`` chunk by chunk, without locks.

    Every Dask chunk must cover whole Zarr chunks (or end at the array end), so that no two
    tasks ever write into the same Zarr chunk, also from different processes.
    """
    if array.shape != target.shape:
        raise ValueError(f"target: shape {target.shape} differs from the array's {array.shape}")
    for axis, (blocks, size) in enumerate(zip(array.chunks, target.chunks, strict=True)):
        if np.any(np.cumsum(blocks)[:-1] % size):
            raise ValueError(f"target: its chunks {target.chunks} do not tile the chunks {blocks} of axis {axis}")
    return da.store(array, target, lock=False, compute=False)


class _LabelJob:
    """Instance labels of a chunked foreground mask, written chunk by chunk to a Zarr array.

    :attr:`work` labels every chunk on its own, stores it and summarises its faces; run it
    in one ``dask.compute`` with other work on the same inputs so that they are computed
    once. :meth:`finish` then merges labels across chunk faces and rewrites every chunk.
    """

    def __init__(self, foreground: da.Array, target: zarr.Array, spatial_dims: int) -> None:
        lead = foreground.ndim - spatial_dims
        self.spatial_dims, self.target = spatial_dims, target
        self.local = foreground.rechunk({axis: 1 for axis in range(lead)}).map_blocks(
            _label_block, spatial_dims=spatial_dims, dtype=np.uint32
        )
        blocks = self.local.to_delayed(optimize_graph=False)  # the same keys as the store's
        self.grid = blocks.shape
        summaries = [dask.delayed(_block_summary)(block, spatial_dims) for block in blocks.flat]
        self.work = [_store(self.local, target), *summaries]

    def finish(self, results: Sequence[Any]) -> None:
        """Merge and rewrite, given the results of :attr:`work`."""
        summaries = np.empty(len(results) - 1, dtype=object)
        summaries[:] = list(results[1:])
        offsets, table = _relabel_table(summaries.reshape(self.grid), self.spatial_dims)
        log.debug("merged %d chunk labels into %d objects", len(table) - 1, int(table.max(initial=0)))
        stored = da.from_zarr(self.target, chunks=self.local.chunks)
        relabelled = stored.map_blocks(
            _relabel_block, dask.delayed(table, pure=False, traverse=False), offsets=offsets, dtype=np.uint32
        )
        dask.compute(_store(relabelled, self.target))


def label_chunked(foreground: da.Array, target: zarr.Array, *, spatial_dims: int = 2) -> None:
    """Label the face-connected objects of a chunked mask into ``target``, one label per object.

    Parameters
    ----------
    foreground : dask.array.Array of bool
        ``(*items, *spatial)``; each item (e.g. each plane of a stack) is labelled on its own.
    target : zarr.Array
        Of the same shape, an unsigned integer type, and chunks that tile the mask's chunks
        (every mask chunk is a whole number of target chunks), so chunks are written in
        parallel safely.
    spatial_dims : int
        Number of trailing spatial axes.

    Notes
    -----
    Two passes over the data: each chunk is labelled (``scipy.ndimage.label``, face
    connectivity) and stored with its own numbers; the numbers of foreground pixels that
    touch across chunk faces are merged by a union-find; every chunk is then rewritten
    through the resulting table. Memory: one chunk per worker, plus the faces and the table
    (one entry per chunk-local object). As dask-image's ``label``.
    """
    if foreground.dtype != bool or not 1 <= spatial_dims <= foreground.ndim:
        raise ValueError(
            f"foreground: expected a boolean mask with {spatial_dims} spatial axes, got {foreground.dtype} "
            f"of shape {foreground.shape}"
        )
    job = _LabelJob(foreground, target, spatial_dims)
    job.finish(dask.compute(*job.work))


# ------------------------------------------------------------------------------------------
# Writing OME-Zarr chunk by chunk
# ------------------------------------------------------------------------------------------
def ngff_attributes(axes: Sequence[tuple[str, str]], scale: Sequence[float], *, zarr_format: int, name: str) -> dict:
    """OME-Zarr ``multiscales`` metadata of a single-scale image whose array is at path ``"0"``.

    NGFF 0.4 (Zarr v2: ``{"multiscales": [...]}`` with ``"version": "0.4"``) or NGFF 0.5
    (Zarr v3: the same under ``{"ome": {"version": "0.5", ...}}``). ``axes`` are ``(name,
    type)`` pairs, ordered time, channel, space as the specification requires; one
    ``scale`` transformation per dataset.

    References
    ----------
    OME-NGFF specification 0.4, "multiscales" metadata, https://ngff.openmicroscopy.org/0.4/
    """
    if len(scale) != len(axes):
        raise ValueError(f"ngff_attributes: {len(scale)} scale values for {len(axes)} axes")
    image = {
        "name": name,
        "axes": [{"name": n, "type": t} for n, t in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(map(float, scale))}]}],
    }
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **image}]}
    return {"ome": {"version": "0.5", "multiscales": [image]}}


def _ngff_array(
    folder: Path, name: str, like: da.Array, dtype: Any, axes: Sequence[tuple[str, str]], scale: dict[str, float],
    zarr_format: int,
) -> zarr.Array:  # fmt: skip
    """An OME-Zarr image at ``folder`` whose array ``"0"`` will hold ``like``, chunked like it.

    Zarr chunks are ``like``'s regular chunks (one class per chunk on a channel axis), so
    that every Dask chunk covers whole Zarr chunks.
    """
    group = zarr.open_group(str(folder), mode="w", zarr_format=zarr_format)
    sizes = [scale.get(n.upper(), 1.0) if t == "space" else 1.0 for n, t in axes]
    group.attrs.update(ngff_attributes(axes, sizes, zarr_format=zarr_format, name=name))
    chunks = tuple(1 if t == "channel" else c[0] for (_, t), c in zip(axes, like.chunks, strict=True))
    extra: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}  # NGFF 0.4 requires "/"
        if zarr_format == 2
        else {"dimension_names": [n for n, _ in axes]}
    )
    return group.create_array("0", shape=like.shape, chunks=chunks, dtype=dtype, fill_value=0, **extra)


class _TqdmCallback(Callback):
    """A tqdm bar over the tasks of a local Dask computation."""

    def __init__(self, desc: str, enabled: bool) -> None:
        super().__init__()
        self._desc, self._enabled, self._bar = desc, enabled, None

    def _start_state(self, dsk: Any, state: dict) -> None:
        from tqdm.auto import tqdm

        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = tqdm(total=total, desc=self._desc, unit="task", disable=not self._enabled, leave=False)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
        self._bar.update(1)

    def _finish(self, dsk: Any, state: dict, errored: bool) -> None:
        self._bar.close()


def _on_cluster() -> bool:
    try:
        from distributed import get_client

        get_client()
    except (ImportError, ValueError):
        return False
    return True


def predict_to_zarr(
    model: UNet,
    items: da.Array,
    output: Path,
    stem: str,
    *,
    stack_axis: str | None = None,
    save: Sequence[str] = ("probabilities", "labels"),
    zarr_format: int = 2,
    scale: dict[str, float] | None = None,
    chunk: int | None = None,
    tile: int | None = None,
    batch_size: int = 4,
    device: str | None = None,
    precision: Precision = "float32",
    compile: bool | CompileMode = False,
    progress: bool = True,
) -> list[Path]:
    """Predict ``(items, channels, *spatial)`` pixels chunk by chunk into OME-Zarr images.

    Writes ``<stem>_probabilities.ome.zarr`` (float32, classes on the channel axis) and
    ``<stem>_labels.ome.zarr`` (uint32 instance labels, one per object across chunks, for
    2-class models; the arg-max class for more classes), each a single-scale OME-Zarr
    image (NGFF 0.4 on Zarr v2, or NGFF 0.5 on Zarr v3) chunked like the prediction.
    Each output is written to a temporary folder and renamed into place when complete.
    Runs on the active ``dask.distributed`` client if there is one, else on local threads.

    Parameters
    ----------
    model : UNet
        The network.
    items : dask.array.Array
        ``(items, channels, *spatial)``; more than one item only with ``stack_axis``.
    output : Path
        An existing folder.
    stem : str
        The outputs' name prefix.
    stack_axis : {"T", "Z", ...}, optional
        The letter of the item axis of a stack: ``"T"`` becomes an NGFF time axis, any other
        letter a ``z`` space axis (2D models only), put after the class axis as NGFF asks.
    save : sequence of {"probabilities", "labels"}
        What to write.
    zarr_format : {2, 3}
        Zarr v2 with NGFF 0.4 metadata, or Zarr v3 with NGFF 0.5 metadata.
    scale : dict, optional
        Pixel size per spatial axis letter, copied into the metadata.
    chunk, tile, batch_size, device, precision, compile
        See :func:`predict_dask`.
    progress : bool
        A tqdm bar over the Dask tasks (local scheduler only).

    Returns
    -------
    list of Path
        The written folders.
    """
    config = model.config
    if items.ndim != config.dims + 2 or (items.shape[0] != 1 and stack_axis is None):
        raise ValueError(f"items: expected (items, channels, {config.dims} spatial axes), got shape {items.shape}")
    if set(save) - {"probabilities", "labels"} or zarr_format not in (2, 3):
        raise ValueError(f"save must list 'probabilities'/'labels', zarr_format be 2 or 3; got {save}, {zarr_format}")
    if stack_axis is not None and stack_axis != "T" and config.dims == 3:
        raise ValueError(f"a 3D model's input can only be stacked along time (T), not {stack_axis!r}")
    options = dict(tile=tile, batch_size=batch_size, device=device, precision=precision, compile=compile)
    prob = _predict_items(model, items, _ranges(model, items, None), chunk=chunk, options=options)
    # NGFF orders axes time, channel, space: a plane stack's item axis goes after the classes
    space = [(a, "space") for a in "zyx"[3 - config.dims :]]
    if stack_axis is None:
        prob, prob_axes, label_axes = prob[0], [("c", "channel"), *space], space
    elif stack_axis == "T":
        prob_axes, label_axes = [("t", "time"), ("c", "channel"), *space], [("t", "time"), *space]
    else:
        prob = prob.transpose(1, 0, *range(2, prob.ndim))
        prob_axes, label_axes = [("c", "channel"), ("z", "space"), *space], [("z", "space"), *space]
    class_axis = prob_axes.index(("c", "channel"))
    postprocess = model.info.postprocess
    if config.num_classes == 2 or postprocess.get("split") == "border":
        skipped = {k: v for k, v in postprocess.items() if k != "threshold" and v not in (None, 0, "none")}
        if skipped:  # splitting and size filtering need whole objects, which chunks do not have
            log.warning("%s: streamed labels are the connected components of p > threshold; the model's "
                        "post-processing %s is not applied to them (it is to in-memory predictions)",
                        stem, skipped)  # fmt: skip
        index = (slice(None),) * class_axis
        foreground = prob[index + (1,)] if config.num_classes == 2 else 1 - prob[index + (0,)]  # interior + border
        labels = foreground > postprocess.get("threshold", FOREGROUND_THRESHOLD)
    else:
        labels = prob.argmax(axis=class_axis).astype(np.uint16)

    written: list[Path] = []
    work: list[Any] = []
    label_job = None
    with contextlib.ExitStack() as stack:

        def target(suffix: str, like: da.Array, dtype: Any, axes: list[tuple[str, str]]) -> zarr.Array:
            path = output / f"{stem}_{suffix}.ome.zarr"
            written.append(path)
            folder = stack.enter_context(atomic_folder(path))
            return _ngff_array(folder, f"{stem}_{suffix}", like, dtype, axes, scale or {}, zarr_format)

        if "probabilities" in save:
            work.append(_store(prob, target("probabilities", prob, np.float32, prob_axes)))
        if "labels" in save and config.num_classes == 2:
            label_job = _LabelJob(labels, target("labels", labels, np.uint32, label_axes), config.dims)
            work += label_job.work
        elif "labels" in save:
            work.append(_store(labels, target("labels", labels, np.uint16, label_axes)))
        if work:
            with _TqdmCallback(f"{stem} chunks", progress and not _on_cluster()):
                results = dask.compute(*work)
        if label_job is not None:
            label_job.finish(results[-len(label_job.work) :])
    return written
