"""Tests of biounet.postprocess.probabilities_to_labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from biounet.postprocess import probabilities_to_labels
from test_metrics import same_partition


def disks(centres, radius, shape=(40, 64)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.any([(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2 for cy, cx in centres], axis=0)


def two_touching() -> np.ndarray:
    """Two disks of radius 10 whose centres are 17 px apart: one blob with a neck at x = 26.5.

    Their distance maxima are 10 px, the neck's saddle 6 px: a dynamic of 4 px."""
    return np.where(disks([(20, 18), (20, 35)], 10), 0.95, 0.05).astype(np.float32)


def test_threshold_and_components_match_a_plain_labelling():
    rng = np.random.default_rng(0)
    prob = ndimage.gaussian_filter(rng.random((50, 60)), 2)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    labels = probabilities_to_labels(prob, threshold=0.6)
    assert labels.dtype == np.int32
    assert same_partition(labels, ndimage.label(prob > 0.6)[0])
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))  # 0, 1..N


def test_connectivity_one_keeps_diagonal_neighbours_apart():
    prob = np.zeros((4, 4))
    prob[1, 1] = prob[2, 2] = 1.0
    assert probabilities_to_labels(prob).max() == 2
    assert probabilities_to_labels(prob, connectivity=2).max() == 1


def test_distance_split_cuts_two_touching_disks_at_the_neck():
    prob = two_touching()
    assert probabilities_to_labels(prob).max() == 1
    labels = probabilities_to_labels(prob, split="distance")
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, prob > 0.5)  # the watershed only divides
    left, right = labels[20, 12], labels[20, 41]
    assert left != right and {left, right} == {1, 2}
    assert (labels[:, :26] != right).all() and (labels[:, 28:] != left).all()  # the cut is at the neck


def test_distance_split_needs_a_deep_enough_neck():
    prob = two_touching()  # the maxima rise 4 px above the saddle between them
    assert probabilities_to_labels(prob, split="distance", min_seed_height=3.99).max() == 2
    assert probabilities_to_labels(prob, split="distance", min_seed_height=4.0).max() == 1  # must exceed h


@pytest.mark.parametrize("angle", [0, 30, 45, 60, 90])
def test_distance_split_keeps_an_ellipse_whole_at_any_angle(angle):
    """The ridge of an elongated object's distance map is one seed even where it runs diagonally."""
    yy, xx = np.mgrid[:100, :100] - 50.0
    t = np.deg2rad(angle)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    prob = ((u / 30) ** 2 + (v / 8) ** 2 < 1).astype(np.float32)
    assert probabilities_to_labels(prob, split="distance").max() == 1


def test_probability_split_follows_the_valley_between_cores():
    blob = disks([(20, 18), (20, 36)], 8).astype(float)
    prob = ndimage.gaussian_filter(blob, 2.5)  # the two blurred disks join above 0.2
    assert probabilities_to_labels(prob, threshold=0.2).max() == 1
    labels = probabilities_to_labels(prob, threshold=0.2, split="probability", seed_threshold=0.8)
    assert labels.max() == 2 and labels[20, 18] != labels[20, 36]
    assert labels[20, 26] == labels[20, 18] and labels[20, 28] == labels[20, 36]  # valley at x = 27


def test_border_split_grows_the_interiors_of_a_three_class_map():
    from biounet.postprocess import labels_from_probabilities
    from biounet.postprocess import foreground_probability

    # two squares that touch along x = 10: interiors 2..7 and 12..17, border pixels around them
    cells = np.zeros((12, 20), bool)
    cells[1:11, 1:19] = True
    interior = np.zeros_like(cells)
    interior[2:10, 2:9], interior[2:10, 12:18] = True, True
    prob = np.zeros((3, *cells.shape), np.float32)
    prob[0] = np.where(cells, 0.1, 0.9)
    prob[1] = np.where(interior, 0.8, 0.1 * cells)
    prob[2] = 1 - prob[0] - prob[1]
    foreground = foreground_probability(prob)
    np.testing.assert_allclose(foreground, prob[1] + prob[2], atol=1e-6)
    assert probabilities_to_labels(foreground).max() == 1  # one blob without the border class
    labels = labels_from_probabilities(prob, split="border")
    assert labels.max() == 2 and labels[5, 5] != labels[5, 15]
    assert (labels > 0).sum() == cells.sum()  # the border pixels are shared out, none lost
    left = labels == labels[5, 5]
    assert left[1:11, 1:9].all() and not left[:, 12:].any()  # each interior's own border goes with it
    with pytest.raises(ValueError, match='split="border" needs the interior'):
        probabilities_to_labels(foreground, split="border")
    with pytest.raises(ValueError, match="only it takes one"):
        probabilities_to_labels(foreground, interior=prob[1])
    with pytest.raises(ValueError, match="3 classes of a border model"):
        labels_from_probabilities(prob[:2], split="border")
    with pytest.raises(ValueError, match="shape"):
        probabilities_to_labels(foreground, split="border", interior=prob[1, :5])


