"""``biounet predict`` end to end on files the test writes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from biounet import UNet, labels_from_probabilities, load_model, predict, prediction
from biounet.cli import main
from biounet.io import read_image, read_image_axes
from biounet.prediction import PredictReport


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    UNet(depth=2, base_channels=4).save(tmp_path / "model")
    return tmp_path / "model"


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from biounet.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "biounet", "predict", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--tile" in out.stdout and "--no-progress" in out.stdout


def test_predict_writes_outputs_equal_to_api(tmp_path, model_dir):
    image = (np.random.default_rng(0).random((70, 50)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image)
    rc = main(["predict", str(model_dir), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"), "--precision", "float32",
               "--save", "probabilities,labels,overlay", "--no-progress", "--tile", "60"])
    assert rc == 0
    prob, axes = read_image_axes(tmp_path / "out" / "a_probabilities.tif")
    assert axes == "CYX" and prob.dtype == np.float32
    np.testing.assert_array_equal(prob, predict(load_model(model_dir), image, tile=60, progress=False))
    labels = read_image(tmp_path / "out" / "a_labels.tif")
    assert labels.shape == (70, 50) and labels.dtype == np.uint16
    assert read_image(tmp_path / "out" / "a_overlay.png").shape == (70, 50, 3)


def test_compile_option_takes_the_modes(tmp_path, model_dir, capsys, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((20, 20), np.float32))
    args = ["predict", str(model_dir), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit):
        main([*args, "--compile", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(prediction, "predict_files", lambda *a, **kw: seen.append(kw["options"].compile) or PredictReport())
    for extra, mode in (([], False), (["--compile"], "default"), (["--compile", "reduce-overhead"], "reduce-overhead")):
        assert main([*args, *extra]) == 0
    assert seen == [False, "default", "reduce-overhead"]  # what reaches predict_files


def test_predict_stack_keeps_axes(tmp_path, model_dir):
    stack = np.random.default_rng(0).random((3, 30, 20)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "s.tif"), "-o", str(tmp_path / "o"),
                 "--save", "probabilities", "--no-progress"]) == 0
    prob, axes = read_image_axes(tmp_path / "o" / "s_probabilities.tif")
    assert prob.shape == (3, 2, 30, 20) and axes == "ZCYX"


@pytest.mark.parametrize(("planes", "axes"), [(3, "ZYX"), (4, "TYX")])
def test_labels_of_a_3_or_4_plane_stack_keep_its_axes(tmp_path, model_dir, planes, axes):
    """Issue 13, finding 7: such labels were written as one planar RGB page ("3 channels" on reading)."""
    stack = np.random.default_rng(1).random((planes, 30, 20)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": axes})
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "s.tif"), "-o", str(tmp_path / "o"),
                 "--no-progress"]) == 0  # fmt: skip
    labels, label_axes = read_image_axes(tmp_path / "o" / "s_labels.tif")
    prob, prob_axes = read_image_axes(tmp_path / "o" / "s_probabilities.tif")
    assert (labels.shape, label_axes) == ((planes, 30, 20), axes)
    assert (prob.shape, prob_axes) == ((planes, 2, 30, 20), axes[0] + "CYX")
    with tifffile.TiffFile(tmp_path / "o" / "s_labels.tif") as tif:
        assert len(tif.pages) == planes and tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK


def test_bad_inputs_are_reported_and_others_still_processed(tmp_path, model_dir, capsys):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.random.default_rng(0).random((30, 30)).astype(np.float32))
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00not a tiff")
    np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8)))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((10, 10, 3), np.uint8), photometric="rgb")
    np.save(tmp_path / "cplx.npy", np.zeros((4, 4), complex))
    np.save(tmp_path / "4d.npy", np.zeros((2, 2, 2, 2, 2, 2)))
    bad = ["corrupt.tif", "nan.npy", "empty.npy", "rgb.tif", "cplx.npy", "missing.png"]
    rc = main(["predict", str(model_dir), *(str(tmp_path / n) for n in bad), str(good),
               "-o", str(tmp_path / "out"), "--save", "probabilities", "--no-progress"])
    assert rc == 1
    assert (tmp_path / "out" / "good_probabilities.tif").is_file()
    err = capsys.readouterr().err
    for name, words in zip(bad, ["cannot read", "NaN", "empty", "3 channel", "pixel type", "no such file"]):
        line = next(line for line in err.splitlines() if line.startswith("error:") and name in line)
        assert words in line, line
    assert "Traceback" not in err


def test_unwritable_output_and_bad_model_are_one_line_errors(tmp_path, model_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["predict", str(model_dir), "x.tif", "-o", str(blocker / "sub")]) == 1
    assert main(["predict", str(tmp_path / "nomodel"), "x.tif", "-o", str(tmp_path / "o")]) == 1
    assert main(["predict", str(model_dir), "x.tif", "-o", str(tmp_path / "o"), "--save", "pixels"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("biounet predict: error:") for line in err)
    assert "cannot be written" in err[0] and "not a biounet model" in err[1] and "pixels" in err[2]


def test_a_luminance_model_takes_rgb_files_and_others_refuse_them_clearly(tmp_path, capsys):
    import dataclasses

    import imageio.v3 as iio
    from skimage.color import rgb2gray

    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4)
    model.info = dataclasses.replace(model.info, color="luminance")
    model.save(tmp_path / "lum")
    UNet(depth=2, base_channels=4).save(tmp_path / "keep")
    rgb = (np.random.default_rng(2).random((40, 50, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "he.png", rgb)
    tifffile.imwrite(tmp_path / "two.tif", rgb[..., :2], photometric="minisblack", planarconfig="contig",
                     metadata={"axes": "YXC"})  # fmt: skip
    assert main(["predict", str(tmp_path / "lum"), str(tmp_path / "he.png"), "-o", str(tmp_path / "out"),
                 "--precision", "float32", "--no-progress"]) == 0  # fmt: skip
    expected = predict(load_model(tmp_path / "lum"), rgb2gray(rgb).astype(np.float32), progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "he_probabilities.tif"), expected)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "keep"), str(tmp_path / "he.png"), "-o", str(tmp_path / "o2"),
                 "--no-progress"]) == 1  # fmt: skip
    assert 'has 3 channel(s) (axes YXC, shape (40, 50, 3)) but the model takes 1 (it was trained without colour' in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "lum"), str(tmp_path / "two.tif"), "-o", str(tmp_path / "o3"),
                 "--no-progress"]) == 1  # fmt: skip
    assert "it converts 3-channel (RGB) images to luminance, and no other channel count" in capsys.readouterr().err


def test_outputs_never_overwrite_ground_truth_inputs_or_each_other(tmp_path, model_dir, capsys):
    """Issue 13, findings 1 and 2: refused before any work, one line naming both paths."""
    image = np.random.default_rng(0).random((30, 40)).astype(np.float32)
    for folder in ("g", "a", "b"):
        (tmp_path / folder).mkdir()
    for name in ("g/x.tif", "a/x.tif", "b/x.tif", "a/y.tif"):
        tifffile.imwrite(tmp_path / name, image)
    truth = tmp_path / "g" / "x_labels.tif"
    tifffile.imwrite(truth, np.ones((30, 40), np.uint16))
    before = truth.read_bytes()
    assert main(["predict", str(model_dir), str(tmp_path / "g/x.tif"), "-o", str(tmp_path / "g"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{truth} exists already" in err and "--overwrite" in err and err.count("\n") == 1
    assert truth.read_bytes() == before and not (tmp_path / "g" / "x_probabilities.tif").exists()
    # two inputs with one name: nothing is written at all
    assert main(["predict", str(model_dir), str(tmp_path / "a/x.tif"), str(tmp_path / "b/x.tif"), str(tmp_path / "a/y.tif"),
                 "-o", str(tmp_path / "out"), "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a/x.tif'} and {tmp_path / 'b/x.tif'} would both be written to {tmp_path / 'out'}" in err
    assert list((tmp_path / "out").iterdir()) == []
    # an output named like an input of the call is refused even with --overwrite
    tifffile.imwrite(tmp_path / "g" / "z_labels.tif", image)
    tifffile.imwrite(tmp_path / "g" / "z.tif", image)
    assert main(["predict", str(model_dir), str(tmp_path / "g/z.tif"), str(tmp_path / "g/z_labels.tif"), "-o",
                 str(tmp_path / "g"), "--overwrite", "--no-progress"]) == 1  # fmt: skip
    assert f"would write {tmp_path / 'g/z_labels.tif'}, which is an input of this call" in capsys.readouterr().err
    # deliberate: --overwrite replaces an earlier result
    assert main(["predict", str(model_dir), str(tmp_path / "g/x.tif"), "-o", str(tmp_path / "g"), "--overwrite",
                 "--no-progress"]) == 0  # fmt: skip
    assert truth.read_bytes() != before


def test_cli_precision_defaults_to_auto_resolved_by_the_device(tmp_path, model_dir, monkeypatch):
    from biounet import device as _device

    image = np.random.default_rng(4).random((30, 40)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image)
    asked = []
    monkeypatch.setattr(_device, "resolve_precision", lambda device, level: asked.append(str(device)) or "float32")
    assert main(["predict", str(model_dir), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert asked == ["cpu"]  # auto was resolved once, for the device, and the answer was used
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "a_probabilities.tif"),
                                  predict(load_model(model_dir), image, progress=False))  # fmt: skip


def test_any_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from biounet import cli

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "_cmd_evaluate", broken)
    assert main(["evaluate", "p.tif", "--gt", "g.tif"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "biounet evaluate: error: unexpected TypeError: unsupported operand" in err
    assert "--debug" in err
    with pytest.raises(TypeError):
        main(["--debug", "evaluate", "p.tif", "--gt", "g.tif"])

    def hungry(args):
        raise MemoryError

    monkeypatch.setattr(cli, "_cmd_evaluate", hungry)
    assert main(["evaluate", "p.tif", "--gt", "g.tif"]) == 1
    assert "out of memory" in capsys.readouterr().err


def test_sigterm_is_handled_like_ctrl_c(monkeypatch, capsys, tmp_path):
    """Batch schedulers stop jobs with SIGTERM: atomic writes clean up, the exit status is 143."""
    import os
    import signal
    import time

    from biounet import cli
    from biounet.io import atomic_write

    def killed_while_writing(args):
        with atomic_write(tmp_path / "out.tif") as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_cmd_evaluate", killed_while_writing)
    assert main(["evaluate", "p.tif", "--gt", "g.tif"]) == 143
    assert capsys.readouterr().err == "biounet: terminated\n"
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary file
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the caller's again


def test_torture_findings_are_one_clear_line(tmp_path, model_dir, capsys):
    """Findings of experiments/torture.py: each wrong input names itself and what is wrong with it."""
    (tmp_path / "stack.tif").mkdir()
    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", image)
    tifffile.imwrite(tmp_path / "x_labels.tif", image)
    rc = main(["predict", "--model", str(model_dir), str(tmp_path / "stack.tif"), "-o", str(tmp_path / "o"),
               "--no-progress"])  # fmt: skip
    assert rc == 1 and "stack.tif: a folder, not an image file" in capsys.readouterr().err
    rc = main(["predict", "--model", str(model_dir), str(tmp_path / "x.tif"), str(tmp_path / "x_labels.tif"),
               "-o", str(tmp_path), "--overwrite", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'x.tif'} would write {tmp_path / 'x_labels.tif'}, which is an input" in err
    (tmp_path / "loop.tif").symlink_to(tmp_path / "loop2.tif")
    (tmp_path / "loop2.tif").symlink_to(tmp_path / "loop.tif")
    rc = main(["predict", "--model", str(model_dir), str(tmp_path / "loop.tif"), "-o", str(tmp_path / "o"),
               "--no-progress"])  # fmt: skip
    assert rc == 1 and "loop.tif" in capsys.readouterr().err
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = 1
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "l.png", labels)
    before = (tmp_path / "l.png").read_bytes()
    assert main(["show-weights", str(tmp_path / "l.png"), "-o", str(tmp_path / "l.png")]) == 1
    assert "is the input label image" in capsys.readouterr().err and (tmp_path / "l.png").read_bytes() == before


def test_weights_of_another_shape_are_one_line(tmp_path, capsys):
    import json

    UNet(depth=1, base_channels=2).save(tmp_path / "m")
    UNet(depth=1, base_channels=4).save(tmp_path / "wide")
    (tmp_path / "wide" / "weights.safetensors").replace(tmp_path / "m" / "weights.safetensors")
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    del document["weights_sha256"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"tensor\(s\) of another shape \(first: .* \(4, 1, 3, 3\), the config needs "
                                         r"\(2, 1, 3, 3\)\)$"):  # fmt: skip
        load_model(tmp_path / "m")


# --------------------------------------------------------------------------------------------
# issue 14: parity with cellpose and stardist (folders, names, overrides, measurements)
# --------------------------------------------------------------------------------------------
def identity_unet(gain: float = 20.0, postprocess: dict | None = None) -> UNet:
    """A depth-0 U-Net whose foreground probability is ``sigmoid(gain * (pixel - 0.5))``, pixel by pixel.

    Its 3x3 kernels pass the centre pixel on and nothing else, and it does not normalise, so
    which pixels are objects is decided by the test image: labels the tests can predict.
    """
    from biounet import ModelInfo

    model = UNet(depth=0, base_channels=1, dropout=0.0, info=ModelInfo(normalization=None,
                                                                       postprocess=postprocess or {}))  # fmt: skip
    with torch.no_grad():
        for conv in (model.bottom[0], model.bottom[3]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
        model.head.weight.zero_()
        model.head.weight[1, 0, 0, 0] = gain
        model.head.bias.copy_(torch.tensor([0.0, -gain / 2]))
    return model.eval()


def blobs_image() -> np.ndarray:
    """Squares of four brightnesses and sizes, and two touching discs (a dumbbell), in [0, 1]."""
    image = np.zeros((64, 72), np.float32)
    for (y, x), size, value in zip([(3, 3), (3, 20), (3, 40), (3, 58)], [2, 3, 5, 8], [0.45, 0.55, 0.7, 0.95],
                                   strict=True):  # fmt: skip
        image[y : y + size, x : x + size] = value
    yy, xx = np.mgrid[:64, :72]
    image[((yy - 40) ** 2 + (xx - 24) ** 2 <= 64) | ((yy - 40) ** 2 + (xx - 38) ** 2 <= 64)] = 0.9
    return image


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(r[key]) for r in rows]) for key in (rows[0] if rows else {})}


def reference_table(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid, bounding box and mean intensity per label of a 2D label image, with numpy only."""
    ids = np.unique(labels[labels > 0])
    yy, xx = np.indices(labels.shape)
    area = np.bincount(labels.ravel())[ids]
    table = {"label": ids, "area": area}
    table["centroid_y"] = np.bincount(labels.ravel(), weights=yy.ravel())[ids] / area
    table["centroid_x"] = np.bincount(labels.ravel(), weights=xx.ravel())[ids] / area
    table["bbox_min_y"] = np.array([yy[labels == i].min() for i in ids])
    table["bbox_min_x"] = np.array([xx[labels == i].min() for i in ids])
    table["bbox_max_y"] = np.array([yy[labels == i].max() + 1 for i in ids])
    table["bbox_max_x"] = np.array([xx[labels == i].max() + 1 for i in ids])
    table["intensity_mean"] = np.bincount(labels.ravel(), weights=image.astype(np.float64).ravel())[ids] / area
    return table


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images have the same objects, whatever their numbers."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (a > 0).sum() == (b > 0).sum() and len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def needs_zarr():
    """The Zarr and Dask of the ``large`` extra (streamed inputs and outputs), or a skip saying so."""
    pytest.importorskip("dask", reason="streaming needs the large extra (dask)")
    return pytest.importorskip("zarr", reason="streaming needs the large extra (zarr)")


