"""``biounet export``: bioimage.io packages, TorchScript and ONNX files (issue 14).

Every format is checked against biounet's own prediction (:func:`biounet.predict`, float32)
on an image the export has not seen; the bioimage.io packages of the shipped models pass
``bioimageio.core``'s test (``bioimageio test``) offline, with bioimageio's cache in a
temporary folder and every HTTP request recorded (there must be none).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import biounet
from biounet import UNet, load_model, predict
from biounet.cli import main
from biounet.data import synthetic_cells
from biounet.errors import InputError
from biounet.io import has_bright_background, normalize_percentile, to_luminance
from biounet.prediction import PredictOptions

# Not imported here: bioimageio reads its cache folder, and onnxruntime writes its telemetry store
# ($XDG_CACHE_HOME/Microsoft/DeveloperTools), when first imported: after the fixture below.
if not all(importlib.util.find_spec(name) for name in ("bioimageio", "bioimageio.core", "onnxruntime", "onnx")):
    pytest.skip("the export extra (pip install 'biounet[export]') is not installed", allow_module_level=True)

from biounet.export import FORMATS, ONNX_OPSET, export_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

#: The tolerance the issue asks for, and the one the export's checks use.
TOL = 1e-4
SHIPPED = Path(biounet.__file__).parent / "models"
FLOAT32 = PredictOptions(precision="float32", device="cpu", progress=False, batch_size=1)


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def offline_bioimageio(tmp_path_factory):
    """bioimageio's and onnxruntime's caches in a temporary folder (never the user's home), every HTTP
    request recorded."""
    cache = tmp_path_factory.mktemp("caches")
    patch = pytest.MonkeyPatch()
    patch.setenv("BIOIMAGEIO_CACHE_PATH", str(cache / "bioimageio"))
    patch.setenv("XDG_CACHE_HOME", str(cache))
    if "bioimageio.spec" in sys.modules:  # imported by an earlier test module: its settings are read already
        from bioimageio.spec._internal._settings import settings

        patch.setattr(settings, "cache_path", cache / "bioimageio")
    requests_made: list[str] = []

    def refuse(self, request, *args, **kwargs):
        requests_made.append(str(getattr(request, "url", request)))
        raise OSError("no network in the tests")

    import httpx

    patch.setattr(httpx.Client, "send", refuse)
    try:
        import requests

        patch.setattr(requests.Session, "send", refuse)
    except ImportError:  # pragma: no cover - requests comes with bioimageio.spec
        pass
    yield cache
    patch.undo()
    assert requests_made == [], f"the export tests made HTTP requests: {requests_made}"


def _model(padding: str = "valid", *, seed: int = 0, in_channels: int = 1, color: str = "keep") -> UNet:
    """A small U-Net with batch normalisation whose running statistics are not the identity."""
    torch.manual_seed(seed)
    model = UNet(in_channels=in_channels, depth=2, base_channels=4, padding=padding, norm="batch", dropout=0.5,
                 info=biounet.ModelInfo(color=color))  # fmt: skip
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _unseen_image(shape: tuple[int, int], seed: int = 7) -> np.ndarray:
    """Synthetic cells (uint16 counts) that no export uses (exports draw seed 0)."""
    return synthetic_cells(1, shape=shape, seed=seed)[0][0]


def _biounet_probabilities(model: UNet, image: np.ndarray) -> np.ndarray:
    """biounet's prediction of the centre of ``image`` that a valid-padding network computes from it alone."""
    halo = model.config.halo
    return predict(model, image, options=FLOAT32, tile=max(image.shape), context=[(halo, halo)] * 2)


def _reference(model: UNet, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model.eval()(torch.from_numpy(x)), dim=1).numpy()


def _onnx_session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _three_valid_shapes(model: UNet) -> list[tuple[int, ...]]:
    config = model.config
    s = [config.valid_input_size(1) + k * config.stride for k in range(3)]
    return [(1, config.in_channels, s[0], s[0]), (2, config.in_channels, s[1], s[2]), (1, config.in_channels, s[2], s[0])]


# ---- the size rule ------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_package_size_rules_are_the_networks_own(padding, depth):
    from biounet.export._network import Geometry

    config = biounet.UNetConfig(depth=depth, base_channels=1, padding=padding)
    g = Geometry.of(config, 16)
    valid = [s for s in range(1, g.min + 40 * g.step) if config.is_valid_input_size(s)]
    usable = [s for s in valid if s >= g.min]
    assert usable == list(range(g.min, g.min + 40 * g.step, g.step))  # min + n*step, nothing else
    assert g.step == 2**depth
    for s in usable[:5]:
        if padding == "valid":
            assert g.halo == 0 and s + g.offset == config.output_size(s)
        else:
            assert g.offset == 0 and g.halo >= config.halo and s - 2 * g.halo >= 1
            assert config.is_valid_input_size(s + 2 * g.halo)  # a consumer pads by the halo and stays valid
    if padding == "valid":
        assert g.min == valid[0]  # the smallest input the network takes
        assert config.output_size(g.test_size) >= 16 and config.output_size(g.test_size - g.step) < 16
    else:
        assert g.min - 2 * g.halo >= 1 and g.min - g.step - 2 * g.halo < 1


# ---- TorchScript ---------------------------------------------------------------------------
def test_torchscript_export_reloads_and_matches_predict_on_an_unseen_image(tmp_path):
    model = _model()
    path = export_model(model, tmp_path / "net.pt", format="torchscript")
    loaded = torch.jit.load(str(path))
    for shape in _three_valid_shapes(model):  # after torch.jit.load, at three valid sizes
        x = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
        with torch.inference_mode():
            got = loaded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, _reference(model, x), rtol=0, atol=TOL)
    image = _unseen_image((92, 108))  # valid sizes 44 + 4 n: 92 and 108
    normalised = normalize_percentile(image, *model.info.normalization)[None, None]
    with torch.inference_mode():
        got = loaded(torch.from_numpy(normalised)).numpy()[0]
    expected = _biounet_probabilities(model, image)
    assert got.shape == expected.shape == (2, 92 - 40, 108 - 40)
    assert np.abs(got - expected).max() <= TOL
    assert model.training is False and next(model.parameters()).requires_grad  # the caller's model is untouched