def test_unseeded_objects_keep_a_label():
    prob = np.zeros((20, 30))
    prob[5:15, 2:12] = 0.95  # a core above the seed threshold
    prob[8:10, 20:22] = 0.6  # a faint object without any seed
    labels = probabilities_to_labels(prob, split="probability", seed_threshold=0.9)
    assert labels.max() == 2 and labels[9, 21] > 0 and labels[9, 21] != labels[9, 6]


def test_min_size_removes_small_objects_and_renumbers():
    prob = np.zeros((10, 20))
    prob[1:4, 1:4] = 1.0  # 9 px
    prob[6, 6] = 1.0  # 1 px
    prob[1:6, 10:16] = 1.0  # 30 px
    labels = probabilities_to_labels(prob, min_size=9)
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], [9, 30])
    assert probabilities_to_labels(prob, min_size=31).max() == 0


def test_three_dimensional_maps():
    zz, yy, xx = np.mgrid[:24, :24, :40]
    balls = [(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - cx) ** 2 < 8**2 for cx in (12, 25)]  # touching at x ~ 18
    prob = np.any(balls, axis=0).astype(np.float32)
    assert probabilities_to_labels(prob).max() == 1
    labels = probabilities_to_labels(prob, split="distance")
    assert labels.max() == 2 and labels[12, 12, 8] != labels[12, 12, 30]