def write_tree(root, image):
    """root/ with images at two depths, look-alikes of earlier outputs, a non-image file and a Zarr image."""
    zarr = needs_zarr()

    for name in ("a.tif", "sub/e.tif", "sub/deeper/f.tif", "x_labels.tif", "x_probabilities.tif", ".hidden.tif"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / name, image)
    np.save(root / "c.npy", image)
    import imageio.v3 as iio

    iio.imwrite(root / "B.PNG", (image * 255).astype(np.uint8))
    iio.imwrite(root / "old_overlay.png", (image * 255).astype(np.uint8))
    (root / "notes.txt").write_text("not an image")
    zarr.create_array(str(root / "z.ome.zarr"), shape=image.shape, chunks=(32, 32), dtype=image.dtype)[:] = image


def test_folders_expand_to_their_images_sorted_filtered_and_without_earlier_outputs(tmp_path, caplog):
    from biounet.prediction import find_images

    root = tmp_path / "d"
    write_tree(root, blobs_image())
    (root / "out").mkdir()
    tifffile.imwrite(root / "out" / "extra.tif", blobs_image())  # inside the output folder: never an input
    with caplog.at_level("INFO", logger="biounet"):
        top = find_images([root], exclude=root / "out")
    assert [p.relative_to(root).as_posix() for p in top] == ["B.PNG", "a.tif", "c.npy", "z.ome.zarr"]
    assert "skipped 3 earlier output(s) of biounet (old_overlay.png, x_labels.tif, x_probabilities.tif)" in caplog.text
    deep = find_images([root], recursive=True, exclude=root / "out")
    assert [p.relative_to(root).as_posix() for p in deep] == [
        "B.PNG", "a.tif", "c.npy", "sub/deeper/f.tif", "sub/e.tif", "z.ome.zarr"]  # fmt: skip
    assert find_images([root], pattern="*.TIF") == [root / "a.tif"]  # case-insensitive, as the suffixes
    assert [p.name for p in find_images([root], pattern="*.tif", recursive=True)] == ["a.tif", "extra.tif", "f.tif",
                                                                                      "e.tif"]  # fmt: skip
    # files named directly are kept as they are, once
    assert find_images([root / "x_labels.tif", root, root / "a.tif"], pattern="a*") == [root / "x_labels.tif",
                                                                                         root / "a.tif"]  # fmt: skip
    # the outputs of another name template are skipped by the run that names its outputs so
    tifffile.imwrite(root / "a.seg.tif", blobs_image())
    assert root / "a.seg.tif" in find_images([root]) and root / "a.seg.tif" not in find_images([root], name="{stem}.seg{ext}")
    with pytest.raises(ValueError, match=rf"^{root}: a folder with no image files matching '\*\.jpg' in it or its "
                                         r"subfolders; biounet reads .tif, .tiff"):  # fmt: skip
        find_images([root], pattern="*.jpg", recursive=True)