# ---- ONNX ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_onnx_export_has_dynamic_axes_and_matches_predict_on_an_unseen_image(tmp_path):
    import onnx

    model = _model(seed=1)
    path = export_model(model, tmp_path / "net.onnx", format="onnx")
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == ONNX_OPSET == 18
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[1] == 1 and all(isinstance(d, str) and "4*" in d and "+ 44" in d for d in dims[2:])
    session = _onnx_session(path)
    for shape in _three_valid_shapes(model):  # batch and both spatial axes change
        x = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
        got = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, _reference(model, x), rtol=0, atol=TOL)
    image = _unseen_image((100, 88))
    normalised = normalize_percentile(image, *model.info.normalization)[None, None]
    got = session.run(None, {"input": normalised})[0][0]
    expected = _biounet_probabilities(model, image)
    assert got.shape == expected.shape == (2, 60, 48)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.slow
def test_same_padding_and_multichannel_networks_export_to_files(tmp_path):
    for model, name in ((_model("same", seed=2), "same"), (_model(seed=3, in_channels=2), "two")):
        ts = torch.jit.load(str(export_model(model, tmp_path / f"{name}.pt", format="torchscript")))
        session = _onnx_session(export_model(model, tmp_path / f"{name}.onnx", format="onnx"))
        for shape in _three_valid_shapes(model):
            x = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
            expected = _reference(model, x)
            with torch.inference_mode():
                np.testing.assert_allclose(ts(torch.from_numpy(x)).numpy(), expected, rtol=0, atol=TOL)
            np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, rtol=0, atol=TOL)


