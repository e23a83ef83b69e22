"""The paper's architecture: shapes, layer count, parameter count, initialisation, I/O."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from biounet import ModelInfo, UNet, UNetConfig, load_model
from biounet.model import count_conv_layers


def paper_parameter_count(c_in: int = 1, n_classes: int = 2, base: int = 64, depth: int = 4) -> int:
    """Closed form, counted layer by layer from the paper's Fig. 1 (weights + biases)."""

    def conv(k: int, cin: int, cout: int) -> int:
        return k * k * cin * cout + cout

    widths = [base * 2**i for i in range(depth + 1)]
    total, prev = 0, c_in
    for w in widths:  # contracting path and bottom: two 3x3 convs per level
        total += conv(3, prev, w) + conv(3, w, w)
        prev = w
    for lo, hi in zip(reversed(widths[:-1]), reversed(widths[1:])):  # expanding path
        total += conv(2, hi, lo)  # 2x2 up-convolution halving the channels
        total += conv(3, 2 * lo, lo) + conv(3, lo, lo)
    return total + conv(1, widths[0], n_classes)


def test_paper_net_572_gives_388():
    model = UNet().eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)


def test_paper_net_has_23_conv_layers_and_closed_form_parameters():
    model = UNet()
    assert count_conv_layers(model) == 23
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == paper_parameter_count() == 31_030_658


@pytest.mark.parametrize("c_in,n_classes,base,depth", [(3, 5, 16, 3), (2, 2, 8, 2)])
def test_parameter_count_other_widths(c_in, n_classes, base, depth):
    model = UNet(in_channels=c_in, num_classes=n_classes, base_channels=base, depth=depth)
    assert sum(p.numel() for p in model.parameters()) == paper_parameter_count(c_in, n_classes, base, depth)


def test_init_std_is_sqrt_2_over_fan_in():
    torch.manual_seed(1)
    model = UNet()
    checked = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.ConvTranspose2d):
            fan_in = module.in_channels  # stride 2, kernel 2: one input pixel per output pixel
        else:
            continue
        w = module.weight.detach().double().flatten()
        expected = math.sqrt(2.0 / fan_in)
        # the sample std of n Gaussian draws has relative standard error ~ 1/sqrt(2n): allow 5 of them
        tolerance = 5.0 / math.sqrt(2 * w.numel())
        assert abs(w.std().item() / expected - 1.0) < tolerance, module
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(w.numel())
        assert torch.all(module.bias == 0)
        checked += 1
    assert checked == 23


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = UNet(depth=1, base_channels=4, dropout=0.5)
    x = torch.rand(1, 1, 44, 44)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_shape_helpers_paper_numbers():
    cfg = UNetConfig()
    assert cfg.halo == 92
    assert cfg.output_size(572) == 388
    assert cfg.input_size_for(388) == 572
    assert cfg.input_size_for(512) == 700 and cfg.output_size(700) == 516
    assert cfg.input_size_for(1) == 188 and cfg.output_size(188) == 4
    valid = [n for n in range(1, 800) if cfg.is_valid_input_size(n)]
    # the valid sizes are 188, 204, ... in steps of 2**depth
    assert valid == list(range(188, 800, 16))


def test_invalid_input_size_names_nearest_valid_sizes():
    cfg = UNetConfig()
    with pytest.raises(ValueError, match=r"570 .* 556 or 572"):
        cfg.check_input_size(570)
    with pytest.raises(ValueError, match="570"):
        UNet()(torch.zeros(1, 1, 570, 572))


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_shape_arithmetic_matches_forward(depth):
    cfg = UNetConfig(depth=depth, base_channels=2, dropout=0.0)
    model = UNet(**cfg.to_dict()).eval()
    size = cfg.input_size_for(5)
    with torch.no_grad():
        out = model(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == cfg.output_size(size) == size - 2 * cfg.halo


def test_same_padding_keeps_size_and_requires_multiple_of_stride():
    model = UNet(depth=3, base_channels=4, padding="same").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 48, 40)).shape == (2, 2, 48, 40)
    with pytest.raises(ValueError, match="44"):
        model(torch.zeros(1, 1, 44, 48))


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_norm_options(norm):
    model = UNet(depth=2, base_channels=8, norm=norm, in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 60, 60))
    assert out.shape == (1, 4, 20, 20)


def test_3d_unet_same_code_path():
    model = UNet(dims=3, depth=2, base_channels=2).eval()
    size = model.input_size_for(4)
    with torch.no_grad():
        out = model(torch.rand(1, 1, size, size, size))
    assert out.shape == (1, 2, 4, 4, 4)


