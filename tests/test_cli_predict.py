"""``biounet predict`` end to end on files the test writes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from biounet import UNet, load_model, predict
from biounet import inference
from biounet.cli import main
from biounet.inference import PredictReport
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
    rc = main(["predict", str(model_dir), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"),
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
    monkeypatch.setattr(inference, "predict_files", lambda *a, **kw: seen.append(kw["compile"]) or PredictReport())
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
