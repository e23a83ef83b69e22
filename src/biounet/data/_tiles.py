"""Random training tiles with mirrored context, class targets and loss weights (paper, sec. 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from biounet.borders import mirror_indices
from biounet.data._samples import Pick, Sample, TargetKind
from biounet.data._weights import weight_map
from biounet.errors import InputError
from biounet.io._intensity import Background, normalize_percentile

TargetWindow = Literal["output", "input"]


class Tile(NamedTuple):
    """One training example (a namedtuple, so the default ``DataLoader`` collation works).

    Attributes
    ----------
    image : Tensor
        ``(C, in_h, in_w)`` float32 input tile, mirrored beyond the image border.
    target : Tensor
        ``(out_h, out_w)`` uint8 class target, 0 outside the image (``(in_h, in_w)`` with
        ``targets="input"``).
    weight : Tensor
        float32 loss weight of the same shape, 0 outside the image.
    """

    image: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def extract_tile(
    image: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    corner: tuple[int, int],
    output_size: tuple[int, int],
    halo: tuple[int, int],
    targets: TargetWindow = "output",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one training tile: an output window and its input window with context.

    Parameters
    ----------
    image : ndarray
        ``(C, H, W)`` image.
    target, weight : ndarray
        ``(H, W)`` class target and loss weights.
    corner : (int, int)
        Top-left pixel ``(y0, x0)`` of the output window; it may lie outside the image.
    output_size : (int, int)
        ``(out_h, out_w)``.
    halo : (int, int)
        Context per side, ``(in - out) / 2`` per axis.
    targets : {"output", "input"}
        Cut target and weight over the output window, or over the whole input window (for
        augmentations that warp labels with the image before the centre is cropped).

    Returns
    -------
    image_tile : ndarray
        ``(C, out_h + 2 halo_y, out_w + 2 halo_x)``, mirrored beyond the image border by
        the predictor's rule (:func:`biounet.borders.mirror_indices`, ``np.pad`` "reflect").
    target_tile, weight_tile : ndarray
        ``(out_h, out_w)`` (or the input size); pixels outside the image have target 0 and
        weight 0, they are never mirrored.

    Raises
    ------
    ValueError
        If the shapes do not fit together, a size is not positive, a halo is negative or
        the output window does not overlap the image.
    """
    (y0, x0), (oh, ow), (hy, hx) = corner, output_size, halo
    if image.ndim != 3 or target.shape != image.shape[1:] or weight.shape != image.shape[1:]:
        raise InputError(
            f"extract_tile: need image (C, H, W) and target, weight (H, W); got {image.shape}, "
            f"{target.shape}, {weight.shape}"
        )
    _, height, width = image.shape
    if min(oh, ow) < 1 or min(hy, hx) < 0:
        raise InputError(f"extract_tile: output_size {output_size} must be positive and halo {halo} >= 0")
    if targets not in ("output", "input"):
        raise InputError(f"extract_tile: targets must be 'output' or 'input', got {targets!r}")
    if not (1 - oh <= y0 < height and 1 - ow <= x0 < width):
        raise InputError(
            f"extract_tile: output window at {corner} of size {output_size} misses the {height}x{width} image"
        )
    rows = _mirrored_range(y0 - hy, y0 + oh + hy, height)
    cols = _mirrored_range(x0 - hx, x0 + ow + hx, width)
    image_tile = image[:, rows[:, None], cols[None, :]]
    if targets == "input":
        (y0, x0), (oh, ow) = (y0 - hy, x0 - hx), (oh + 2 * hy, ow + 2 * hx)
    target_tile = np.zeros((oh, ow), dtype=target.dtype)
    weight_tile = np.zeros((oh, ow), dtype=weight.dtype)
    inside_y = slice(max(y0, 0), min(y0 + oh, height))
    inside_x = slice(max(x0, 0), min(x0 + ow, width))
    into = (slice(inside_y.start - y0, inside_y.stop - y0), slice(inside_x.start - x0, inside_x.stop - x0))
    target_tile[into] = target[inside_y, inside_x]
    weight_tile[into] = weight[inside_y, inside_x]
    return image_tile, target_tile, weight_tile


def _mirrored_range(start: int, stop: int, size: int) -> np.ndarray:
    """Source pixels of positions ``start..stop-1`` of an axis of ``size`` pixels, mirrored outside."""
    before, after = max(0, -start), max(0, stop - size)
    return mirror_indices(size, before, after)[start + before : stop + before]