def test_wrong_channel_count_is_clear():
    with pytest.raises(ValueError, match=r"\(N, 3, S, S\)"):
        UNet(in_channels=3)(torch.zeros(1, 1, 572, 572))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"depth": -1}, "depth"), ({"padding": "full"}, "padding"), ({"num_classes": 1}, "num_classes"),
     ({"dropout": 1.0}, "dropout"), ({"norm": "layer"}, "norm"), ({"dims": 4}, "dims")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_save_load_round_trip_exact(tmp_path):
    torch.manual_seed(3)
    info = ModelInfo(normalization=(2.0, 99.0), class_names=("bg", "nucleus", "edge"), provenance={"data": "x"},
                     background="dark")  # fmt: skip
    model = UNet(depth=2, base_channels=4, num_classes=3, norm="batch", info=info)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.safetensors"]
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config and loaded.info == info
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.rand(1, 1, 60, 60)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not a biounet model"):
        load_model(tmp_path)
    UNet(depth=1, base_channels=2).save(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "m")
    UNet(depth=1, base_channels=4).save(tmp_path / "m")
    UNet(depth=1, base_channels=2).save(tmp_path / "other")
    (tmp_path / "other" / "weights.safetensors").replace(tmp_path / "m" / "weights.safetensors")
    with pytest.raises(ValueError, match="folder mixes two saves"):  # config.json records the weights' hash
        load_model(tmp_path / "m")
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    del document["weights_sha256"]  # as in models saved before the hash was recorded
    (tmp_path / "m" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="weights do not match"):
        load_model(tmp_path / "m")


def _saved_config(tmp_path: Path) -> tuple[Path, dict]:
    folder = UNet(depth=1, base_channels=2).save(tmp_path / "m")
    return folder, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(("change", "message"), [
    ({"postprocess": {"bogus": 1}}, "postprocess: unknown post-processing option.*'bogus'"),
    ({"postprocess": {"threshold": "high"}}, "postprocess: post-processing option threshold must be a number"),
    ({"postprocess": {"threshold": 1.5}}, r"postprocess: threshold must be in \[0, 1\)"),
    ({"postprocess": {"split": "watershed"}}, "split must be one of 'none', 'distance', 'probability', 'border'"),
    ({"postprocess": {"min_size": True}}, "min_size must be an integer, got True"),
    ({"postprocess": []}, "postprocess must be a JSON object"),
    ({"normalization": [5]}, r"normalization must be null or \[low, high\] percentiles, got \[5\]"),
    ({"normalization": [99.8, 1.0]}, "0 <= low < high <= 100, got"),
    ({"normalization": ["NaN", 1.0]}, "normalization must be null or"),
    ({"class_names": ["background"]}, "1 class_names for num_classes=2"),
    ({"class_names": "cells"}, "class_names must be a JSON array"),
    ({"color": "sepia"}, "color must be one of keep, luminance"),
    ({"background": "light"}, "background must be one of as-is, dark, inverted, got 'light'"),
    ({"background": 1}, "background must be a JSON string, got 1"),
    ({"format_version": 99}, "format_version 99 is not one this biounet reads"),
    ({"format_version": None}, "format_version None"),
    ({"architecture": {"base_channels": 1000000}}, r"base_channels must be an integer in 1\.\.4096"),
    ({"architecture": {"base_channels": 512, "depth": 4}}, r"8192 channels at the bottom, over the limit of 4096"),
    ({"architecture": {"depth": "4"}}, "depth must be an integer in 0..8, got '4'"),
    ({"architecture": {"dims": 2.0}}, "dims must be 2 or 3, got 2.0"),
    ({"architecture": {"dropout": "0.1"}}, "dropout must be in"),
    ({"architecture": {"bogus": 1}}, "unknown U-Net config fields: bogus"),
    ({"architecture": []}, "architecture must be a JSON object"),
])  # fmt: skip
def test_model_config_is_validated_before_the_network_is_built(tmp_path, change, message):
    folder, document = _saved_config(tmp_path)
    for key, value in change.items():
        if key == "architecture" and isinstance(value, dict):
            document["architecture"] = {**document["architecture"], **value}
        else:
            document[key] = value
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message) as caught:
        load_model(folder)
    assert str(caught.value).startswith(f"{folder / 'config.json'}: invalid model config: ")


