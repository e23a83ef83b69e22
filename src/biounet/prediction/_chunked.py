"""Prediction of images larger than memory, chunk by chunk with Dask, into OME-Zarr."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from tqdm.dask import TqdmCallback

from biounet.borders import mirror_indices
from biounet.errors import InputError
from biounet.io._files import scratch_folder
from biounet.io._lazy import intensity_percentiles
from biounet.io._ngff import ngff_image, store_blocks
from biounet.model import UNet, UNetConfig
from biounet.prediction._chunk_labels import LabelJob, postprocess_chunked
from biounet.prediction._input import check_intensity_range, model_items
from biounet.prediction._ngff_outputs import NgffOutputs, label_name, makes_instances, ngff_axes, ngff_order
from biounet.prediction._options import PredictOptions
from biounet.prediction._stitch import predict
from biounet.prediction._tiling import chunk_context

log = logging.getLogger(__name__)


#: Default output chunk per spatial axis, in pixels, for 2D and 3D models (rounded down to a
#: multiple of ``2**depth``).
DEFAULT_CHUNK_2D = 2048
DEFAULT_CHUNK_3D = 128


#: Foreground threshold of 2-class models without one of their own, as in
#: :func:`biounet.postprocess.probabilities_to_labels`.
FOREGROUND_THRESHOLD = 0.5

#: Serialises compiled forward passes across Dask's worker threads.
_COMPILED_LOCK = threading.Lock()


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
        raise InputError(f"chunk and size must be positive, got chunk={chunk}, size={size}")
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
    options: PredictOptions | None = None,
    channel_axis: int | None = None,
    chunk: int | None = None,
    intensity_range: np.ndarray | Sequence[float] | None = None,
    **overrides: Any,
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
    options : PredictOptions, optional
        As for :func:`biounet.predict` (``**overrides`` change single fields), applied inside
        each chunk; ``tta`` is not available here and ``progress`` is ignored.
    intensity_range : array_like, optional
        ``(low, high)`` intensities (or one pair per channel) that the model's percentiles
        map to 0 and 1 (``low > high`` inverts). Default: measured over the whole image
        first (:func:`intensity_percentiles`, one pass over the image, with the model's
        ``background``).

    Returns
    -------
    dask.array.Array of float32
        ``(num_classes, *spatial)`` or ``(Z, num_classes, Y, X)`` for a stack; computing it
        (or storing it with ``dask.array.store``/``to_zarr``) runs the network chunk by
        chunk on the active Dask scheduler.

    Notes
    -----
    Each chunk carries :func:`biounet.prediction.chunk_context` px of its neighbours, read with
    ``dask.array.map_overlap``; see the module notes for why the result equals
    :func:`biounet.predict` to float32 rounding (valid padding). Test-time augmentation is
    not available here.
    """
    array = da.from_zarr(image) if isinstance(image, zarr.Array) else image
    array = array if hasattr(array, "__dask_graph__") else da.from_array(np.asarray(array))
    items, stacked = model_items(array, model.config, channel_axis)
    ranges = _ranges(model, items, intensity_range)
    prob = _predict_items(model, items, ranges, chunk=chunk, options=PredictOptions.of(options, overrides))
    return prob if stacked else prob[0]


def _ranges(model: UNet, items: da.Array, intensity_range: Any) -> np.ndarray | None:
    """(items, channels, 2) intensity ranges for the model's normalisation (None if it has none)."""
    if model.info.normalization is None:
        return None
    if intensity_range is None:
        return intensity_percentiles(items, *model.info.normalization, background=model.info.background)
    values = check_intensity_range(intensity_range, items.shape[1])
    return np.broadcast_to(values, (items.shape[0], *values.shape))