# ---- argument checks and atomic writes --------------------------------------------------------
def test_bad_arguments_are_one_clear_error_naming_the_argument(tmp_path):
    model = _model()
    with pytest.raises(InputError, match="format must be one of bioimageio, torchscript, onnx, got 'keras'") as err:
        export_model(model, tmp_path / "m.h5", format="keras")
    assert err.value.option == "format"
    with pytest.raises(InputError, match="model: .*no-such-model: not a biounet model") as err:
        export_model(tmp_path / "no-such-model", tmp_path / "m.pt", format="torchscript")
    assert err.value.option == "model"
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    with pytest.raises(InputError, match=r"taken.pt: exists; choose another output or overwrite it") as err:
        export_model(model, tmp_path / "taken.pt", format="torchscript")
    assert err.value.option == "overwrite" and (tmp_path / "taken.pt").read_bytes() == b"keep me"
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="folder: is a folder; the torchscript export writes a file"):
        export_model(model, tmp_path / "folder", format="torchscript", overwrite=True)
    model.save(tmp_path / "model")
    with pytest.raises(InputError, match="is inside the model folder") as err:
        export_model(tmp_path / "model", tmp_path / "model" / "package.zip")
    assert err.value.option == "output"
    with pytest.raises(InputError, match=r"sample: \(30, 30\) px is smaller than the smallest input this model takes "
                       r"\(44 px per axis\)") as err:  # fmt: skip
        export_model(model, tmp_path / "p.zip", sample=np.zeros((30, 30)))
    assert err.value.option == "sample"
    with pytest.raises(InputError, match=r"sample: expected a \(Y, X\) image of numbers for this 1-channel 2D "
                       r"model, got float64 \(50, 50, 3\)"):  # fmt: skip
        export_model(model, tmp_path / "new" / "p.zip", sample=np.zeros((50, 50, 3)))
    with pytest.raises(InputError, match="authors must be one or more names") as err:
        export_model(model, tmp_path / "new" / "p.zip", authors=[" "])
    assert err.value.option == "authors"
    with pytest.raises(InputError, match="sample: only the bioimageio format has test tensors"):
        export_model(model, tmp_path / "m.onnx", format="onnx", sample=np.zeros((50, 50)))
    with pytest.raises(InputError, match="license must be an SPDX identifier such as BSD-3-Clause, MIT or "
                       "CC-BY-4.0, got 'free for all'") as err:  # fmt: skip
        export_model(model, tmp_path / "p.zip", license="free for all")
    assert err.value.option == "license"
    low_percentiles = UNet(depth=2, base_channels=4, info=biounet.ModelInfo(normalization=(0.1, 0.9)))
    with pytest.raises(InputError, match=r"scale_range needs an upper percentile above 1, and this model normalises "
                       r"with percentiles \[0.1, 0.9\]"):  # fmt: skip
        export_model(low_percentiles, tmp_path / "p.zip")
    inverting = UNet(depth=2, base_channels=4, info=biounet.ModelInfo(background="dark"))
    with pytest.raises(InputError, match=r"background: the model inverts images with a bright background, a choice "
                       r"it makes per image .* 'dark' \(bright objects on a dark background") as err:  # fmt: skip
        export_model(inverting, tmp_path / "p.zip")
    assert err.value.option == "background"
    for model, background, message in ((inverting, "light", "background must be 'dark' or 'bright'"),
                                       (low_percentiles, "bright", "only for a model that inverts bright-background"),
                                       (inverting, "dark", "only the bioimageio format normalises its input")):
        with pytest.raises(InputError, match=message) as err:
            export_model(model, tmp_path / "p.pt", format="onnx" if background == "dark" else "bioimageio",
                         background=background)  # fmt: skip
        assert err.value.option == "background"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "model", "taken.pt"]  # nothing else written


