"""Overlap-tile segmentation (paper, Fig. 2): images of any size, tile by tile, seam-free.

Each tile's input carries ``halo`` pixels of context on every side (92 px for the paper
net); context that lies outside the image is mirrored. Tiles start at multiples of
``2**depth`` pixels so that every tile sees the same max-pooling grid as one forward pass
over the whole mirror-padded image would: for valid padding the tiled result *equals* that
whole-image result (to float32 rounding), whatever the tile size.

The mirror is ``numpy.pad(mode="reflect")``'s: the edge pixel is not repeated
(``... c b | a b c ... | b a ...``), and reflection repeats as often as needed, so images
smaller than the halo (down to 1x1) are padded too. A 1-pixel axis is repeated.

The network runs in channels-last memory format (CUDA; 2D models on the CPU). On a CUDA
device the forward pass also takes a fast path: pinned, non-blocking host-to-device
copies, ``cudnn.benchmark``, and stitching on the device (one copy back per image);
``torch.compile`` is optional everywhere. Out-of-core prediction (:mod:`biounet.largeimage`)
calls the same code on chunks that carry their neighbours' pixels as context
(``context=``), with intensity percentiles measured over the whole image
(``intensity_range=``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from biounet.io import normalize_percentile, rescale_intensity
from biounet.model import UNet, UNetConfig

log = logging.getLogger(__name__)

Precision = Literal["auto", "float32", "bfloat16", "float16"]
#: ``torch.compile`` modes: ``"reduce-overhead"`` replays the forward pass as a CUDA graph
#: (one per tile shape and batch size), ``"max-autotune"`` also searches kernel variants.
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")

#: Default largest input tile per axis for 2D models: a 512x512 image is one 700x700 tile.
DEFAULT_TILE_2D = 700
#: Default largest input tile per axis for 3D models.
DEFAULT_TILE_3D = 124


# ------------------------------------------------------------------------------------------
# Mirror padding
# ------------------------------------------------------------------------------------------
def mirror_indices(size: int, before: int, after: int) -> np.ndarray:
    """Source index of every position of an axis of length ``size`` padded by mirroring.

    Position ``i`` in ``[-before, size + after)`` reads pixel ``m(i)`` where ``m`` reflects
    about the first and last pixel without repeating them (period ``2 * (size - 1)``), the
    rule of ``numpy.pad(mode="reflect")``. For ``size == 1`` every position reads pixel 0.
    The value at a position does not depend on ``before``/``after``: padding more never
    changes pixels already padded, which is what makes tiling and streaming exact.
    """
    if size < 1 or before < 0 or after < 0:
        raise ValueError(f"mirror_indices: need size >= 1 and non-negative pads, got {size}, {before}, {after}")
    positions = np.arange(-before, size + after)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def mirror_pad(array: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mirror-pad the last ``len(pads)`` axes of ``array`` (see :func:`mirror_indices`)."""
    out = np.asarray(array)
    first = out.ndim - len(pads)
    for axis, (before, after) in enumerate(pads, start=first):
        out = np.take(out, mirror_indices(out.shape[axis], before, after), axis=axis)
    return out


