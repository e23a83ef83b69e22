"""Tests of biounet.data: readers, training tiles, synthetic touching cells."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from biounet.cli import main
from biounet.data import INSTANCE_LABELS, ISBI_MEMBRANES, LabelFormat, Sample, TileDataset, detect_layout, extract_tile, load_dataset, make_sample, synthetic_cells
from biounet.io import read_image, write_png


# --------------------------------------------------------------------------------------------
# helpers, written independently of the module
# --------------------------------------------------------------------------------------------
def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different cells with 4-adjacent pixels, by a plain loop over pixels."""
    pairs = set()
    height, width = labels.shape
    for y in range(height):
        for x in range(width):
            a = int(labels[y, x])
            for ny, nx in ((y + 1, x), (y, x + 1)):
                if ny < height and nx < width:
                    b = int(labels[ny, nx])
                    if a and b and a != b:
                        pairs.add((min(a, b), max(a, b)))
    return pairs


def touching_fraction(labels: np.ndarray) -> float:
    cells = {c for pair in touching_pairs(labels) for c in pair}
    return len(cells) / int(labels.max())


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        write_png(path, array)
    else:
        tifffile.imwrite(path, array)


# --------------------------------------------------------------------------------------------
# synthetic cells
# --------------------------------------------------------------------------------------------
def test_synthetic_cells_deterministic_and_independent_of_n():
    first = synthetic_cells(3, shape=(96, 128), seed=5)
    again = synthetic_cells(3, shape=(96, 128), seed=5)
    prefix = synthetic_cells(2, shape=(96, 128), seed=5)
    other = synthetic_cells(1, shape=(96, 128), seed=6)
    for (im_a, lab_a), (im_b, lab_b) in zip(first, again):
        np.testing.assert_array_equal(im_a, im_b)
        np.testing.assert_array_equal(lab_a, lab_b)
    for (im_a, lab_a), (im_b, lab_b) in zip(first, prefix):
        np.testing.assert_array_equal(im_a, im_b)
        np.testing.assert_array_equal(lab_a, lab_b)
    assert not np.array_equal(first[0][1], other[0][1])
    assert not np.array_equal(first[0][1], first[1][1])


@pytest.mark.parametrize("style", ["fluorescence", "phase"])
def test_synthetic_cells_dtypes_shapes_and_labels(style):
    for image, labels in synthetic_cells(4, shape=(120, 200), seed=1, style=style):
        assert image.shape == labels.shape == (120, 200)
        assert image.dtype == np.uint16 and labels.dtype == np.uint16
        n = int(labels.max())
        assert n >= 5
        np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))
        # every cell is one 4-connected piece of at least 0.5 * pi * 7**2 = 77 px
        for cell in range(1, n + 1):
            pieces, count = ndi.label(labels == cell)
            assert count == 1
            assert (labels == cell).sum() >= 77
        assert image.min() > 0 and image.std() > 0


def test_synthetic_cells_touch_each_other():
    data = synthetic_cells(4, seed=0)
    fractions = [touching_fraction(labels) for _, labels in data]
    assert min(fractions) >= 0.5, fractions
    # with the gap probabilities (0.5, 0.3, 0.2) a cell with k neighbours touches one with
    # probability 1 - 0.5**k: never all, never none
    assert max(fractions) < 1.0