def test_predict_a_folder_recursively_mirrors_subfolders_and_reruns_safely(tmp_path, capsys):
    root = tmp_path / "d"
    image = blobs_image()
    write_tree(root, image)
    tifffile.imwrite(root / "sub" / "a.tif", image)
    model = tmp_path / "m"
    identity_unet().save(model)
    args = ["predict", str(model), str(root), "-r", "--pattern", "*.tif", "-o", str(root / "out"), "--no-progress",
            "--precision", "float32"]  # fmt: skip
    # the default names are flat: a.tif and sub/a.tif would both write out/a_labels.tif; nothing is written
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{root / 'a.tif'} and {root / 'sub/a.tif'} would both be written to {root / 'out/a_probabilities.tif'}" in err
    assert "(or put {dir} in the name template)" in err and err.count("error:") == 1 and "Traceback" not in err
    assert list((root / "out").iterdir()) == []
    mirrored = [*args, "--name", "{dir}/{stem}_{kind}{ext}"]
    assert main(mirrored) == 0
    written = {p.relative_to(root / "out").as_posix() for p in (root / "out").rglob("*") if p.is_file()}
    assert written == {f"{d}_{k}.tif" for d in ("a", "sub/a", "sub/e", "sub/deeper/f")
                       for k in ("labels", "probabilities")}  # fmt: skip
    expected = labels_from_probabilities(predict(load_model(model), image, progress=False, precision="float32"))
    np.testing.assert_array_equal(read_image(root / "out" / "sub" / "deeper" / "f_labels.tif"), expected)
    # again into the same folder: its outputs and the look-alikes are skipped, the same 4 images segmented
    capsys.readouterr()
    assert main([*mirrored, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "skipped (the output folder)" in err and "segmented 4 of 4 image(s)" in err


def test_the_name_template_names_every_output_and_refuses_collisions(tmp_path, capsys):
    image = blobs_image()
    tifffile.imwrite(tmp_path / "a.tif", image)
    model = tmp_path / "m"
    identity_unet().save(model)
    base = ["predict", str(model), str(tmp_path / "a.tif"), "--no-progress", "--precision", "float32",
            "--save", "probabilities,labels,overlay,objects"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "default")]) == 0
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [
        "a_labels.tif", "a_objects.csv", "a_overlay.png", "a_probabilities.tif"]  # today's names, unchanged
    assert main([*base, "-o", str(tmp_path / "t"), "--name", "{kind}/{stem}.biounet{ext}"]) == 0
    for kind, ext in (("probabilities", ".tif"), ("labels", ".tif"), ("overlay", ".png"), ("objects", ".csv")):
        assert (tmp_path / "t" / kind / f"a.biounet{ext}").read_bytes() == (tmp_path / "default" / f"a_{kind}{ext}"
                                                                            ).read_bytes() or ext == ".tif"  # fmt: skip
        if ext == ".tif":
            np.testing.assert_array_equal(read_image(tmp_path / "t" / kind / f"a.biounet{ext}"),
                                          read_image(tmp_path / "default" / f"a_{kind}{ext}"))  # fmt: skip
    capsys.readouterr()
    bad = {"{stem}.stardist{ext}": "its probabilities and labels would both be written to",
           "{img}.stardist{ext}": "unknown placeholder(s) {img}; known: {stem}, {kind}, {ext}, {dir}",
           "{stem}_{kind}.tif": "must end with {ext}",
           "../{stem}_{kind}{ext}": "an output must be a visible file inside the output folder",
           "{stem:>9}{ext}": "placeholders take no format"}  # fmt: skip
    for template, words in bad.items():
        assert main([*base, "-o", str(tmp_path / "bad"), "--name", template]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and err.rstrip().endswith("(--name)"), err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_streamed_outputs_follow_the_template_too(tmp_path):
    zarr = needs_zarr()

    image = blobs_image()
    tifffile.imwrite(tmp_path / "a.tif", image)
    model = tmp_path / "m"
    identity_unet().save(model)
    base = ["predict", str(model), str(tmp_path / "a.tif"), "--no-progress", "--precision", "float32", "--chunk", "32",
            "--format", "ome-zarr"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "default")]) == 0
    assert main([*base, "-o", str(tmp_path / "t"), "--name", "{kind}/{stem}{ext}", "--measure"]) == 0
    assert sorted(p.relative_to(tmp_path / "t").as_posix() for p in (tmp_path / "t").iterdir()) == [
        "objects", "probabilities"]  # no staging folder left behind  # fmt: skip
    for sub in ("0", "labels/cell/0"):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "t" / "probabilities" / "a.ome.zarr" / sub))[:],
                                      zarr.open_array(str(tmp_path / "default" / "a_probabilities.ome.zarr" / sub))[:])
    # objects without labels: measured from labels that are not kept
    assert main([*base, "-o", str(tmp_path / "p"), "--save", "probabilities,objects"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a_objects.csv", "a_probabilities.ome.zarr"]
    assert not (tmp_path / "p" / "a_probabilities.ome.zarr" / "labels").exists()
    assert (tmp_path / "p" / "a_objects.csv").read_text() == (tmp_path / "t" / "objects" / "a.csv").read_text()


def test_postprocessing_overrides_change_labels_as_labels_from_probabilities_would(tmp_path):
    zarr = needs_zarr()

    image = blobs_image()
    tifffile.imwrite(tmp_path / "a.tif", image)
    model_dir = tmp_path / "m"
    identity_unet(postprocess={"min_size": 2}).save(model_dir)
    prob = predict(load_model(model_dir), image, progress=False, precision="float32")
    own = labels_from_probabilities(prob, min_size=2)
    base = ["predict", str(model_dir), str(tmp_path / "a.tif"), "--no-progress", "--precision", "float32"]
    cases = {("--threshold", "0.9"): {"threshold": 0.9, "min_size": 2},
             ("--min-size", "10"): {"min_size": 10},
             ("--split", "distance"): {"split": "distance", "min_size": 2},
             ("--threshold", "0.6", "--min-size", "0", "--split", "distance"): {"threshold": 0.6, "min_size": 0,
                                                                                 "split": "distance"}}  # fmt: skip
    for i, (flags, kwargs) in enumerate(cases.items()):
        expected = labels_from_probabilities(prob, **kwargs)
        assert not np.array_equal(expected, own)  # each override changes something
        assert main([*base, "-o", str(tmp_path / f"o{i}"), "--save", "labels", *flags]) == 0
        np.testing.assert_array_equal(read_image(tmp_path / f"o{i}" / "a_labels.tif"), expected)
        streamed = ["--save", "labels", "--chunk", "32", "--format", "ome-zarr"]
        assert main([*base, "-o", str(tmp_path / f"s{i}"), *streamed, *flags]) == 0
        streamed = zarr.open_array(str(tmp_path / f"s{i}" / "a_labels.ome.zarr" / "0"))[:]
        assert same_partition(streamed, expected)  # the streamed path honours them too (numbers may differ)
    assert load_model(model_dir).info.postprocess == {"min_size": 2}  # the model folder is unchanged
    # the library: merged over the model's, which keeps its own
    model = load_model(model_dir)
    prediction.predict_files(model, [tmp_path / "a.tif"], tmp_path / "lib", save=["labels"], progress=False,
                             postprocess={"threshold": 0.9}, precision="float32")  # fmt: skip
    np.testing.assert_array_equal(read_image(tmp_path / "lib" / "a_labels.tif"),
                                  labels_from_probabilities(prob, threshold=0.9, min_size=2))  # fmt: skip
    assert model.info.postprocess == {"min_size": 2}
    with pytest.raises(ValueError, match=r"unknown post-processing option\(s\) 'thresh'; known: threshold"):
        prediction.predict_files(model, [tmp_path / "a.tif"], tmp_path / "lib", postprocess={"thresh": 0.9})


def test_normalisation_override_equals_predicting_a_normalised_image(tmp_path, model_dir):
    import dataclasses

    image = (np.random.default_rng(3).random((60, 52)) * 3000 + 200).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image)
    raw = load_model(model_dir)
    assert raw.info.normalization == (1.0, 99.8)
    raw.info = dataclasses.replace(raw.info, normalization=None)
    low, high = np.percentile(image.astype(np.float64), [5, 95])
    manual = ((image - low) / (high - low)).astype(np.float32)
    base = ["predict", str(model_dir), str(tmp_path / "a.tif"), "--no-progress", "--precision", "float32",
            "--save", "probabilities"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "n"), "--normalize", "5,95"]) == 0
    np.testing.assert_allclose(read_image(tmp_path / "n" / "a_probabilities.tif"),
                               predict(raw, manual, progress=False), atol=1e-5)  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "r"), "--no-normalize"]) == 0
    np.testing.assert_array_equal(read_image(tmp_path / "r" / "a_probabilities.tif"),
                                  predict(raw, image.astype(np.float32), progress=False))  # fmt: skip
    assert not np.allclose(read_image(tmp_path / "n" / "a_probabilities.tif"),
                           predict(load_model(model_dir), image, progress=False), atol=1e-3)  # not the model's own
    zarr = needs_zarr()
    assert main([*base, "-o", str(tmp_path / "z"), "--normalize", "5,95", "--chunk", "32", "--format", "ome-zarr"]) == 0
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "z" / "a_probabilities.ome.zarr" / "0"))[:],
                               predict(raw, manual, progress=False), atol=1e-5)  # fmt: skip


