"""The warping error (Jain et al. 2010) with Fiji's border thinning."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from biounet.errors import InputError
from biounet.metrics._common import (
    CROSS,
    RING,
    SQUARE,
    check_labels,
    check_pair,
    check_probabilities,
    pack,
    scan_order,
    unique_values,
)


def _flood_decision(states: np.ndarray) -> np.ndarray:
    """Fiji's rule for a border pixel: the one basin label among ``states`` (> 0), else 0.

    ``states`` (int32) holds -1 (ignored), 0 (line) or a basin label per neighbour.
    """
    high = states.max(axis=1)
    low = (states - 1).view(np.uint32).min(axis=1) + 1  # -1 and 0 wrap around to the top
    return np.where((high > 0) & (high == low.view(np.int32)), high, 0)


def thin_borders(foreground: np.ndarray) -> np.ndarray:
    """Segments of a binary 2D proposal after Fiji's watershed thinning (lines are 0).

    The flood visits border pixels ring by ring (ring d = city-block distance d to the
    nearest cell pixel). A border pixel takes the label of its already-labelled neighbours
    if they all carry one basin label, else it becomes a line pixel. "Already labelled"
    means the rings below plus the pixels of its own ring that Fiji's FIFO pops earlier;
    that dependence is resolved exactly by propagation (re-test a pixel when an earlier
    neighbour of its ring changes label), since a pixel depends only on smaller ranks.
    """
    basins, n_basins = ndimage.label(foreground, CROSS)
    if n_basins == 0:
        return np.ones(foreground.shape, np.int32)
    if foreground.all():
        return basins.astype(np.int32)
    # A frame of sentinels (distance -2, never d - 1, d or d + 1) replaces bounds checks.
    distance = np.pad(ndimage.distance_transform_cdt(~foreground, metric="taxicab"), 1, constant_values=-2)
    state = np.pad(basins.astype(np.int32), 1, constant_values=-1)
    framed_width = distance.shape[1]
    distance, state = distance.ravel(), state.ravel()
    offsets = np.array([-1, -framed_width, 1, framed_width])  # Fiji's order: left, up, right, down
    rank = np.full(state.size, -1, np.int32)
    first = np.full(state.size, state.size, np.int64)
    ring = scan_order(distance.reshape(-1, framed_width) == 1)
    d = 1
    while ring.size:
        order = np.arange(ring.size, dtype=np.int32)
        rank[ring] = order
        nbr = ring[:, None] + offsets
        nbr_distance = distance[nbr]
        lower = np.where(nbr_distance == d - 1, state[nbr], np.int32(-1))
        labels = _flood_decision(lower)
        nbr_rank = np.where(nbr_distance == d, rank[nbr], np.int32(-1))  # -1 outside the ring
        earlier = nbr_rank < order[:, None]
        earlier &= nbr_rank >= 0
        to_test = np.flatnonzero(earlier.any(axis=1))
        while to_test.size:
            same_ring = np.where(earlier[to_test], labels[nbr_rank[to_test]], np.int32(-1))
            update = _flood_decision(np.concatenate([lower[to_test], same_ring], axis=1))
            changed = to_test[update != labels[to_test]]
            labels[to_test] = update
            later = nbr_rank[changed]
            to_test = unique_values(later[later > changed[:, None]])
        state[ring] = labels
        rank[ring] = -1
        pixel, direction = np.nonzero(nbr_distance == d + 1)  # sorted by rank, then direction
        discovered = nbr[pixel, direction]
        position = np.arange(discovered.size)
        np.minimum.at(first, discovered, position)
        ring = discovered[first[discovered] == position]  # each pixel where the queue first meets it
        first[discovered] = state.size
        d += 1
    return state.reshape(-1, framed_width)[1:-1, 1:-1]


class TopologyError(enum.IntEnum):
    """Kinds of mismatch left after warping, with the flag values of Fiji's ``WarpingError``."""

    MERGE = 0x1
    SPLIT = 0x2
    HOLE_ADDITION = 0x4
    OBJECT_DELETION = 0x8
    OBJECT_ADDITION = 0x10
    HOLE_DELETION = 0x20