@pytest.mark.parametrize("gaps", [(0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_synthetic_cells_gaps_separate_every_pair(gaps):
    for _, labels in synthetic_cells(2, seed=3, gaps=gaps):
        assert touching_pairs(labels) == set()


def test_synthetic_cells_without_gaps_almost_all_touch():
    for _, labels in synthetic_cells(2, seed=3, gaps=(1.0, 0.0, 0.0)):
        assert touching_fraction(labels) >= 0.8


def test_synthetic_cells_one_px_gap_is_one_px():
    """With only 1 px gaps, touching cells of the gap-free version are 2 px apart (one pixel between)."""
    (_, closed), (_, open_) = synthetic_cells(1, seed=4, gaps=(1.0, 0.0, 0.0)) + synthetic_cells(
        1, seed=4, gaps=(0.0, 1.0, 0.0)
    )
    # cells one background pixel apart: some pixel of a has a pixel of b two steps away in a line
    near = set()
    for dy, dx in ((2, 0), (0, 2)):
        a, b = open_[: open_.shape[0] - dy, : open_.shape[1] - dx], open_[dy:, dx:]
        mid = open_[dy // 2 : open_.shape[0] - dy + dy // 2, dx // 2 : open_.shape[1] - dx + dx // 2]
        hit = (a > 0) & (b > 0) & (a != b) & (mid == 0)
        near |= set(zip(np.minimum(a, b)[hit].tolist(), np.maximum(a, b)[hit].tolist()))
    assert len(near) >= 0.5 * len(touching_pairs(closed))


def test_synthetic_styles_share_cells_and_differ_in_look():
    (fluo, labels), = synthetic_cells(1, seed=2, style="fluorescence")
    (phase, labels_p), = synthetic_cells(1, seed=2, style="phase")
    np.testing.assert_array_equal(labels, labels_p)
    cells = labels > 0
    interior = ndi.binary_erosion(cells, iterations=3)
    far = ~ndi.binary_dilation(cells, iterations=12)
    ring = ndi.binary_dilation(cells, iterations=3) & ~cells
    f, p = fluo - 100.0, phase - 100.0  # the camera offset
    # fluorescence: bright cells on a dark background
    assert f[interior].mean() > 5 * f[far].mean()
    # phase contrast: mid-grey background, darker cells, bright halos around them
    assert p[interior].mean() < 0.88 * p[far].mean()
    assert p[ring].mean() > 1.05 * p[far].mean()
    assert f[ring].mean() < 0.3 * f[interior].mean()
    assert 0.2 < np.median(p[far]) / p.max() < 0.8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must"),
        ({"n": 1, "shape": (8, 64)}, "shape"),
        ({"n": 1, "style": "dic"}, "style"),
        ({"n": 1, "radius": (5.0, 3.0)}, "radius"),
        ({"n": 1, "clump_size": (0, 3)}, "clump_size"),
        ({"n": 1, "gaps": (0.5, 0.5, 0.5)}, "gaps"),
    ],
)
def test_synthetic_cells_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_cells(**kwargs)


def test_cli_synth_writes_loadable_folders(tmp_path):
    out = tmp_path / "synth"
    assert main(["synth", "-o", str(out), "-n", "2", "--shape", "64", "80", "--seed", "7", "--style", "phase"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["synth_000.tif", "synth_001.tif"]
    samples = load_dataset(out)
    expected = synthetic_cells(2, shape=(64, 80), seed=7, style="phase")
    assert [s.name for s in samples] == ["synth_000", "synth_001"]
    for sample, (image, labels) in zip(samples, expected):
        np.testing.assert_array_equal(sample.image, image)
        np.testing.assert_array_equal(sample.labels, labels)
    assert main(["synth", "-o", str(out), "-n", "1"]) == 1  # refuses to mix with earlier data


# --------------------------------------------------------------------------------------------
# samples and label conventions
# --------------------------------------------------------------------------------------------
def test_make_sample_relabels_instances_to_consecutive():
    labels = np.array([[0, 7, 7], [30, 0, 7], [30, 30, 0]], dtype=np.uint16)
    sample = make_sample(np.zeros((3, 3)), labels, name="a")
    np.testing.assert_array_equal(sample.labels, [[0, 1, 1], [2, 0, 1], [2, 2, 0]])
    assert sample.labels.dtype == np.int32 and sample.n_instances == 2
    np.testing.assert_array_equal(sample.target, labels > 0)
    assert labels[0, 1] == 7  # input untouched


def test_make_sample_mask_to_four_connected_instances():
    mask = np.array(
        [
            [255, 255, 0, 0],
            [255, 255, 0, 0],
            [0, 0, 255, 0],
            [0, 0, 255, 255],
        ],
        dtype=np.uint8,
    )
    sample = make_sample(np.ones((4, 4)), mask, name="m", label_format=ISBI_MEMBRANES)
    # the two cells touch only at a corner: 4-connectivity keeps them apart
    np.testing.assert_array_equal(sample.labels, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 2, 2]])
    np.testing.assert_array_equal(sample.target, mask == 255)
    inverted = make_sample(np.ones((4, 4)), mask, name="m", label_format=LabelFormat("mask", 0, 255))
    np.testing.assert_array_equal(inverted.target, mask == 0)
    assert inverted.n_instances == 2  # top-right block and bottom-left block


@pytest.mark.parametrize(
    ("image", "labels", "fmt", "message"),
    [
        (
            np.zeros((4, 5)),
            np.zeros((5, 4), np.uint8),
            INSTANCE_LABELS,
            r"lab/x\.tif: label shape \(5, 4\) does not match image shape \(4, 5\)",
        ),
        (np.zeros((4, 4)), np.zeros((4, 4), np.float32), INSTANCE_LABELS, "must hold integers"),
        (np.zeros((4, 4)), -np.ones((4, 4), np.int16), INSTANCE_LABELS, ">= 0"),
        (np.zeros((4, 4)), np.full((4, 4), 128, np.uint8), ISBI_MEMBRANES, r"values \{128\}"),
        (np.zeros((2, 4, 4, 1)), np.zeros((4, 4), np.uint8), INSTANCE_LABELS, "image must be"),
    ],
)
def test_make_sample_rejects_bad_pairs(image, labels, fmt, message):
    with pytest.raises(ValueError, match=message):
        make_sample(image, labels, name="x", label_format=fmt, label_path="lab/x.tif")


def test_sample_requires_int32_labels():
    with pytest.raises(TypeError, match="int32"):
        Sample("x", np.zeros((2, 2)), np.zeros((2, 2), np.uint16))


def test_label_format_validation():
    with pytest.raises(ValueError, match="kind"):
        LabelFormat("membranes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both 3"):
        LabelFormat("mask", 3, 3)


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------
def test_folders_pairs_by_stem_any_format(tmp_path):
    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    write(tmp_path / "images" / "b.png", rgb)
    write(tmp_path / "images" / "a.tif", np.full((5, 6), 9, np.uint16))
    write(tmp_path / "labels" / "a.tif", np.eye(5, 6, dtype=np.uint16) * 40)
    write(tmp_path / "labels" / "b.png", np.eye(5, 6, dtype=np.uint8) * 3)
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    assert detect_layout(tmp_path) == "folders"
    samples = load_dataset(tmp_path)
    assert [s.name for s in samples] == ["a", "b"]
    assert samples[0].image.dtype == np.uint16 and samples[0].image_path == tmp_path / "images" / "a.tif"
    np.testing.assert_array_equal(samples[1].image, rgb)
    np.testing.assert_array_equal(samples[0].labels, np.eye(5, 6))
    gray = load_dataset(tmp_path, as_gray=True)
    assert gray[1].image.shape == (5, 6)
    np.testing.assert_allclose(gray[1].image, rgb @ [0.2125, 0.7154, 0.0721] / 255, rtol=1e-5)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"images/a.tif": (4, 4), "labels/a.tif": (4, 4), "images/b.tif": (4, 4)}, r"images/b\.tif: no file with stem"),
        ({"images/a.tif": (4, 4), "labels/a.tif": (4, 4), "labels/c.tif": (4, 4)}, r"labels/c\.tif: no file with stem"),
        ({"images/a.tif": (4, 4), "images/a.png": (4, 4), "labels/a.tif": (4, 4)}, "same stem"),
        ({"images/a.tif": (4, 4), "labels/a.tif": (4, 5)}, r"labels/a\.tif: label shape \(4, 5\) does not match"),
        ({"images/.hidden.tif": (4, 4), "labels/.hidden.tif": (4, 4)}, "empty data set"),
    ],
)
def test_folders_errors_name_the_file(tmp_path, files, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, shape in files.items():
        write(tmp_path / name, np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path, "folders")


def test_isbi_slices_layout_and_membrane_values(tmp_path):
    mask = np.full((6, 6), 255, np.uint8)
    mask[3, :] = 0
    for i in range(3):
        write(tmp_path / "images" / f"{i:02d}.png", np.full((6, 6), i, np.uint8))
        write(tmp_path / "labels" / f"{i:02d}.png", mask)
    write(tmp_path / "test-images" / "00.png", np.zeros((6, 6), np.uint8))
    assert detect_layout(tmp_path) == "isbi"
    samples = load_dataset(tmp_path)
    assert [s.name for s in samples] == ["00", "01", "02"]
    assert all(s.n_instances == 2 for s in samples)
    np.testing.assert_array_equal(samples[1].target, mask == 255)
    bad = mask.copy()
    bad[0, 0] = 128
    write(tmp_path / "labels" / "01.png", bad)
    with pytest.raises(ValueError, match=r"labels/01\.png: mask has values \{128\}"):
        load_dataset(tmp_path)


def test_isbi_stacks(tmp_path):
    volume = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    labels = np.full((3, 8, 8), 255, np.uint8)
    labels[:, :, 4] = 0
    tifffile.imwrite(tmp_path / "train-volume.tif", volume)
    tifffile.imwrite(tmp_path / "train-labels.tif", labels)
    assert detect_layout(tmp_path) == "isbi"
    samples = load_dataset(tmp_path)
    assert [s.name for s in samples] == ["00", "01", "02"]
    np.testing.assert_array_equal(samples[2].image, volume[2])
    assert [s.n_instances for s in samples] == [2, 2, 2]
    tifffile.imwrite(tmp_path / "train-labels.tif", labels[:2])
    with pytest.raises(ValueError, match=r"train-labels\.tif: stack shape \(2, 8, 8\) does not match"):
        load_dataset(tmp_path)


def make_ctc(root: Path) -> None:
    for t in range(3):
        write(root / "01" / f"t{t:03d}.tif", np.full((6, 7), t, np.uint16))
        write(root / "02" / f"t{t:04d}.tif", np.full((6, 7), 10 + t, np.uint16))
    gt = np.zeros((6, 7), np.uint16)
    gt[1:3, 1:3], gt[4:6, 2:6] = 17, 4
    write(root / "01_GT" / "SEG" / "man_seg000.tif", gt)
    write(root / "01_GT" / "SEG" / "man_seg002.tif", gt)
    write(root / "02_GT" / "SEG" / "man_seg0001.tif", gt)
    write(root / "01_GT" / "TRA" / "man_track000.tif", gt)


def test_ctc_reads_only_frames_with_ground_truth(tmp_path):
    make_ctc(tmp_path)
    assert detect_layout(tmp_path) == "ctc"
    samples = load_dataset(tmp_path)
    assert [s.name for s in samples] == ["01_t000", "01_t002", "02_t001"]
    assert [int(s.image[0, 0]) for s in samples] == [0, 2, 11]
    np.testing.assert_array_equal(np.unique(samples[0].labels), [0, 1, 2])
    assert samples[0].labels[1, 1] == 2 and samples[0].labels[4, 2] == 1  # relabelled in order of value
    assert [s.name for s in load_dataset(tmp_path, "ctc", sequences=["02"])] == ["02_t001"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("01_GT/SEG/man_seg_000_010.tif", r"man_seg_000_010\.tif: not a 2D CTC ground-truth name"),
        ("01_GT/SEG/man_seg005.tif", r"man_seg005\.tif: no image t005\.tif"),
    ],
)
def test_ctc_errors_name_the_file(tmp_path, extra, message):
    make_ctc(tmp_path)
    write(tmp_path / extra, np.zeros((6, 7), np.uint16))
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path)


