"""The overlap-tile plan: where tiles go, how far the image is mirrored, and the context a chunk needs."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biounet.errors import InputError
from biounet.model import UNetConfig

log = logging.getLogger(__name__)


#: Default largest input tile per axis for 2D models: a 512x512 image is one 700x700 tile.
DEFAULT_TILE_2D = 700
#: Default largest input tile per axis for 3D models.
DEFAULT_TILE_3D = 124


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
    max_in = max(config.valid_input_at_most(max_tile) or smallest, smallest)
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
        raise InputError(f"tile: expected one size or {len(shape)} sizes, got {tile!r}")
    if min(tiles) < 1:
        raise InputError(f"tile: sizes must be positive, got {tile!r}")
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
        shape = tile_shape(layout, corner)
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def tile_shape(layout: Sequence[AxisTiling], corner: Sequence[int]) -> tuple[int, ...]:
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
