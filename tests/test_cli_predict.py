"""``biounet predict`` end to end on files the test writes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from biounet import UNet, load_model, predict
from biounet import prediction
from biounet.cli import main
from biounet.prediction import PredictReport
from biounet.io import read_image, read_image_axes


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
    monkeypatch.setattr(_device, "resolve_precision", lambda device: asked.append(str(device)) or "float32")
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