def test_unknown_layouts_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown data set layout"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="layout must be"):
        load_dataset(tmp_path, "hdf5")  # type: ignore[arg-type]
    make_ctc(tmp_path)
    with pytest.raises(ValueError, match="sequence '03' has no ground-truth folder"):
        load_dataset(tmp_path, sequences=["03"])
    with pytest.raises(ValueError, match="sequences only applies"):
        load_dataset(tmp_path, "folders", sequences=["01"])


# --------------------------------------------------------------------------------------------
# training tiles
# --------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    out=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    halo=st.tuples(st.integers(0, 12), st.integers(0, 12)),
    data=st.data(),
)
def test_extract_tile_matches_np_pad_reflect(height, width, out, halo, data):
    y0 = data.draw(st.integers(1 - out[0], height - 1))
    x0 = data.draw(st.integers(1 - out[1], width - 1))
    rng = np.random.default_rng(height * 100 + width)
    image = rng.normal(size=(2, height, width)).astype(np.float32)
    target = rng.integers(0, 2, (height, width)).astype(np.uint8)
    weight = rng.uniform(0.5, 2, (height, width)).astype(np.float32)
    image_tile, target_tile, weight_tile = extract_tile(image, target, weight, (y0, x0), out, halo)
    _, target_in, weight_in = extract_tile(image, target, weight, (y0, x0), out, halo, targets="input")
    assert target_in.shape == weight_in.shape == image_tile.shape[1:]
    # reference: pad generously with numpy's reflect mode, then crop
    pad = 40
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    top, left = pad + y0 - halo[0], pad + x0 - halo[1]
    expected = padded[:, top : top + out[0] + 2 * halo[0], left : left + out[1] + 2 * halo[1]]
    np.testing.assert_array_equal(image_tile, expected)
    for i in range(out[0] + 2 * halo[0]):
        for j in range(out[1] + 2 * halo[1]):
            y, x = y0 - halo[0] + i, x0 - halo[1] + j
            inside = 0 <= y < height and 0 <= x < width
            assert target_in[i, j] == (target[y, x] if inside else 0)
            assert weight_in[i, j] == (weight[y, x] if inside else 0.0)
            if halo[0] <= i < halo[0] + out[0] and halo[1] <= j < halo[1] + out[1]:
                assert target_tile[i - halo[0], j - halo[1]] == target_in[i, j]
                assert weight_tile[i - halo[0], j - halo[1]] == weight_in[i, j]


