"""Segmentation metrics: the ISBI 2012 EM challenge scores, the Cell Tracking Challenge SEG
measure, per-class IoU/Dice and object matching (DSB 2018 / StarDist average precision).

ISBI 2012 scores follow the challenge's official evaluation, Fiji's
``trainableSegmentation.metrics`` (``RandError``, ``VariationOfInformation``, ``PixelError``,
``WarpingError``) as called by the challenge's script: re-derived from that code and
vectorised with NumPy/SciPy, not translated line by line.

* The probability map ``prob`` (probability of *cell*, the white class of the ISBI labels) is
  binarised as ``prob > t`` for ``t`` in :data:`ISBI_THRESHOLDS`, the eleven values Fiji's loop
  ``for (t = 0.0; t <= 1.0; t += 0.1)`` visits. They are accumulated in double precision, so
  the last one is ``0.9999999999999999``: a pixel of probability exactly 1 is foreground at
  every threshold. ``prob`` is rounded to float32 (Fiji's 32-bit images) and compared in
  double precision, as Java does.
* Ground-truth segments are the 4-connected components of the cells (``gt > 0``).
* Border thinning (the challenge's final V_rand and V_info are "after thinning"): the
  binarised proposal is inverted (cells 0, borders 255) and flooded with Fiji's classic
  Vincent-Soille watershed, 4-connected. Each 4-connected cell region is a basin; the border
  pixels are assigned, in breadth-first order from the cells, to the basin that reaches them,
  and a pixel reached by two basins becomes a watershed line (label 0), so the proposal's
  borders end up 1 pixel wide and every border pixel joins a cell. A proposal without any
  cell pixel is one single segment. :func:`_thin_borders` reproduces Fiji's FIFO order
  exactly (first the border pixels next to a cell in Fiji's column-major scan order, then
  the order in which the queue discovers them, neighbours left, up, right, down).
* V_rand and V_info are computed on the ground-truth foreground only; proposal line pixels
  (label 0) count as singletons. Each is the best value over the thresholds.
* The warping error warps the ground truth toward each binarised proposal with Fiji's
  ``simplePointWarp2d`` (same visiting order, same 4/8 simple-point test, so the same
  warped image) and classifies the remaining mismatches as Fiji's ``classifyMismatches2d``.

Everything else in the module (IoU/Dice, the Cell Tracking Challenge SEG, object matching)
works on label images of any dimension. Scoring files (``biounet evaluate``) is
:mod:`biounet.evaluation`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import label as label_components
from skimage.segmentation import relabel_sequential


def _fiji_thresholds() -> tuple[float, ...]:
    values, t = [], 0.0
    while t <= 1.0:
        values.append(t)
        t += 0.1
    return tuple(values)


#: The thresholds of the ISBI 2012 evaluation: 0.0, 0.1, ..., 0.9999999999999999 (11 values).
ISBI_THRESHOLDS: tuple[float, ...] = _fiji_thresholds()

#: IoU thresholds of the DSB 2018 / StarDist object matching: 0.5, 0.55, ..., 0.95.
IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())

_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = ndimage.generate_binary_structure(2, 2)
# The 8 neighbours (dy, dx) in ring order; bit k of a neighbourhood code is neighbour k.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


# --------------------------------------------------------------------------------------------
# Input checks and array helpers
# --------------------------------------------------------------------------------------------
def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str], *, ndim: int | None = None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{names[0]} and {names[1]} must be {ndim}D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty (shape {a.shape})")


def _check_labels(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x.astype(np.uint8)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or boolean label image, got dtype {x.dtype}")
    if x.dtype.kind == "i" and x.size and x.min() < 0:
        raise ValueError(f"{name} has negative labels (min {x.min()})")
    return x


def _check_probabilities(prob: np.ndarray, name: str = "prob") -> np.ndarray:
    prob = np.asarray(prob)
    if prob.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real-valued array, got dtype {prob.dtype}")
    # Fiji holds 32-bit pixels and compares them, promoted, with double thresholds: round to
    # float32, compare in float64 (a float32 comparison would round 0.9999999999999999 to 1).
    prob = prob.astype(np.float32).astype(np.float64)
    if not np.isfinite(prob).all():
        raise ValueError(f"{name} has NaN or infinite values")
    if prob.size and (prob.min() < 0.0 or prob.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1], got values in [{prob.min()}, {prob.max()}]")
    return prob


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0 (kept), 1..n in increasing order of the original ids, and n."""
    sequential = relabel_sequential(labels)[0].astype(np.int64, copy=False)  # int64: pair indices must not wrap
    return sequential, int(sequential.max(initial=0))