# ------------------------------------------------------------------------------------------
# Tile layout
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisTiling:
    """How one axis of length ``size`` is cut into ``count`` tiles.

    Tile ``k`` reads input pixels ``[k*step - halo, k*step - halo + input_size(k))`` (image
    coordinates; outside the image mirrored) and yields output pixels ``[k*step, k*step +
    output_size(k))``, of which it keeps ``[cut[k], cut[k+1])``. All tiles but the last
    have ``tile_in`` input and ``tile_out`` output pixels; the last has ``last_in`` and
    ``last_out`` (usually smaller: the remainder of the axis).
    """

    size: int
    tile_in: int
    tile_out: int
    step: int
    count: int
    halo: int
    last_in: int
    last_out: int

    def input_size(self, k: int) -> int:
        """Input pixels of tile ``k`` along this axis."""
        return self.last_in if k == self.count - 1 else self.tile_in

    def output_size(self, k: int) -> int:
        """Output pixels of tile ``k`` along this axis."""
        return self.last_out if k == self.count - 1 else self.tile_out

    @property
    def cuts(self) -> list[int]:
        overlap = self.tile_out - self.step
        inner = [min(k * self.step + overlap // 2, self.size) for k in range(1, self.count)]
        return [0, *inner, self.size]

    @property
    def computed(self) -> int:
        """Output pixels computed along this axis, kept or not."""
        return (self.count - 1) * self.tile_out + self.last_out


def plan_axis(size: int, config: UNetConfig, max_tile: int) -> AxisTiling:
    """Cut an axis of ``size`` pixels into the fewest tiles of input <= ``max_tile``, wasting least.

    All tiles start at multiples of ``config.stride`` (``2**depth``). With the fewest tiles
    fixed, the step between tiles is chosen to minimise the output pixels computed but not
    kept; the last tile may have another size than the others (it covers what is left), and
    among equally wasteful layouts one tile size is preferred, then the larger last tile. A
    512 px axis is one 700 px input tile (516 px output) for the paper net; a 20000 px axis
    is 39 tiles of 700 px and one of 220 px (computed output 1.008x the axis, where equal
    tiles would compute 1.032x).
    """
    halo, unit = config.halo, config.stride
    # the smallest useful tile: it keeps the whole axis, or at least one step of 2**depth
    smallest = config.valid_input_size(min(size, unit) + 2 * halo)
    max_in = max(config._valid_input_at_most(max_tile) or smallest, smallest)
    max_out = max_in - 2 * halo
    max_step = max((max_out // unit) * unit, unit)
    count = 1 if size <= max_out else 1 + math.ceil((size - max_out) / max_step)
    best: AxisTiling | None = None
    for step in range(unit, max_step + 1, unit) if count > 1 else [0]:
        need = size - (count - 1) * step  # what the last tile must cover
        if need < 1:
            break
        last_in = config.valid_input_size(need + 2 * halo)
        tile_in = config.valid_input_size(step + 2 * halo) if count > 1 else last_in
        if max(tile_in, last_in) > max_in:
            continue
        option = AxisTiling(size, tile_in, tile_in - 2 * halo, step, count, halo, last_in, last_in - 2 * halo)
        if best is None or _waste_key(option) < _waste_key(best):
            best = option
    if best is None:  # pragma: no cover - count was chosen so that max_step fits
        raise RuntimeError(f"no tile layout for size {size} with tiles <= {max_in}")
    return best


def _waste_key(a: AxisTiling) -> tuple[int, bool, int]:
    """Least computed output first; then one tile size (fewer shapes to batch or compile); then the larger last tile."""
    return a.computed, a.last_in != a.tile_in, -a.last_in


def plan_tiles(config: UNetConfig, shape: Sequence[int], tile: int | Sequence[int] | None = None) -> list[AxisTiling]:
    """Tile layout for an image of spatial ``shape`` (one :class:`AxisTiling` per axis).

    ``tile`` is the largest input tile per axis (an int or one per axis); the nearest valid
    size below it is used, or the smallest the model computes if it is smaller (with a
    warning). Default: 700 px for 2D models, 124 px for 3D models.
    """
    asked, tile = tile, (DEFAULT_TILE_2D if config.dims == 2 else DEFAULT_TILE_3D) if tile is None else tile
    tiles = [int(tile)] * len(shape) if isinstance(tile, (int, np.integer)) else [int(t) for t in tile]
    if len(tiles) != len(shape):
        raise ValueError(f"tile: expected one size or {len(shape)} sizes, got {tile!r}")
    if min(tiles) < 1:
        raise ValueError(f"tile: sizes must be positive, got {tile!r}")
    layout = [plan_axis(int(size), config, t) for size, t in zip(shape, tiles, strict=True)]
    used = [axis.tile_in for axis in layout]
    if asked is not None and any(u > t for u, t in zip(used, tiles, strict=True)):
        log.warning("tile %s is below the smallest tile this model computes; using %s px", tile, used)
    return layout


def tiling_efficiency(layout: Sequence[AxisTiling]) -> float:
    """Useful output pixels over computed output pixels (1.0 = nothing computed in vain)."""
    return math.prod(a.size for a in layout) / math.prod(a.computed for a in layout)


def tile_input_shapes(layout: Sequence[AxisTiling]) -> dict[tuple[int, ...], int]:
    """``{input tile shape: number of tiles}`` of a layout (at most ``2**dims`` shapes)."""
    shapes: dict[tuple[int, ...], int] = {}
    for corner in itertools.product(*(range(a.count) for a in layout)):
        shape = _tile_shape(layout, corner)
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def _tile_shape(layout: Sequence[AxisTiling], corner: Sequence[int]) -> tuple[int, ...]:
    return tuple(a.input_size(k) for a, k in zip(layout, corner, strict=True))


def chunk_context(config: UNetConfig) -> tuple[int, int]:
    """Input context ``(before, after)`` per axis that makes a chunk's prediction exact.

    An output chunk ``[a, b)`` whose ends are multiples of ``2**depth`` (or the image end,
    padded on to such a multiple) is computed exactly from the input ``[a - before, b +
    after)``: ``before`` is the halo and ``after = valid_input_size(2*halo + 2**depth) -
    halo - 2**depth``. The right side can need more than the halo because valid output sizes
    step by ``2**depth`` from an offset: a 188 px input gives 4 output pixels for the paper
    net, so the aligned tile that ends a chunk reaches ``halo + 4 = 96`` px beyond it
    (92 before). For depth <= 2 both are the halo.
    """
    halo, stride = config.halo, config.stride
    return halo, config.valid_input_size(2 * halo + stride) - halo - stride


# ------------------------------------------------------------------------------------------
# Input preparation
# ------------------------------------------------------------------------------------------
def model_items(image: np.ndarray, config: UNetConfig, channel_axis: int | None = None) -> tuple[np.ndarray, bool]:
    """Arrange ``image`` as (items, channels, *spatial) without converting it; say whether it was a stack.

    2D models take a 2D image ``(Y, X)``, a stack ``(Z, Y, X)`` (segmented slice by slice)
    or either with a channel axis named by ``channel_axis``. 3D models take ``(Z, Y, X)`` or
    ``(Z, Y, X)`` with a channel axis. The channel axis is never guessed. A dask array
    stays a lazy dask array (the out-of-core predictor arranges its input here too).
    """
    arr = image if hasattr(image, "__dask_graph__") else np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"image: unsupported pixel type {arr.dtype}; expected integers or floats")
    if arr.size == 0:
        raise ValueError(f"image: empty image of shape {arr.shape}")
    if channel_axis is None:
        if config.in_channels != 1:
            raise ValueError(
                f"image: the model takes {config.in_channels} channels; say which axis holds them (channel_axis)"
            )
        arr = np.expand_dims(arr, 0)
        channel_axis = 0
    elif not -arr.ndim <= channel_axis < arr.ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for an image of shape {arr.shape}")
    arr = np.moveaxis(arr, channel_axis, 0)
    if arr.shape[0] != config.in_channels:
        raise ValueError(
            f"image: {arr.shape[0]} channels on axis {channel_axis}, but the model takes {config.in_channels}"
        )
    spatial = arr.ndim - 1
    if spatial == config.dims:
        return arr[None], False
    if spatial == config.dims + 1:
        return np.moveaxis(arr, 1, 0), True
    expected = "(Y, X) or a stack (Z, Y, X)" if config.dims == 2 else "(Z, Y, X)"
    raise ValueError(f"image: shape {np.shape(image)} does not fit a {config.dims}D model; expected {expected}")


def as_model_input(image: np.ndarray, config: UNetConfig, channel_axis: int | None = None) -> tuple[np.ndarray, bool]:
    """Bring ``image`` to (items, channels, *spatial) float32 (see :func:`model_items`); say whether it was a stack."""
    items, stacked = model_items(image, config, channel_axis)
    data = items.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError("image: has NaN or infinite pixels")
    return data, stacked


def normalize_items(
    items: np.ndarray, normalization: tuple[float, float] | None, intensity_range: np.ndarray | None = None
) -> np.ndarray:
    """Percentile-normalise each item and channel of (items, channels, *spatial) on its own.

    With ``intensity_range`` (``(channels, 2)``: the low and high percentile values per
    channel, measured beforehand, e.g. over a whole image that is predicted chunk by
    chunk) those values are used instead of the percentiles of ``items``:
    ``(x - low) / max(high - low, 1e-12)`` as in :func:`biounet.io.normalize_percentile`.
    """
    if normalization is None:
        return items
    if intensity_range is None:
        spatial = tuple(range(2, items.ndim))
        return normalize_percentile(items, normalization[0], normalization[1], axis=spatial)
    shape = (1, -1) + (1,) * (items.ndim - 2)
    low, high = (np.asarray(intensity_range, np.float64)[:, k].reshape(shape) for k in (0, 1))
    return rescale_intensity(items, low, high)


def _check_intensity_range(intensity_range: object, channels: int) -> np.ndarray | None:
    if intensity_range is None:
        return None
    values = np.asarray(intensity_range, dtype=np.float64)
    if values.shape == (2,):
        values = np.tile(values, (channels, 1))
    if values.shape != (channels, 2) or not np.isfinite(values).all():
        raise ValueError(
            f"intensity_range: expected finite (low, high) values of shape (2,) or ({channels}, 2), "
            f"got shape {np.shape(intensity_range)}"
        )
    return values


def _check_context(context: object, dims: int) -> list[tuple[int, int]]:
    if context is None:
        return [(0, 0)] * dims
    pairs = [tuple(int(v) for v in pair) for pair in context]  # type: ignore[union-attr]
    if len(pairs) != dims or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(f"context: expected {dims} pairs (before, after) of non-negative ints, got {context!r}")
    return pairs  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------
# Test-time augmentation: the 8 symmetries of the square
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """One step of :func:`predict_steps`: ``done`` of ``total`` tiles; ``result`` at the end."""

    done: int
    total: int
    result: np.ndarray | None = None


def converts_to_luminance(model: UNet, n_channels: int) -> bool:
    """Whether ``model`` turns an image of ``n_channels`` channels into its luminance (``model.info.color``).

    Only RGB (3 channels) into a 1-channel network; every other mismatch is an error of the caller's.
    """
    return model.info.color == "luminance" and model.config.in_channels == 1 and n_channels == 3


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that this torch can use, or one ``ValueError``.

    Refused: strings torch does not parse (``"gpu"``), CUDA on a torch without CUDA or
    without a GPU, a CUDA index past the GPUs present, MPS where it is missing.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use cpu")  # fmt: skip
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available here; use cpu")
    return parsed


def resolve_precision(device: str | torch.device) -> Literal["float32", "bfloat16"]:
    """``"bfloat16"`` where ``device`` computes it natively, else ``"float32"`` (with a log line).

    Native: a CPU with AVX512-BF16 or AMX tiles (oneDNN's bfloat16 convolutions run about
    twice float32 there; measured in ``benchmarks/train.py`` and
    ``benchmarks/precision.py``), or a CUDA GPU of compute
    capability 8.0 or more (Ampere and later). Elsewhere bfloat16 is emulated and slower.
    """
    device = check_device(device)
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8
    elif device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    else:
        native = False
    if not native:
        log.info("precision auto: %s has no native bfloat16, computing in float32", device)
    return "bfloat16" if native else "float32"


def _autocast(device: torch.device, precision: Precision):
    if precision == "float32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on during a CUDA forward pass (the fastest kernels
    for each tile shape are found once), restored afterwards; nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _memory_format(device: torch.device, dims: int) -> torch.memory_format | None:
    """Channels-last on CUDA (cuDNN) and for 2D models on the CPU (oneDNN), where it is faster.

    Measured on a 2-core AMD EPYC CPU (torch 2.13, one 700 px tile, float32): 1.24x faster
    for the paper net, 2.0x for a depth-3, 8-channel net (``benchmarks/large_image.py``).
    """
    if device.type == "cuda":
        return torch.channels_last if dims == 2 else torch.channels_last_3d
    return torch.channels_last if device.type == "cpu" and dims == 2 else None


def check_compile(compile: object) -> bool | CompileMode:
    """``compile`` if it is a bool or one of :data:`COMPILE_MODES`, else a ValueError naming them."""
    if isinstance(compile, bool) or compile in COMPILE_MODES:
        return compile  # type: ignore[return-value]
    raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}; got {compile!r}")


def _runner(model: UNet, device: torch.device, compile: bool | CompileMode) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs the forward pass: the model in its fastest memory format, compiled if asked.

    ``torch.compile`` caches the compiled code on the model's ``forward``, so calling this
    again for the same model and tile shape does not compile again. With
    ``"reduce-overhead"`` on CUDA each output lives in a CUDA graph's memory until the next
    replay; :func:`_forward` takes its softmax (a new tensor) at once.
    """
    memory_format = _memory_format(device, model.config.dims)
    if memory_format is not None:
        model.to(memory_format=memory_format)  # the same values in another layout; a no-op the second time
    if not compile:
        return model
    return torch.compile(model, dynamic=False, mode=None if compile is True else compile)


def predict_steps(
    model: UNet,
    image: np.ndarray,
    *,
    channel_axis: int | None = None,
    tile: int | Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    tta: bool = False,
    precision: Precision = "float32",
    intensity_range: np.ndarray | Sequence[float] | None = None,
    context: Sequence[tuple[int, int]] | None = None,
    compile: bool | CompileMode = False,
) -> Iterator[Progress]:
    """Generator form of :func:`predict`: yields a :class:`Progress` after every batch of tiles.

    The last item carries the result. A GUI iterates over it to show progress and stays
    responsive; :func:`predict` wraps it with a tqdm bar.
    """
    config = model.config
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"precision must be 'auto', 'float32', 'bfloat16' or 'float16', got {precision!r}")
    if precision == "auto":
        precision = resolve_precision(device if device is not None else next(model.parameters()).device)
    compile = check_compile(compile)
    shape = np.shape(image)
    if channel_axis is not None and -len(shape) <= channel_axis < len(shape):
        if converts_to_luminance(model, shape[channel_axis]):  # as the model was trained
            from biounet.io import to_luminance

            image, channel_axis = to_luminance(np.asarray(image), "image", axis=channel_axis), None
    items, stacked = as_model_input(image, config, channel_axis)
    spans = _check_context(context, config.dims)
    if tta and config.dims != 2:
        raise ValueError("tta=True is implemented for 2D models only")
    if tta and context is not None:
        raise ValueError("tta=True cannot be combined with context (chunks of a larger image)")
    region = tuple(size - before - after for size, (before, after) in zip(items.shape[2:], spans, strict=True))
    if min(region) < 1:
        raise ValueError(f"context: {spans} leaves no pixels to predict in an image of spatial shape {items.shape[2:]}")
    ranges = _check_intensity_range(intensity_range, config.in_channels)
    items = normalize_items(items, model.info.normalization, ranges)
    transforms = DIHEDRAL if tta else ((0, False),)
    device = check_device(device) if device is not None else next(model.parameters()).device

    # One job per (item, transform); each job's tiles are independent and batched together.
    jobs = [(i, t) for i in range(len(items)) for t in transforms]
    inputs = [np.ascontiguousarray(dihedral(items[i], *t)) for i, t in jobs]
    regions = [region if context is not None else x.shape[1:] for x in inputs]  # context excludes TTA
    layouts = [plan_tiles(config, shape, tile) for shape in regions]
    # Job after job, each job's tiles grouped by shape (a stable sort): batches of one shape,
    # shared by consecutive jobs of the same shape, and few jobs in flight at a time.
    tiles = [
        (j, c) for j, layout in enumerate(layouts)
        for c in sorted(itertools.product(*(range(a.count) for a in layout)), key=lambda c: _tile_shape(layout, c))
    ]  # fmt: skip
    batches = _batches(tiles, lambda tile: _tile_shape(layouts[tile[0]], tile[1]), batch_size)
    log.debug("%d image(s), %d transform(s), %d tile(s)", len(items), len(transforms), len(tiles))

    run = _runner(model, device, compile)
    out = np.zeros((len(items), config.num_classes, *region), np.float32)
    # Each job is stitched where it is computed (no per-tile copy back from a GPU) and copied
    # to the host once its last tile is in, so device memory holds only the jobs in flight.
    results: dict[int, torch.Tensor] = {}
    pending = [math.prod(a.count for a in layout) for layout in layouts]
    was_training = model.training
    model.eval()
    try:
        done = 0
        yield Progress(0, len(tiles))
        for batch in batches:
            windows = [_input_window(inputs[j], layouts[j], spans, corner) for j, corner in batch]
            if compile and len(windows) < batch_size:  # a full batch: one compiled graph per tile shape
                windows += [windows[-1]] * (batch_size - len(windows))
            probs = _forward(run, config, windows, device, precision)[: len(batch)]
            with torch.inference_mode():
                for (j, corner), prob in zip(batch, probs, strict=True):
                    if j not in results:
                        results[j] = torch.zeros((config.num_classes, *regions[j]), device=device)
                    _paste(results[j], prob, layouts[j], corner)
                    pending[j] -= 1
                    if not pending[j]:
                        i, t = jobs[j]
                        out[i] += dihedral_inverse(results.pop(j).cpu().numpy(), *t)
            done += len(batch)
            yield Progress(done, len(tiles))
    finally:
        model.train(was_training)

    if tta:
        out /= len(transforms)
    yield Progress(len(tiles), len(tiles), out if stacked else out[0])


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


def _forward(
    run: Callable[[torch.Tensor], torch.Tensor],
    config: UNetConfig,
    windows: list[np.ndarray],
    device: torch.device,
    precision: Precision,
) -> torch.Tensor:
    """Class probabilities (float32) of a batch of input windows, on ``device``.

    On CUDA the batch goes through pinned host memory with a non-blocking copy, so the host
    prepares the next batch while the device computes; nothing waits for the device until
    the stitched result is copied back once at the end.
    """
    batch = torch.from_numpy(np.stack(windows))
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    memory_format = _memory_format(device, config.dims)
    if memory_format is not None:
        batch = batch.contiguous(memory_format=memory_format)
    with torch.inference_mode(), _autocast(device, precision), _cudnn_benchmark(device):
        probs = torch.softmax(run(batch).float(), dim=1)
    if config.padding == "same":  # keep the centre, where the context is complete
        halo = config.halo
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
    channel_axis: int | None = None,
    tile: int | Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    tta: bool = False,
    precision: Precision = "float32",
    intensity_range: np.ndarray | Sequence[float] | None = None,
    context: Sequence[tuple[int, int]] | None = None,
    compile: bool | CompileMode = False,
    progress: bool = True,
) -> np.ndarray:
    """Segment an image of any size with the overlap-tile strategy; return class probabilities.

    Parameters
    ----------
    model : UNet
        The network; its stored input normalisation (percentiles) is applied per image and
        channel. It is run in eval mode and left in the mode it was in.
    image : ndarray
        ``(Y, X)``, a stack ``(Z, Y, X)`` segmented slice by slice, or either with a channel
        axis (``channel_axis``) for multi-channel models; ``(Z, Y, X)`` for 3D models. Any
        size from 1x1 up; never modified.
    channel_axis : int, optional
        The axis of ``image`` that holds the channels. Required when the model takes more
        than one channel; never guessed.
    tile : int or sequence of int, optional
        Largest input tile per axis (the nearest valid size at or below it is used; default
        700 for 2D models). The tiles per axis are then as few as possible, laid out to
        compute the fewest output pixels (:func:`plan_axis`; the last may be smaller).
    batch_size : int
        Tiles per forward pass.
    device : str or torch.device, optional
        Where to compute (default: where the model's weights are).
    tta : bool
        Average the predictions of the 8 flips and 90-degree rotations (2D models).
    precision : {"float32", "auto", "bfloat16", "float16"}
        Autocast precision of the forward pass; the softmax is float32. ``"auto"`` is
        bfloat16 where the device computes it natively (:func:`resolve_precision`), else
        float32; float32, the default, is the precision in which tiled prediction equals
        whole-image prediction. bfloat16
        probabilities stay within 0.05 of float32 (max abs difference) and 0.005 on
        average, as the tests check on the CPU on random networks of depth 2 to 4.
    intensity_range : array_like, optional
        The intensities that the model's normalisation percentiles map to 0 and 1,
        ``(low, high)`` or one pair per channel ``(channels, 2)``, measured beforehand (e.g.
        over a whole image that is predicted in chunks, see :mod:`biounet.largeimage`).
        Default: the percentiles of each image (and channel) given.
    context : sequence of (int, int), optional
        Pixels ``(before, after)`` per spatial axis of real image context that ``image``
        carries around the region to predict; the result covers the region only. With
        ``padding="valid"``, a region starting at a multiple of ``2**depth`` of the full
        image and ending at one (or at the image end, mirrored on to one) and the context of
        :func:`chunk_context`, the result equals that region of the full image's result.
    compile : bool or {"default", "reduce-overhead", "max-autotune"}
        Run the network through ``torch.compile`` (``True``: its default mode) compiled
        once per model, tile shape and batch size; worth it for many tiles on a GPU.
        ``"reduce-overhead"`` also replays each forward pass as a CUDA graph, which removes
        the kernel launch overhead that dominates small images on a fast GPU.
    progress : bool
        Show a tqdm bar over the tiles.

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
    the CPU (the model's weights are converted in place; their values do not change), 1.24x
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

    bar = None
    try:
        for step in predict_steps(
            model, image, channel_axis=channel_axis, tile=tile, batch_size=batch_size, device=device, tta=tta,
            precision=precision, intensity_range=intensity_range, context=context, compile=compile,
        ):
            if bar is None:
                bar = tqdm(total=step.total, desc="tiles", unit="tile", disable=not progress, leave=False)
            bar.update(step.done - bar.n)
            if step.result is not None:
                return step.result
    finally:
        if bar is not None:
            bar.close()
    raise RuntimeError("predict_steps ended without a result")  # pragma: no cover