def test_extract_tile_rejects_bad_arguments():
    image, plane = np.zeros((1, 5, 6)), np.zeros((5, 6))
    with pytest.raises(ValueError, match="misses"):
        extract_tile(image, plane, plane, (-4, 0), (4, 4), (2, 2))
    with pytest.raises(ValueError, match="misses"):
        extract_tile(image, plane, plane, (0, 6), (4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        extract_tile(image, np.zeros((5, 5)), plane, (0, 0), (4, 4), (2, 2))


def coordinate_samples() -> list[Sample]:
    """Two small images whose pixel values encode (image, y, x), all pixels labelled."""
    shapes = [(13, 17), (6, 9)]
    out = []
    for k, (h, w) in enumerate(shapes):
        image = (k * 1000 + np.arange(h * w).reshape(h, w)).astype(np.float32)
        out.append(make_sample(image, np.ones((h, w), np.uint8), name=str(k)))
    return out


def test_tile_dataset_picks_images_by_their_objects():
    labels = [np.zeros((12, 12), np.int32) for _ in range(3)]  # 0 objects (counts as 1), 1 object, 4 objects
    labels[1][2:5, 2:5] = 1
    for k, (y, x) in enumerate([(1, 1), (1, 7), (7, 1), (7, 7)], start=1):
        labels[2][y:y + 3, x:x + 3] = k
    samples = [make_sample(np.full((12, 12), float(k), np.float32), lab, name=str(k)) for k, lab in enumerate(labels)]
    drawn = {}
    for pick, expected in (("objects", [1 / 6, 1 / 6, 4 / 6]), ("images", [1 / 3, 1 / 3, 1 / 3])):
        ds = TileDataset(samples, input_size=8, output_size=4, length=3000, seed=2, pick=pick, normalization=None,
                         weight_fn=lambda lab: np.ones(lab.shape, np.float32))  # fmt: skip
        counts = np.bincount([int(ds[i].image[0, 0, 0]) for i in range(len(ds))], minlength=3)
        # binomial standard deviation of a count: at most sqrt(3000 / 4) = 27; allow 4 of them
        np.testing.assert_allclose(counts, 3000 * np.array(expected), atol=110)
        drawn[pick] = counts
    assert drawn["objects"][2] > 1.7 * drawn["images"][2]


def test_tile_dataset_covers_every_pixel_uniformly():
    samples = coordinate_samples()
    ds = TileDataset(samples, input_size=(14, 12), output_size=(4, 6), length=3000, seed=1, pick="pixels",
                     normalization=None, weight_fn=lambda labels: np.ones(labels.shape, np.float32))
    counts = {k: np.zeros(s.labels.shape) for k, s in enumerate(samples)}
    for i in range(len(ds)):
        tile = ds[i]
        assert tile.image.shape == (1, 14, 12) and tile.target.shape == tile.weight.shape == (4, 6)
        assert tile.image.dtype == torch.float32 and tile.target.dtype == torch.uint8
        centre = tile.image[0, 5:9, 3:9].numpy().astype(int)
        inside = tile.weight.numpy() > 0
        np.testing.assert_array_equal(tile.target.numpy(), inside)  # all pixels labelled 1 inside, 0 outside
        for value in centre[inside]:
            k, pos = divmod(value, 1000)
            np.add.at(counts[k], np.unravel_index(pos, counts[k].shape), 1)
    # every pixel, corners included, is in (4 * 6) of the (H + 3) * (W + 5) windows of its image, and
    # images are picked by their number of windows: each pixel is expected in 3000 * 24 / total windows
    total = sum((h + 3) * (w + 5) for h, w in (s.labels.shape for s in samples))
    expected = 3000 * 24 / total
    for k in counts:
        assert counts[k].min() > 0.5 * expected and counts[k].max() < 1.5 * expected
        assert abs(counts[k].mean() / expected - 1) < 0.1


def test_tile_dataset_reproducible_and_epochs_differ():
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2, shape=(64, 64)))]
    a = TileDataset(samples, input_size=52, output_size=12, length=4, seed=3)
    b = TileDataset(samples, input_size=52, output_size=12, length=4, seed=3)
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)
    before = a[2]
    a.set_epoch(1)
    assert not torch.equal(before.image, a[2].image)
    wide = TileDataset(samples, input_size=52, output_size=12, targets="input", length=4, seed=3)
    wide.set_epoch(1)
    assert torch.equal(wide[2].image, a[2].image)
    assert torch.equal(wide[2].weight[20:32, 20:32], a[2].weight) and wide[2].weight.shape == (52, 52)
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert batch.image.shape == (4, 1, 52, 52) and batch.weight.shape == (4, 12, 12)
    assert float(batch.weight.max()) > 1.0  # border weights of eq. 2 present
    with pytest.raises(IndexError):
        a[4]