def test_overwrite_replaces_a_file_and_a_failed_check_leaves_nothing(tmp_path, monkeypatch):
    import biounet.export._torchscript as torchscript_export

    first, second = _model(seed=4), _model(seed=5)
    path = tmp_path / "net.pt"
    export_model(first, path, format="torchscript")
    export_model(second, path, format="torchscript", overwrite=True)
    x = np.random.default_rng(0).standard_normal((1, 1, 44, 44), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(torch.jit.load(str(path))(torch.from_numpy(x)).numpy(), _reference(second, x),
                                   rtol=0, atol=TOL)  # fmt: skip
    monkeypatch.setattr(torchscript_export, "check_torchscript", lambda *args, **kwargs: 3e-3)
    with pytest.raises(RuntimeError, match=r"other.pt: the torchscript export differs from PyTorch by 3.00e-03 "
                       r"\(allowed: 0.0001\); nothing written"):  # fmt: skip
        export_model(first, tmp_path / "other.pt", format="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]  # no other.pt, no temporary file


def test_cli_exports_and_reports_errors_in_one_line(tmp_path, capsys):
    _model(seed=6).save(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "out" / "model.pt"),
                 "--format", "torchscript"]) == 0  # fmt: skip
    assert (tmp_path / "out" / "model.pt").is_file()
    assert "torchscript export within 0.0e+00 of PyTorch at three valid sizes" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "out" / "model.pt"),
                 "--format", "torchscript"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "out" / "model.pt"
    assert err == [f"biounet export: error: {out}: exists; choose another output or overwrite it (--overwrite)"]
    assert main(["export", "no-such-model", "-o", str(tmp_path / "x.zip")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("biounet export: error: model: no-such-model: not a biounet model")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "x"), "--format", "keras"])
    assert "invalid choice: 'keras'" in capsys.readouterr().err
    assert FORMATS == ("bioimageio", "torchscript", "onnx")


# ---- bioimage.io ------------------------------------------------------------------------------
@pytest.mark.slow
def test_bioimageio_package_of_a_folder_model_with_a_sample_and_a_card(tmp_path):
    """Through the CLI: an RGB sample for a luminance model, the folder's card as README, the check on."""
    from bioimageio.core import load_model_description

    model = _model(seed=8, color="luminance")
    model.save(tmp_path / "model")
    (tmp_path / "model" / "MODEL_CARD.md").write_text("# `tiny`: a card\n\nWritten by the test.\n")
    rgb = np.stack([_unseen_image((200, 190), seed=s) for s in (1, 2, 3)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    rc = main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "tiny.zip"), "--sample", str(tmp_path / "rgb.tif"),
               "--author", "A. Tester", "--license", "CC-BY-4.0"])  # fmt: skip
    assert rc == 0
    with zipfile.ZipFile(tmp_path / "tiny.zip") as z:
        names = set(z.namelist())
        readme = z.read("README.md").decode()
        test_input = np.load(z.open("test_input.npy"))
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "weights.pt",
            "weights_torchscript.pt", "weights.onnx"} <= names  # fmt: skip
    assert readme.startswith("# `tiny`: a card\n\nWritten by the test.\n") and "## Validation" in readme
    assert "convert an RGB image to one gray channel first" in readme
    # the test input is the luminance of the sample's centre (168 px: 128 reliable output pixels + 2 * 20)
    luminance = to_luminance(rgb, axis=-1)
    np.testing.assert_array_equal(test_input, luminance[16:184, 11:179][None, None])
    descr = load_model_description(tmp_path / "tiny.zip")
    assert [a.name for a in descr.authors] == ["A. Tester"] and descr.license == "CC-BY-4.0"
    assert descr.inputs[0].axes[1].channel_names == ["luminance"]