def test_a_config_that_is_not_an_object_or_not_text_is_one_line(tmp_path):
    folder, _ = _saved_config(tmp_path)
    for content in (b"[1, 2]", b"\xff\xfe\x00garbage", b""):
        (folder / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match="config.json: invalid model config"):
            load_model(folder)


def test_weights_of_the_wrong_kind_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, document = _saved_config(tmp_path)
    state = load_file(str(folder / "weights.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].to(torch.int32)
    save_file(state, str(folder / "weights.safetensors"))
    del document["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=f"weights.safetensors: tensor {name} is torch.int32, the model needs torch.float32"):
        load_model(folder)


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    model = UNet(depth=2, base_channels=2)
    files = {(model.save(tmp_path / f"m{i}") / "weights.safetensors").read_bytes() for i in range(12)}
    assert len(files) == 1  # with two metadata entries in a hash map, 12 equal files would be a 1 in 2048 chance


def test_save_writes_the_model_folder_as_one_rename(tmp_path, monkeypatch):
    UNet(depth=1, base_channels=2).save(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    real_rename = Path.rename
    seen = []

    def crash_at_the_swap(self, target):  # both new files are complete when the folders swap
        seen.append(sorted(p.name for p in self.iterdir()) if self.is_dir() else None)
        if self.name == "m":
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_at_the_swap)
    with pytest.raises(OSError, match="disk gone"):
        UNet(depth=1, base_channels=4).save(tmp_path / "m")
    monkeypatch.undo()
    assert seen == [["config.json", "weights.safetensors"]]  # the old folder, about to be moved aside
    # the old model is whole, nothing of the new one is mixed in, no temporary folder is left
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_model(tmp_path / "m").config.base_channels == 2
    UNet(depth=1, base_channels=4).save(tmp_path / "m")
    assert load_model(tmp_path / "m").config.base_channels == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_into_a_folder_with_other_files_keeps_them(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    UNet(depth=1, base_channels=2).save(tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert load_model(tmp_path / "m").config.base_channels == 2
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        UNet(depth=1, base_channels=2).save(tmp_path / "f")


def test_loading_never_unpickles(tmp_path):
    UNet(depth=1, base_channels=2).save(tmp_path / "m")
    data = (tmp_path / "m" / "weights.safetensors").read_bytes()
    assert b"\x80\x04" not in data[:16]  # not a pickle stream
    header_len = int.from_bytes(data[:8], "little")
    assert data[8 : 8 + header_len].lstrip().startswith(b"{")  # safetensors: JSON header
    assert np.frombuffer(data[:8], "<u8")[0] == header_len


def test_public_api_names_resolve_and_do_not_shadow_modules():
    import importlib

    import biounet

    for name in biounet.__all__:
        assert getattr(biounet, name) is not None, name
        assert importlib.util.find_spec(f"biounet.{name}") is None, f"{name} is also a submodule"


def test_broken_weight_files_are_one_clear_error(tmp_path):
    """Issue 13, findings 3 and 5: a NaN weight, a truncated or foreign weights file."""
    import torch

    from biounet import UNet, load_model

    model = UNet(depth=2, base_channels=4)
    first = next(n for n, p in model.named_parameters())
    with torch.no_grad():
        dict(model.named_parameters())[first].view(-1)[0] = float("nan")
    model.save(tmp_path / "nan")
    with pytest.raises(ValueError, match=rf"weights.safetensors: weights hold NaN or infinite values \({first}"):
        load_model(tmp_path / "nan")
    UNet(depth=2, base_channels=4).save(tmp_path / "cut")
    weights = tmp_path / "cut" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="weights.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "cut")
    torch.save({"x": torch.zeros(2)}, weights)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path / "cut")


def test_devices_this_torch_cannot_use_are_one_line(tmp_path):
    from biounet.device import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        check_device("gpu")
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        load_model(UNet(depth=1, base_channels=2).save(tmp_path / "m"), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': this torch .* sees no CUDA GPU"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA GPU\\(s\\) here"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_a_folder_named_like_a_shipped_model_does_not_shadow_it(tmp_path, monkeypatch, caplog):
    (tmp_path / "nuclei").mkdir()  # e.g. the user's data folder
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="biounet.model"):
        model = load_model("nuclei")
    assert model.info.color == "luminance" and "loading the shipped model 'nuclei'" in caplog.text
    UNet(depth=1, base_channels=2).save(tmp_path / "nuclei")  # a real model folder of that name wins
    assert load_model("nuclei").config.base_channels == 2