def test_tile_dataset_inverts_bright_background_images_with_background_dark():
    cells = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2, shape=(64, 64)))]
    turned = [make_sample(im.max() + im.min() - im, s.labels, name=s.name) for s in cells for im in [s.image]]
    kept = TileDataset(cells, input_size=52, output_size=12, length=4, seed=3, normalization=(0.0, 100.0))
    dark = TileDataset(turned, input_size=52, output_size=12, length=4, seed=3, normalization=(0.0, 100.0),
                       background="dark")  # fmt: skip
    plain = TileDataset(turned, input_size=52, output_size=12, length=4, seed=3, normalization=(0.0, 100.0))
    for k in range(4):  # percentiles 0 and 100: the inverted turned image is the original, to rounding
        torch.testing.assert_close(dark[k].image, kept[k].image, rtol=0, atol=1e-6)
        assert torch.equal(dark[k].target, kept[k].target)
        torch.testing.assert_close(plain[k].image, 1 - kept[k].image, rtol=0, atol=1e-6)
    # the synthetic cells are bright on a dark background: kept as they are
    as_is = TileDataset(cells, input_size=52, output_size=12, length=4, seed=3, normalization=(0.0, 100.0),
                        background="dark")  # fmt: skip
    assert torch.equal(as_is[1].image, kept[1].image)