@pytest.mark.slow
def test_a_wrong_test_tensor_fails_the_check_and_leaves_nothing(tmp_path, monkeypatch):
    import biounet.export._bioimageio as package

    right = package.make_test_probabilities
    monkeypatch.setattr(package, "make_test_probabilities", lambda *args: right(*args) * 0.98 + 0.01)
    with pytest.raises(RuntimeError, match="fails bioimageio's test: Reproduce test outputs from test inputs"):
        export_model(_model(seed=9), tmp_path / "package")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_model_that_inverts_bright_backgrounds_exports_one_package_per_kind_of_image(tmp_path):
    """background="dark" decides per image; its packages are made for dark or bright backgrounds and predict
    as biounet does on such images (bioimageio's own test ran on both: check=True)."""
    from bioimageio.core import create_prediction_pipeline, load_model_description
    from bioimageio.core import predict as bioimageio_predict

    model = _model(seed=11)
    model.info = dataclasses.replace(model.info, background="dark")
    fluorescence = _unseen_image((200, 184)).astype(np.float32)  # bright cells on a dark background
    brightfield = fluorescence.max() - fluorescence  # dark cells on a bright one
    assert [bool(has_bright_background(*np.percentile(i, [1, 50, 99.8]))) for i in (fluorescence, brightfield)] == \
        [False, True]  # fmt: skip
    for background, image in (("dark", fluorescence), ("bright", brightfield)):
        path = export_model(model, tmp_path / f"{background}.zip", background=background)
        descr = load_model_description(path)
        steps = [(p.id, getattr(p.kwargs, "gain", None)) for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"]
        assert steps == [("scale_range", None)] + ([("scale_linear", -1.0)] if background == "bright" else [])
        with zipfile.ZipFile(path) as z:
            test_input = np.load(z.open("test_input.npy"))[0, 0]
        # the default sample has the package's background, so biounet's per-image rule agrees with the package
        assert bool(has_bright_background(*np.percentile(test_input, [1, 50, 99.8]))) == (background == "bright")
        pipeline = create_prediction_pipeline(descr, weight_format="onnx", devices=["cpu"])
        got = bioimageio_predict(model=pipeline, inputs=image[None, None], sample_id="unseen")
        expected = _biounet_probabilities(model, image)  # the model's own rule: inverts the bright one only
        assert np.abs(got.members["output"].data.to_numpy()[0] - expected).max() <= TOL, background
    assert model.info.background == "dark"  # the caller's model is unchanged


@pytest.mark.slow
def test_same_padding_package_passes_bioimageio_test(tmp_path):
    from bioimageio.core import load_model_description

    path = export_model(_model("same", seed=10), tmp_path / "same.zip")  # check=True: bioimageio's test ran
    axes = load_model_description(path).outputs[0].axes
    assert [getattr(a, "halo", None) for a in axes[2:]] == [20, 20]  # depth 2: halo 20, a multiple of 4 / 2


@pytest.fixture(scope="module")
def shipped_packages(tmp_path_factory):
    """The bioimage.io packages of the shipped models: nuclei zipped, for fluorescence (it inverts bright
    backgrounds itself, so its package is made for one kind of image), em-membranes as a folder (check off:
    the tests run bioimageio's test themselves)."""
    root = tmp_path_factory.mktemp("packages")
    return {"nuclei": export_model("nuclei", root / "nuclei.zip", check=False, background="dark"),
            "em-membranes": export_model("em-membranes", root / "em-membranes", check=False) / "rdf.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nuclei", "em-membranes"])
def test_shipped_model_packages_pass_bioimageio_test(shipped_packages, name):
    from bioimageio.core import test_model

    summary = test_model(str(shipped_packages[name]), devices=["cpu"])
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    tested = {d.name for d in summary.details if d.status == "passed"}
    for weights in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({weights})" in tested
        assert f"Run {weights} inference for inputs with batch_size: 2 and size parameter n: 2" in tested


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nuclei", "em-membranes"])
def test_shipped_packages_predict_like_biounet_on_an_unseen_image(shipped_packages, name):
    from bioimageio.core import create_prediction_pipeline, load_model_description
    from bioimageio.core import predict as bioimageio_predict

    model = load_model(name)
    descr = load_model_description(shipped_packages[name])
    image = _unseen_image((204, 236)).astype(np.float32) * 3.0  # valid sizes 188 + 16 n
    expected = _biounet_probabilities(model, image)
    assert expected.shape == (2, 20, 52)
    for weights in ("pytorch_state_dict", "torchscript", "onnx"):
        # predict enters and unloads the pipeline itself (inside another `with` it would wait forever)
        pipeline = create_prediction_pipeline(descr, weight_format=weights, devices=["cpu"])
        result = bioimageio_predict(model=pipeline, inputs=image[None, None], sample_id="unseen")
        got = result.members["output"].data.to_numpy()
        assert got.shape == (1, *expected.shape), weights
        assert np.abs(got[0] - expected).max() <= TOL, weights