def _scan_order(mask: np.ndarray) -> np.ndarray:
    """Flat (row-major) indices of ``mask``'s pixels in Fiji's scan order: x outer, y inner."""
    height, width = mask.shape
    x, y = np.divmod(np.flatnonzero(mask.T), height)
    return y * width + x


def _pack(bits: np.ndarray) -> np.ndarray:
    """Neighbourhood codes of an (n, 8) array of 0/1 values in ring order."""
    return np.packbits(bits, axis=1, bitorder="little").ravel()


def _unique(values: np.ndarray) -> np.ndarray:
    """The distinct entries of ``values``, in no particular order (faster than np.unique)."""
    values = values.ravel()
    owner = np.empty(int(values.max()) + 1 if values.size else 0, np.int64)
    index = np.arange(values.size)
    owner[values] = index  # one of the writers of each value wins
    return values[owner[values] == index]


# --------------------------------------------------------------------------------------------
# V_rand and V_info (foreground-restricted, ISBI 2012)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitMergeScore:
    """An F-score and its two halves: ``score = 2 split merge / (split + merge)``.

    ``split`` is 1 when the proposal never splits a true segment (Fiji's "recall"),
    ``merge`` is 1 when it never merges two (Fiji's "precision").
    """

    score: float
    split: float
    merge: float


def _fscore(split: float, merge: float) -> float:
    return 2.0 * split * merge / (split + merge) if split + merge > 0 else 0.0


def _table(gt: np.ndarray, pred: np.ndarray, n_pred: int) -> np.ndarray:
    """Contingency counts ``n[i, j]``: ground-truth segment i >= 1 (rows 1..), proposal j >= 0."""
    index = gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel()
    n_gt = int(gt.max()) if gt.size else 0
    return np.bincount(index, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)[1:]


def _rand_from_table(n: np.ndarray) -> SplitMergeScore:
    counts = n.astype(np.float64)
    singletons = counts[:, 0].sum()  # proposal background: every pixel its own segment
    sum_ab = (counts[:, 1:] ** 2).sum() + singletons
    sum_a = (counts.sum(axis=1) ** 2).sum()
    sum_b = (counts[:, 1:].sum(axis=0) ** 2).sum() + singletons
    split, merge = sum_ab / sum_a, sum_ab / sum_b
    return SplitMergeScore(_fscore(split, merge), split, merge)


def _xlogx(x: np.ndarray) -> float:
    x = x[x > 0]
    return float((x * np.log(x)).sum())


def _info_from_table(n: np.ndarray) -> SplitMergeScore:
    total = float(n.sum())
    p = n.astype(np.float64) / total
    singletons = p[:, 0].sum()
    h_a = -_xlogx(p.sum(axis=1))
    h_b = -_xlogx(p[:, 1:].sum(axis=0)) + singletons * np.log(total)
    h_ab = -_xlogx(p[:, 1:]) + singletons * np.log(total)
    mutual = max(h_a + h_b - h_ab, 0.0)
    if h_b == 0:  # Fiji's conventions for a side with a single segment
        merge, split = 1.0, 0.0
    elif h_a == 0:
        merge, split = 0.0, 1.0
    else:
        merge, split = min(mutual / h_a, 1.0), min(mutual / h_b, 1.0)
    return SplitMergeScore(_fscore(split, merge), split, merge)