def _simple_point_table() -> np.ndarray:
    """For each 8-neighbourhood code, whether the centre is a simple point (4/8 topology).

    Foreground is 4-connected and background 8-connected, as Fiji's ``simple2D(im, 4)``:
    the foreground pixels among the 8 neighbours (centre removed) touching the centre's
    4-neighbours form exactly one 4-connected component, and the background pixels among
    them one 8-connected component.
    """
    table = np.zeros(256, bool)
    edges = ([0, 1, 2, 1], [1, 2, 1, 0])
    for code in range(256):
        patch = np.zeros((3, 3), bool)
        for k, (dy, dx) in enumerate(RING):
            patch[1 + dy, 1 + dx] = bool(code >> k & 1)
        fg, _ = ndimage.label(patch, CROSS)
        background = ~patch
        background[1, 1] = False
        n_background = ndimage.label(background, SQUARE)[1]
        table[code] = len(set(fg[edges].tolist()) - {0}) == 1 and n_background == 1
    return table


_SIMPLE = _simple_point_table()


def _warp(source: np.ndarray, target: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Fiji's ``simplePointWarp2d``: flip simple mismatched pixels of ``source`` until none.

    Each sweep visits the mismatched pixels by decreasing ``priority`` (ties in Fiji's
    column-major scan order) and flips each one that is simple at that moment; sweeps
    repeat until one flips nothing. The image is framed by background, as Fiji pads it.

    A pixel's test sees the pixels before it in the sweep already flipped or not. The
    decisions are found by propagation: start from the decisions at the sweep's starting
    state and re-test only pixels with an earlier neighbour whose decision changed. This is
    exact because a decision depends only on decisions of lower rank. Flips only remove
    mismatches, so the ordered list of mismatches is made once and only shrinks, and a
    pixel whose neighbourhood did not change since its last test cannot have become simple.
    """
    src = np.pad(source, 1).astype(np.uint8)
    framed_width = src.shape[1]
    mismatched = scan_order(src != np.pad(target, 1))
    # sort by decreasing priority, then scan position: one unique integer key (the bits of a
    # non-negative float32 order like the float)
    key = (~np.pad(priority, 1).ravel()[mismatched].view(np.uint32)).astype(np.uint64) << np.uint64(32)
    order = mismatched[np.argsort(key | np.arange(mismatched.size, dtype=np.uint64))]
    n = order.size
    rank = np.full(src.size, n, np.int32)
    rank[order] = np.arange(n, dtype=np.int32)
    nbr = order[:, None] + np.array([dy * framed_width + dx for dy, dx in RING])
    nbr_rank = rank[nbr]  # n (a sentinel row) where the neighbour was never mismatched
    earlier = nbr_rank < np.arange(n, dtype=np.int32)[:, None]
    code = pack(src.ravel()[nbr])  # neighbourhood codes at the start of the current sweep
    alive = np.ones(n + 1, bool)  # still mismatched
    alive[n] = False
    to_test = np.arange(n)
    while to_test.size:
        flips = np.zeros(n + 1, bool)
        flips[to_test] = _SIMPLE[code[to_test]]  # as if no earlier pixel flipped
        changed = to_test[flips[to_test]]
        while changed.size:  # re-test the later neighbours of changed decisions
            later = nbr_rank[changed]
            later = unique_values(later[(later > changed[:, None]) & alive[later]])
            update = _SIMPLE[code[later] ^ pack(earlier[later] & flips[nbr_rank[later]])]
            changed = later[update != flips[later]]
            flips[later] = update
        flipped = np.flatnonzero(flips[:n])
        alive[flipped] = False
        for k in range(8):  # the neighbour in direction k sees the flipped pixel in direction k + 4
            row = nbr_rank[flipped, k]
            row = row[alive[row]]
            code[row] ^= np.uint8(1 << (k + 4) % 8)
        around = nbr_rank[flipped]
        to_test = unique_values(around[alive[around]])
    warped = src.ravel()
    warped[order[~alive[:n]]] ^= 1
    return warped.reshape(-1, framed_width)[1:-1, 1:-1].astype(bool)


def _ring_gap_table() -> tuple[np.ndarray, np.ndarray]:
    """For each 8-neighbourhood code: the foreground runs around the ring that touch the
    centre's 4-neighbours, and one background ring position in each gap between them.

    Runs of corner pixels alone do not separate gaps: background is 8-connected and passes
    diagonally between such a corner and the centre.
    """
    runs = np.zeros(256, np.int64)
    gaps = np.full((256, 4), -1, np.int64)
    for code in range(255):
        ring = [bool(code >> k & 1) for k in range(8)]
        start = ring.index(False)
        stretches: list[list[int]] = [[]]  # background positions between edge-touching runs
        run: list[int] = []
        for k in [(start + 1 + i) % 8 for i in range(8)]:
            if ring[k]:
                run.append(k)
                continue
            if any(j % 2 for j in run):  # the run holds a 4-neighbour of the centre
                stretches.append([])
            run = []
            stretches[-1].append(k)
        if len(stretches) > 1:  # the stretch after the last run wraps around to the first
            stretches[0] = stretches.pop() + stretches[0]
        stretches = [gap for gap in stretches if gap]
        runs[code] = len(stretches) if len(stretches) > 1 or any(ring[1::2]) else 0
        gaps[code, : len(stretches)] = [gap[0] for gap in stretches]
    # code 255 (no background around): no run, no gap, so k - a + 1 = 1 piece, as it should be
    return runs, gaps


_EDGE_RUNS, _GAP_POSITIONS = _ring_gap_table()


def _classify(warped: np.ndarray, mismatched: np.ndarray) -> np.ndarray:
    """Fiji's ``classifyMismatches2d`` (whole-image radius) for the flat ``mismatched`` pixels.

    The one global case, a foreground pixel whose neighbours show background and one
    object, is a split when removing it leaves at least two pieces of the object around it.
    By planar duality ((4, 8) topology, the outside of the image being background) the
    number of pieces is ``k - a + 1`` for ``k`` foreground runs around the pixel that touch
    its 4-neighbours and ``a`` distinct background components among the gaps between
    them, so no relabelling per pixel is needed.
    """
    width = warped.shape[1]
    components, _ = ndimage.label(warped, CROSS)
    background, _ = ndimage.label(np.pad(~warped, 1, constant_values=True), SQUARE)
    framed = np.pad(components, 1, constant_values=-1).ravel()
    offsets = np.array([dy * (width + 2) + dx for dy, dx in RING])
    y, x = np.divmod(mismatched, width)
    centre = (y + 1) * (width + 2) + x + 1
    around = framed[centre[:, None] + offsets]
    ordered = np.sort(around, axis=1)
    first = np.concatenate([np.ones((len(ordered), 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    distinct = (first & (ordered >= 0)).sum(axis=1)
    has_background = (around == 0).any(axis=1)
    own = framed[centre]
    inside = own != 0
    code = pack(around > 0)
    gap_pixels = np.where(_GAP_POSITIONS[code] >= 0, centre[:, None] + offsets[_GAP_POSITIONS[code]], 0)
    gap_labels = np.sort(np.where(_GAP_POSITIONS[code] >= 0, background.ravel()[gap_pixels], 0), axis=1)
    n_gap_components = ((gap_labels[:, 1:] != gap_labels[:, :-1]) & (gap_labels[:, 1:] > 0)).sum(axis=1)
    n_gap_components += gap_labels[:, 0] > 0
    pieces = _EDGE_RUNS[code] - n_gap_components + 1
    others = distinct - (around == own[:, None]).any(axis=1)
    kinds = np.where(inside, TopologyError.SPLIT, TopologyError.MERGE)
    two = distinct == 2
    kinds = np.where(two & ~inside, TopologyError.HOLE_ADDITION, kinds)
    kinds = np.where(two & inside & (others + pieces <= 2), TopologyError.HOLE_DELETION, kinds)
    one = distinct == 1
    kinds = np.where(one & has_background & inside, TopologyError.OBJECT_DELETION, kinds)
    kinds = np.where(one & has_background & ~inside, TopologyError.OBJECT_ADDITION, kinds)
    kinds = np.where(one & ~has_background & inside, TopologyError.HOLE_ADDITION, kinds)
    kinds = np.where(one & ~has_background & ~inside, TopologyError.HOLE_DELETION, kinds)
    return kinds.astype(np.uint8)


@dataclass(frozen=True)
class WarpingResult:
    """Outcome of :func:`warping_error` at one threshold.

    ``error`` is the classic warping error (fraction of pixels still mismatched after
    warping); ``split_merge_error`` the fraction of those classified split or merge (the
    ISBI 2012 "splits and mergers" warping error). The counts are topological errors, not
    pixels: the mismatched pixels of each kind grouped into connected clusters as Fiji's
    ``clusterMismatchesByError`` does. ``mismatches`` maps each remaining mismatch to its
    :class:`TopologyError` value (0 elsewhere); ``warped`` is the warped ground truth.
    """

    threshold: float
    error: float
    split_merge_error: float
    splits: int
    mergers: int
    object_additions: int
    object_deletions: int
    hole_additions: int
    hole_deletions: int
    warped: np.ndarray
    mismatches: np.ndarray


ERROR_COUNTS = ("splits", "mergers", "object_additions", "object_deletions", "hole_additions", "hole_deletions")

# (kind, pixel value in the warped ground truth or None for either, connectivity) as Fiji clusters
_CLUSTERS = (
    (TopologyError.OBJECT_ADDITION, None, CROSS),
    (TopologyError.HOLE_DELETION, False, CROSS),
    (TopologyError.HOLE_DELETION, True, CROSS),
    (TopologyError.MERGE, None, SQUARE),
    (TopologyError.HOLE_ADDITION, False, CROSS),
    (TopologyError.HOLE_ADDITION, True, SQUARE),
    (TopologyError.OBJECT_DELETION, None, CROSS),
    (TopologyError.SPLIT, None, CROSS),
)


def warp_and_classify(prob: np.ndarray, gt: np.ndarray, threshold: float) -> WarpingResult:
    target = prob > threshold
    priority = np.abs(prob - threshold).astype(np.float32)
    warped = _warp(gt, target, priority)
    mismatched = np.flatnonzero(warped != target)
    kinds = np.zeros(gt.size, np.uint8)
    kinds[mismatched] = _classify(warped, mismatched)
    kinds = kinds.reshape(gt.shape)
    counts = {kind: 0 for kind in TopologyError}
    for kind, value, structure in _CLUSTERS:
        pixels = mismatched[(kinds.ravel()[mismatched] == kind) & (value is None or warped.ravel()[mismatched] == value)]
        if pixels.size:  # label within the pixels' bounding box only
            y, x = np.divmod(pixels, gt.shape[1])
            box = np.zeros((y.max() - y.min() + 1, x.max() - x.min() + 1), bool)
            box[y - y.min(), x - x.min()] = True
            counts[kind] += ndimage.label(box, structure)[1]
    split_merge = np.isin(kinds, [TopologyError.SPLIT, TopologyError.MERGE]).sum()
    return WarpingResult(
        threshold=threshold,
        error=mismatched.size / gt.size,
        split_merge_error=float(split_merge) / gt.size,
        splits=counts[TopologyError.SPLIT],
        mergers=counts[TopologyError.MERGE],
        object_additions=counts[TopologyError.OBJECT_ADDITION],
        object_deletions=counts[TopologyError.OBJECT_DELETION],
        hole_additions=counts[TopologyError.HOLE_ADDITION],
        hole_deletions=counts[TopologyError.HOLE_DELETION],
        warped=warped,
        mismatches=kinds,
    )


def warping_error(prob: np.ndarray, gt: np.ndarray, *, threshold: float = 0.5) -> WarpingResult:
    r"""Topology-preserving warping error of a probability map (Jain et al. 2010).

    The ground truth ``gt > 0`` is warped toward the proposal ``prob > threshold`` by
    flipping mismatched *simple* pixels only (foreground 4-connected, background
    8-connected, so flips never split, merge, create or delete objects or holes). As in
    Fiji, sweeps visit the mismatched pixels from the most confident (largest
    ``|prob - threshold|``) to the least, ties in column-major order, and repeat until a
    sweep flips nothing; the image is framed by background. The warping error is

    .. math:: W = \frac{|\{x : L^*(x) \ne \hat{L}(x)\}|}{N},

    the fraction of the ``N`` pixels where the warped ground truth :math:`L^*` still differs
    from the thresholded proposal :math:`\hat L`. Each remaining mismatch is classified as
    Fiji does, from the 4-connected components of the warped ground truth around it: a
    split, a merger, an added or deleted object, an added or deleted hole.

    Parameters
    ----------
    prob : ndarray, shape (H, W)
        Probability of the foreground (cell) class, in [0, 1].
    gt : ndarray, shape (H, W)
        Ground truth; nonzero is foreground.
    threshold : float
        Binarisation threshold for ``prob``, in [0, 1).

    Returns
    -------
    WarpingResult

    References
    ----------
    .. [1] V. Jain et al. (2010). Boundary learning by optimization with topological
       constraints. CVPR 2010, 2488-2495.
    """
    prob = check_probabilities(prob)
    gt = check_labels(gt, "gt")
    check_pair(prob, gt, ("prob", "gt"), ndim=2)
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}")
    return warp_and_classify(prob, gt != 0, float(threshold))
