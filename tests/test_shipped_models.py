"""The models shipped inside the package: loadable by name, small, packaged, and they reproduce
the scores recorded in their ``config.json`` (``provenance.evaluation``) on the shared data."""

from __future__ import annotations

import fnmatch
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tifffile

import biounet
from biounet.cli import main
from biounet.data import load_dataset
from biounet.model import available_models, load_model
from biounet.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402
import reproduce  # noqa: E402

SHIPPED = ("em-membranes", "nuclei")
MODELS = Path(biounet.__file__).parent / "models"
LIMIT_BYTES = 25 * 2**20
#: Allowed differences between recorded and recomputed scores (thread scheduling and CPU
#: kernels can move probabilities by ~1e-6, which can flip a pixel at a threshold).
TOLERANCE = {"v_rand": 2e-3, "v_info": 2e-3, "rand_error": 2e-3, "pixel_error": 2e-3, "warping_error": 1e-4,
             "iou": 2e-3, "seg": 2e-3, "f1": 5e-3, "ap": 5e-3, "touching": 0, "merged": 1}  # fmt: skip


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_complete_small_and_packaged(name):
    assert name in available_models()
    folder = MODELS / name
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["MODEL_CARD.md", "config.json", "weights.safetensors"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= LIMIT_BYTES
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["biounet"]
    for file in files:
        assert any(fnmatch.fnmatch(f"models/{name}/{file}", p) for p in patterns), file
    model = load_model(name)
    evaluation = model.info.provenance["evaluation"]
    card = (folder / "MODEL_CARD.md").read_text()
    for heading in ("## Data", "## Recipe", "## Scores", "## Limits", f"biounet predict --model {name}"):
        assert heading in card
    metrics = common.EM_METRICS if name == "em-membranes" else common.NUCLEI_METRICS
    for metric, (_, fmt) in metrics.items():  # the card shows the recorded scores
        assert format(evaluation["scores"][metric], fmt) in card


def test_predict_cli_takes_a_shipped_model_by_name(tmp_path):
    image = (np.random.default_rng(0).random((60, 70)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "slice.tif", image)
    rc = main(["predict", "--model", "em-membranes", str(tmp_path / "slice.tif"), "-o", str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    prob = tifffile.imread(tmp_path / "out" / "slice_probabilities.tif")
    assert prob.shape == (2, 60, 70) and np.allclose(prob.sum(axis=0), 1, atol=1e-5)


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_recorded_scores(name, data_dir):
    model = load_model(name)
    provenance = model.info.provenance
    evaluation = provenance["evaluation"]
    config = TrainConfig.from_dict(provenance["recipe"])
    samples = load_dataset(data_dir / evaluation["dataset"], as_gray=True)
    by_name = {s.name: s for s in samples}
    test = [by_name[n] for n in evaluation["images"]]
    if evaluation["crop"]:
        test = [common.crop_sample(s, evaluation["crop"]) for s in test]
    probabilities = [reproduce.unet_predict(model, s.image, config, tta=False, device="cpu") for s in test]
    if name == "em-membranes":
        got = common.em_scores([p[1] for p in probabilities], [s.labels for s in test])
    else:
        got = common.mean_nuclei_scores([common.nuclei_scores(s.labels, p, model.info.postprocess)
                                         for s, p in zip(test, probabilities)])  # fmt: skip
    recorded = evaluation["scores"]
    for metric, value in got.items():
        assert abs(value - recorded[metric]) <= TOLERANCE[metric], (metric, value, recorded[metric])


def test_shipped_nuclei_model_takes_rgb_images(tmp_path):
    """It was trained on the luminance of the DSB images (many are RGB) and converts RGB inputs the same way."""
    import imageio.v3 as iio
    from skimage.color import rgb2gray

    model = load_model("nuclei")
    assert model.info.color == "luminance" and model.config.in_channels == 1 and model.info.background == "dark"
    rgb = (np.random.default_rng(3).random((96, 100, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "he.png", rgb)
    iio.imwrite(tmp_path / "he-jpeg.jpg", rgb)
    rc = main(["predict", "--model", "nuclei", str(tmp_path / "he.png"), str(tmp_path / "he-jpeg.jpg"), "-o",
               str(tmp_path / "out"), "--precision", "float32", "--no-progress"])  # fmt: skip
    assert rc == 0 and (tmp_path / "out" / "he-jpeg_labels.tif").is_file()
    prob = tifffile.imread(tmp_path / "out" / "he_probabilities.tif")
    np.testing.assert_array_equal(prob, biounet.predict(model, rgb2gray(rgb).astype(np.float32), progress=False))