def _label_tables(gt_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    gt_labels = _check_labels(gt_labels, "gt_labels")
    pred_labels = _check_labels(pred_labels, "pred_labels")
    _check_pair(gt_labels, pred_labels, ("gt_labels", "pred_labels"))
    if not gt_labels.any():
        raise ValueError("gt_labels has no foreground (all 0): the foreground-restricted score is undefined")
    gt_seq, _ = _sequential(gt_labels)
    pred_seq, n_pred = _sequential(pred_labels)
    return _table(gt_seq, pred_seq, n_pred)


def v_rand(gt_labels: np.ndarray, pred_labels: np.ndarray) -> SplitMergeScore:
    r"""Foreground-restricted Rand F-score V_rand of a proposal against the ground truth.

    With :math:`p_{ij}` the fraction of ground-truth foreground pixels in true segment *i*
    and proposed segment *j*, :math:`t_i = \sum_j p_{ij}` and :math:`s_j = \sum_i p_{ij}`,

    .. math::
        V^{split} = \frac{\sum_{ij} p_{ij}^2}{\sum_i t_i^2}, \quad
        V^{merge} = \frac{\sum_{ij} p_{ij}^2}{\sum_j s_j^2}, \quad
        V_{rand} = \frac{2 V^{split} V^{merge}}{V^{split} + V^{merge}}

    (Arganda-Carreras et al. 2015, eq. 3-5). Pixels with ``gt_labels == 0`` are ignored;
    proposed pixels labelled 0 are each a segment of their own, as in Fiji. The Rand error
    of the challenge is ``1 - V_rand``.

    This is scikit-image's :func:`~skimage.metrics.adapted_rand_error` except for two
    conventions: pairs are drawn with replacement (``n^2`` normalisation, a pixel pairs with
    itself) where scikit-image counts distinct pairs, and label 0 of the proposal is
    singletons where scikit-image treats it as one segment. (scikit-image also names the
    halves the other way round: its ``precision`` is ``split`` here.)

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int
        Label images of the same shape; ``gt_labels`` needs some nonzero pixels.

    Returns
    -------
    SplitMergeScore
        ``score`` = V_rand, with its ``split`` and ``merge`` halves, all in (0, 1].

    References
    ----------
    .. [1] I. Arganda-Carreras et al. (2015). Crowdsourcing the creation of image
       segmentation algorithms for connectomics. Front. Neuroanat. 9:142.
    """
    return _rand_from_table(_label_tables(gt_labels, pred_labels))


def v_info(gt_labels: np.ndarray, pred_labels: np.ndarray) -> SplitMergeScore:
    r"""Foreground-restricted information-theoretic score V_info (ISBI 2012).

    With the entropies :math:`H(T)` of the true and :math:`H(S)` of the proposed segments
    over the ground-truth foreground and their mutual information :math:`I(S; T)`,

    .. math::
        V^{split} = \frac{I(S;T)}{H(S)}, \quad V^{merge} = \frac{I(S;T)}{H(T)}, \quad
        V_{info} = \frac{2 V^{split} V^{merge}}{V^{split} + V^{merge}}

    (Arganda-Carreras et al. 2015, eq. 6-8). Conventions are Fiji's: pixels with
    ``gt_labels == 0`` are ignored, proposal label 0 is singletons, a ground truth of one
    segment (:math:`H(T) = 0`) gives ``merge = 0, split = 1`` and a one-segment proposal
    (:math:`H(S) = 0`) gives ``merge = 1, split = 0``, so V_info = 0 in both cases.
    V_info = 0 also when :math:`I = 0` (Fiji returns NaN there).

    scikit-image's :func:`~skimage.metrics.variation_of_information` gives the conditional
    entropies ``[H(S|T), H(T|S)]`` (false splits, false merges): ``merge = 1 - H(T|S) / H(T)``
    and ``split = 1 - H(S|T) / H(S)`` when the proposal has no 0 inside the ground-truth
    foreground (scikit-image treats proposal 0 as one segment, Fiji as singletons).

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int
        Label images of the same shape; ``gt_labels`` needs some nonzero pixels.

    Returns
    -------
    SplitMergeScore
        ``score`` = V_info with its ``split`` and ``merge`` halves, all in [0, 1].
    """
    return _info_from_table(_label_tables(gt_labels, pred_labels))


# --------------------------------------------------------------------------------------------
# Border thinning: Fiji's classic watershed on the binarised proposal
# --------------------------------------------------------------------------------------------
def _flood_decision(states: np.ndarray) -> np.ndarray:
    """Fiji's rule for a border pixel: the one basin label among ``states`` (> 0), else 0.

    ``states`` (int32) holds -1 (ignored), 0 (line) or a basin label per neighbour.
    """
    high = states.max(axis=1)
    low = (states - 1).view(np.uint32).min(axis=1) + 1  # -1 and 0 wrap around to the top
    return np.where((high > 0) & (high == low.view(np.int32)), high, 0)


def _thin_borders(foreground: np.ndarray) -> np.ndarray:
    """Segments of a binary 2D proposal after Fiji's watershed thinning (lines are 0).

    The flood visits border pixels ring by ring (ring d = city-block distance d to the
    nearest cell pixel). A border pixel takes the label of its already-labelled neighbours
    if they all carry one basin label, else it becomes a line pixel. "Already labelled"
    means the rings below plus the pixels of its own ring that Fiji's FIFO pops earlier;
    that dependence is resolved exactly by propagation (re-test a pixel when an earlier
    neighbour of its ring changes label), since a pixel depends only on smaller ranks.
    """
    basins, n_basins = ndimage.label(foreground, _CROSS)
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
    ring = _scan_order(distance.reshape(-1, framed_width) == 1)
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
            to_test = _unique(later[later > changed[:, None]])
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


# --------------------------------------------------------------------------------------------
# Warping error (Jain et al. 2010) with Fiji's simple-point warping
# --------------------------------------------------------------------------------------------
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
        for k, (dy, dx) in enumerate(_RING):
            patch[1 + dy, 1 + dx] = bool(code >> k & 1)
        fg, _ = ndimage.label(patch, _CROSS)
        background = ~patch
        background[1, 1] = False
        n_background = ndimage.label(background, _SQUARE)[1]
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
    mismatched = _scan_order(src != np.pad(target, 1))
    # sort by decreasing priority, then scan position: one unique integer key (the bits of a
    # non-negative float32 order like the float)
    key = (~np.pad(priority, 1).ravel()[mismatched].view(np.uint32)).astype(np.uint64) << np.uint64(32)
    order = mismatched[np.argsort(key | np.arange(mismatched.size, dtype=np.uint64))]
    n = order.size
    rank = np.full(src.size, n, np.int32)
    rank[order] = np.arange(n, dtype=np.int32)
    nbr = order[:, None] + np.array([dy * framed_width + dx for dy, dx in _RING])
    nbr_rank = rank[nbr]  # n (a sentinel row) where the neighbour was never mismatched
    earlier = nbr_rank < np.arange(n, dtype=np.int32)[:, None]
    code = _pack(src.ravel()[nbr])  # neighbourhood codes at the start of the current sweep
    alive = np.ones(n + 1, bool)  # still mismatched
    alive[n] = False
    to_test = np.arange(n)
    while to_test.size:
        flips = np.zeros(n + 1, bool)
        flips[to_test] = _SIMPLE[code[to_test]]  # as if no earlier pixel flipped
        changed = to_test[flips[to_test]]
        while changed.size:  # re-test the later neighbours of changed decisions
            later = nbr_rank[changed]
            later = _unique(later[(later > changed[:, None]) & alive[later]])
            update = _SIMPLE[code[later] ^ _pack(earlier[later] & flips[nbr_rank[later]])]
            changed = later[update != flips[later]]
            flips[later] = update
        flipped = np.flatnonzero(flips[:n])
        alive[flipped] = False
        for k in range(8):  # the neighbour in direction k sees the flipped pixel in direction k + 4
            row = nbr_rank[flipped, k]
            row = row[alive[row]]
            code[row] ^= np.uint8(1 << (k + 4) % 8)
        around = nbr_rank[flipped]
        to_test = _unique(around[alive[around]])
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
    components, _ = ndimage.label(warped, _CROSS)
    background, _ = ndimage.label(np.pad(~warped, 1, constant_values=True), _SQUARE)
    framed = np.pad(components, 1, constant_values=-1).ravel()
    offsets = np.array([dy * (width + 2) + dx for dy, dx in _RING])
    y, x = np.divmod(mismatched, width)
    centre = (y + 1) * (width + 2) + x + 1
    around = framed[centre[:, None] + offsets]
    ordered = np.sort(around, axis=1)
    first = np.concatenate([np.ones((len(ordered), 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    distinct = (first & (ordered >= 0)).sum(axis=1)
    has_background = (around == 0).any(axis=1)
    own = framed[centre]
    inside = own != 0
    code = _pack(around > 0)
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


_ERROR_COUNTS = ("splits", "mergers", "object_additions", "object_deletions", "hole_additions", "hole_deletions")

# (kind, pixel value in the warped ground truth or None for either, connectivity) as Fiji clusters
_CLUSTERS = (
    (TopologyError.OBJECT_ADDITION, None, _CROSS),
    (TopologyError.HOLE_DELETION, False, _CROSS),
    (TopologyError.HOLE_DELETION, True, _CROSS),
    (TopologyError.MERGE, None, _SQUARE),
    (TopologyError.HOLE_ADDITION, False, _CROSS),
    (TopologyError.HOLE_ADDITION, True, _SQUARE),
    (TopologyError.OBJECT_DELETION, None, _CROSS),
    (TopologyError.SPLIT, None, _CROSS),
)


def _warping(prob: np.ndarray, gt: np.ndarray, threshold: float) -> WarpingResult:
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
    prob = _check_probabilities(prob)
    gt = _check_labels(gt, "gt")
    _check_pair(prob, gt, ("prob", "gt"), ndim=2)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return _warping(prob, gt != 0, float(threshold))


# --------------------------------------------------------------------------------------------
# The ISBI 2012 scores
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IsbiScores:
    """All ISBI 2012 scores of one slice, per threshold of :data:`ISBI_THRESHOLDS`.

    Arrays have one value per threshold. ``pixel_fscore`` is the F-score of the
    foreground pixels (precision 1 without false positives, recall 1 without false
    negatives, as Fiji); ``misclassification`` the fraction of wrong pixels; ``warping``
    holds one :class:`WarpingResult` per threshold (empty if not computed). Best values:
    :meth:`summary`.
    """

    thresholds: np.ndarray
    v_rand: np.ndarray
    v_rand_split: np.ndarray
    v_rand_merge: np.ndarray
    v_info: np.ndarray
    v_info_split: np.ndarray
    v_info_merge: np.ndarray
    pixel_fscore: np.ndarray
    misclassification: np.ndarray
    warping: tuple[WarpingResult, ...] = ()

    def summary(self) -> dict[str, float]:
        """The challenge's numbers: each score at its best threshold (the first on ties).

        Keys: ``v_rand``, ``rand_error`` (1 - V_rand), ``v_info``, ``pixel_error``
        (1 - maximal pixel F-score), ``misclassification`` (minimal), each with its
        ``*_threshold``. With warping also ``warping_error`` (minimal classic warping
        error) and ``warping_threshold`` with the error counts there (``splits``,
        ``mergers``, ``object_additions``, ...), and ``splits_mergers_error``, the minimal
        fraction of split and merger pixels (the "minimum splits and mergers warping
        error" of the original 2012 leaderboard), with ``splits_mergers_threshold``.
        """
        t = self.thresholds
        i_rand, i_info = int(np.argmax(self.v_rand)), int(np.argmax(self.v_info))
        i_pixel, i_miss = int(np.argmax(self.pixel_fscore)), int(np.argmin(self.misclassification))
        out = {
            "v_rand": float(self.v_rand[i_rand]),
            "rand_error": 1.0 - float(self.v_rand[i_rand]),
            "v_rand_threshold": float(t[i_rand]),
            "v_info": float(self.v_info[i_info]),
            "v_info_threshold": float(t[i_info]),
            "pixel_error": 1.0 - float(self.pixel_fscore[i_pixel]),
            "pixel_error_threshold": float(t[i_pixel]),
            "misclassification": float(self.misclassification[i_miss]),
            "misclassification_threshold": float(t[i_miss]),
        }
        if self.warping:
            best = min(self.warping, key=lambda w: w.error)
            fewest = min(self.warping, key=lambda w: w.split_merge_error)
            out |= {
                "warping_error": best.error,
                "warping_threshold": best.threshold,
                "splits_mergers_error": fewest.split_merge_error,
                "splits_mergers_threshold": fewest.threshold,
            }
            out |= {name: float(getattr(best, name)) for name in _ERROR_COUNTS}
        return out


def isbi_scores(prob: np.ndarray, gt: np.ndarray, *, warping: bool = True) -> IsbiScores:
    """The ISBI 2012 EM challenge scores of a cell probability map, as Fiji computes them.

    At each threshold ``t`` of :data:`ISBI_THRESHOLDS` the proposal ``prob > t``:

    * is thinned (Fiji's watershed, see the module notes) and compared with the
      4-connected components of the ground truth by :func:`v_rand` and :func:`v_info`;
    * gives the pixel F-score and the misclassification rate against ``gt > 0``;
    * with ``warping``, gives :func:`warping_error` (the slow part).

    The challenge reports V_rand and V_info at their maximum over thresholds (Rand error =
    1 - V_rand) and the pixel error 1 - maximal F-score: see :meth:`IsbiScores.summary`.
    A proposal without foreground is one segment (V_rand = 2q / (1 + q) with
    q = sum of the squared true segment fractions; V_info = 0), and has pixel error 1.

    Parameters
    ----------
    prob : ndarray, shape (H, W)
        Probability of the cell (foreground, white in the ISBI labels) class, in [0, 1]; a
        binary 0/1 proposal works too. Rounded to float32 as in Fiji.
    gt : ndarray, shape (H, W)
        Ground truth: nonzero is cell, 0 is membrane/background. An instance label image
        works too: its segments are the 4-connected regions of equal label.
    warping : bool
        Also compute the warping error at every threshold.

    Returns
    -------
    IsbiScores

    References
    ----------
    .. [1] I. Arganda-Carreras et al. (2015). Crowdsourcing the creation of image
       segmentation algorithms for connectomics. Front. Neuroanat. 9:142.
    """
    prob = _check_probabilities(prob)
    gt = _check_labels(gt, "gt")
    _check_pair(prob, gt, ("prob", "gt"), ndim=2)
    truth = gt != 0
    if not truth.any():
        raise ValueError("gt has no foreground (cell) pixels: the ISBI scores are undefined")
    segments = label_components(gt, connectivity=1, background=0)[truth]
    rows: list[tuple[float, ...]] = []
    warps: list[WarpingResult] = []
    for t in ISBI_THRESHOLDS:
        proposal = prob > t
        thinned = _thin_borders(proposal)
        table = _table(segments, thinned[truth], int(thinned.max()))
        rand, info = _rand_from_table(table), _info_from_table(table)
        tp = np.count_nonzero(proposal & truth)
        fp = np.count_nonzero(proposal) - tp
        fn = np.count_nonzero(truth) - tp
        precision = tp / (tp + fp) if fp else 1.0
        recall = tp / (tp + fn) if fn else 1.0
        rows.append((t, rand.score, rand.split, rand.merge, info.score, info.split, info.merge,
                     _fscore(recall, precision), (fp + fn) / truth.size))
        if warping:
            warps.append(_warping(prob, truth, t))
    columns = [np.array(c) for c in zip(*rows)]
    return IsbiScores(*columns, warping=tuple(warps))


# --------------------------------------------------------------------------------------------
# Cell metrics: IoU / Dice per class, CTC SEG, object matching
# --------------------------------------------------------------------------------------------
def _class_overlaps(gt: np.ndarray, pred: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, ...]:
    gt = _check_labels(gt, "gt")
    pred = _check_labels(pred, "pred")
    _check_pair(gt, pred, ("gt", "pred"))
    n = int(max(gt.max(), pred.max())) + 1 if num_classes is None else num_classes
    if num_classes is not None and max(gt.max(), pred.max()) >= num_classes:
        raise ValueError(f"num_classes={num_classes} but the images hold class {max(gt.max(), pred.max())}")
    joint = np.bincount(gt.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)
    return np.diag(joint).astype(np.float64), joint.sum(axis=1).astype(np.float64), joint.sum(axis=0)


def iou_per_class(gt: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    r"""Intersection over union (Jaccard index) of each class, :math:`|G_c \cap P_c| / |G_c \cup P_c|`.

    Parameters
    ----------
    gt, pred : ndarray of int
        Class maps (0, 1, ..., C-1) of the same shape; for instance labels pass
        ``labels > 0`` to get background and foreground.
    num_classes : int, optional
        C; default the largest class present plus one.

    Returns
    -------
    ndarray of float, shape (C,)
        A class absent from both images scores 1 (empty agrees with empty).

    References
    ----------
    .. [1] P. Jaccard (1912). The distribution of the flora in the alpine zone. New
       Phytologist 11(2), 37-50.
    """
    inter, size_gt, size_pred = _class_overlaps(gt, pred, num_classes)
    union = size_gt + size_pred - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice_per_class(gt: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    r"""Dice coefficient of each class, :math:`2 |G_c \cap P_c| / (|G_c| + |P_c|)`.

    Same inputs and conventions as :func:`iou_per_class` (``dice = 2 iou / (1 + iou)``).

    References
    ----------
    .. [1] L. R. Dice (1945). Measures of the amount of ecologic association between
       species. Ecology 26(3), 297-302.
    """
    inter, size_gt, size_pred = _class_overlaps(gt, pred, num_classes)
    total = size_gt + size_pred
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


@dataclass(frozen=True)
class _Overlaps:
    """Object sizes and the overlapping (true, predicted) pairs of two instance images."""

    true_sizes: np.ndarray  # (n_true,)
    pred_sizes: np.ndarray  # (n_pred,)
    true_index: np.ndarray  # (n_pairs,) 0-based object index
    pred_index: np.ndarray
    intersection: np.ndarray

    def iou(self) -> np.ndarray:
        union = self.true_sizes[self.true_index] + self.pred_sizes[self.pred_index] - self.intersection
        return self.intersection / union


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> _Overlaps:
    gt = _check_labels(gt, "gt")
    pred = _check_labels(pred, "pred")
    _check_pair(gt, pred, ("gt", "pred"))
    gt_seq, n_true = _sequential(gt)
    pred_seq, n_pred = _sequential(pred)
    both = (gt_seq > 0) & (pred_seq > 0)
    pairs, counts = np.unique(gt_seq[both].astype(np.int64) * (n_pred + 1) + pred_seq[both], return_counts=True)
    return _Overlaps(
        true_sizes=np.bincount(gt_seq.ravel(), minlength=n_true + 1)[1:].astype(np.float64),
        pred_sizes=np.bincount(pred_seq.ravel(), minlength=n_pred + 1)[1:].astype(np.float64),
        true_index=pairs // (n_pred + 1) - 1,
        pred_index=pairs % (n_pred + 1) - 1,
        intersection=counts.astype(np.float64),
    )


def seg_jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    r"""The Jaccard index of each reference object under the Cell Tracking Challenge rule.

    A reference object :math:`R` is matched by the predicted object :math:`S` with
    :math:`|R \cap S| > 0.5 |R|` (at most one can qualify) and scores
    :math:`J(R, S) = |R \cap S| / |R \cup S|`; an unmatched reference object scores 0.

    Parameters
    ----------
    gt, pred : ndarray of int
        Instance label images (0 = background) of the same shape, 2D or 3D.

    Returns
    -------
    ndarray of float, shape (n_reference,)
        In increasing order of the reference label.

    References
    ----------
    .. [1] V. Ulman et al. (2017). An objective comparison of cell-tracking algorithms.
       Nature Methods 14, 1141-1152.
    """
    o = _overlaps(gt, pred)
    jaccard = np.zeros(len(o.true_sizes))
    match = o.intersection > 0.5 * o.true_sizes[o.true_index]
    jaccard[o.true_index[match]] = o.iou()[match]
    return jaccard


def seg_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """The Cell Tracking Challenge SEG measure: the mean of :func:`seg_jaccard`.

    0 when ``gt`` has no objects, as in ``py-ctcmetrics``. For a sequence, the challenge
    pools all reference objects: ``np.concatenate([seg_jaccard(g, p) for ...]).mean()``.
    """
    jaccard = seg_jaccard(gt, pred)
    return float(jaccard.mean()) if jaccard.size else 0.0


@dataclass(frozen=True)
class MatchingScores:
    """Object matching counts and scores, one value per IoU threshold.

    ``average_precision`` is TP / (TP + FP + FN) (the DSB 2018 / StarDist "AP"); its mean
    over thresholds, :attr:`mean_average_precision`, is the DSB 2018 score.
    """

    thresholds: np.ndarray
    n_true: int
    n_pred: int
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    average_precision: np.ndarray

    @property
    def mean_average_precision(self) -> float:
        """Mean of ``average_precision`` over the thresholds."""
        return float(self.average_precision.mean())


def _ratio(numerator: np.ndarray, denominator: int | np.ndarray, empty: float) -> np.ndarray:
    denominator = np.asarray(denominator, np.float64)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), empty)


def match_objects(
    gt: np.ndarray, pred: np.ndarray, thresholds: tuple[float, ...] = IOU_THRESHOLDS
) -> MatchingScores:
    r"""Match predicted to true objects at IoU thresholds; precision, recall, F1, AP.

    A true and a predicted object match at threshold :math:`\tau` when their IoU exceeds
    :math:`\tau` (strictly, as in the DSB 2018 rules). For :math:`\tau \ge 0.5` an object
    has at most one such partner, so the matching is unique and no assignment algorithm is
    needed (StarDist's ``matching`` uses IoU :math:`\ge \tau` with a Hungarian assignment,
    which differs only when an IoU equals :math:`\tau` exactly). Then

    .. math::
        P = \frac{TP}{TP + FP}, \quad R = \frac{TP}{TP + FN}, \quad
        F_1 = \frac{2 TP}{2 TP + FP + FN}, \quad AP = \frac{TP}{TP + FP + FN}.

    With no objects on either side every score is 1; with no predictions precision is 0,
    with no true objects recall is 0.

    Parameters
    ----------
    gt, pred : ndarray of int
        Instance label images (0 = background) of the same shape.
    thresholds : tuple of float
        IoU thresholds, each in [0.5, 1); default 0.5, 0.55, ..., 0.95.

    Returns
    -------
    MatchingScores

    References
    ----------
    .. [1] J. C. Caicedo et al. (2019). Nucleus segmentation across imaging experiments:
       the 2018 Data Science Bowl. Nature Methods 16, 1247-1253.
    .. [2] U. Schmidt, M. Weigert, C. Broaddus, G. Myers (2018). Cell detection with
       star-convex polygons. MICCAI 2018.
    """
    taus = np.asarray(thresholds, np.float64)
    if taus.ndim != 1 or taus.size == 0 or taus.min() < 0.5 or taus.max() >= 1.0:
        raise ValueError(f"thresholds must be a non-empty sequence of values in [0.5, 1), got {thresholds}")
    o = _overlaps(gt, pred)
    n_true, n_pred = len(o.true_sizes), len(o.pred_sizes)
    tp = (o.iou()[None, :] > taus[:, None]).sum(axis=1)
    fp, fn = n_pred - tp, n_true - tp
    return MatchingScores(
        thresholds=taus,
        n_true=n_true,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=_ratio(tp, n_pred, 1.0 if n_true == 0 else 0.0),
        recall=_ratio(tp, n_true, 1.0 if n_pred == 0 else 0.0),
        f1=_ratio(2 * tp, n_true + n_pred, 1.0),
        average_precision=_ratio(tp, n_true + n_pred - tp, 1.0),
    )