def test_tile_dataset_rejects_bad_arguments():
    gray = make_sample(np.zeros((8, 8)), np.ones((8, 8), np.uint8), name="g")
    rgb = make_sample(np.zeros((8, 8, 3)), np.ones((8, 8), np.uint8), name="c")
    with pytest.raises(ValueError, match="even number"):
        TileDataset([gray], input_size=9, output_size=4)
    with pytest.raises(ValueError, match="differ in channels"):
        TileDataset([gray, rgb], input_size=8, output_size=4)
    with pytest.raises(ValueError, match="empty"):
        TileDataset([], input_size=8, output_size=4)
    with pytest.raises(ValueError, match="pick"):
        TileDataset([gray], input_size=8, output_size=4, pick="area")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the real data
# --------------------------------------------------------------------------------------------
@pytest.mark.data
def test_isbi2012_real_data_loads(data_dir):
    root = data_dir / "isbi2012-em"
    samples = load_dataset(root)
    assert [s.name for s in samples] == [f"{i:02d}" for i in range(25)]
    membrane = [1 - s.target.mean() for s in samples]
    assert 0.1835 <= min(membrane) and max(membrane) < 0.2705 and 0.2235 <= np.mean(membrane) < 0.2245  # SOURCE.md
    for s in samples:
        raw = read_image(s.label_path)
        assert s.image.shape == raw.shape == (512, 512) and s.image.dtype == np.uint8
        np.testing.assert_array_equal(np.unique(raw), [0, 255])
        np.testing.assert_array_equal(s.target, raw == 255)
        assert s.n_instances > 50
    tests = sorted((root / "test-images").iterdir())
    assert [p.name for p in tests] == [f"{i:02d}.png" for i in range(30)]
    for path in tests:
        image = read_image(path)
        assert image.shape == (512, 512) and image.dtype == np.uint8


