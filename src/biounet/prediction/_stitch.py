"""Overlap-tile prediction of one image: batches of tiles through the network, stitched exactly."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from biounet.borders import mirror_indices
from biounet.device import check_device, resolve_precision
from biounet.errors import InputError
from biounet.model import UNet, UNetConfig
from biounet.prediction._device import Forward, model_forward
from biounet.prediction._input import (
    as_model_input,
    check_context,
    check_intensity_range,
    converts_to_luminance,
    normalize_items,
)
from biounet.prediction._options import PredictOptions
from biounet.prediction._tiling import AxisTiling, plan_tiles, tile_shape

log = logging.getLogger(__name__)


#: The dihedral group D4 as (number of 90-degree rotations, flip) pairs.
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Apply a flip of the last axis (if ``flip``) then ``k`` rotations of the last two axes."""
    out = array[..., ::-1] if flip else array
    return np.rot90(out, k, axes=(-2, -1))


def dihedral_inverse(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Undo :func:`dihedral` ``(k, flip)``."""
    out = np.rot90(array, -k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


@dataclass(frozen=True)
class Progress:
    """One step of :func:`predict_steps`: ``done`` of ``total`` tiles; ``result`` at the end."""

    done: int
    total: int
    result: np.ndarray | None = None


def stitch_steps(
    forward: Forward,
    items: np.ndarray,
    geometry: UNetConfig,
    *,
    tile: int | Sequence[int] | None = None,
    batch_size: int = 4,
    tta: bool = False,
    context: Sequence[tuple[int, int]] | None = None,
    full_batches: bool = False,
) -> Iterator[Progress]:
    """Overlap-tile prediction of prepared items with any network: the pure core of :func:`predict`.

    Parameters
    ----------
    forward : callable
        ``forward(batch) -> logits``: a float32 ``(N, C, *input tile)`` CPU tensor in,
        ``(N, num_classes, *output tile)`` logits out (on any device; the tiles are stitched
        there and each image is copied to the host once). Never given anything but valid
        tiles of ``geometry``.
    items : ndarray
        ``(items, channels, *spatial)`` float32, already normalised; never modified.
    geometry : UNetConfig
        The network's shape arithmetic (valid input sizes, output size, halo, padding,
        classes): the only thing the stitcher knows of the network.
    tile, batch_size, tta
        As in :class:`PredictOptions`.
    context : sequence of (int, int), optional
        Real image context ``(before, after)`` per spatial axis around the region to predict
        (see :func:`predict`).
    full_batches : bool
        Fill the last batch of each tile shape up to ``batch_size`` (a compiled forward then
        runs one graph per tile shape).

    Yields
    ------
    Progress
        After every batch; the last one carries the ``(items, classes, *region)`` softmax
        probabilities, float32.
    """
    spans = check_context(context, geometry.dims)
    if tta and geometry.dims != 2:
        raise InputError("tta=True is implemented for 2D models only")
    if tta and context is not None:
        raise InputError("tta=True cannot be combined with context (chunks of a larger image)")
    region = tuple(size - before - after for size, (before, after) in zip(items.shape[2:], spans, strict=True))
    if min(region) < 1:
        raise InputError(f"context: {spans} leaves no pixels to predict in an image of spatial shape {items.shape[2:]}")
    transforms = DIHEDRAL if tta else ((0, False),)

    # One job per (item, transform); each job's tiles are independent and batched together.
    jobs = [(i, t) for i in range(len(items)) for t in transforms]
    inputs = [np.ascontiguousarray(dihedral(items[i], *t)) for i, t in jobs]
    regions = [region if context is not None else x.shape[1:] for x in inputs]  # context excludes TTA
    layouts = [plan_tiles(geometry, shape, tile) for shape in regions]
    # Job after job, each job's tiles grouped by shape (a stable sort): batches of one shape,
    # shared by consecutive jobs of the same shape, and few jobs in flight at a time.
    tiles = [
        (j, c) for j, layout in enumerate(layouts)
        for c in sorted(itertools.product(*(range(a.count) for a in layout)), key=lambda c: tile_shape(layout, c))
    ]  # fmt: skip
    batches = _batches(tiles, lambda tile: tile_shape(layouts[tile[0]], tile[1]), batch_size)
    log.debug("%d image(s), %d transform(s), %d tile(s)", len(items), len(transforms), len(tiles))

    out = np.zeros((len(items), geometry.num_classes, *region), np.float32)
    # Each job is stitched where it is computed (no per-tile copy back from a GPU) and copied
    # to the host once its last tile is in, so device memory holds only the jobs in flight.
    results: dict[int, torch.Tensor] = {}
    pending = [math.prod(a.count for a in layout) for layout in layouts]
    done = 0
    yield Progress(0, len(tiles))
    for batch in batches:
        windows = [_input_window(inputs[j], layouts[j], spans, corner) for j, corner in batch]
        if full_batches and len(windows) < batch_size:
            windows += [windows[-1]] * (batch_size - len(windows))
        probs = _probabilities(forward, geometry, windows)[: len(batch)]
        with torch.inference_mode():
            for (j, corner), prob in zip(batch, probs, strict=True):
                if j not in results:
                    results[j] = torch.zeros((geometry.num_classes, *regions[j]), device=prob.device)
                _paste(results[j], prob, layouts[j], corner)
                pending[j] -= 1
                if not pending[j]:
                    i, t = jobs[j]
                    out[i] += dihedral_inverse(results.pop(j).cpu().numpy(), *t)
        done += len(batch)
        yield Progress(done, len(tiles))
    if tta:
        out /= len(transforms)
    yield Progress(len(tiles), len(tiles), out)


def predict_steps(
    model: UNet,
    image: np.ndarray,
    *,
    options: PredictOptions | None = None,
    channel_axis: int | None = None,
    intensity_range: np.ndarray | Sequence[float] | None = None,
    context: Sequence[tuple[int, int]] | None = None,
    **overrides: Any,
) -> Iterator[Progress]:
    """Generator form of :func:`predict`: yields a :class:`Progress` after every batch of tiles.

    The last item carries the result. A GUI iterates over it to show progress and stays
    responsive; :func:`predict` wraps it with a tqdm bar. The image is arranged and
    normalised as the model was trained (its axes once, here), then :func:`stitch_steps`
    runs the model as a pure function (:func:`model_forward`): ``model`` is not changed.
    """
    options = PredictOptions.of(options, overrides)
    config = model.config
    device = check_device(options.device) if options.device is not None else next(model.parameters()).device
    precision = resolve_precision(device, level=logging.DEBUG) if options.precision == "auto" else options.precision
    shape = np.shape(image)
    if channel_axis is not None and -len(shape) <= channel_axis < len(shape):
        if converts_to_luminance(model, shape[channel_axis]):  # as the model was trained
            from biounet.io._images import to_luminance

            image, channel_axis = to_luminance(np.asarray(image), "image", axis=channel_axis), None
    items, stacked = as_model_input(image, config, channel_axis)
    ranges = check_intensity_range(intensity_range, config.in_channels)
    items = normalize_items(items, model.info.normalization, ranges, model.info.background)
    forward = model_forward(model, device, precision, options.compile)
    for step in stitch_steps(forward, items, config, tile=options.tile, batch_size=options.batch_size,
                             tta=options.tta, context=context, full_batches=bool(options.compile)):  # fmt: skip
        if step.result is not None and not stacked:
            step = Progress(step.done, step.total, step.result[0])
        yield step


def _batches(tiles: list, key, size: int) -> list[list]:
    """Batches of at most ``size`` consecutive tiles of one shape (``key``), in order.

    A layout has up to ``2**dims`` tile shapes (smaller last tiles) and the transposed
    images of TTA can have others; consecutive tiles of one shape, from one image or
    several, share batches.
    """
    batches = []
    for _, group in itertools.groupby(tiles, key=key):
        members = list(group)
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    return batches


def _input_window(
    item: np.ndarray, layout: Sequence[AxisTiling], spans: Sequence[tuple[int, int]], corner: Sequence[int]
) -> np.ndarray:
    """The input that tile ``corner`` reads from ``item`` (channels first), mirrored where it leaves ``item``.

    The region to predict starts ``before`` px into ``item`` (its context); tile ``k`` of an
    axis reads ``[before + k*step - halo, ... + input_size(k))``. Inner tiles are slices;
    only tiles at the border take mirrored indices (:func:`mirror_indices`).
    """
    slices: list[slice] = [slice(None)]
    mirrored: list[tuple[int, np.ndarray]] = []
    for axis, (a, (before, _), k) in enumerate(zip(layout, spans, corner, strict=True), start=1):
        lo = before + k * a.step - a.halo
        hi, size = lo + a.input_size(k), item.shape[axis]
        if 0 <= lo and hi <= size:
            slices.append(slice(lo, hi))
        else:
            pre = max(0, -lo)
            mirrored.append((axis, mirror_indices(size, pre, max(0, hi - size))[lo + pre : hi + pre]))
            slices.append(slice(None))
    window = item[tuple(slices)]
    for axis, index in mirrored:
        window = np.take(window, index, axis=axis)
    return window


def _probabilities(forward: Forward, geometry: UNetConfig, windows: list[np.ndarray]) -> torch.Tensor:
    """Class probabilities (float32) of a batch of input windows, where ``forward`` computed them."""
    logits = forward(torch.from_numpy(np.stack(windows)))
    with torch.inference_mode():
        probs = torch.softmax(logits.float(), dim=1)
        if geometry.padding == "same":  # keep the centre, where the context is complete
            halo = geometry.halo
            probs = probs[(slice(None), slice(None), *(slice(halo, s - halo) for s in probs.shape[2:]))]
    return probs


def _paste(result: torch.Tensor, prob: torch.Tensor, layout: Sequence[AxisTiling], corner: Sequence[int]) -> None:
    target, source = [slice(None)], [slice(None)]
    for k, a in zip(corner, layout, strict=True):
        lo, hi = a.cuts[k], a.cuts[k + 1]
        target.append(slice(lo, hi))
        source.append(slice(lo - k * a.step, hi - k * a.step))
    result[tuple(target)] = prob[tuple(source)]


def predict(
    model: UNet,
    image: np.ndarray,
    *,
    options: PredictOptions | None = None,
    channel_axis: int | None = None,
    intensity_range: np.ndarray | Sequence[float] | None = None,
    context: Sequence[tuple[int, int]] | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Segment an image of any size with the overlap-tile strategy; return class probabilities.

    Parameters
    ----------
    model : UNet
        The network; its stored input normalisation (percentiles) is applied per image and
        channel. It is never changed: a private eval-mode copy runs (:func:`model_forward`).
    image : ndarray
        ``(Y, X)``, a stack ``(Z, Y, X)`` segmented slice by slice, or either with a channel
        axis (``channel_axis``) for multi-channel models; ``(Z, Y, X)`` for 3D models. Any
        size from 1x1 up; never modified.
    options : PredictOptions, optional
        Tile, batch size, device, precision, compilation, TTA and progress bar (default:
        ``PredictOptions()``). The tiles per axis are as few as possible, laid out to compute
        the fewest output pixels (:func:`plan_axis`; the last may be smaller). float32, the
        default precision, is the one in which tiled prediction equals whole-image
        prediction; bfloat16 probabilities stay within 0.05 of float32 (max abs difference)
        and 0.005 on average, as the tests check on the CPU on random networks of depth 2 to 4.
    channel_axis : int, optional
        The axis of ``image`` that holds the channels. Required when the model takes more
        than one channel; never guessed.
    intensity_range : array_like, optional
        The intensities that the model's normalisation percentiles map to 0 and 1,
        ``(low, high)`` or one pair per channel ``(channels, 2)``, measured beforehand (e.g.
        over a whole image that is predicted in chunks, see :mod:`biounet.prediction`);
        ``low > high`` inverts the image. Default: the percentiles of each image (and
        channel) given, swapped where the model inverts bright-background images
        (:attr:`biounet.ModelInfo.background`).
    context : sequence of (int, int), optional
        Pixels ``(before, after)`` per spatial axis of real image context that ``image``
        carries around the region to predict; the result covers the region only. With
        ``padding="valid"``, a region starting at a multiple of ``2**depth`` of the full
        image and ending at one (or at the image end, mirrored on to one) and the context of
        :func:`chunk_context`, the result equals that region of the full image's result.
    **overrides
        Fields of :class:`PredictOptions` to change for this call, e.g. ``tile=512`` or
        ``device="cuda"``. ``compile`` compiles once per model, weights, tile shape and batch
        size; worth it for many tiles on a GPU (``"reduce-overhead"`` also replays each
        forward pass as a CUDA graph, which removes the kernel launch overhead that dominates
        small images on a fast GPU).

    Returns
    -------
    ndarray of float32
        Softmax probabilities ``(num_classes, *spatial)``, or ``(Z, num_classes, Y, X)`` for
        a stack; they sum to 1 over the class axis.

    Notes
    -----
    With ``padding="valid"`` the result equals one forward pass over the whole image,
    mirror-padded by the halo (and on the far side up to a valid size), to float32
    rounding, because every tile starts at a multiple of ``2**depth``. With
    ``padding="same"`` tiles overlap by twice the halo and only their centres are kept; the
    zero padding inside the network then still differs slightly from whole-image inference
    (see the tests for the measured seam error).

    Speed: the network runs in channels-last memory format on CUDA and, for 2D models, on
    the CPU (in the private copy; the values do not change), 1.24x
    (paper net) to 2.0x (narrow nets) faster on a CPU with oneDNN. On a CUDA device the
    batches also go through pinned host memory with non-blocking copies,
    ``cudnn.benchmark`` is on during the forward pass, and the tiles are stitched on the
    device, so the host never waits for a tile. ``precision="bfloat16"`` is faster on GPUs
    and on CPUs with bfloat16 instructions (2.2x on an AVX512-BF16 CPU, paper net). On a
    shared or oversubscribed CPU, set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported
    (``biounet predict`` does): up to 4x faster for narrow nets (``docs/benchmarks.md``).

    References
    ----------
    Ronneberger, Fischer & Brox (2015), Sec. 2 and Fig. 2 (overlap-tile strategy).
    """
    from tqdm.auto import tqdm

    options = PredictOptions.of(options, overrides)
    bar = None
    try:
        for step in predict_steps(model, image, options=options, channel_axis=channel_axis,
                                  intensity_range=intensity_range, context=context):  # fmt: skip
            if bar is None:
                bar = tqdm(total=step.total, desc="tiles", unit="tile", disable=not options.progress, leave=False)
            bar.update(step.done - bar.n)
            if step.result is not None:
                return step.result
    finally:
        if bar is not None:
            bar.close()
    raise RuntimeError("predict_steps ended without a result")  # pragma: no cover