def test_input_is_not_modified():
    prob = two_touching()
    copy = prob.copy()
    probabilities_to_labels(prob, split="distance", min_size=5)
    np.testing.assert_array_equal(prob, copy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.0}, "threshold must be in"),
        ({"split": "bogus"}, "split must be"),
        ({"split": "probability", "seed_threshold": 0.4}, r"seed_threshold must be in \(threshold=0.5, 1\)"),
        ({"split": "distance", "min_seed_height": 0}, "min_seed_height must be > 0"),
        ({"min_size": -1}, "min_size must be >= 0"),
        ({"connectivity": 3}, r"connectivity must be in 1..2"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        probabilities_to_labels(np.zeros((4, 4)), **kwargs)


def test_invalid_maps():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        probabilities_to_labels(np.full((4, 4), 1.5))
    with pytest.raises(ValueError, match=r"2D or 3D array, got float64 with shape \(4,\)"):
        probabilities_to_labels(np.zeros(4))


def test_labels_of_planes_post_processes_each_plane_of_a_stack_on_its_own():
    from biounet.postprocess import labels_from_probabilities, labels_of_planes

    rng = np.random.default_rng(3)
    fg = rng.random((2, 3, 20, 24))  # (T, Z, Y, X) planes of a 2D model
    prob = np.stack([1 - fg, fg], axis=2)  # (T, Z, C, Y, X)
    labels = labels_of_planes(prob, 2, threshold=0.6)
    assert labels.shape == (2, 3, 20, 24)
    for t, z in np.ndindex(2, 3):  # numbered within each plane, as labels_from_probabilities numbers it
        np.testing.assert_array_equal(labels[t, z], labels_from_probabilities(prob[t, z], threshold=0.6))
    np.testing.assert_array_equal(labels_of_planes(prob[0, 0], 2), labels_from_probabilities(prob[0, 0]))


# --------------------------------------------------------------------------------------------
# post-processing tuned on annotated images (biounet.training.tune_postprocess)


def _disc_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two discs of radius 6, 10 px apart, as one blob of p = 0.9 and as two true objects.

    The distance transform has two maxima of height 6 over a saddle of about 3.3 (the half
    chord at the midpoint, sqrt(36 - 25)): a seed height of 3 merges them, 2 or less splits them.
    """
    yy, xx = np.mgrid[:24, :34]
    d1, d2 = np.hypot(yy - 12, xx - 11), np.hypot(yy - 12, xx - 21)
    union = (d1 <= 6) | (d2 <= 6)
    truth = np.where(union, np.where(d1 <= d2, 1, 2), 0).astype(np.int32)
    p = np.where(union, 0.9, 0.02)
    return np.stack([1 - p, p]), truth


def test_tuning_finds_the_threshold_that_separates_object_from_halo():
    from biounet.training import tune_postprocess

    truth = np.zeros((30, 30), np.int32)
    truth[10:20, 10:20] = 1
    p = np.zeros((30, 30))
    p[7:23, 7:23] = 0.55  # a halo 3 px wide: at 0.5 the object is 16x16, IoU 100 / 256 < 0.5
    p[10:20, 10:20] = 0.65
    tuned = tune_postprocess([np.stack([1 - p, p])], [truth], {"split": "none"})
    assert tuned.options == {"split": "none", "threshold": 0.6}  # 0.7 finds nothing, 0.3-0.5 the halo too
    assert (tuned.default_score, tuned.score) == (0.0, 1.0)
    assert tuned.grid == {"threshold": (0.3, 0.4, 0.5, 0.6, 0.7)}


def test_tuning_finds_a_seed_height_that_splits_and_keeps_the_given_options_on_ties():
    from biounet.training import tune_postprocess

    prob, truth = _disc_pair()
    assert probabilities_to_labels(prob[1], split="distance", min_seed_height=3.0).max() == 1
    tuned = tune_postprocess([prob], [truth], {"split": "distance", "min_seed_height": 3.0})
    # merged: 1 match of 2 true objects, AP 1 / 2; split: both. Of the heights that split, the first
    # tried; the threshold stays at its default (changing it as well scores no higher)
    assert (tuned.default_score, tuned.score) == (0.5, 1.0)
    assert tuned.options == {"split": "distance", "min_seed_height": 1.0, "threshold": 0.5}
    assert probabilities_to_labels(prob[1], **tuned.options).max() == 2
    kept = tune_postprocess([prob], [truth], {"split": "distance", "min_seed_height": 2.0})  # already the best
    assert kept.options == {"split": "distance", "min_seed_height": 2.0} and kept.score == kept.default_score == 1.0


def test_tuning_grids_and_bad_input():
    from biounet.training import postprocess_grid, tune_postprocess

    assert postprocess_grid({"split": "probability"}) == {"threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
                                                          "seed_threshold": (0.8, 0.9, 0.95)}  # fmt: skip
    assert set(postprocess_grid({"split": "border"})) == set(postprocess_grid({})) == {"threshold"}
    prob, truth = _disc_pair()
    with pytest.raises(ValueError, match=r"image 0: probabilities of shape \(2, 24, 34\) do not fit labels of shape"):
        tune_postprocess([prob], [truth[:20]], {})
    with pytest.raises(ValueError, match="1 probability map"):
        tune_postprocess([prob], [], {})
    with pytest.raises(ValueError, match="unknown option.*'treshold'"):
        tune_postprocess([prob], [truth], {}, grid={"treshold": (0.5,)})
    with pytest.raises(ValueError, match="grid: empty"):
        tune_postprocess([prob], [truth], {}, grid={})
    for bad in ({"threshold": (0.5, 5)}, {"threshold": ("0.5",)}, {"split": "distance"}):  # a string: its letters
        with pytest.raises(ValueError, match="fits no combination"):
            tune_postprocess([prob], [truth], {}, grid=bad)
    with pytest.raises(ValueError, match="min_seed_height"):
        tune_postprocess([prob], [truth], {"split": "distance", "min_seed_height": -1.0})
    with pytest.raises(ValueError, match="3 classes of probabilities; split 'distance' makes objects of 2"):
        tune_postprocess([np.stack([prob[0] / 2, prob[0] / 2, prob[1]])], [truth], {"split": "distance"})
    # a seed threshold must lie above the threshold: (0.85, 0.8) is skipped, not an error, as 0.8 fits 0.5
    before = prob.copy()
    tuned = tune_postprocess([prob], [truth], {"split": "probability"},
                             grid={"threshold": (0.5, 0.85), "seed_threshold": (0.8, 0.9)})  # fmt: skip
    np.testing.assert_array_equal(prob, before)  # the input is not changed
    assert tuned.score == tuned.default_score  # p = 0.9 everywhere: one seed, one object, whatever the grid
    with pytest.raises(ValueError, match=r"seed_threshold = 0.4 fits no combination \(seed_threshold must be in"):
        tune_postprocess([prob], [truth], {"split": "probability"}, grid={"seed_threshold": (0.4, 0.9)})