class TileDataset(torch.utils.data.Dataset[Tile]):
    """Random training tiles for a U-Net with ``input = output + 2 * halo`` (paper, sec. 3).

    Each item picks a sample and an output window uniformly among all windows that overlap
    the image (``y0`` in ``-(out_h - 1) .. H - 1``), so every labelled pixel, the image
    border included, lies in a window equally often. The input window around it is
    mirrored beyond the border as the predictor does; target and weight pixels outside the
    image are 0, so they do not count in the loss.

    Item ``i`` of epoch ``e`` is drawn from ``np.random.default_rng([seed, e, i])``: a run is
    reproducible for any number of ``DataLoader`` workers and any sampler.

    Parameters
    ----------
    samples : sequence of Sample
        The training data, all with the same number of channels.
    input_size, output_size : int or (int, int)
        Network input and output sizes, e.g. 572 and 388 for the paper's net
        (``model.input_size_for(out)``); equal for ``padding="same"``.
    targets : {"output", "input"}
        Target and weight tiles of the output size, or of the input size (zero outside the
        image) so that an augmentation can warp them with the image and crop the centre;
        the output window is drawn as above either way.
    kind : {"binary", "border"}
        The class target (:meth:`Sample.class_target`): background and cell, or background,
        cell interior and cell border.
    length : int
        Items per epoch.
    seed : int
        Seed of the draws (>= 0).
    pick : {"images", "pixels", "objects"}
        Choose samples with equal probability, in proportion to their number of windows
        (every pixel of the data set equally likely), or in proportion to their number of
        labelled objects, at least 1 (every object about equally often in a tile: a few large
        images of many small nuclei are not drowned by many small images of a few large ones).
    normalization : (float, float) or None
        Percentiles mapped to 0 and 1 per image and channel by
        :func:`biounet.io.normalize_percentile` (as the predictor does), or None for raw
        values as float32.
    background : {"as-is", "dark"}
        With ``"dark"``, images with a bright background are inverted after normalisation
        (``background`` of :func:`biounet.io.normalize_percentile`).
    weight_fn : callable
        ``weight_fn(labels) -> (H, W)`` loss weights, computed once per sample. Default: the
        paper's eq. 2, :func:`biounet.data.weight_map` with ``w0=10, sigma=5`` and
        per-image balanced class weights; use :func:`functools.partial` for other settings.
    progress : bool
        Show a progress bar while the weight maps are computed.

    Examples
    --------
    >>> data = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2))]
    >>> tiles = TileDataset(data, input_size=572, output_size=388, length=8)
    >>> [tuple(t.shape) for t in tiles[0]]
    [(1, 572, 572), (388, 388), (388, 388)]
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        input_size: int | tuple[int, int],
        output_size: int | tuple[int, int],
        *,
        targets: TargetWindow = "output",
        kind: TargetKind = "binary",
        length: int = 1000,
        seed: int = 0,
        pick: Pick = "images",
        normalization: tuple[float, float] | None = (1.0, 99.8),
        background: Background = "as-is",
        weight_fn: Callable[[np.ndarray], np.ndarray] = weight_map,
        progress: bool = False,
    ) -> None:
        inp, out = as_pair(input_size, "input_size"), as_pair(output_size, "output_size")
        if any(i < o or (i - o) % 2 for i, o in zip(inp, out)):
            raise InputError(f"input_size {inp} must be output_size {out} plus an even number of pixels per axis")
        if not samples:
            raise InputError("samples is empty")
        if not isinstance(length, int) or length < 1:
            raise InputError(f"length must be a positive integer, got {length!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if pick not in get_args(Pick):
            raise InputError(f"pick must be one of {', '.join(map(repr, get_args(Pick)))}, got {pick!r}")
        if targets not in ("output", "input"):
            raise InputError(f"targets must be 'output' or 'input', got {targets!r}")
        channels = {s.image.shape[2:] for s in samples}
        if len(channels) > 1:
            raise InputError(f"samples differ in channels {sorted(channels)}; load them with as_gray=True")
        self.output_size, self.halo = out, ((inp[0] - out[0]) // 2, (inp[1] - out[1]) // 2)
        self.targets, self.length, self.seed, self.epoch = targets, length, seed, 0
        self._images = [_channels_first(s.image, normalization, background) for s in samples]
        self._targets = [s.class_target(kind) for s in samples]
        self._weights = [
            np.asarray(weight_fn(s.separated), dtype=np.float32)
            for s in tqdm(samples, desc="weight maps", disable=not progress)
        ]
        self._p = _pick_probabilities(samples, out, pick)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of tiles from now on (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Tile:
        if not 0 <= index < self.length:
            raise IndexError(f"TileDataset index {index} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self._images), p=self._p))
        height, width = self._targets[k].shape
        corner = (int(rng.integers(1 - self.output_size[0], height)), int(rng.integers(1 - self.output_size[1], width)))
        image, target, weight = extract_tile(
            self._images[k], self._targets[k], self._weights[k], corner, self.output_size, self.halo, self.targets
        )
        target = torch.from_numpy(target.astype(np.uint8, copy=False))  # classes: 8x less to copy, no range check
        return Tile(torch.from_numpy(image), target, torch.from_numpy(weight))


def _pick_probabilities(samples: Sequence[Sample], output_size: tuple[int, int], pick: Pick) -> np.ndarray:
    """The probability of drawing each sample: equal, by its output windows, or by its objects (>= 1)."""
    if pick == "pixels":
        sizes = [(s.labels.shape[0] + output_size[0] - 1) * (s.labels.shape[1] + output_size[1] - 1) for s in samples]
    elif pick == "objects":
        sizes = [max(len(np.unique(s.labels)) - int((s.labels == 0).any()), 1) for s in samples]
    else:
        sizes = [1] * len(samples)
    weights = np.asarray(sizes, dtype=float)
    return weights / weights.sum()


def as_pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in pair):
        raise InputError(f"{name} must be a positive int or a pair of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def _channels_first(
    image: np.ndarray, normalization: tuple[float, float] | None, background: Background = "as-is"
) -> np.ndarray:
    """``(C, H, W)`` float32 copy of an ``(H, W)`` or ``(H, W, C)`` image, optionally normalised."""
    image = image[np.newaxis] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    if normalization is None:
        return np.ascontiguousarray(image, dtype=np.float32)
    return normalize_percentile(image, *normalization, axis=(1, 2), background=background)
