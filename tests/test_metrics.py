"""Tests of biounet.metrics: ISBI 2012 scores against plain re-implementations of Fiji's
algorithms, scikit-image and py-ctcmetrics; hand-made topology cases; cell metrics.
Scoring files (``biounet evaluate``) is tested in test_evaluation.py."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from biounet import metrics as M
from biounet.metrics import _warping as W


# --------------------------------------------------------------------------------------------
# Plain, slow references (pixel loops, written from the algorithms' descriptions)
# --------------------------------------------------------------------------------------------
RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def yokoi_simple(ring: list[int]) -> bool:
    """Yokoi's 4-connectivity number N4 = sum over edge neighbours of x_k - x_k x_k+1 x_k+2
    (neighbours counter-clockwise from the right); a pixel is 4/8-simple iff N4 == 1."""
    # RING order is clockwise from the top-left corner; reorder to right, up-right, up, ...
    x = [ring[RING.index(p)] for p in ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))]
    x += x[:2]
    return sum(x[k] - x[k] * x[k + 1] * x[k + 2] for k in (0, 2, 4, 6)) == 1


def fiji_watershed(foreground: np.ndarray) -> np.ndarray:
    """Vincent-Soille flooding with a FIFO, 4-connected, on 0 (cells) / 255 (borders), in
    the pixel order of Fiji's WatershedTransform2D (x outer, y inner; neighbours L, U, R, D)."""
    height, width = foreground.shape
    value = np.where(foreground, 0, 255)
    init, mask, inqueue, wshed = -1, -2, -3, 0
    lab = np.full(foreground.shape, init)
    pixels = [(x, y) for x in range(width) for y in range(height)]

    def neighbours(x, y):
        for u, v in ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1)):
            if 0 <= u < width and 0 <= v < height:
                yield u, v

    current, flag = 0, False
    for level in sorted(set(value.ravel().tolist())):
        at_level = [(x, y) for x, y in pixels if value[y, x] == level]
        fifo = collections.deque()
        for x, y in at_level:
            lab[y, x] = mask
            if any(lab[v, u] >= wshed for u, v in neighbours(x, y)):
                lab[y, x] = inqueue
                fifo.append((x, y))
        while fifo:
            x, y = fifo.popleft()
            for u, v in neighbours(x, y):
                if lab[v, u] > 0:
                    if lab[y, x] == inqueue or (lab[y, x] == wshed and flag):
                        lab[y, x] = lab[v, u]
                    elif lab[y, x] > 0 and lab[y, x] != lab[v, u]:
                        lab[y, x], flag = wshed, False
                elif lab[v, u] == wshed:
                    if lab[y, x] == inqueue:
                        lab[y, x], flag = wshed, True
                elif lab[v, u] == mask:
                    lab[v, u] = inqueue
                    fifo.append((u, v))
        for x, y in at_level:
            if lab[y, x] == mask:
                current += 1
                lab[y, x] = current
                fifo.append((x, y))
                while fifo:
                    for u, v in neighbours(*fifo.popleft()):
                        if lab[v, u] == mask:
                            lab[v, u] = current
                            fifo.append((u, v))
    lab[lab == init] = 0
    return lab