def test_labels_past_65535_objects_are_written_as_uint32(tmp_path):
    lattice = np.zeros((580, 580), np.float32)
    lattice[::2, ::2] = 1.0  # 290 x 290 = 84,100 single-pixel objects, 4-connected apart
    tifffile.imwrite(tmp_path / "many.tif", lattice)
    identity_unet().save(tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), str(tmp_path / "many.tif"), "-o", str(tmp_path / "o"),
                 "--save", "labels", "--no-progress", "--precision", "float32"]) == 0  # fmt: skip
    labels = read_image(tmp_path / "o" / "many_labels.tif")
    assert labels.dtype == np.uint32 and labels.max() == 84_100
    np.testing.assert_array_equal(labels > 0, lattice > 0)
    assert np.unique(labels[::2, ::2]).size == 84_100  # every object its own label


def test_measurements_equal_a_numpy_reference_in_memory_and_streamed(tmp_path):
    zarr = needs_zarr()

    rng = np.random.default_rng(9)
    image = (blobs_image() > 0) * rng.integers(100, 1000, (64, 72)).astype(np.uint16)  # raw camera counts
    image = image.astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image)
    identity_unet().save(tmp_path / "m")
    base = ["predict", str(tmp_path / "m"), str(tmp_path / "a.tif"), "--no-progress", "--precision", "float32",
            "--measure"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "o")]) == 0
    labels = read_image(tmp_path / "o" / "a_labels.tif")
    table = read_csv(tmp_path / "o" / "a_objects.csv")
    expected = reference_table(labels, image)
    assert list(table) == list(expected) and len(table["label"]) == 5
    for key in expected:
        np.testing.assert_allclose(table[key], expected[key], rtol=1e-12, atol=0, err_msg=key)
    # streamed, chunks of 16 px cut the objects: measured chunk by chunk from the written labels
    assert main([*base, "-o", str(tmp_path / "s"), "--chunk", "16", "--save", "labels", "--format", "ome-zarr"]) == 0
    streamed = zarr.open_array(str(tmp_path / "s" / "a_labels.ome.zarr" / "0"))[:]
    assert same_partition(streamed, labels)
    table = read_csv(tmp_path / "s" / "a_objects.csv")
    for key, values in reference_table(streamed, image).items():
        np.testing.assert_allclose(table[key], values, rtol=1e-12, atol=0, err_msg=key)