@pytest.mark.data
def test_dsb2018_real_data_loads_and_weight_maps(data_dir):
    from biounet.data import weight_map

    root = data_dir / "dsb2018-nuclei"
    with open(root / "manifest.csv", newline="") as f:
        manifest = {row["id"]: row for row in csv.DictReader(f)}
    samples = load_dataset(root)
    separated = 0
    assert len(samples) == len(manifest) == 120
    assert {s.name for s in samples} == set(manifest)
    for s in samples:
        row = manifest[s.name]
        assert s.image.shape[:2] == s.labels.shape == (int(row["height"]), int(row["width"]))
        assert s.image.dtype == np.uint8 and s.image.ndim == (3 if row["category"] == "color_HE" else 2)
        assert s.n_instances == int(row["n_instances"])
        np.testing.assert_array_equal(s.labels, read_image(s.label_path))  # already 1..N
        assert round(float((s.labels > 0).mean()), 3) == pytest.approx(float(row["foreground_fraction"]), abs=1e-9)
        assert np.all(s.target <= (s.labels > 0))  # the target only loses the lines between touching nuclei
        w = weight_map(s.labels)
        assert w.shape == s.labels.shape and np.isfinite(w).all() and w.min() > 0
        assert np.ptp(w[s.labels > 0]) == 0  # cells get their class weight only
        separated += np.ptp(w[s.labels == 0]) > 1  # a border term between nuclei closer than ~28 px
    assert separated >= 100  # 107 of the 120 images have nuclei close enough


