"""Out-of-core prediction (Dask + Zarr): exactness, percentiles, labels across chunks, files, clusters."""

from __future__ import annotations

import dataclasses
import json

import dask
import dask.array as da
import numpy as np
import ome_zarr_models
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage

from biounet import UNet, load_model, predict
from biounet.errors import InputError
from biounet.prediction import _chunked, _files, _names
from biounet.cli import main
from biounet.postprocess import labels_from_probabilities
from biounet.io import intensity_percentiles, ngff_attributes, open_image, read_image_axes
from biounet.prediction import label_chunked, plan_chunks, predict_dask, predict_to_zarr
from biounet.prediction import chunk_context
from biounet.borders import mirror_indices


def net(depth: int = 2, width: int = 4, seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(depth=depth, base_channels=width, dropout=0.0, **kwargs).eval()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (equal up to renumbering; 0 is background)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return bool(
        np.array_equal(a == 0, b == 0)
        and len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
    )


# -- the arithmetic that makes chunks exact ----------------------------------------------------
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_chunk_context_is_exactly_what_an_aligned_chunk_depends_on(depth):
    """Rows the output rows [a, b) depend on, found by autograd through a network with positive weights."""
    model = net(depth, 1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_().add_(0.01)  # every ReLU is active, so every dependency has a non-zero gradient
    cfg = model.config
    rows = cfg.valid_input_size(2 * cfg.halo + 5 * cfg.stride)
    x = torch.rand(1, 1, rows, cfg.valid_input_size(1), dtype=torch.float64, requires_grad=True)
    out = model(x)
    # image position p sits at input row p + halo; the grid is aligned at output row 0
    a, b = cfg.stride, 3 * cfg.stride
    out[0, 1, a:b].sum().backward()
    used = np.flatnonzero(x.grad[0, 0].abs().sum(1).numpy())
    before, after = chunk_context(cfg)
    assert (used.min() - cfg.halo, used.max() + 1 - cfg.halo) == (a - before, b + after)
    assert (before, after) == ((cfg.halo, cfg.halo) if depth <= 2 else (cfg.halo, cfg.halo + 4))


def test_dask_reflect_repeats_the_edge_so_biounet_pads_itself():
    x = np.arange(6.0)
    dask_reflect = da.overlap.overlap(da.from_array(x, chunks=3), depth=2, boundary="reflect").compute()
    assert np.array_equal(dask_reflect[:2], np.pad(x, 2, mode="symmetric")[:2])  # [1, 0]
    assert not np.array_equal(dask_reflect[:2], x[mirror_indices(6, 2, 0)][:2])  # ours: [2, 1]


def test_plan_chunks_are_aligned_and_never_smaller_than_the_context():
    cfg = net(3).config  # stride 8, context (44, 48)
    plan = plan_chunks(cfg, 301, 100)
    assert plan.margin == 48
    assert all(c % 8 == 0 and c >= 48 for c in plan.chunks)
    assert sum(plan.chunks) == 304 and plan.chunks == (96, 96, 112)  # the 16 px rest merged
    assert plan_chunks(cfg, 5, 2048).chunks == (48,)


# -- streamed == in memory -------------------------------------------------------------------
@pytest.mark.parametrize(
    "depth,shape,chunk,dtype",
    [(2, (150, 133), 16, np.float32), (3, (150, 133), 40, np.float32), (3, (97, 250), 64, np.uint16),
     (2, (7, 5), 16, np.float32), (3, (64, 64), 2048, np.uint8)],
)  # fmt: skip
def test_streamed_equals_in_memory(depth, shape, chunk, dtype):
    model = net(depth)
    image = (np.random.default_rng(1).random(shape) * 250).astype(dtype)
    lazy = predict_dask(model, da.from_array(image, chunks=37), chunk=chunk)
    assert isinstance(lazy, da.Array) and lazy.shape == (2, *shape)
    np.testing.assert_allclose(lazy.compute(), predict(model, image, progress=False), atol=1e-5, rtol=0)


def test_streamed_stack_with_channels_equals_in_memory():
    model = net(2, in_channels=2)
    stack = np.random.default_rng(2).random((3, 70, 45, 2)).astype(np.float32)
    stack[1] *= 50  # planes are normalised on their own, as in memory
    lazy = predict_dask(model, stack, channel_axis=-1, chunk=32)
    np.testing.assert_allclose(lazy.compute(), predict(model, stack, channel_axis=-1, progress=False), atol=1e-5)


def test_a_model_in_training_mode_is_predicted_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, dropout=0.5).train()
    image = np.random.default_rng(2).random((60, 50)).astype(np.float32)
    lazy = predict_dask(model, image, chunk=16)
    assert model.training
    np.testing.assert_allclose(lazy.compute(), predict(model, image, progress=False), atol=1e-5)
    assert model.training


def test_predict_with_context_equals_the_crop_of_the_full_result():
    model = net(3)  # stride 8, context (44, 48)
    image = np.random.default_rng(3).random((90, 100)).astype(np.float32)
    full = predict(model, image, progress=False)
    before, after = chunk_context(model.config)
    padded = np.pad(image, before + after, mode="reflect")  # image pixel (y, x) at (y + 92, x + 92)
    rows, cols = slice(92 - before, 92 + 40 + after), slice(92 + 8 - before, 92 + 56 + after)
    ranges = np.percentile(image, model.info.normalization)  # the whole image's, not the window's
    part = predict(model, padded[rows, cols], context=[(before, after)] * 2, intensity_range=ranges, progress=False)
    np.testing.assert_allclose(part, full[:, 0:40, 8:56], atol=1e-5)


def test_each_chunk_is_predicted_once_when_writing_probabilities_and_labels(tmp_path, monkeypatch):
    calls = []
    real = _chunked.predict
    monkeypatch.setattr(_chunked, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = net(2)
    items = da.from_array(np.random.default_rng(0).random((1, 1, 100, 70)).astype(np.float32))
    _chunked.predict_to_zarr(model, items, tmp_path, "x", chunk=32, progress=False)
    assert len(calls) == 3 * 2  # 100 px -> chunks 32, 32, 36 (the 4 px rest merged); 70 -> 72 px -> 32, 40


# -- percentiles over the whole image ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, bool])
def test_histogram_percentiles_equal_numpy(dtype):
    rng = np.random.default_rng(4)
    data = (rng.normal(0, 1, (2, 3, 61, 47)) * 3000).astype(dtype)
    got = intensity_percentiles(da.from_array(data, chunks=(1, 1, 20, 20)), 1.0, 99.8)
    want = np.percentile(data.astype(np.float32).reshape(2, 3, -1), [1.0, 99.8], axis=-1).transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_float_percentiles_are_exact_when_small_and_sampled_on_a_grid_when_large():
    data = np.random.default_rng(5).random((1, 1, 90, 70)).astype(np.float32)
    lazy = da.from_array(data, chunks=(1, 1, 32, 32))
    exact = np.percentile(data[0, 0], [2, 98])
    np.testing.assert_allclose(intensity_percentiles(lazy, 2, 98)[0, 0], exact, rtol=1e-12)
    sampled = intensity_percentiles(lazy, 2, 98, max_pixels=1000)  # step ceil(sqrt(6300 / 1000)) = 3
    np.testing.assert_allclose(sampled[0, 0], np.percentile(data[0, 0, ::3, ::3], [2, 98]), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_percentiles_swap_for_bright_background_images_as_normalize_percentile_inverts_them(dtype):
    from biounet.io import normalize_percentile, rescale_intensity

    rng = np.random.default_rng(6)
    dark = (rng.random((61, 47)) * 40).astype(dtype)  # dark background, a bright square
    dark[10:25, 10:25] += dtype(200)
    data = np.stack([dark, (255 - dark).astype(dtype)])[:, None]  # item 1: dark square on a bright background
    got = intensity_percentiles(da.from_array(data, chunks=(1, 1, 20, 20)), 1.0, 99.8, background="dark")
    plain = np.percentile(data.astype(np.float32).reshape(2, 1, -1), [1.0, 99.8], axis=-1).transpose(1, 2, 0)
    np.testing.assert_allclose(got[0], plain[0], rtol=1e-12)  # kept
    np.testing.assert_allclose(got[1], plain[1, :, ::-1], rtol=1e-12)  # swapped: (high, low)
    for n in (0, 1):  # and the swapped pair normalises as normalize_percentile(background="dark") does
        np.testing.assert_allclose(rescale_intensity(data[n, 0].astype(np.float32), *got[n, 0]),
                                   normalize_percentile(data[n, 0], background="dark"), atol=1e-6)  # fmt: skip
    inverted = intensity_percentiles(da.from_array(data, chunks=(1, 1, 20, 20)), 1.0, 99.8, background="inverted")
    np.testing.assert_allclose(inverted, plain[..., ::-1], rtol=1e-12)  # every pair swapped


def test_a_dark_background_model_predicts_the_same_in_memory_and_in_chunks_and_inverts_as_trained():
    model = net(2)
    model.info = dataclasses.replace(model.info, normalization=(0.0, 100.0), background="dark")
    plain = net(2)  # the same weights, polarity kept
    plain.info = dataclasses.replace(model.info, background="as-is")
    rng = np.random.default_rng(7)
    bright = 1.0 - rng.random((100, 70)).astype(np.float32) * 0.3  # a bright background
    bright[30:50, 20:40] -= 0.6
    whole = predict(model, bright, progress=False, precision="float32")
    # percentiles 0 and 100 are the extremes, so the inversion is exactly the image turned over
    turned = (bright.max() + bright.min() - bright).astype(np.float32)
    np.testing.assert_allclose(whole, predict(plain, turned, progress=False, precision="float32"), atol=1e-5)
    assert np.abs(whole - predict(plain, bright, progress=False, precision="float32")).max() > 1e-3  # it matters
    chunked = predict_dask(model, da.from_array(bright, chunks=(32, 32)), chunk=32, precision="float32").compute()
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


# -- labels across chunk borders ---------------------------------------------------------------
def test_object_spanning_four_chunks_keeps_one_label():
    mask = np.zeros((2, 40, 40), bool)
    mask[0, 5:35, 18:22] = True  # a cross centred on the corner shared by four 20 x 20 chunks
    mask[0, 18:22, 5:35] = True
    mask[0, 30, 22:31] = True  # a hook off its lower arm, reaching back up inside chunk (1, 1)
    mask[0, 25:38, 30] = True
    cross = mask[0].copy()
    mask[0, 2:4, 2:4] = True  # a separate object
    mask[1, 19:21, 10:30] = True  # the second plane: a bar across two chunks, numbered on its own
    target = zarr.create_array(zarr.storage.MemoryStore(), shape=mask.shape, chunks=(1, 20, 20), dtype=np.uint32)
    label_chunked(da.from_array(mask, chunks=(1, 20, 20)), target)
    labels = target[:]
    assert len(np.unique(labels[0][cross])) == 1 and labels[0, 2, 2] not in (0, labels[0, 20, 20])
    assert sorted(np.unique(labels[0])) == [0, 1, 2] and sorted(np.unique(labels[1])) == [0, 1]
    assert same_partition(labels[0], ndimage.label(mask[0])[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_labels_equal_scipy_on_random_masks(seed):
    mask = ndimage.binary_opening(np.random.default_rng(seed).random((67, 59)) > 0.45)
    target = zarr.create_array(zarr.storage.MemoryStore(), shape=(1, 67, 59), chunks=(1, 8, 16), dtype=np.uint32)
    label_chunked(da.from_array(mask[None], chunks=(1, 16, 16)), target)
    expected, n = ndimage.label(mask)
    assert same_partition(target[0], expected) and target[:].max() == n


# -- files: Zarr v2/v3, OME-Zarr, TIFF, CLI -------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    net(2).save(tmp_path / "model")
    return tmp_path / "model"


def labels_path(folder, stem, name="cell"):
    """Where streamed labels are: in the probabilities' NGFF labels/ group, else a label image of their own."""
    inside = folder / f"{stem}_probabilities.ome.zarr" / "labels" / name
    return inside if inside.exists() else folder / f"{stem}_labels.ome.zarr"


def check_ngff(path, axes, zarr_format):
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == zarr_format
    attrs = group.attrs.asdict()
    image = (attrs if zarr_format == 2 else attrs["ome"])["multiscales"][0]
    assert [a["name"] for a in image["axes"]] == list(axes)
    assert image["datasets"][0]["path"] == "0"
    assert image["datasets"][0]["coordinateTransformations"][0]["type"] == "scale"
    if zarr_format == 2:
        assert image["version"] == "0.4"
        assert json.loads((path / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    model = ome_zarr_models.open_ome_zarr(group)  # the reference validator: raises on invalid metadata
    version = ome_zarr_models.v04 if zarr_format == 2 else ome_zarr_models.v05
    assert type(model) is (version.ImageLabel if "image-label" in image_attrs(group) else version.Image)
    return group["0"][:]


def image_attrs(group):
    attrs = group.attrs.asdict()
    return attrs.get("ome", attrs)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ngff_attributes_refuse_axes_out_of_the_specified_order(zarr_format):
    with pytest.raises(InputError, match="ngff_attributes: axes .* are not valid OME-Zarr axes"):
        ngff_attributes([("y", "space"), ("c", "channel"), ("x", "space")], [1, 1, 1], zarr_format=zarr_format,
                        name="bad")  # fmt: skip


@pytest.mark.parametrize("layout", ["v3-array", "v2-array", "ngff-0.4"])
def test_cli_streams_zarr_inputs_into_ome_zarr(tmp_path, model_dir, layout):
    image = (np.random.default_rng(6).random((90, 75)) * 4000).astype(np.uint16)
    src = tmp_path / "in.zarr"
    if layout == "ngff-0.4":
        group = zarr.open_group(str(src), mode="w", zarr_format=2)
        group.attrs.update(ngff_attributes([("c", "channel"), ("y", "space"), ("x", "space")], [1, 0.5, 0.5],
                                           zarr_format=2, name="in"))  # fmt: skip
        group.create_array("0", shape=(1, 90, 75), chunks=(1, 32, 32), dtype=image.dtype)[:] = image[None]
    else:
        fmt = 3 if layout == "v3-array" else 2
        zarr.create_array(str(src), shape=image.shape, chunks=(32, 32), dtype=image.dtype, zarr_format=fmt)[:] = image
    assert main(["predict", str(model_dir), str(src), "-o", str(tmp_path / "out"), "--no-progress",
                 "--chunk", "40", "--precision", "float32"]) == 0  # fmt: skip
    fmt = 3 if layout == "v3-array" else 2
    prob = check_ngff(tmp_path / "out" / "in_probabilities.ome.zarr", "cyx", fmt)
    reference = predict(load_model(model_dir), image, progress=False)
    np.testing.assert_allclose(prob, reference, atol=1e-5)
    labels = check_ngff(labels_path(tmp_path / "out", "in"), "yx", fmt)
    assert same_partition(labels, labels_from_probabilities(reference))
    if layout == "ngff-0.4":
        scale = zarr.open_group(str(labels_path(tmp_path / "out", "in"))).attrs["multiscales"][0]["datasets"][0]
        assert scale["coordinateTransformations"][0]["scale"] == [0.5, 0.5]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_streamed_outputs_are_an_ngff_image_with_its_labels_group_and_pyramid(tmp_path, zarr_format):
    image = np.random.default_rng(5).random((70, 90)).astype(np.float32)
    items = da.from_array(image[None, None], chunks=(1, 1, 32, 32))
    predict_to_zarr(net(2), items, tmp_path, "x", zarr_format=zarr_format, levels=3, chunk=32, progress=False,
                    scale={"Y": 0.5, "X": 0.25}, units={"Y": "micrometer", "X": "micrometer"})  # fmt: skip
    folder = tmp_path / "x_probabilities.ome.zarr"
    version = ome_zarr_models.v04 if zarr_format == 2 else ome_zarr_models.v05
    def attributes(model):  # NGFF 0.5 puts them under "ome"
        return model.attributes if zarr_format == 2 else model.attributes.ome

    validated = version.Image.from_zarr(zarr.open_group(str(folder), mode="r"))  # the reference validator
    labels_group = zarr.open_group(str(folder / "labels"), mode="r")
    assert attributes(version.Labels.from_zarr(labels_group)).labels == ["cell"]  # named after the model's class
    label_image = version.ImageLabel.from_zarr(labels_group["cell"])
    assert attributes(label_image).image_label.source.image == "../../"
    for meta in (attributes(validated).multiscales[0], attributes(label_image).multiscales[0]):
        axes = [(a.name, a.unit) for a in meta.axes if a.type == "space"]
        assert axes == [("y", "micrometer"), ("x", "micrometer")]
        scales = [d.coordinateTransformations[0].scale[-2:] for d in meta.datasets]
        assert scales == [[0.5, 0.25], [1.0, 0.5], [2.0, 1.0]]  # as many levels for the labels as the image
    prob = [zarr.open_array(str(folder / str(k)), mode="r")[:] for k in range(3)]
    labels = [zarr.open_array(str(folder / "labels" / "cell" / str(k)), mode="r")[:] for k in range(3)]
    np.testing.assert_allclose(prob[0], predict(net(2), image, progress=False), atol=1e-5)
    assert same_partition(labels[0], labels_from_probabilities(prob[0]))
    for k in (1, 2):  # nearest-neighbour levels: every 2**k-th pixel of full resolution
        np.testing.assert_array_equal(prob[k], prob[0][:, :: 2**k, :: 2**k])
        np.testing.assert_array_equal(labels[k], labels[0][:: 2**k, :: 2**k])
    assert prob[2].shape == (2, 18, 23) and labels[0].dtype == np.uint32


def test_labels_alone_are_a_label_image_that_viewers_open_as_labels(tmp_path):
    items = da.from_array(np.random.default_rng(6).random((1, 1, 40, 40)).astype(np.float32), chunks=(1, 1, 32, 32))
    predict_to_zarr(net(2), items, tmp_path, "x", save=["labels"], progress=False)
    group = zarr.open_group(str(tmp_path / "x_labels.ome.zarr"), mode="r")
    assert type(ome_zarr_models.open_ome_zarr(group)) is ome_zarr_models.v04.ImageLabel
    assert "source" not in group.attrs["image-label"]  # no image outside the store to point to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_labels.ome.zarr"]


def test_pixel_sizes_and_units_are_read_from_imagej_and_ome_tiffs_and_reach_the_ngff(tmp_path, model_dir):
    stack = (np.random.default_rng(7).random((2, 48, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", stack, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 2.5})  # fmt: skip
    tifffile.imwrite(tmp_path / "ome.tif", stack, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"})
    tifffile.imwrite(tmp_path / "plain.tif", stack, resolution=(72, 72), resolutionunit="INCH")  # a print resolution
    ij, ome, plain = (open_image(tmp_path / f"{n}.tif") for n in ("ij", "ome", "plain"))
    assert ij.scale == pytest.approx({"X": 0.2, "Y": 0.2, "Z": 2.5}) and set(ij.units.values()) == {"micrometer"}
    assert ome.scale == {"X": 0.3, "Y": 0.4} and ome.units == {"X": "nanometer", "Y": "nanometer"}
    assert plain.scale == {} and plain.units == {}
    assert main(["predict", str(model_dir), str(tmp_path / "ij.tif"), "-o", str(tmp_path / "o"), "--chunk", "32",
                 "--no-progress", "--precision", "float32", "--format", "ome-zarr"]) == 0  # fmt: skip
    meta = image_attrs(zarr.open_group(str(tmp_path / "o" / "ij_probabilities.ome.zarr"), mode="r"))["multiscales"][0]
    assert [(a["name"], a.get("unit")) for a in meta["axes"]] == [
        ("c", None), ("z", "micrometer"), ("y", "micrometer"), ("x", "micrometer")]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([1.0, 2.5, 0.2, 0.2])


def test_large_tiff_is_read_lazily_and_streamed(tmp_path, model_dir, monkeypatch):
    stack = (np.random.default_rng(7).random((2, 80, 70)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", stack, tile=(32, 32), metadata={"axes": "ZYX"})
    lazy = open_image(tmp_path / "big.tif")
    assert lazy.axes == "ZYX" and isinstance(lazy.array, da.Array) and lazy.array.numblocks == (2, 1, 1)
    np.testing.assert_array_equal(lazy.array[1, 10:20, 5:9].compute(), stack[1, 10:20, 5:9])
    monkeypatch.setattr(_names, "STREAM_ABOVE_PIXELS", 1000)
    monkeypatch.setattr(_files, "read_image_axes", lambda path: pytest.fail("the TIFF was loaded whole"))
    assert main(["predict", str(model_dir), str(tmp_path / "big.tif"), "-o", str(tmp_path / "o"),
                 "--precision", "float32", "--no-progress", "--format", "ome-zarr"]) == 0  # fmt: skip
    prob = check_ngff(tmp_path / "o" / "big_probabilities.ome.zarr", "czyx", 2)
    reference = predict(load_model(model_dir), stack, progress=False)  # (Z, C, Y, X)
    np.testing.assert_allclose(prob, reference.transpose(1, 0, 2, 3), atol=1e-5)
    labels = check_ngff(labels_path(tmp_path / "o", "big"), "zyx", 2)
    for z in range(2):
        assert same_partition(labels[z], labels_from_probabilities(reference[z]))


def test_output_format_follows_the_input_or_the_choice_with_the_same_segmentation(tmp_path, model_dir):
    stack = (np.random.default_rng(9).random((2, 70, 60)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "unit": "um"})  # fmt: skip
    run = ["predict", str(model_dir), str(tmp_path / "s.tif"), "--precision", "float32", "--no-progress"]
    assert main([*run, "-o", str(tmp_path / "memory")]) == 0  # in memory -> TIFF
    assert main([*run, "-o", str(tmp_path / "streamed"), "--chunk", "32"]) == 0  # streamed TIFF -> tiled TIFF
    assert main([*run, "-o", str(tmp_path / "zarr"), "--format", "ome-zarr", "--pyramid", "2"]) == 0  # in memory
    memory_prob, axes = read_image_axes(tmp_path / "memory" / "s_probabilities.tif")
    streamed_prob, streamed_axes = read_image_axes(tmp_path / "streamed" / "s_probabilities.tif")
    assert axes == streamed_axes == "ZCYX" and streamed_prob.shape == (2, 2, 70, 60)
    np.testing.assert_allclose(streamed_prob, memory_prob, atol=1e-5)
    memory_labels = tifffile.imread(tmp_path / "memory" / "s_labels.tif")
    streamed_labels = tifffile.imread(tmp_path / "streamed" / "s_labels.tif")
    assert all(same_partition(streamed_labels[z], memory_labels[z]) for z in range(2))
    assert open_image(tmp_path / "streamed" / "s_labels.tif").scale == {"X": 0.5, "Y": 0.5}  # an OME-TIFF
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["s_labels.tif", "s_probabilities.tif"]
    zarr_prob = check_ngff(tmp_path / "zarr" / "s_probabilities.ome.zarr", "czyx", 2)
    np.testing.assert_array_equal(zarr_prob, memory_prob.transpose(1, 0, 2, 3))
    zarr_labels = check_ngff(tmp_path / "zarr" / "s_probabilities.ome.zarr" / "labels" / "cell", "zyx", 2)
    np.testing.assert_array_equal(zarr_labels, memory_labels)  # the same labels, numbering too: the same code
    level1 = zarr.open_array(str(tmp_path / "zarr" / "s_probabilities.ome.zarr" / "labels" / "cell" / "1"))[:]
    np.testing.assert_array_equal(level1, memory_labels[:, ::2, ::2])

def test_bad_output_format_and_levels_are_one_line_before_any_work(tmp_path, model_dir, capsys):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((40, 40), np.uint8))
    run = ["predict", str(model_dir), str(tmp_path / "s.tif"), "-o", str(tmp_path / "bad"), "--no-progress"]
    assert main([*run, "--pyramid", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "levels must be a positive number" in err and err.rstrip().endswith("(--pyramid)")
    with pytest.raises(InputError, match="output_format must be one of auto, tiff, ome-zarr, got 'png'"):
        _files.predict_files(model_dir, [tmp_path / "s.tif"], tmp_path / "bad", output_format="png")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_rgb_tiff_is_chunked_by_plane_not_by_row(tmp_path):
    rgb = (np.random.default_rng(8).random((90, 70, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, tile=(32, 32), photometric="rgb")
    lazy = open_image(tmp_path / "rgb.tif")
    assert lazy.axes == "YXS" and lazy.array.chunksize == (90, 70, 3) and lazy.array.numblocks == (1, 1, 1)
    np.testing.assert_array_equal(lazy.array.compute(), rgb)


@pytest.mark.parametrize("save", [("probabilities", "labels"), ("labels",)])
def test_streamed_labels_equal_in_memory_labels_with_the_models_split(tmp_path, save):
    from biounet.data import synthetic_cells

    model = load_model("nuclei")  # split "distance", min_size 12: touching nuclei cut apart, specks removed
    image = synthetic_cells(1, (224, 200), seed=3)[0][0].astype(np.float32)
    items = da.from_array(image[None, None], chunks=(1, 1, 64, 64))
    predict_to_zarr(model, items, tmp_path, "x", save=save, chunk=64, progress=False)
    labels = zarr.open_array(str(labels_path(tmp_path, "x") / "0"))[:]
    prob = predict(model, image, progress=False)  # equal to the streamed probabilities to float32 rounding
    if "probabilities" in save:
        prob = zarr.open_array(str(tmp_path / "x_probabilities.ome.zarr" / "0"))[:]
    expected = labels_from_probabilities(prob, **model.info.postprocess)
    assert expected.max() > 20 and labels.max() == expected.max()  # many objects, 1..N
    assert same_partition(labels, expected)  # the same objects, numbered in another order
    assert [p.name for p in tmp_path.iterdir()] == [f"x_{save[0]}.ome.zarr"]  # one image; no scratch left


@pytest.mark.parametrize("stack_axis", ["T", "Z"])
def test_streamed_stack_labels_equal_in_memory_labels_plane_by_plane(tmp_path, stack_axis):
    from biounet.data import synthetic_cells

    model = load_model("nuclei")
    planes = np.stack([synthetic_cells(1, (200, 176), seed=s)[0][0] for s in (3, 4)]).astype(np.float32)
    predict_to_zarr(model, da.from_array(planes[:, None], chunks=(1, 1, 64, 64)), tmp_path, "x",
                    stack_axis=stack_axis, chunk=64, progress=False)  # fmt: skip
    labels = zarr.open_array(str(labels_path(tmp_path, "x") / "0"))[:]
    prob = zarr.open_array(str(tmp_path / "x_probabilities.ome.zarr" / "0"))[:]
    for i in range(2):
        expected = labels_from_probabilities(prob[i] if stack_axis == "T" else prob[:, i], **model.info.postprocess)
        assert labels[i].max() == expected.max() > 15 and same_partition(labels[i], expected)


def test_streamed_objects_larger_than_the_window_are_post_processed_whole(tmp_path, monkeypatch):
    from biounet.prediction import _chunk_labels

    monkeypatch.setattr(_chunk_labels, "OBJECT_MARGIN", 2)  # every object needs its own crop
    model = net(2)
    model.info = dataclasses.replace(model.info, postprocess={"threshold": 0.3, "split": "distance", "min_size": 5})
    image = np.random.default_rng(4).random((60, 60)).astype(np.float32)
    predict_to_zarr(model, da.from_array(image[None, None], chunks=(1, 1, 32, 32)), tmp_path, "x", chunk=32,
                    progress=False)  # fmt: skip
    prob = zarr.open_array(str(tmp_path / "x_probabilities.ome.zarr" / "0"))[:]
    labels = zarr.open_array(str(labels_path(tmp_path, "x") / "0"))[:]
    assert same_partition(labels, labels_from_probabilities(prob, **model.info.postprocess))


def test_streamed_failures_leave_no_output_and_tta_is_refused(tmp_path, model_dir, monkeypatch, capsys):
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(40, 40), chunks=(20, 20), dtype=np.float32)[:] = 1.0
    argv = ["predict", str(model_dir), str(tmp_path / "a.zarr"), "-o", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--tta"]) == 1
    err = capsys.readouterr().err
    assert "test-time augmentation (tta) is not available for streamed" in err  # a per-file failure, logged

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(_chunked, "predict", boom)
    assert main(argv) == 1
    assert "out of memory" in capsys.readouterr().err
    assert list((tmp_path / "o").iterdir()) == []  # no partial output, no temporary folder


def test_scheduler_runs_the_job_on_a_local_cluster(tmp_path, model_dir):
    distributed = pytest.importorskip("distributed")
    image = (np.random.default_rng(8).random((100, 90)) * 1000).astype(np.uint16)
    zarr.create_array(str(tmp_path / "c.zarr"), shape=image.shape, chunks=(32, 32), dtype=image.dtype)[:] = image
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        assert main(["predict", str(model_dir), str(tmp_path / "c.zarr"), "-o", str(tmp_path / "o"),
                     "--no-progress", "--chunk", "32", "--scheduler", cluster.scheduler_address,
                     "--precision", "float32"]) == 0  # fmt: skip
    prob = check_ngff(tmp_path / "o" / "c_probabilities.ome.zarr", "cyx", 3)
    reference = predict(load_model(model_dir), image, progress=False)
    np.testing.assert_allclose(prob, reference, atol=1e-5)
    labels = check_ngff(labels_path(tmp_path / "o", "c"), "yx", 3)
    assert same_partition(labels, labels_from_probabilities(reference))
    with dask.config.set(scheduler="sync"):  # the client is closed again: back to local computing
        assert predict_dask(net(2), np.ones((8, 8), np.float32)).compute().shape == (2, 8, 8)


# -- GPU fast path, checked on the CPU ------------------------------------------------------------
@pytest.mark.parametrize("seed,depth,width", [(0, 2, 4), (1, 3, 8), (2, 4, 16)])
def test_bfloat16_stays_within_documented_tolerance_of_float32(seed, depth, width):
    model = net(depth, width, seed)
    image = np.random.default_rng(seed).random((100, 100)).astype(np.float32)
    exact = predict(model, image, progress=False)
    fast = predict(model, image, precision="bfloat16", progress=False)
    assert np.abs(fast - exact).max() < 0.05  # the tolerance documented in biounet.predict
    assert np.abs(fast - exact).mean() < 0.005
    assert not np.array_equal(fast, exact)  # bfloat16 really was used


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_model_gives_the_eager_result(mode):
    from torch._dynamo.utils import counters

    model = net(2)
    image = np.random.default_rng(9).random((40, 40)).astype(np.float32)
    np.testing.assert_allclose(
        predict(model, image, compile=mode, progress=False), predict(model, image, progress=False), atol=1e-5
    )
    graphs = counters["stats"]["unique_graphs"]
    predict(model, image, compile=mode, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs  # the second call reuses the compiled code
    np.testing.assert_allclose(  # 5 tiles of one shape in batches of 4 and 1: the last batch is filled up
        predict(model, image[:, :35], tile=32, compile=mode, progress=False),
        predict(model, image[:, :35], tile=32, progress=False), atol=1e-5,
    )
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one more tile shape, one more graph


@pytest.mark.parametrize("mode", ["fast", 1, None])
def test_unknown_compile_mode_is_one_clear_error(mode):
    with pytest.raises(ValueError, match="compile must be True, False or one of default, reduce-overhead"):
        predict(net(2), np.zeros((20, 20), np.float32), compile=mode, progress=False)
