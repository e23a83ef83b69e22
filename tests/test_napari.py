"""The napari plugin (issue 15): reader, writer, sample data and manifest without a display; the
predict and train widgets in a napari viewer under Xvfb (pytest-xvfb starts it).

The GUI tests skip, saying why, where napari, pytest-qt or a display with OpenGL is missing
(`.ci/run` installs Xvfb). napari's own pytest plugin is kept off (pyproject.toml: it changes
logging for the whole session), so ``make_napari_viewer`` here is a small fixture of the
same contract: viewers made through it are closed after the test, without saving settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tifffile
import torch

from biounet import ModelInfo, UNet, predict, synthetic_cells
from biounet.errors import InputError
from biounet.io import read_image_axes, write_tiff
from biounet.napari._reader import get_reader, read_layers
from biounet.napari._sample import fluorescence_cells, phase_cells
from biounet.napari._segment import layer_axes, samples_from_layers, segment_steps
from biounet.napari._writer import write_labels

zarr = pytest.importorskip("zarr", reason="the OME-Zarr reader and writer need zarr: pip install 'biounet[large]'")

MANIFEST = Path(__file__).parents[1] / "src" / "biounet" / "napari" / "napari.yaml"

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:npe2"),  # npe2 0.10's pydantic v1-style fields
    pytest.mark.filterwarnings("ignore:`json_encoders` is deprecated:DeprecationWarning"),  # napari's models
]


def tiny_model_folder(folder: Path, image: np.ndarray, *, seed: int = 0) -> tuple[Path, UNet, float]:
    """A depth-2, width-4 U-Net saved to ``folder``, its threshold the median foreground probability of ``image``.

    An untrained network's probabilities hover around 0.5; a threshold at their median
    gives many objects, so that equal labels say something.
    """
    torch.manual_seed(seed)
    model = UNet(depth=2, base_channels=4, dropout=0.0).eval()
    threshold = float(np.median(predict(model, image, progress=False)[1]))
    model.info = ModelInfo(postprocess={"threshold": round(threshold, 4), "split": "distance", "min_size": 3})
    model.save(folder)
    return folder, model, round(threshold, 4)


# ---- reader ------------------------------------------------------------------------------
def test_reader_tiff_keeps_axes_channels_and_pixel_size(tmp_path):
    data = np.arange(3 * 2 * 20 * 24, dtype=np.uint16).reshape(3, 2, 20, 24)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": "ZCYX", "unit": "um", "spacing": 2.0})  # fmt: skip
    (layer,) = read_layers(str(path))
    array, kwargs, kind = layer
    assert kind == "image" and kwargs["channel_axis"] == 1
    np.testing.assert_array_equal(array, data)
    assert kwargs["name"] == ["stack [0]", "stack [1]"]
    assert kwargs["scale"] == [[2.0, 0.25, 0.25]] * 2
    assert kwargs["units"] == [["micrometer"] * 3] * 2
    assert kwargs["axis_labels"] == [("z", "y", "x")] * 2


def test_reader_tells_labels_rgb_and_plain_images(tmp_path):
    labels = np.zeros((16, 16), np.uint16)
    labels[2:6, 3:9] = 1
    write_tiff(tmp_path / "cells_labels.tif", labels, axes="YX")
    write_tiff(tmp_path / "cells.tif", labels.astype(np.float32), axes="YX")
    import imageio.v3 as iio

    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "photo.png", rgb)
    (lab,), (img,), (photo,) = (read_layers(str(tmp_path / n)) for n in ("cells_labels.tif", "cells.tif", "photo.png"))
    assert lab[2] == "labels" and img[2] == "image" and photo[2] == "image"
    np.testing.assert_array_equal(lab[0], labels)
    assert photo[1]["rgb"] is True and photo[1]["axis_labels"] == ("y", "x")
    np.testing.assert_array_equal(photo[0], rgb)


def _ngff_store(root: Path, zarr_format: int, *, image: np.ndarray, labels: np.ndarray) -> None:
    """An OME-Zarr image (c, y, x; 2 levels; scale and translation) with one label image, made from the spec alone."""
    version = "0.4" if zarr_format == 2 else "0.5"

    def multiscale(axes, scales, translation):
        datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": s},
                                                                  {"type": "translation", "translation": translation}]}
                    for k, s in enumerate(scales)]  # fmt: skip
        entry = {"axes": axes, "datasets": datasets, "name": "cells"}
        return {**({"version": version} if zarr_format == 2 else {}), **entry}

    def put(group, attrs):
        group.attrs.update(attrs if zarr_format == 2 else {"ome": {"version": version, **attrs}})

    extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    space = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    group = zarr.open_group(str(root), mode="w", zarr_format=zarr_format)
    put(group, {"multiscales": [multiscale([{"name": "c", "type": "channel"}, *space],
                                           [[1, 0.5, 0.5], [1, 1.0, 1.0]], [0, 10, 20])],
                "omero": {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}})  # fmt: skip
    for k, level in enumerate((image, image[:, ::2, ::2])):
        group.create_array(str(k), data=level, chunks=(1, 8, 8), **extra)
    labels_group = group.create_group("labels")
    put(labels_group, {"labels": ["nuclei"]})
    nuclei = labels_group.create_group("nuclei")
    label = {**({"version": version} if zarr_format == 2 else {}), "source": {"image": "../../"}}
    put(nuclei, {"multiscales": [multiscale(space, [[0.5, 0.5], [1.0, 1.0]], [10, 20])], "image-label": label})
    for k, level in enumerate((labels, labels[::2, ::2])):
        nuclei.create_array(str(k), data=level, chunks=(8, 8), **extra)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_reader_opens_ome_zarr_with_its_labels(tmp_path, zarr_format):
    rng = np.random.default_rng(1)
    image = rng.random((2, 16, 24), dtype=np.float32)
    labels = rng.integers(0, 5, (16, 24)).astype(np.uint32)
    root = tmp_path / "cells.ome.zarr"
    _ngff_store(root, zarr_format, image=image, labels=labels)
    assert get_reader(str(root)) is read_layers
    (img_data, img, img_kind), (lab_data, lab, lab_kind) = read_layers(str(root))
    assert (img_kind, lab_kind) == ("image", "labels")
    assert img["channel_axis"] == 0 and img["multiscale"] and img["name"] == ["DAPI", "GFP"]
    assert img["scale"] == [[0.5, 0.5]] * 2 and img["translate"] == [[10.0, 20.0]] * 2
    np.testing.assert_array_equal(np.asarray(img_data[0]), image)
    np.testing.assert_array_equal(np.asarray(img_data[1]), image[:, ::2, ::2])
    assert lab["name"] == "cells nuclei" and lab["scale"] == [0.5, 0.5] and lab["translate"] == [10.0, 20.0]
    assert lab["units"] == ["micrometer", "micrometer"] and lab["axis_labels"] == ("y", "x")
    np.testing.assert_array_equal(np.asarray(lab_data[0]), labels)


def test_reader_opens_what_biounet_predict_chunk_writes(tmp_path):
    from biounet.cli import main

    image = synthetic_cells(1, (96, 80), seed=3)[0][0]
    tifffile.imwrite(tmp_path / "cells.tif", image, imagej=True, resolution=(1 / 0.4, 1 / 0.4),
                     metadata={"axes": "YX", "unit": "um"})  # fmt: skip
    model_dir, _, _ = tiny_model_folder(tmp_path / "model", image)
    for out, save in (("both", "probabilities,labels"), ("alone", "labels")):
        assert main(["predict", str(model_dir), str(tmp_path / "cells.tif"), "-o", str(tmp_path / out), "--chunk",
                     "64", "--format", "ome-zarr", "--save", save, "--precision", "float32",
                     "--no-progress"]) == 0  # fmt: skip
    # probabilities with the labels in their labels/ group: a 2-channel image and a labels layer
    store = tmp_path / "both" / "cells_probabilities.ome.zarr"
    (prob, prob_kwargs, prob_kind), (labels, labels_kwargs, labels_kind) = read_layers(str(store))
    assert (prob_kind, labels_kind) == ("image", "labels") and prob_kwargs["channel_axis"] == 0
    assert np.asarray(prob).shape == (2, 96, 80) and prob_kwargs["scale"] == [[0.4, 0.4]] * 2
    (name,) = zarr.open_group(str(store / "labels"), mode="r").attrs["labels"]
    written = zarr.open_array(str(store / "labels" / name / "0"), mode="r")[...]
    np.testing.assert_array_equal(np.asarray(labels), written)
    assert labels_kwargs["scale"] == [0.4, 0.4] and labels_kwargs["units"] == ["micrometer"] * 2
    assert np.asarray(labels).max() >= 2  # objects, not an empty map
    # labels saved alone: a label image of its own, the same labels
    ((alone, alone_kwargs, alone_kind),) = read_layers(str(tmp_path / "alone" / "cells_labels.ome.zarr"))
    assert alone_kind == "labels" and alone_kwargs["scale"] == [0.4, 0.4]
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(labels))


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)  # a group without NGFF metadata
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "plain.zarr")) is None
    assert get_reader([str(tmp_path / "notes.txt"), str(tmp_path / "plain.zarr")]) is None


# ---- writer ------------------------------------------------------------------------------
def test_writer_tiff_round_trip(tmp_path):
    labels = np.zeros((3, 10, 12), np.int32)
    labels[1, 2:5, 3:7] = 70000  # past uint16: written as uint32
    assert write_labels(str(tmp_path / "out.tif"), labels, {"name": "x"}) == [str(tmp_path / "out.tif")]
    back, axes = read_image_axes(tmp_path / "out.tif")
    assert axes == "ZYX" and back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_writer_ome_zarr_is_a_valid_label_image(tmp_path, zarr_format):
    import ome_zarr_models

    from biounet.napari._writer import write_ome_zarr_labels

    labels = np.zeros((4, 20, 30), np.int64)
    labels[2, 5:9, 10:20] = 3
    path = tmp_path / "cells.ome.zarr"
    if zarr_format == 2:
        write_labels(str(path), labels, {"name": "cells", "scale": (2.0, 0.5, 0.5), "units": ("micrometer",) * 3})
    else:
        write_ome_zarr_labels(path, labels, scale=(2.0, 0.5, 0.5), units=("micrometer",) * 3, name="cells",
                              zarr_format=3)  # fmt: skip
    group = zarr.open_group(str(path), mode="r")
    version = ome_zarr_models.v04 if zarr_format == 2 else ome_zarr_models.v05
    assert type(ome_zarr_models.open_ome_zarr(group)) is version.ImageLabel  # the reference validator
    ((data, kwargs, kind),) = read_layers(str(path))
    assert kind == "labels" and kwargs["scale"] == [2.0, 0.5, 0.5] and kwargs["axis_labels"] == ("z", "y", "x")
    assert kwargs["units"] == ["micrometer"] * 3
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert np.asarray(data).dtype == np.uint16


def test_writer_refuses_what_it_cannot_write(tmp_path):
    labels = np.ones((4, 4), np.int32)
    with pytest.raises(InputError, match=r"\.png"):
        write_labels(str(tmp_path / "x.png"), labels, {})
    with pytest.raises(InputError, match="integers"):
        write_labels(str(tmp_path / "x.tif"), labels.astype(np.float32), {})
    with pytest.raises(InputError, match="5 dimensions"):
        write_labels(str(tmp_path / "x.ome.zarr"), np.ones((1, 1, 1, 2, 2), np.int32), {})
    assert not list(tmp_path.iterdir())


# ---- sample data, widget computations, manifest ------------------------------------------
def test_sample_data_is_synthetic_cells_with_labels():
    for sample, style in ((fluorescence_cells, "fluorescence"), (phase_cells, "phase")):
        (image, image_kwargs, image_kind), (labels, labels_kwargs, labels_kind) = sample()
        expected_image, expected_labels = synthetic_cells(1, (256, 256), seed=0, style=style)[0]
        assert (image_kind, labels_kind) == ("image", "labels")
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(labels, expected_labels)
        assert labels.max() > 10 and labels_kwargs["name"] != image_kwargs["name"]


def test_segment_steps_equals_biounet_predict(tmp_path):
    from biounet.prediction import predict_files

    image = synthetic_cells(1, (80, 72), seed=5)[0][0]
    write_tiff(tmp_path / "cells.tif", image, axes="YX")
    model_dir, model, threshold = tiny_model_folder(tmp_path / "model", image)
    predict_files(model_dir, [tmp_path / "cells.tif"], tmp_path / "out", save=("labels",), progress=False)
    expected = read_image_axes(tmp_path / "out" / "cells_labels.tif")[0]
    steps = segment_steps(model, image)
    progress = []
    try:
        while True:
            progress.append(next(steps))
    except StopIteration as stop:
        result = stop.value
    assert progress[-1].done == progress[-1].total >= 1 and all(p.result is None for p in progress)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.max() >= 3
    np.testing.assert_array_equal(result.probability, predict(model, image, progress=False)[1])
    assert threshold == model.info.postprocess["threshold"]


def test_layer_axes_and_samples_from_layers():
    assert layer_axes(2, 2, False) == "YX" and layer_axes(4, 2, True) == "QYXS" and layer_axes(4, 3, False) == "QZYX"
    with pytest.raises(InputError, match="cannot hold"):
        layer_axes(2, 3, False)
    pairs = synthetic_cells(2, (32, 32), seed=0)
    images, labels = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    samples = samples_from_layers(images, labels, name="cells")
    assert [s.name for s in samples] == ["cells_0", "cells_1"]
    np.testing.assert_array_equal(samples[1].image, pairs[1][0])
    assert samples[1].n_instances == len(np.unique(pairs[1][1])) - 1
    with pytest.raises(InputError, match="differs"):
        samples_from_layers(images, labels[:, :16], name="cells")


def test_manifest_is_valid_and_installed():
    npe2 = pytest.importorskip("npe2", reason="the manifest check needs npe2: pip install 'biounet[napari]'")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "biounet"
    assert {c.python_name.rsplit(":", 1)[1] for c in manifest.contributions.commands} == {
        "get_reader", "write_labels", "fluorescence_cells", "phase_cells", "PredictWidget", "TrainWidget"}  # fmt: skip
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "biounet"]
    assert entry.value == "biounet.napari:napari.yaml"
    assert npe2.PluginManifest.from_distribution("biounet").name == "biounet"
    pytest.importorskip("magicgui", reason="importing the widgets needs magicgui: pip install 'biounet[napari]'")
    manifest.validate_imports()  # every python_name imports


# ---- the widgets in a viewer (Xvfb) -------------------------------------------------------
@pytest.fixture(scope="session")
def qt_display():
    """Skip (with the reason) unless napari, pytest-qt and a display with OpenGL are there.

    Probed in a subprocess: Qt aborts the process that cannot open its display.
    """
    pytest.importorskip("napari", reason="the napari GUI tests need napari: pip install 'biounet[napari-test]'")
    pytest.importorskip("pytestqt", reason="the napari GUI tests need pytest-qt: pip install 'biounet[napari-test]'")
    if not os.environ.get("DISPLAY"):
        pytest.skip("no display: the napari GUI tests need Xvfb (Debian's xvfb package; pytest-xvfb starts it)")
    probe = "from qtpy.QtGui import QOpenGLContext\nfrom qtpy.QtWidgets import QApplication\n" \
            "app = QApplication([])\nraise SystemExit(0 if QOpenGLContext().create() else 3)\n"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        why = "no OpenGL context" if done.returncode == 3 else next((s for s in lines if "ould not" in s), lines[-1])
        pytest.skip(f"Qt cannot use the display {os.environ['DISPLAY']}: {why}")


@pytest.fixture
def make_napari_viewer(qt_display, qtbot, monkeypatch, tmp_path):
    """napari's fixture of that name, in small: viewers are closed after the test, settings never saved."""
    monkeypatch.setenv("NAPARI_CONFIG", str(tmp_path / "napari-settings.yaml"))
    import napari

    viewers = []

    def make(**kwargs):
        viewer = napari.Viewer(show=kwargs.pop("show", False), **kwargs)
        viewers.append(viewer)
        return viewer

    yield make
    for viewer in viewers:
        with mock.patch.object(viewer.window._qt_window, "_save_current_window_settings"):
            viewer.close()


