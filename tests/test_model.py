"""The paper's architecture: shapes, layer count, parameter count, initialisation, I/O."""

from __future__ import annotations

import math

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
    info = ModelInfo(normalization=(2.0, 99.0), class_names=("bg", "nucleus", "edge"), provenance={"data": "x"})
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
    with pytest.raises(ValueError, match="weights do not match"):
        load_model(tmp_path / "m")


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
