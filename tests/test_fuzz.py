"""Fuzzing the edges where files and strings come in (issue 13).

Random bytes, truncations and byte flips of real TIFF, PNG, safetensors and checkpoint files,
random JSON model configs and random ``--set`` values must each end in a result or in one
``ValueError`` (the biounet error the CLI prints as one line), never in another exception and
never in a hang (hypothesis' deadline).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biounet import UNet, load_model, predict
from biounet.cli import main
from biounet.data import make_sample, synthetic_cells
from biounet.postprocess import labels_from_probabilities
from biounet.io import read_image_axes, write_png, write_tiff
from biounet.training import TrainConfig, train_steps

FUZZ = settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)  # fmt: skip


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """``original`` truncated, with bytes overwritten, or replaced by random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "random", "append"]))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=64))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("originals")
    rng = np.random.default_rng(0)
    write_tiff(root / "a.tif", rng.integers(0, 4000, (3, 24, 20)).astype(np.uint16), axes="ZYX")
    write_png(root / "a.png", rng.integers(0, 255, (24, 20, 3)).astype(np.uint8))
    UNet(depth=1, base_channels=2).save(root / "model")
    return {
        "tif": (root / "a.tif").read_bytes(),
        "png": (root / "a.png").read_bytes(),
        "weights": (root / "model" / "weights.safetensors").read_bytes(),
        "config": (root / "model" / "config.json").read_bytes(),
    }


def _only_value_errors(call) -> None:
    try:
        call()
    except ValueError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["tif", "png"])
def test_damaged_images_are_read_or_refused(originals, tmp_path, suffix):
    path = tmp_path / f"x.{suffix}"

    @FUZZ
    @given(data=damaged(originals[suffix]))
    def check(data):
        path.write_bytes(data)
        _only_value_errors(lambda: read_image_axes(path))

    check()


@pytest.mark.slow
def test_damaged_weights_are_loaded_or_refused(originals, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    document = json.loads(originals["config"])
    del document["weights_sha256"]  # else every change is refused by the hash before the parser sees it
    (folder / "config.json").write_text(json.dumps(document))

    @FUZZ
    @given(data=damaged(originals["weights"]))
    def check(data):
        (folder / "weights.safetensors").write_bytes(data)
        _only_value_errors(lambda: load_model(folder))

    check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["format_version", "architecture", "normalization", "class_names", "postprocess", "color", "provenance",
          "weights_sha256"]  # fmt: skip
ARCHITECTURE = ["in_channels", "num_classes", "depth", "base_channels", "padding", "norm", "dropout", "dims"]
POSTPROCESS = ["threshold", "split", "seed_threshold", "min_seed_height", "min_size", "connectivity"]


@pytest.mark.slow
def test_random_model_configs_are_loaded_or_refused(originals, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(originals["weights"])
    base = json.loads(originals["config"])

    @settings(FUZZ, max_examples=300)
    @given(field=st.sampled_from(FIELDS + [f"architecture.{a}" for a in ARCHITECTURE]
                                 + [f"postprocess.{o}" for o in POSTPROCESS]), value=JSON)  # fmt: skip
    def check(field, value):
        document = json.loads(json.dumps(base))
        if "." in field:
            section, name = field.split(".", 1)
            document[section][name] = value
        else:
            document[field] = value
        (folder / "config.json").write_text(json.dumps(document))
        _only_value_errors(lambda: use(load_model(folder)))

    def use(model: UNet) -> None:  # what predict does with a loaded model's config
        prob = predict(model, image, progress=False)
        labels_from_probabilities(prob, **model.info.postprocess)

    image = np.random.default_rng(0).random((30, 30)).astype(np.float32)
    check()


@pytest.mark.slow
def test_random_set_values_give_a_config_or_one_error():
    base = TrainConfig.preset("fast")
    names = sorted(vars(base))

    @FUZZ
    @given(field=st.sampled_from(names + ["bogus"]), raw=st.text(max_size=12))
    def check(field, raw):
        _only_value_errors(lambda: base.updated([f"{field}={raw}"]))

    check()


@pytest.mark.slow
def test_damaged_checkpoints_resume_or_are_refused(tmp_path):
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2, (48, 48), seed=2))]
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=1, val_every=1000,
                                checkpoint_every=1)  # fmt: skip
    run = tmp_path / "run"
    list(train_steps(samples, run, config))
    original = (run / "checkpoint.pt").read_bytes()

    @settings(FUZZ, max_examples=15)
    @given(data=damaged(original))
    def check(data):
        trial = tmp_path / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(run, trial)
        (trial / "checkpoint.pt").write_bytes(data)
        _only_value_errors(lambda: list(train_steps(samples, trial, config, resume=True)))

    check()


@pytest.mark.slow
def test_damaged_images_through_the_cli_exit_cleanly(originals, tmp_path, capsys):
    model = tmp_path / "model"
    UNet(depth=1, base_channels=2).save(model)
    path = tmp_path / "in" / "x.tif"
    path.parent.mkdir()

    @settings(FUZZ, max_examples=20)
    @given(data=damaged(originals["tif"]))
    def check(data):
        path.write_bytes(data)
        rc = main(["predict", "--model", str(model), str(path), "-o", str(tmp_path / "out"), "--overwrite",
                   "--no-progress", "--precision", "float32"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc in (0, 1) and "Traceback" not in err and "unexpected" not in err, err

    check()