def _wait(qtbot, widget, timeout=120_000):
    """Until the widget's worker has finished (its ``finished`` slot, connected before the start, clears it)."""
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


@pytest.mark.slow
def test_predict_widget_labels_equal_biounet_predict(make_napari_viewer, qtbot, tmp_path):
    from biounet.cli import main
    from biounet.napari._models import OTHER_FOLDER

    image = synthetic_cells(1, (96, 88), seed=7)[0][0]
    write_tiff(tmp_path / "cells.tif", image, axes="YX")
    model_dir, model, threshold = tiny_model_folder(tmp_path / "model", image)
    assert main(["predict", str(model_dir), str(tmp_path / "cells.tif"), "-o", str(tmp_path / "out"), "--save",
                 "labels", "--precision", "float32", "--no-progress"]) == 0  # fmt: skip
    expected = read_image_axes(tmp_path / "out" / "cells_labels.tif")[0]

    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", scale=(0.5, 0.25), translate=(3.0, 4.0))
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    assert widget.model.value == "nuclei"  # the default
    widget.model.value = OTHER_FOLDER
    widget.folder.value = model_dir
    assert (widget.threshold.value, widget.split.value, widget.min_size.value) == (threshold, "distance", 3)
    widget.precision.value = "float32"
    assert widget.start() is not None
    _wait(qtbot, widget)
    labels, probability = viewer.layers["cells labels"], viewer.layers["cells probability"]
    np.testing.assert_array_equal(labels.data, expected)
    assert expected.max() >= 3
    np.testing.assert_allclose(probability.data, predict(model, image, progress=False)[1], atol=1e-6)
    assert tuple(labels.scale) == (0.5, 0.25) and tuple(labels.translate) == (3.0, 4.0)
    assert widget.status.value == f"cells: {expected.max()} object(s)" and widget.run_button.enabled