def test_measurements_of_a_stack_carry_the_plane_index(tmp_path):
    stack = np.zeros((3, 30, 40), np.uint16)
    stack[0, 2:6, 3:9] = 500
    stack[2, 10:20, 10:12] = 300
    stack[2, 25:28, 30:39] = np.arange(9, dtype=np.uint16) + 100
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    identity_unet().save(tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), str(tmp_path / "s.tif"), "-o", str(tmp_path / "o"), "--no-progress",
                 "--save", "objects", "--precision", "float32"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["s_objects.csv"]
    table = read_csv(tmp_path / "o" / "s_objects.csv")
    assert list(table)[:3] == ["z", "label", "area"]
    np.testing.assert_array_equal(table["z"], [0, 2, 2])
    np.testing.assert_array_equal(table["label"], [1, 1, 2])  # numbered plane by plane
    np.testing.assert_array_equal(table["area"], [24, 20, 27])
    np.testing.assert_array_equal(table["centroid_y"], [3.5, 14.5, 26.0])
    np.testing.assert_array_equal(table["bbox_max_x"], [9, 12, 39])
    np.testing.assert_allclose(table["intensity_mean"], [500, 300, 104], rtol=1e-12)


def test_measure_objects_in_3d_and_per_channel_in_memory_and_with_dask():
    needs_zarr()
    import dask.array as da

    from biounet import measure_objects

    labels = np.zeros((6, 20, 24), np.uint32)
    labels[1:4, 2:10, 3:5] = 7
    labels[0:6, 12:19, 10:24] = 70_000
    image = np.random.default_rng(0).random((6, 20, 24, 2))
    table = measure_objects(labels, image)
    assert list(table) == ["label", "area", "centroid_z", "centroid_y", "centroid_x", "bbox_min_z", "bbox_min_y",
                           "bbox_min_x", "bbox_max_z", "bbox_max_y", "bbox_max_x", "intensity_mean_0",
                           "intensity_mean_1"]  # fmt: skip
    np.testing.assert_array_equal(table["label"], [7, 70_000])
    np.testing.assert_array_equal(table["area"], [48, 6 * 7 * 14])
    np.testing.assert_array_equal(table["bbox_min_x"], [3, 10])
    np.testing.assert_array_equal([table[f"centroid_{a}"][0] for a in "zyx"], [2.0, 5.5, 3.5])
    np.testing.assert_array_equal([table[f"bbox_max_{a}"][1] for a in "zyx"], [6, 19, 24])
    np.testing.assert_allclose(table["intensity_mean_1"], [image[labels == 7, 1].mean(), image[labels == 70_000, 1].mean()],
                               rtol=1e-12)  # fmt: skip
    lazy = measure_objects(da.from_array(labels, chunks=(4, 7, 9)), da.from_array(image, chunks=(2, 5, 5, 1)))
    for key in table:
        np.testing.assert_allclose(lazy[key], table[key], rtol=1e-12, err_msg=key)
    empty = measure_objects(np.zeros((5, 5), np.uint8), np.ones((5, 5)))
    assert list(empty)[-1] == "intensity_mean" and all(len(v) == 0 for v in empty.values())
    with pytest.raises(ValueError, match=r"image: shape \(5, 4\) must be the labels' \(5, 5\)"):
        measure_objects(np.zeros((5, 5), np.uint8), np.ones((5, 4)))