def _predict_items(
    model: UNet, items: da.Array, ranges: np.ndarray | None, *, chunk: int | None, options: PredictOptions
) -> da.Array:
    """(items, classes, *spatial) probabilities of (items, channels, *spatial) pixels, lazily."""
    config = model.config
    if options.tta:
        raise InputError("test-time augmentation (tta) is not available for chunked prediction", option="tta")
    options = options.replace(progress=False)  # chunks in parallel threads: no bar per chunk
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
    options: PredictOptions,
    block_info: dict | None = None,
) -> np.ndarray:
    """Probabilities of one output chunk from its window (the chunk plus its context)."""
    assert block_info is not None
    where, grid = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    if any(k in (0, n - 1) for k, n in zip(where[2:], grid[2:], strict=True)):
        return np.zeros(block_info[None]["chunk-shape"], np.float32)  # a mirrored margin: sliced off, never computed
    item_range = None if ranges is None else ranges[where[0]]
    # torch.compile'd code (and its CUDA graphs) is not thread-safe: compiled chunks run one at a time
    with _COMPILED_LOCK if options.compile else contextlib.nullcontext():
        prob = predict(model, window[0], options=options, channel_axis=0, intensity_range=item_range,
                       context=context)  # fmt: skip
    return prob[None]


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
    units: dict[str, str] | None = None,
    levels: int = 1,
    chunk: int | None = None,
    options: PredictOptions | None = None,
    **overrides: Any,
) -> list[Path]:
    """Predict ``(items, channels, *spatial)`` pixels chunk by chunk into OME-Zarr images.

    Writes ``<stem>_probabilities.ome.zarr``, an NGFF image (float32, classes on the channel
    axis), with the labels in its ``labels/`` group as NGFF asks (``labels/<name>``, with
    ``image-label`` metadata, so that napari opens them as labels; ``<name>`` is the model's
    foreground class, :func:`label_name`, or ``classes``). Saving labels only writes them as
    ``<stem>_labels.ome.zarr``, a label image of its own. Labels are uint32 instances, one per
    object across chunks, for 2-class and border models: the labels the model's
    post-processing makes in memory, its split and minimum size included, up to numbering
    (:func:`postprocess_chunked`); the arg-max class for more classes. NGFF 0.4 on Zarr v2,
    or NGFF 0.5 on Zarr v3, chunked like the prediction, with ``levels`` resolution levels
    (:func:`biounet.io.write_pyramid`). Each output is written to a temporary folder and
    renamed into place when complete. Runs on the active ``dask.distributed`` client if
    there is one, else on local threads.

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
    scale, units : dict, optional
        Pixel size and its unit (``"micrometer"``) per axis letter (``"Y"``, ``"X"``, ``"Z"``,
        ``"T"``), copied into the metadata (:class:`biounet.io.LazyImage` reads them).
    levels : int
        Resolution levels of every output image: 1 (the default) for full resolution only,
        else a pyramid halving y and x from level to level.
    chunk, options
        See :func:`predict_dask` (``**overrides`` change single fields); ``options.progress``
        shows a tqdm bar over the Dask tasks (local scheduler only).

    Returns
    -------
    list of Path
        The written folders.
    """
    config = model.config
    if items.ndim != config.dims + 2 or (items.shape[0] != 1 and stack_axis is None):
        raise InputError(f"items: expected (items, channels, {config.dims} spatial axes), got shape {items.shape}")
    if levels < 1:
        raise InputError(f"levels must be at least 1, got {levels}", option="levels")
    if set(save) - {"probabilities", "labels"} or zarr_format not in (2, 3):
        raise InputError(f"save must list 'probabilities'/'labels', zarr_format be 2 or 3; got {save}, {zarr_format}")
    if stack_axis is not None and stack_axis != "T" and config.dims == 3:
        raise InputError(f"a 3D model's input can only be stacked along time (T), not {stack_axis!r}")
    options = PredictOptions.of(options, overrides)
    prob = _predict_items(model, items, _ranges(model, items, None), chunk=chunk, options=options)
    prob = ngff_order(prob, stack_axis)  # NGFF orders axes time, channel, space
    prob_axes, label_axes = ngff_axes(stack_axis, config.dims)
    class_axis = prob_axes.index(("c", "channel"))
    postprocess = model.info.postprocess
    instances = makes_instances(model)
    # splitting and size filtering act on whole objects: done object by object after the components
    per_object = instances and (postprocess.get("split", "none") != "none" or postprocess.get("min_size", 0) > 0)
    if instances and postprocess.get("connectivity", 1) != 1:
        log.warning("%s: streamed objects are face-connected components; the model's connectivity %s is not used",
                    stem, postprocess["connectivity"])  # fmt: skip
    if instances:
        index = (slice(None),) * class_axis
        foreground = prob[index + (1,)] if config.num_classes == 2 else 1 - prob[index + (0,)]  # interior + border
        labels = foreground > postprocess.get("threshold", FOREGROUND_THRESHOLD)
    else:
        labels = prob.argmax(axis=class_axis).astype(np.uint32)

    work: list[Any] = []
    label_job = None
    with contextlib.ExitStack() as stack:
        outputs = NgffOutputs(stack, output, stem, zarr_format=zarr_format, scale=scale, units=units, levels=levels)
        prob_store = components = scratch = None
        if "labels" in save and per_object:  # the per-object post-processing's own arrays, removed with the call
            scratch = stack.enter_context(scratch_folder(output, stem))
        if "probabilities" in save:
            prob_store = outputs.probabilities(prob, prob_axes)
        elif scratch is not None:  # the post-processing reads them back
            prob_store = ngff_image(scratch / "p", "p", prob, np.float32, prob_axes, {}, zarr_format)
        if prob_store is not None:
            work.append(store_blocks(prob, prob_store))
        if "labels" in save:
            labels_store = outputs.labels(labels, label_axes, label_name(model) if instances else "classes")
            if instances:
                if scratch is not None:
                    components = ngff_image(scratch / "c", "c", labels, np.uint32, label_axes, {}, zarr_format)
                label_job = LabelJob(labels, labels_store if components is None else components, config.dims)
                work += label_job.work
            else:
                work.append(store_blocks(labels, labels_store))
        if work:
            bar = TqdmCallback(desc=f"{stem} chunks", unit="task", leave=False,
                               disable=not options.progress or _on_cluster())
            with bar:  # a bar over the tasks of a local Dask computation
                results = dask.compute(*work)
        if label_job is not None:
            label_job.finish(results[-len(label_job.work) :])
        if components is not None:
            postprocess_chunked(prob_store, components, labels_store, class_axis=class_axis, spatial_dims=config.dims,
                                postprocess=postprocess)  # fmt: skip
        return outputs.finish()