def fiji_warp(source: np.ndarray, target: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Fiji's simplePointWarp2d, one pixel at a time: sweeps over the mismatches sorted by
    decreasing priority (stable, x outer / y inner), flipping each simple one."""
    src = np.pad(source, 1).astype(int)
    tgt = np.pad(target, 1).astype(int)
    height, width = source.shape
    while True:
        mismatches = [(x, y) for x in range(1, width + 1) for y in range(1, height + 1) if src[y, x] != tgt[y, x]]
        mismatches.sort(key=lambda p: -float(priority[p[1] - 1, p[0] - 1]))
        flipped = 0
        for x, y in mismatches:
            if yokoi_simple([src[y + dy, x + dx] for dy, dx in RING]):
                src[y, x] = 1 - src[y, x]
                flipped += 1
        if not flipped:
            return src[1:-1, 1:-1].astype(bool)


def fiji_classify(warped: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Fiji's classifyMismatches2d with radius -1: relabel the whole image for the split test."""
    cross = ndimage.generate_binary_structure(2, 1)
    components, _ = ndimage.label(warped, cross)
    height, width = warped.shape
    kinds = np.zeros(warped.shape, np.uint8)

    def around(image, y, x):
        return {int(image[j, i]) for j in range(y - 1, y + 2) for i in range(x - 1, x + 2)
                if (j, i) != (y, x) and 0 <= j < height and 0 <= i < width}

    for y, x in zip(*np.nonzero(warped != target)):
        ids, inside = around(components, y, x), components[y, x] != 0
        if ids == {0}:
            kind = M.TopologyError.OBJECT_DELETION if inside else M.TopologyError.OBJECT_ADDITION
        elif len(ids) == 1:
            kind = M.TopologyError.HOLE_ADDITION if inside else M.TopologyError.HOLE_DELETION
        elif len(ids) == 2 and not inside:
            kind = M.TopologyError.HOLE_ADDITION
        elif len(ids) == 2:
            removed = warped.copy()
            removed[y, x] = False
            kind = M.TopologyError.SPLIT if len(around(ndimage.label(removed, cross)[0], y, x)) > 2 else (
                M.TopologyError.HOLE_DELETION)
        else:
            kind = M.TopologyError.SPLIT if inside else M.TopologyError.MERGE
        kinds[y, x] = kind
    return kinds


def blobs(rng: np.random.Generator, shape=(24, 24), sigma=2.0, fraction=0.5) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


def soft(rng: np.random.Generator, shape=(24, 24), sigma=2.0, levels: int | None = None) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    field = (field - field.min()) / (field.max() - field.min())
    if levels:
        field = np.round(field * (levels - 1)) / (levels - 1)  # ties, as in 8-bit or binary maps
    return field.astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


# --------------------------------------------------------------------------------------------
# Fiji's algorithms, exactly
# --------------------------------------------------------------------------------------------
def test_thresholds_are_fijis_accumulated_doubles():
    assert len(M.ISBI_THRESHOLDS) == 11
    assert M.ISBI_THRESHOLDS[3] == 0.1 + 0.1 + 0.1 != 0.3
    assert M.ISBI_THRESHOLDS[-1] == 0.9999999999999999 < 1.0


def test_simple_point_table_matches_yokoi():
    for code in range(256):
        assert W._SIMPLE[code] == yokoi_simple([code >> k & 1 for k in range(8)]), format(code, "08b")


def test_simple_points_by_definition():
    """Flipping a simple pixel keeps the numbers of 4-components and 8-connected holes."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        patch = np.pad(rng.random((3, 3)) < 0.5, 2)
        before = (ndimage.label(patch)[1], ndimage.label(~patch, np.ones((3, 3)))[1])
        flipped = patch.copy()
        flipped[3, 3] = ~flipped[3, 3]
        after = (ndimage.label(flipped)[1], ndimage.label(~flipped, np.ones((3, 3)))[1])
        code = sum(int(patch[3 + dy, 3 + dx]) << k for k, (dy, dx) in enumerate(RING))
        if W._SIMPLE[code]:
            assert before == after


@pytest.mark.parametrize("seed", range(12))
def test_thinning_reproduces_fiji_watershed(seed):
    rng = np.random.default_rng(seed)
    foreground = blobs(rng, (20 + seed % 5, 23), sigma=1.5, fraction=[0.2, 0.5, 0.7][seed % 3])
    ours, reference = W.thin_borders(foreground), fiji_watershed(foreground)
    np.testing.assert_array_equal(ours == 0, reference == 0)
    assert same_partition(ours, reference)


def test_thinning_edge_cases():
    assert (W.thin_borders(np.zeros((4, 5), bool)) == 1).all()  # no cell: one new basin, as Fiji
    assert (W.thin_borders(np.ones((4, 5), bool)) == 1).all()
    line = np.zeros((5, 9), bool)
    line[:, [0, 8]] = True  # two cells 7 px apart: the border thins to the middle column
    thinned = W.thin_borders(line)
    np.testing.assert_array_equal(np.flatnonzero((thinned == 0).all(axis=0)), [4])
    np.testing.assert_array_equal(thinned, fiji_watershed(line))


@pytest.mark.parametrize("seed", range(10))
def test_warp_reproduces_fiji_sweeps(seed):
    rng = np.random.default_rng(100 + seed)
    source = blobs(rng, (22, 21), sigma=2.0, fraction=0.5)
    prob = soft(rng, (22, 21), sigma=1.5, levels=[None, 5, 2][seed % 3])
    target = prob > 0.5
    priority = np.abs(prob.astype(np.float64) - 0.5).astype(np.float32)
    np.testing.assert_array_equal(W._warp(source, target, priority), fiji_warp(source, target, priority))


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.bool_, st.tuples(st.integers(1, 9), st.integers(1, 9))),
    arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 3)),
)
def test_thinning_and_warping_match_fiji_on_tiny_images(foreground, levels):
    """Any small binary image, and priorities with many ties (4 levels)."""
    np.testing.assert_array_equal(W.thin_borders(foreground) == 0, fiji_watershed(foreground) == 0)
    assert same_partition(W.thin_borders(foreground), fiji_watershed(foreground))
    shape = tuple(min(a, b) for a, b in zip(foreground.shape, levels.shape))
    source, prob = foreground[: shape[0], : shape[1]], levels[: shape[0], : shape[1]] / 3
    target, priority = prob > 0.5, np.abs(prob - 0.5).astype(np.float32)
    np.testing.assert_array_equal(W._warp(source, target, priority), fiji_warp(source, target, priority))


@pytest.mark.parametrize("seed", range(10))
def test_classification_reproduces_fiji(seed):
    rng = np.random.default_rng(200 + seed)
    warped, target = blobs(rng, (26, 25), 1.2, 0.55), blobs(rng, (26, 25), 1.2, 0.5)
    mismatched = np.flatnonzero(warped != target)
    kinds = np.zeros(warped.size, np.uint8)
    kinds[mismatched] = W._classify(warped, mismatched)
    np.testing.assert_array_equal(kinds.reshape(warped.shape), fiji_classify(warped, target))


# --------------------------------------------------------------------------------------------
# V_rand and V_info against scikit-image
# --------------------------------------------------------------------------------------------
def random_labels(rng, shape=(30, 40), n=6, zero=True):
    labels = rng.integers(0 if zero else 1, n, size=shape)
    return ndimage.median_filter(labels, 3)  # coherent regions


@pytest.mark.parametrize("seed", range(5))
def test_v_rand_agrees_with_skimage_up_to_self_pairs(seed):
    """skimage counts distinct pairs: its precision = (S_AB - N) / (S_T - N) with our
    S_AB = split * S_T; its recall = (S_AB - N) / (S_S - N) with S_S = S_AB / merge."""
    from skimage.metrics import adapted_rand_error

    rng = np.random.default_rng(seed)
    gt = random_labels(rng)
    pred = random_labels(rng, zero=False)  # no proposal 0: the conventions coincide there
    ours = M.v_rand(gt, pred)
    sizes = np.bincount(gt[gt > 0])
    n, s_true = float(sizes.sum()), float((sizes.astype(float) ** 2).sum())
    s_ab = ours.split * s_true
    s_pred = s_ab / ours.merge
    error, precision, recall = adapted_rand_error(gt, pred)
    assert precision == pytest.approx((s_ab - n) / (s_true - n), rel=1e-12)
    assert recall == pytest.approx((s_ab - n) / (s_pred - n), rel=1e-12)
    assert ours.score == pytest.approx(2 * ours.split * ours.merge / (ours.split + ours.merge))


def test_v_rand_and_skimage_differ_on_proposal_background():
    from skimage.metrics import adapted_rand_error, variation_of_information

    gt = np.array([[1, 1, 1, 1, 0, 2, 2]])
    pred = np.array([[0, 0, 0, 0, 0, 3, 3]])
    # ours: the four 0-pixels of segment 1 are singletons: S_AB = 4 + 4, S_T = 16 + 4, S_S = 4 + 4
    rand = M.v_rand(gt, pred)
    assert (rand.split, rand.merge) == (pytest.approx(8 / 20), 1.0)
    # skimage: proposal 0 is one segment, so nothing is split (and self-pairs are excluded)
    error, precision, recall = adapted_rand_error(gt, pred)
    assert (error, precision, recall) == (0.0, 1.0, 1.0)
    # V_info: H(T) = H(S) = entropy of (4/6, 2/6) for skimage, H(S) = log 6 - ... for ours
    info = M.v_info(gt, pred)
    p = np.array([4, 2]) / 6
    h_true = -(p * np.log(p)).sum()
    h_pred = -(4 / 6) * np.log(1 / 6) - (2 / 6) * np.log(2 / 6)
    assert (info.merge, info.split) == (pytest.approx(1.0), pytest.approx(h_true / h_pred))
    assert variation_of_information(gt, pred, ignore_labels=[0]) == pytest.approx([0.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_v_info_agrees_with_skimage(seed):
    from scipy.stats import entropy
    from skimage.metrics import variation_of_information

    rng = np.random.default_rng(10 + seed)
    gt, pred = random_labels(rng), random_labels(rng, zero=False)
    h_pred_given_true, h_true_given_pred = variation_of_information(gt, pred, ignore_labels=[0])
    fg = gt > 0
    h_true = entropy(np.bincount(gt[fg]), base=2)
    h_pred = entropy(np.bincount(pred[fg]), base=2)
    info = M.v_info(gt, pred)
    assert info.merge == pytest.approx(1 - h_true_given_pred / h_true, abs=1e-12)
    assert info.split == pytest.approx(1 - h_pred_given_true / h_pred, abs=1e-12)


def test_v_info_fiji_conventions_give_no_nan():
    gt = np.array([[1, 1, 2, 2]])
    assert M.v_info(gt, np.array([[5, 5, 5, 5]])) == M.SplitMergeScore(0.0, 0.0, 1.0)  # H(S) = 0
    assert M.v_info(np.array([[1, 1, 1, 1]]), gt) == M.SplitMergeScore(0.0, 1.0, 0.0)  # H(T) = 0
    independent = M.v_info(np.array([[1, 1], [2, 2]]), np.array([[1, 2], [1, 2]]))  # I = 0
    assert independent.score == 0.0
    with pytest.raises(ValueError, match="gt_labels has no foreground"):
        M.v_rand(np.zeros((2, 2), int), np.ones((2, 2), int))
    with pytest.raises(ValueError, match="same shape"):
        M.v_rand(np.ones((2, 2), int), np.ones((2, 3), int))
    with pytest.raises(TypeError, match="pred_labels must be an integer"):
        M.v_info(np.ones((2, 2), int), np.ones((2, 2)))


# --------------------------------------------------------------------------------------------
# ISBI scores end to end
# --------------------------------------------------------------------------------------------
def cells_and_membranes(shape=(40, 48)) -> np.ndarray:
    """A ground truth like the ISBI labels: 1-px-wide 0 borders between rectangular cells."""
    gt = np.ones(shape, np.uint8) * 255
    gt[[0, 13, 27, -1], :] = 0
    gt[:, [0, 16, 31, -1]] = 0
    gt[5:8, 5:8] = 0  # a hole in a cell
    return gt


def test_identity_is_perfect():
    gt = cells_and_membranes()
    with np.errstate(all="raise"):
        scores = M.isbi_scores((gt > 0).astype(np.float32), gt)
    summary = scores.summary()
    assert summary["v_rand"] == summary["v_info"] == 1.0
    assert summary["rand_error"] == summary["pixel_error"] == summary["misclassification"] == 0.0
    assert summary["warping_error"] == summary["splits_mergers_error"] == 0.0
    assert all(summary[k] == 0 for k in ("splits", "mergers", "object_additions", "hole_additions"))
    np.testing.assert_array_equal(scores.v_rand, 1.0)  # a binary proposal: same at every threshold


def test_all_background_prediction_gives_the_documented_worst_values():
    gt = cells_and_membranes()
    with np.errstate(all="raise"):  # no division by zero, no invalid value anywhere
        scores = M.isbi_scores(np.zeros(gt.shape, np.float32), gt)
    summary = scores.summary()
    fractions = np.bincount(ndimage.label(gt > 0)[0][gt > 0])[1:] / np.count_nonzero(gt)
    q = (fractions**2).sum()
    assert summary["v_rand"] == pytest.approx(2 * q / (1 + q))  # one segment: every pair merged
    assert summary["v_info"] == 0.0 and summary["pixel_error"] == 1.0
    assert summary["misclassification"] == pytest.approx(np.mean(gt > 0))
    # warping shrinks each cell to a pixel and the holed one to a ring: 8 deleted objects and
    # 1 deleted hole (removing a ring pixel would open the hole)
    assert summary["object_deletions"] == 8 and summary["hole_deletions"] == 1
    for name in ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge",
                 "pixel_fscore", "misclassification"):
        assert np.isfinite(getattr(scores, name)).all(), name
    assert all(np.isfinite(v) for v in summary.values())


def test_probability_one_is_foreground_at_every_threshold():
    gt = cells_and_membranes()
    scores = M.isbi_scores(np.where(gt > 0, 1.0, 0.0), gt, warping=False)
    np.testing.assert_array_equal(scores.pixel_fscore, 1.0)


def test_pixel_error_is_fijis_maximal_fscore():
    gt = cells_and_membranes()
    rng = np.random.default_rng(3)
    prob = np.clip((gt > 0) * 0.6 + rng.normal(0.2, 0.2, gt.shape), 0, 1).astype(np.float32)
    scores = M.isbi_scores(prob, gt, warping=False)
    truth = gt > 0
    assert (prob == 1).any()
    for t, f, miss in zip(M.ISBI_THRESHOLDS, scores.pixel_fscore, scores.misclassification):
        pred = prob.astype(np.float64) > t  # as Java compares a float pixel with a double
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        precision = 1.0 if fp == 0 else tp / (tp + fp)
        recall = 1.0 if fn == 0 else tp / (tp + fn)
        assert f == pytest.approx(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
        assert miss == pytest.approx((fp + fn) / truth.size)
    assert scores.summary()["pixel_error"] == pytest.approx(1 - scores.pixel_fscore.max())


def test_isbi_v_rand_uses_thinned_proposal_and_gt_components():
    gt = cells_and_membranes()
    rng = np.random.default_rng(4)
    prob = soft(rng, gt.shape, sigma=2.0)
    scores = M.isbi_scores(prob, gt, warping=False)
    segments = ndimage.label(gt > 0)[0]
    for i, t in enumerate(M.ISBI_THRESHOLDS):
        thinned = fiji_watershed(prob.astype(np.float64) > t)
        assert scores.v_rand[i] == pytest.approx(M.v_rand(segments, thinned).score)
        assert scores.v_info[i] == pytest.approx(M.v_info(segments, thinned).score)


def test_isbi_input_errors():
    gt = cells_and_membranes()
    with pytest.raises(ValueError, match=r"prob and gt must have the same shape, got \(40, 47\) and \(40, 48\)"):
        M.isbi_scores(np.zeros((40, 47)), gt)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        M.isbi_scores(np.full(gt.shape, 2.0), gt)
    with pytest.raises(ValueError, match="gt has no foreground"):
        M.isbi_scores(np.zeros(gt.shape), np.zeros(gt.shape, np.uint8))
    with pytest.raises(ValueError, match="must be 2D"):
        M.isbi_scores(np.zeros((2, 4, 4)), np.ones((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="threshold must be in"):
        M.warping_error(np.zeros(gt.shape), gt, threshold=1.0)


def test_inputs_are_not_modified():
    gt = cells_and_membranes()
    prob = soft(np.random.default_rng(5), gt.shape)
    gt_copy, prob_copy = gt.copy(), prob.copy()
    M.isbi_scores(prob, gt)
    np.testing.assert_array_equal(gt, gt_copy)
    np.testing.assert_array_equal(prob, prob_copy)


# --------------------------------------------------------------------------------------------
# Warping error: hand-made topology cases
# --------------------------------------------------------------------------------------------
def square(shape=(16, 16), top=4, left=4, size=7) -> np.ndarray:
    image = np.zeros(shape, np.uint8)
    image[top : top + size, left : left + size] = 1
    return image


def counts(result: M.WarpingResult) -> dict[str, int]:
    return {name: getattr(result, name) for name in W.ERROR_COUNTS if getattr(result, name)}


def test_boundary_shifted_by_one_pixel_keeps_topology():
    gt = square()
    prob = np.roll(gt, 1, axis=1).astype(np.float32)
    result = M.warping_error(prob, gt)
    assert result.error == 0.0 and counts(result) == {}
    np.testing.assert_array_equal(result.warped, prob > 0.5)
    assert M.isbi_scores(prob, gt).summary()["pixel_error"] > 0.0


def test_split_is_counted_once():
    gt = square(size=9)
    prob = gt.astype(np.float32)
    prob[:, 8] = 0.0  # the prediction cuts the square in two
    result = M.warping_error(prob, gt)
    assert counts(result) == {"splits": 1}
    assert result.error == result.split_merge_error == 1 / gt.size  # one non-simple pixel remains


def test_merger_is_counted_once():
    gt = square(size=9)
    gt[:, 8] = 0  # two objects 1 px apart
    prob = square(size=9).astype(np.float32)  # the prediction bridges them
    result = M.warping_error(prob, gt)
    assert counts(result) == {"mergers": 1}
    assert result.error == 9 / gt.size  # every gap pixel would merge


def test_added_hole_is_counted_once():
    gt = square(size=9)
    prob = gt.astype(np.float32)
    prob[7:9, 7:9] = 0.0
    result = M.warping_error(prob, gt)
    assert counts(result) == {"hole_additions": 1}


def test_removed_object_is_counted_once():
    gt = square(size=9)
    gt[0:3, 0:3] = 1  # a small extra object the prediction misses
    prob = square(size=9).astype(np.float32)
    result = M.warping_error(prob, gt)
    assert counts(result) == {"object_deletions": 1}
    assert result.error == 1 / gt.size  # shrunk to one pixel


def test_added_object_and_deleted_hole_are_counted_once():
    gt = square(size=9)
    gt[8, 8] = 0  # a hole the prediction fills
    prob = square(size=9).astype(np.float32)
    prob[0:2, 0:2] = 1.0  # and an object it adds
    result = M.warping_error(prob, gt)
    assert counts(result) == {"object_additions": 1, "hole_deletions": 1}
    assert result.mismatches[8, 8] == M.TopologyError.HOLE_DELETION


# --------------------------------------------------------------------------------------------
# Cell metrics
# --------------------------------------------------------------------------------------------
def test_iou_and_dice_per_class():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 1]])
    # class 0: |G|=3, |P|=2, inter 2; class 1: |G|=3, |P|=5, inter 3; class 2: |G|=2, |P|=1, inter 1
    np.testing.assert_allclose(M.iou_per_class(gt, pred), [2 / 3, 3 / 5, 1 / 2])
    np.testing.assert_allclose(M.dice_per_class(gt, pred), [4 / 5, 6 / 8, 2 / 3])
    np.testing.assert_allclose(M.iou_per_class(gt, pred, num_classes=4), [2 / 3, 3 / 5, 1 / 2, 1.0])
    with pytest.raises(ValueError, match="num_classes=2 but the images hold class 2"):
        M.iou_per_class(gt, pred, num_classes=2)


def random_instances(rng, shape=(48, 56), n=9):
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        h, w = rng.integers(3, 12, size=2)
        labels[y : y + h, x : x + w] = i
    return labels


def perturb(rng, labels):
    out = np.roll(labels, rng.integers(-2, 3, size=2), axis=(0, 1))
    out = ndimage.grey_dilation(out, size=3) if rng.random() < 0.5 else out
    out[rng.random(out.shape) < 0.02] = 0
    return (out * 3 % 65521).astype(np.uint16)  # other label values


def seg_naive(gt, pred):
    scores = []
    for r in np.unique(gt[gt > 0]):
        ref = gt == r
        matched = [s for s in np.unique(pred[ref & (pred > 0)]) if (ref & (pred == s)).sum() > 0.5 * ref.sum()]
        scores.append((ref & (pred == matched[0])).sum() / (ref | (pred == matched[0])).sum() if matched else 0.0)
    return np.array(scores)


@pytest.mark.parametrize("seed", range(6))
def test_seg_agrees_with_naive_loop_and_py_ctcmetrics(seed, tmp_path):
    from ctc_metrics.metrics import seg
    from ctc_metrics.utils.representations import match

    rng = np.random.default_rng(seed)
    gt = random_instances(rng)
    pred = perturb(rng, gt)
    np.testing.assert_allclose(M.seg_jaccard(gt, pred), seg_naive(gt, pred))
    tifffile.imwrite(tmp_path / "ref.tif", gt)
    tifffile.imwrite(tmp_path / "comp.tif", pred)
    labels_ref, _, _, _, ious = match(str(tmp_path / "ref.tif"), str(tmp_path / "comp.tif"))
    assert M.seg_score(gt, pred) == pytest.approx(seg([labels_ref], [ious]), abs=1e-12)


def test_seg_on_a_ctc_sequence_agrees_with_py_ctcmetrics(tmp_path, capsys):
    from ctc_metrics import evaluate_sequence

    rng = np.random.default_rng(7)
    res, gt_seg, gt_tra = tmp_path / "01_RES", tmp_path / "01_GT" / "SEG", tmp_path / "01_GT" / "TRA"
    for folder in (res, gt_seg, gt_tra):
        folder.mkdir(parents=True)
    jaccard = []
    for t in range(3):
        gt = random_instances(rng)
        pred = perturb(rng, gt)
        tifffile.imwrite(res / f"mask{t:03d}.tif", pred)
        tifffile.imwrite(gt_tra / f"man_track{t:03d}.tif", gt)
        if t != 1:  # CTC ground truth annotates only some frames
            tifffile.imwrite(gt_seg / f"man_seg{t:03d}.tif", gt)
            jaccard.append(M.seg_jaccard(gt, pred))
    expected = evaluate_sequence(str(res), str(tmp_path / "01_GT"), metrics=["SEG"], threads=1)["SEG"]
    assert np.concatenate(jaccard).mean() == pytest.approx(expected, abs=1e-12)


def test_seg_edge_cases():
    empty = np.zeros((4, 4), np.uint8)
    assert M.seg_score(empty, empty) == 0.0  # no reference object: 0, as py-ctcmetrics
    one = square((4, 4), 0, 0, 2)
    assert M.seg_score(one, empty) == 0.0 and M.seg_score(one, one * 7) == 1.0
    half = one.copy()
    half[0, :2] = 0  # covers exactly half: not > 0.5 |R|
    assert M.seg_score(one, half) == 0.0


def match_naive(gt, pred, tau):
    ious = []
    for r in np.unique(gt[gt > 0]):
        for s in np.unique(pred[pred > 0]):
            inter = ((gt == r) & (pred == s)).sum()
            ious.append(inter / ((gt == r) | (pred == s)).sum())
    return int((np.array(ious) > tau).sum())


@pytest.mark.parametrize("seed", range(4))
def test_object_matching_against_naive_pairs(seed):
    rng = np.random.default_rng(20 + seed)
    gt = random_instances(rng)
    pred = perturb(rng, gt)
    result = M.match_objects(gt, pred)
    n_true, n_pred = len(np.unique(gt[gt > 0])), len(np.unique(pred[pred > 0]))
    assert (result.n_true, result.n_pred) == (n_true, n_pred)
    for i, tau in enumerate(M.IOU_THRESHOLDS):
        tp = match_naive(gt, pred, tau)
        assert result.tp[i] == tp and result.fp[i] == n_pred - tp and result.fn[i] == n_true - tp
        assert result.average_precision[i] == pytest.approx(tp / (n_true + n_pred - tp))
        assert result.f1[i] == pytest.approx(2 * tp / (n_true + n_pred))
        assert result.precision[i] == pytest.approx(tp / n_pred)
        assert result.recall[i] == pytest.approx(tp / n_true)
    assert result.mean_average_precision == pytest.approx(result.average_precision.mean())


def test_object_matching_edge_cases():
    empty = np.zeros((6, 6), np.uint8)
    obj = square((6, 6), 1, 1, 4)
    both_empty = M.match_objects(empty, empty)
    assert both_empty.mean_average_precision == 1.0 and (both_empty.f1 == 1).all()
    missed = M.match_objects(obj, empty)
    assert (missed.average_precision == 0).all() and (missed.precision == 0).all() and (missed.recall == 0).all()
    identical = M.match_objects(obj, obj)
    assert (identical.average_precision == 1).all()
    half = obj.copy()
    half[1:3, 1:5] = 0  # IoU exactly 0.5: not a match (strictly greater)
    assert M.match_objects(obj, half, thresholds=(0.5,)).tp[0] == 0
    with pytest.raises(ValueError, match=r"thresholds must be .* in \[0.5, 1\)"):
        M.match_objects(obj, obj, thresholds=(0.3,))


# --------------------------------------------------------------------------------------------
# One instance scoring for every caller: score_instances
# --------------------------------------------------------------------------------------------
def merged_and_missed() -> tuple[np.ndarray, np.ndarray]:
    """Four true objects: A and B (6 px each, touching) come out as one predicted object of
    12 px, C (4 px) is missed, D (16 px) is found one column off (12 px shared)."""
    gt = np.zeros((8, 12), np.uint16)
    gt[0:2, 0:3], gt[0:2, 3:6], gt[5:7, 0:2], gt[4:8, 8:12] = 1, 2, 3, 4
    pred = np.zeros((8, 12), np.int32)
    pred[0:2, 0:6], pred[4:8, 7:11] = 7, 2
    return gt, pred


def test_score_instances_by_hand():
    gt, pred = merged_and_missed()
    s = M.score_instances(gt, pred, thresholds=(0.5, 0.55, 0.75))
    # foregrounds: |G| = 6 + 6 + 4 + 16 = 32, |P| = 12 + 16 = 28, |G n P| = 12 + 12 = 24, |G u P| = 36
    assert (s.pixels, s.foreground_intersection, s.foreground_union) == (96, 24, 36)
    assert s.foreground_iou == 24 / 36 and s.foreground_dice == 2 * 24 / (32 + 28)
    # object IoUs: A and B with the merged object 6 / 12 = 0.5 each (not > 0.5), D 12 / 20 = 0.6, C none
    assert (s.n_true, s.n_pred) == (4, 2)
    np.testing.assert_array_equal(s.thresholds, [0.5, 0.55, 0.75])
    np.testing.assert_array_equal(np.stack([s.tp, s.fp, s.fn]), [[1, 1, 0], [1, 1, 2], [3, 3, 4]])
    np.testing.assert_allclose(s.precision, [1 / 2, 1 / 2, 0], rtol=1e-15)
    np.testing.assert_allclose(s.recall, [1 / 4, 1 / 4, 0], rtol=1e-15)
    np.testing.assert_allclose(s.f1, [2 / 6, 2 / 6, 0], rtol=1e-15)
    np.testing.assert_allclose(s.average_precision, [1 / 5, 1 / 5, 0], rtol=1e-15)  # TP / (TP + FP + FN)
    assert s.mean_average_precision == pytest.approx(2 / 15, rel=1e-15)
    # SEG: A and B are each covered entirely (> half) by the merged object, J = 6 / 12; C 0; D J = 12 / 20
    assert s.seg == pytest.approx((0.5 + 0.5 + 0.0 + 0.6) / 4, rel=1e-15)
    assert s.foreground_iou == M.iou_per_class(gt > 0, pred > 0, 2)[1]
    assert s.foreground_dice == M.dice_per_class(gt > 0, pred > 0, 2)[1]
    assert M.score_instances(gt, pred).thresholds.tolist() == [0.5]  # the default: IoU 0.5 alone


def test_score_instances_edge_cases_and_invariances():
    import biounet

    empty = np.zeros((3, 4), np.uint8)
    none = M.score_instances(empty, empty)
    assert (none.foreground_iou, none.foreground_dice, none.seg, none.f1[0], none.average_precision[0]) == (
        1.0, 1.0, 0.0, 1.0, 1.0)  # fmt: skip
    gt, pred = merged_and_missed()
    missed = M.score_instances(gt, np.zeros_like(pred))
    assert (missed.foreground_iou, missed.seg, missed.recall[0], missed.precision[0], missed.fn[0]) == (0, 0, 0, 0, 4)
    s = M.score_instances(gt, pred)
    renumbered = M.score_instances(gt, np.where(pred > 0, 100 - pred, 0))
    volume = M.score_instances(np.stack([gt, gt]), np.stack([pred, pred]))  # each object spans two slices
    for other in (renumbered, volume):
        assert (other.foreground_iou, other.seg, other.f1[0], other.average_precision[0]) == (
            s.foreground_iou, s.seg, s.f1[0], s.average_precision[0])  # fmt: skip
    assert volume.pixels == 2 * s.pixels and volume.foreground_union == 2 * s.foreground_union
    with pytest.raises(ValueError, match=r"gt_labels and pred_labels must have the same shape"):
        M.score_instances(gt, pred[:4])
    with pytest.raises(ValueError, match="thresholds must be"):
        M.score_instances(gt, pred, thresholds=(0.3,))
    with pytest.raises(ValueError, match="pred_labels has negative labels"):
        M.score_instances(gt, -pred)
    assert biounet.score_instances is M.score_instances


def test_experiments_score_with_score_instances(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "experiments"))
    import common

    gt, pred = merged_and_missed()
    s = M.score_instances(gt, pred)
    # A and B touch and come out merged
    expected = {"iou": s.foreground_iou, "seg": s.seg, "f1": s.f1[0], "ap": s.average_precision[0],
                "touching": 1, "merged": 1}  # fmt: skip
    assert common.nuclei_label_scores(gt, pred) == expected
    assert (expected["iou"], expected["f1"], expected["ap"]) == (24 / 36, 1 / 3, 1 / 5)
    probabilities = np.stack([pred == 0, pred > 0]).astype(np.float32)  # the same two objects
    assert common.nuclei_scores(gt, probabilities) == expected


def test_validation_pools_the_pixels_of_score_instances():
    from biounet import load_model, make_sample, predict, synthetic_cells
    from biounet.postprocess import labels_from_probabilities
    from biounet.training import evaluate_samples

    model = load_model("nuclei")
    pairs = synthetic_cells(2, (96, 112), seed=5)
    samples = [make_sample(image, labels, name=str(i)) for i, (image, labels) in enumerate(pairs)]
    got = evaluate_samples(model, samples, v_rand=False)
    scores = []
    for sample in samples:
        labels = labels_from_probabilities(predict(model, sample.image, progress=False), **model.info.postprocess)
        scores.append(M.score_instances(sample.labels, labels))
    inter = sum(s.foreground_intersection for s in scores)
    union = sum(s.foreground_union for s in scores)
    assert got["iou"] == inter / union  # pooled: the sums of the per-image counts
    assert got["pixel_error"] == (union - inter) / sum(s.pixels for s in scores)
    assert got["f1"] == pytest.approx(np.mean([s.f1[0] for s in scores]), rel=1e-15)
    assert got["ap"] == pytest.approx(np.mean([s.average_precision[0] for s in scores]), rel=1e-15)
    assert 0 < got["iou"] < 1 and 0 < got["f1"] <= 1 and math.isnan(got["v_rand"])


def test_demo_scores_with_score_instances(tmp_path, monkeypatch):
    import biounet.model
    import biounet.prediction
    import biounet.training
    from biounet import UNet, read_image, synthetic_cells
    from biounet.demo import run_demo
    from biounet.postprocess import labels_from_probabilities

    model = UNet(depth=2, base_channels=4)

    def fake_predict(model, image, **_):  # the cells' smoothed intensity as p(cell): touching cells merge
        cells = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
        cells = (cells - cells.min()) / (cells.max() - cells.min())
        return np.stack([1 - cells, cells])

    monkeypatch.setattr(biounet.training, "train", lambda *args, **kwargs: model)
    monkeypatch.setattr(biounet.prediction, "predict", fake_predict)
    monkeypatch.setattr(biounet.model, "load_model", lambda name: model)
    monkeypatch.delenv("BIOUNET_DATA", raising=False)
    result = run_demo(tmp_path, steps=1, n_train=1, progress=False)
    truth = synthetic_cells(1, (480, 640), seed=1000)[0][1]
    s = M.score_instances(truth, read_image(tmp_path / "heldout_labels.tif"))
    assert (result.iou, result.f1) == (s.foreground_iou, s.f1[0])
    assert 0 < result.iou < 1 and 0 < result.f1 < 1
    image, truth = synthetic_cells(1, (512, 512), seed=2000)[0]  # the shipped model's image without data
    shipped = M.score_instances(truth, labels_from_probabilities(fake_predict(model, image)))
    assert result.shipped is not None and result.shipped.f1 == shipped.f1[0]


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------
@pytest.mark.data
def test_real_isbi_slice_identity_and_blur(data_dir):
    import imageio.v3 as iio

    gt = iio.imread(data_dir / "isbi2012-em" / "labels" / "00.png")
    perfect = M.isbi_scores((gt > 0).astype(np.float32), gt, warping=False).summary()
    assert perfect["v_rand"] == perfect["v_info"] == 1.0
    blurred = ndimage.gaussian_filter((gt > 0).astype(np.float32), 2.0)
    summary = M.isbi_scores(blurred, gt).summary()
    assert 0.9 < summary["v_rand"] < 1.0 and math.isfinite(summary["warping_error"])


@pytest.mark.data
def test_real_isbi_crop_matches_fiji_references(data_dir):
    import imageio.v3 as iio

    gt = iio.imread(data_dir / "isbi2012-em" / "labels" / "03.png")[100:196, 200:296] > 0
    rng = np.random.default_rng(0)
    prob = np.clip(ndimage.gaussian_filter(gt.astype(float), 2.0) + soft(rng, gt.shape, 3.0) * 0.3 - 0.15, 0, 1)
    for t in (0.3, 0.7):
        proposal = prob > t
        assert same_partition(W.thin_borders(proposal), fiji_watershed(proposal))
        priority = np.abs(prob - t).astype(np.float32)
        np.testing.assert_array_equal(W._warp(gt, proposal, priority), fiji_warp(gt, proposal, priority))
