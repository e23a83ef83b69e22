"""Tests of biounet.data: the paper's border weight map (eq. 2), exact and fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from biounet.data import binary_to_instances, class_frequencies, render_weight_map, weight_map


def naive_weight_map(labels, w0=10.0, sigma=5.0, border="background", class_weights=None):
    """Eq. 2 the slow way: one full distance transform per cell, the two smallest per pixel."""
    cells = [k for k in np.unique(labels) if k != 0]
    w = np.ones(labels.shape) if class_weights is None else np.asarray(class_weights)[(labels > 0).astype(int)]
    if len(cells) < 2:
        return w
    distances = np.sort(np.stack([ndi.distance_transform_edt(labels != k) for k in cells]), axis=0)
    term = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    return w + (term if border == "all" else term * (labels == 0))


@st.composite
def label_images(draw):
    """Small images with 0..6 rectangular cells (overlapping ones touch), sparse ids, at the border."""
    height, width = draw(st.integers(1, 24)), draw(st.integers(2, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = np.zeros((height, width), dtype=np.int32)
    ids = rng.choice(np.arange(1, 1000), size=draw(st.integers(0, 6)), replace=False)
    for cell in ids:
        y0, x0 = rng.integers(0, (height, width))
        h, w = rng.integers(1, 9, size=2)
        labels[y0 : y0 + h, x0 : x0 + w] = cell
    return labels


@settings(max_examples=60, deadline=None)
@given(
    labels=label_images(),
    w0=st.floats(0.5, 20.0),
    sigma=st.floats(0.5, 6.0),
    border=st.sampled_from(["background", "all"]),
)
def test_equals_naive_reference(labels, w0, sigma, border):
    fast = weight_map(labels, w0=w0, sigma=sigma, class_weights=None, border=border)
    expected = naive_weight_map(labels, w0, sigma, border)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-5)


def test_equals_naive_reference_on_many_touching_cells():
    rng = np.random.default_rng(3)
    labels = np.zeros((96, 96), dtype=np.int32)
    labels[tuple(rng.integers(0, 96, size=(2, 40)))] = np.arange(1, 41)
    distance, nearest = ndi.distance_transform_edt(labels == 0, return_indices=True)
    cells = np.where(distance < 7, labels[tuple(nearest)], 0)  # Voronoi cells cut to discs: clumps
    np.testing.assert_allclose(weight_map(cells, class_weights=None), naive_weight_map(cells), rtol=0, atol=1e-5)


def test_two_cells_by_hand():
    labels = np.zeros((1, 9), dtype=np.uint16)
    labels[0, 0], labels[0, 8] = 1, 2  # pixel 3 is 3 px from cell 1 and 5 px from cell 2
    w = weight_map(labels, w0=10.0, sigma=5.0, class_weights=None)
    assert w[0, 3] == pytest.approx(1 + 10 * math.exp(-(8.0**2) / 50.0), abs=1e-6)
    assert w[0, 0] == w[0, 8] == 1.0  # cells: no border term by default
    w_all = weight_map(labels, w0=10.0, sigma=5.0, class_weights=None, border="all")
    assert w_all[0, 0] == pytest.approx(1 + 10 * math.exp(-(8.0**2) / 50.0), abs=1e-6)


@pytest.mark.parametrize("n_cells", [0, 1])
def test_fewer_than_two_cells_has_no_border_term(n_cells):
    labels = np.zeros((10, 12), dtype=np.int64)
    labels[2:5, 3:9] = n_cells  # 18 cell pixels out of 120 when there is one cell
    w = weight_map(labels, border="all")
    expected = np.where(labels > 0, 120 / (2 * 18), 120 / (2 * 102)) if n_cells else np.ones((10, 12))
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_truncation_error_is_below_tol_and_tol_zero_is_exact():
    labels = np.zeros((2, 40), dtype=np.int32)
    labels[:, 0], labels[:, 23] = 1, 2  # 23 px apart: beyond the cutoff R = 21.5 px for tol = 1e-3
    exact = naive_weight_map(labels, 10.0, 5.0, border="all")
    truncated = weight_map(labels, class_weights=None, border="all", tol=1e-3)
    error = np.abs(truncated - exact)
    assert 0 < error.max() < 1e-3  # the dropped term 10 exp(-23**2 / 50) = 2.5e-4 at x = 0
    np.testing.assert_allclose(weight_map(labels, class_weights=None, border="all", tol=0), exact, rtol=0, atol=1e-6)


def test_sparse_ids_and_no_background_give_the_same_map_as_dense_ids():
    dense = np.array([[1, 1, 2, 2], [1, 3, 3, 2], [3, 3, 3, 2]], dtype=np.int64)
    sparse = np.choose(dense - 1, [7, 10**9, 123456789])  # max id > size: relabelled internally
    np.testing.assert_array_equal(weight_map(sparse, border="all"), weight_map(dense, border="all"))
    np.testing.assert_allclose(weight_map(dense, border="all"), naive_weight_map(dense, border="all"), atol=1e-5)


def test_balanced_class_weights_per_image_and_from_frequencies():
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[:2, :2] = 1  # 4 cell pixels, 12 background
    w = weight_map(labels, w0=0.0)
    np.testing.assert_allclose(w, np.where(labels > 0, 16 / (2 * 4), 16 / (2 * 12)), rtol=1e-6)
    w = weight_map(labels, w0=0.0, class_frequencies=[9.0, 1.0])  # normalised: 0.9, 0.1
    np.testing.assert_allclose(w, np.where(labels > 0, 5.0, 1 / 1.8), rtol=1e-6)
    np.testing.assert_allclose(class_frequencies([labels, np.ones((2, 2))]), [12 / 20, 8 / 20])


def test_explicit_class_weights():
    labels = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    w_seq = weight_map(labels, w0=0.0, class_weights=[0.5, 3.0])
    w_map = weight_map(labels, w0=0.0, class_weights={0: 0.5, 1: 3.0})
    np.testing.assert_array_equal(w_seq, [[0.5, 3.0], [3.0, 0.5]])
    np.testing.assert_array_equal(w_map, w_seq)


def test_3d_labels_match_reference():
    labels = np.zeros((5, 9, 9), dtype=np.int32)
    labels[1:3, 1:4, 1:4], labels[2:5, 5:8, 4:8] = 1, 2
    np.testing.assert_allclose(weight_map(labels, class_weights=None), naive_weight_map(labels), atol=1e-5)


def test_input_is_not_mutated():
    labels = np.array([[0, 1, 0, 2]], dtype=np.int32)
    before = labels.copy()
    weight_map(labels)
    np.testing.assert_array_equal(labels, before)


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (np.zeros((4, 4), bool), {}, TypeError, "binary_to_instances"),
        (np.zeros((4, 4), np.float32), {}, TypeError, "integer"),
        (np.zeros(4, np.int32), {}, ValueError, "2D or 3D"),
        (-np.ones((4, 4), np.int32), {}, ValueError, "negative"),
        (np.zeros((4, 4), np.int32), {"sigma": -1.0}, ValueError, "sigma"),
        (np.zeros((4, 4), np.int32), {"w0": math.nan}, ValueError, "w0"),
        (np.zeros((4, 4), np.int32), {"tol": -1.0}, ValueError, "tol"),
        (np.zeros((4, 4), np.int32), {"border": "cells"}, ValueError, "border"),
        (np.zeros((4, 4), np.int32), {"class_weights": "auto"}, ValueError, "class_weights"),
        (np.zeros((4, 4), np.int32), {"class_weights": [1.0]}, ValueError, "class_weights"),
        (np.zeros((4, 4), np.int32), {"class_weights": {1: 2.0}}, ValueError, "keys"),
        (np.zeros((4, 4), np.int32), {"class_weights": None, "class_frequencies": [1, 1]}, ValueError, "balanced"),
        (np.zeros((4, 4), np.int32), {"class_frequencies": [1.0, 0.0]}, ValueError, "class_frequencies"),
    ],
)
def test_invalid_input_raises_one_clear_error(labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        weight_map(labels, **kwargs)


def test_binary_to_instances_connectivity_and_foreground_value():
    mask = np.array([[255, 0, 0], [0, 255, 255], [0, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(binary_to_instances(mask, foreground_value=255), [[1, 0, 0], [0, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(binary_to_instances(mask, connectivity=2), [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(binary_to_instances(mask, foreground_value=0), [[0, 1, 1], [2, 0, 0], [2, 2, 2]])
    with pytest.raises(ValueError, match="connectivity"):
        binary_to_instances(mask, connectivity=3)
    with pytest.raises(ValueError, match="2D or 3D"):
        binary_to_instances(np.zeros(5))


def test_membranes_between_two_cells_get_the_highest_weight():
    mask = np.full((9, 11), 255, dtype=np.uint8)
    mask[:, 5] = 0  # a one-pixel membrane splits the image into two cells
    w = weight_map(binary_to_instances(mask, foreground_value=255), class_weights=None)
    np.testing.assert_allclose(w[:, 5], 1 + 10 * math.exp(-4 / 50), rtol=1e-6)
    assert w[:, 5].min() > w[:, np.r_[0:5, 6:11]].max()


#: matplotlib's "jet": (x, value) corners of each channel's piecewise-linear segments
JET = {"red": [(0.0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1.0, 0.5)],
       "green": [(0.0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1.0, 0)],
       "blue": [(0.0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1.0, 0)]}  # fmt: skip


def _jet_bytes(t: np.ndarray) -> np.ndarray:
    """A 256-entry table of the segments, entry ``min(int(256 t), 255)``, times 255 truncated to bytes."""
    x = np.minimum((t * 256).astype(int), 255) / 255.0
    return np.stack([(np.interp(x, *zip(*JET[c])) * 255).astype(np.uint8) for c in ("red", "green", "blue")], -1)


def test_render_weight_map_colours():
    rgb = render_weight_map(np.array([[0.0, 1.0, 2.0, 4.0]]), vmax=2.0)
    np.testing.assert_array_equal(rgb[0], [[0, 0, 127], [124, 255, 121], [127, 0, 0], [127, 0, 0]])
    weights = np.linspace(0.0, 3.0, 301).reshape(7, 43)
    np.testing.assert_array_equal(render_weight_map(weights), _jet_bytes(weights / 3.0))
    assert render_weight_map(np.zeros((2, 3))).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="2D"):
        render_weight_map(np.zeros((2, 3, 3)))


def test_cli_show_weights_writes_the_rendered_map(tmp_path):
    from biounet.cli import main
    from biounet.io import read_image, write_tiff

    labels = np.zeros((20, 30), dtype=np.uint16)
    labels[3:10, 2:14], labels[3:10, 15:28], labels[12:18, 5:25] = 1, 2, 3
    write_tiff(tmp_path / "labels.tif", labels)
    out = tmp_path / "weights.png"
    assert main(["show-weights", str(tmp_path / "labels.tif"), "-o", str(out), "--sigma", "3"]) == 0
    np.testing.assert_array_equal(read_image(out), render_weight_map(weight_map(labels, sigma=3.0)))
    assert main(["show-weights", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "w.jpg")]) == 1
    assert not (tmp_path / "w.jpg").exists()


def test_cli_show_weights_binary_mask(tmp_path):
    from biounet.cli import main
    from biounet.io import read_image, write_png

    mask = np.full((16, 16), 255, dtype=np.uint8)
    mask[8, :] = 0
    write_png(tmp_path / "mask.png", mask)
    out = tmp_path / "w.png"
    args = ["show-weights", str(tmp_path / "mask.png"), "--binary", "--foreground-value", "255", "-o", str(out)]
    assert main(args) == 0
    expected = render_weight_map(weight_map(binary_to_instances(mask, foreground_value=255)))
    np.testing.assert_array_equal(read_image(out), expected)


@pytest.mark.data
@pytest.mark.slow
def test_dsb_brightfield_label_equals_naive_reference(data_dir):
    import csv

    from biounet.io import read_image

    root = data_dir / "dsb2018-nuclei"
    rows = [r for r in csv.DictReader(open(root / "manifest.csv")) if r["category"] == "brightfield_gray"]
    labels = read_image(root / "labels" / f"{rows[0]['id']}.tif")
    assert labels.shape == (1024, 1024)
    np.testing.assert_allclose(weight_map(labels, class_weights=None), naive_weight_map(labels), rtol=0, atol=1e-5)