@pytest.mark.slow
def test_shipped_package_describes_the_network_and_biounets_outputs(shipped_packages):
    from bioimageio.core import load_model_description

    model = load_model("nuclei")
    descr = load_model_description(shipped_packages["nuclei"])
    ipt, out = descr.inputs[0], descr.outputs[0]
    assert [a.type for a in ipt.axes] == ["batch", "channel", "space", "space"]
    assert [str(a.id) for a in ipt.axes[2:]] == ["y", "x"]
    assert [(a.size.min, a.size.step) for a in ipt.axes[2:]] == [(188, 16)] * 2  # depth 4, valid padding
    assert [a.size.offset for a in out.axes[2:]] == [-184] * 2  # 2 * halo 92
    scale = [p for p in ipt.preprocessing if p.id == "scale_range"]
    assert len(scale) == 1 and (scale[0].kwargs.min_percentile, scale[0].kwargs.max_percentile) == (1.0, 99.8)
    assert [str(a) for a in scale[0].kwargs.axes] == ["y", "x"]
    assert [p.id for p in out.postprocessing if p.id != "ensure_dtype"] == ["softmax"]
    assert out.axes[1].channel_names == ["background", "cell"]
    assert "10.1007/978-3-319-24574-4_28" in [str(c.doi) for c in descr.cite]
    assert descr.weights.pytorch_state_dict.architecture.import_from == "biounet.model"
    assert descr.weights.onnx.opset_version == ONNX_OPSET
    with zipfile.ZipFile(shipped_packages["nuclei"]) as z:
        readme = z.read("README.md").decode()
        test_input, test_output = np.load(z.open("test_input.npy")), np.load(z.open("test_output.npy"))
        state = torch.load(z.open("weights.pt"), weights_only=True)
        cover = read_image_bytes(z.read("cover.png"))
    card = (SHIPPED / "nuclei" / "MODEL_CARD.md").read_text()
    assert readme.startswith(card.rstrip()) and "## Validation" in readme and "188 + 16 n px" in readme
    # the test output is biounet's prediction of the test input, recomputed here
    np.testing.assert_allclose(test_output[0], _biounet_probabilities(model, test_input[0, 0]), rtol=0, atol=1e-6)
    assert test_input.shape == (1, 1, 316, 316) and test_output.shape == (1, 2, 132, 132)
    original = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert cover.shape == (132, 264, 3)  # 2:1: the input's predicted region and its labels
    config = json.loads((SHIPPED / "nuclei" / "config.json").read_text())
    assert descr.weights.pytorch_state_dict.architecture.kwargs == config["architecture"]


def read_image_bytes(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(data, extension=".png")


def test_caches_are_in_the_tests_temporary_folder(offline_bioimageio, tmp_path):
    from bioimageio.spec._internal._settings import settings

    assert os.environ["BIOIMAGEIO_CACHE_PATH"] == str(offline_bioimageio / "bioimageio") == str(settings.cache_path)
    assert os.environ["XDG_CACHE_HOME"] == str(offline_bioimageio)
    # onnxruntime writes its telemetry store on import on some machines and not on others: a fresh process with
    # a home of its own shows it follows XDG_CACHE_HOME wherever it writes, and never writes into the home
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache)}
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=120)
    assert list(home.iterdir()) == []