def test_separate_touching_draws_a_line_that_splits_4_connected_components():
    from scipy import ndimage

    from biounet.data import separate_touching

    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = ndimage.zoom(rng.integers(0, 6, size=(6, 6)), 5, order=0).astype(np.int32)
        before = labels.copy()
        out = separate_touching(labels)
        assert np.array_equal(labels, before)  # the input is not modified
        # independent check: no two 4-adjacent foreground pixels of out belong to different objects
        for axis in (0, 1):
            a, b = np.moveaxis(out, axis, 0)[:-1], np.moveaxis(out, axis, 0)[1:]
            assert not np.any((a > 0) & (b > 0) & (a != b))
        # each object loses only pixels on its border with a lower-numbered object
        lost = (labels > 0) & (out == 0)
        others = np.where(labels > 0, labels, 10**6)
        lowest = ndimage.minimum_filter(others, footprint=ndimage.generate_binary_structure(2, 1), mode="nearest")
        assert np.all(lowest[lost] < labels[lost])
        components, n = ndimage.label(out > 0)
        assert n >= len(np.unique(out[out > 0]))


def test_target_and_weights_use_the_separating_lines():
    from biounet.data import make_sample

    labels = np.zeros((10, 12), np.int32)
    labels[2:8, 1:6] = 1
    labels[2:8, 6:11] = 2  # touches object 1 along a vertical line
    sample = make_sample(np.zeros((10, 12)), labels, name="two")
    assert sample.target[2:8, 6].tolist() == [0] * 6  # the line is drawn in the higher-numbered object
    assert sample.target[2:8, 5].tolist() == [1] * 6 and sample.target[2:8, 7].tolist() == [1] * 6
    assert sample.n_instances == 2 and sample.labels[4, 6] == 2  # the instances themselves are kept


def test_border_target_marks_each_cells_outermost_pixels_but_not_the_image_edge():
    from biounet.data import TileDataset, make_sample

    labels = np.zeros((10, 12), np.int32)
    labels[1:7, 1:6], labels[1:7, 6:11] = 1, 2  # touching along column 6
    labels[8:, 9:] = 3  # cut by the bottom and right edges
    sample = make_sample(np.zeros((10, 12)), labels, name="three")
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 0],
        [0, 2, 1, 1, 1, 2, 0, 2, 1, 1, 2, 0],
        [0, 2, 1, 1, 1, 2, 0, 2, 1, 1, 2, 0],
        [0, 2, 1, 1, 1, 2, 0, 2, 1, 1, 2, 0],
        [0, 2, 1, 1, 1, 2, 0, 2, 1, 1, 2, 0],
        [0, 2, 2, 2, 2, 2, 0, 2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 1],
    ], np.uint8)  # fmt: skip
    np.testing.assert_array_equal(sample.class_target("border"), expected)
    np.testing.assert_array_equal(sample.class_target("binary"), sample.target)
    with pytest.raises(ValueError, match="'binary' or 'border'"):
        sample.class_target("three")
    tile = TileDataset([sample], 8, 8, kind="border", length=4, normalization=None)[0]
    assert set(np.unique(tile.target.numpy())) <= {0, 1, 2} and 2 in set(np.unique(tile.target.numpy()))


def test_a_file_for_a_folder_and_a_nan_image_name_the_path(tmp_path):
    from biounet.data import load_dataset, make_sample

    (tmp_path / "data.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="data.tif: a file, not a data set folder"):
        load_dataset(tmp_path / "data.tif")
    image = np.ones((8, 8), np.float32)
    image[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"images/s2.tif \(x\): the image has NaN or infinite pixels"):
        make_sample(image, np.zeros((8, 8), np.uint8), name="x", image_path="images/s2.tif")