@pytest.mark.slow
def test_predict_widget_reports_errors_and_cancel_stops_the_worker(make_napari_viewer, qtbot, tmp_path):
    from biounet.napari._models import OTHER_FOLDER

    stack = np.stack([p[0] for p in synthetic_cells(48, (64, 64), seed=2)])  # 48 planes: 12 batches of 4 tiles
    model_dir, _, _ = tiny_model_folder(tmp_path / "model", stack[0])
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    widget.model.value = OTHER_FOLDER
    widget.folder.value = tmp_path / "missing"
    assert widget.status.value.startswith("no model:") and "not a biounet model" in widget.status.value
    assert widget.start() is not None
    _wait(qtbot, widget)
    assert widget.status.value.startswith("error:") and "not a biounet model" in widget.status.value
    widget.folder.value = model_dir
    worker = widget.start()
    with qtbot.waitSignal(worker.aborted, timeout=60_000):
        widget.cancel_button.native.click()  # while the worker loads the model or runs its first batches
    _wait(qtbot, widget)
    assert "stack labels" not in viewer.layers and "stack probability" not in viewer.layers
    assert widget.progress.value < 48 and widget.status.value == "cancelled" and widget.run_button.enabled


@pytest.mark.slow
def test_train_widget_trains_a_model_the_predict_widget_uses(make_napari_viewer, qtbot, tmp_path):
    from biounet import load_model

    pairs = synthetic_cells(2, (64, 64), seed=4)
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([p[0] for p in pairs]), name="cells")
    viewer.add_labels(np.stack([p[1] for p in pairs]).astype(np.int32), name="truth")
    _, predict_widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Train")
    assert widget.images.value.name == "cells" and widget.masks.value.name == "truth"
    widget.steps.value = 3
    widget.recipe.value = 'depth=2, base_channels=4, tile=64, precision="float32", normalization=[1.0, 99.8]'
    widget.run_dir.value = tmp_path / "run"
    assert widget.start() is not None
    _wait(qtbot, widget)
    assert [step for step, _ in widget.losses] == [1, 2, 3] and all(np.isfinite(loss) for _, loss in widget.losses)
    model = load_model(tmp_path / "run" / "last")
    assert (model.config.depth, model.config.base_channels) == (2, 4)
    assert model.info.provenance["recipe"]["steps"] == 3
    # the predict widget offers the new model and has chosen it: it segments with it at once
    assert predict_widget.model.value == str((tmp_path / "run" / "last").resolve())
    assert predict_widget.split.value == "distance"  # the fast preset's post-processing, stored with the model
    assert predict_widget.start() is not None
    _wait(qtbot, predict_widget)
    assert viewer.layers["cells labels"].data.shape == (2, 64, 64)