def test_bad_parity_flags_are_one_line_naming_the_flag(tmp_path, model_dir, capsys):
    tifffile.imwrite(tmp_path / "a.tif", blobs_image())
    base = ["predict", str(model_dir), str(tmp_path), "-o", str(tmp_path / "o"), "--no-progress"]
    cases = {("--threshold", "1.5"): "threshold must be in [0, 1), got 1.5 (--threshold)",
             ("--min-size", "-3"): "min_size must be >= 0, got -3 (--min-size)",
             ("--split", "border"): "split 'border' needs a 3-class border model (background, interior, border); "
                                    "this model has 2 classes (--split)",
             ("--normalize", "99,1"): "0 <= low < high <= 100, got [99.0, 1.0] (--normalize)",
             ("--normalize", "1"): "--normalize takes two percentiles LOW,HIGH such as 1,99.8; got '1'",
             ("--pattern", "*.jpg"): f"{tmp_path}: a folder with no image files matching '*.jpg' in it;",
             ("--save", "labels,areas"): "--save: unknown output(s) areas"}  # fmt: skip
    for flags, words in cases.items():
        assert main([*base, *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("biounet predict: error:") and words in err, err
        assert err.rstrip().endswith(f"({flags[0]})") or flags[0] in words, err  # the flag that sets it
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    with pytest.raises(SystemExit) as exit_info:  # not a number: argparse's usage line, no traceback
        main([*base, "--threshold", "high"])
    assert exit_info.value.code == 2 and "invalid float value: 'high'" in capsys.readouterr().err