@pytest.mark.slow
def test_train_widget_cancel_and_bad_inputs(make_napari_viewer, qtbot, tmp_path):
    image, labels = synthetic_cells(1, (64, 64), seed=4)[0]
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Train")
    assert widget.start() is None and widget.status.value.startswith("error: choose an image layer")
    viewer.add_labels(labels.astype(np.int32), name="truth")
    widget.recipe.value = "depth=2, no_such_option=1"
    assert widget.start() is None and "no_such_option" in widget.status.value
    widget.recipe.value = "depth=2, base_channels=4, tile=64"
    widget.steps.value = 10_000
    widget.run_dir.value = tmp_path / "run"
    worker = widget.start()
    with qtbot.waitSignal(worker.aborted, timeout=60_000):
        widget.cancel()
    _wait(qtbot, widget)
    assert len(widget.losses) < 10_000 and widget.status.value.startswith("cancelled at step")


@pytest.mark.slow
def test_viewer_opens_and_saves_through_the_plugin(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((2, 16, 24), dtype=np.float32)
    labels = rng.integers(0, 5, (16, 24)).astype(np.uint32)
    _ngff_store(tmp_path / "cells.ome.zarr", 2, image=image, labels=labels)
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "cells.ome.zarr"), plugin="biounet")
    assert [layer.name for layer in layers] == ["DAPI", "GFP", "cells nuclei"]
    assert type(layers[2]).__name__ == "Labels" and tuple(layers[2].scale) == (0.5, 0.5)
    viewer.layers.selection = {layers[2]}
    written = viewer.layers.save(str(tmp_path / "saved.tif"), selected=True, plugin="biounet")
    assert written == [str(tmp_path / "saved.tif")]
    np.testing.assert_array_equal(read_image_axes(tmp_path / "saved.tif")[0], labels)
    viewer.open_sample("biounet", "fluorescence_cells")
    assert "synthetic fluorescence ground truth" in viewer.layers
