"""The U-Net of Ronneberger, Fischer & Brox (2015), exactly, with options beside it.

By default :class:`UNet` is the paper's network: four 2x2 max-poolings, 64-128-256-512-1024
channels, two unpadded 3x3 convolutions + ReLU per level, 2x2 up-convolutions that halve the
channels, concatenation with the centre-cropped skip feature map, a final 1x1 convolution:
23 convolutional layers, a 572x572 input gives a 388x388 output. Dropout sits at the end of
the contracting path. Options: ``padding="same"``, batch/instance/group normalisation, any
depth and width, ``dims=3`` (a 3D U-Net on the same code path), any number of input channels
and classes.

A saved model is a folder with ``weights.safetensors`` and ``config.json`` (architecture,
input normalisation, class names, provenance). Loading never unpickles code.

References
----------
O. Ronneberger, P. Fischer, T. Brox. U-Net: Convolutional Networks for Biomedical Image
Segmentation. MICCAI 2015, LNCS 9351, pp. 234-241. arXiv:1505.04597.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from biounet.errors import InputError

log = logging.getLogger(__name__)

Padding = Literal["valid", "same"]
Norm = Literal["batch", "instance", "group"]

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
#: Most channels any layer of a :class:`UNet` may have (4x the paper's widest layer): a bound
#: that turns a typo such as ``base_channels: 1000000`` into one line instead of an
#: allocation of terabytes.
MAX_CHANNELS = 4096


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet` (the paper's by default).

    Attributes
    ----------
    in_channels, num_classes : int
        Input channels and output classes (softmax over classes).
    depth : int
        Number of 2x2 max-poolings (4 in the paper).
    base_channels : int
        Channels of the first level; level ``l`` has ``base_channels * 2**l`` (64 in the paper).
    padding : {"valid", "same"}
        ``"valid"``: unpadded convolutions as in the paper (output smaller than input);
        ``"same"``: zero-padded convolutions (output size = input size).
    norm : {None, "batch", "instance", "group"}
        Normalisation after each 3x3 convolution, before the ReLU (None in the paper).
    dropout : float
        Dropout probability at the end of the contracting path (0.5 in the paper).
    dims : {2, 3}
        2D or 3D convolutions.
    """

    in_channels: int = 1
    num_classes: int = 2
    depth: int = 4
    base_channels: int = 64
    padding: Padding = "valid"
    norm: Norm | None = None
    dropout: float = 0.5
    dims: Literal[2, 3] = 2

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHANNELS:
                raise InputError(f"UNetConfig.{name} must be an integer in 1..{MAX_CHANNELS}, got {value!r}")
        if self.num_classes < 2:
            raise InputError(f"UNetConfig.num_classes must be >= 2 (softmax over classes), got {self.num_classes}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 0 <= self.depth <= 8:
            raise InputError(f"UNetConfig.depth must be an integer in 0..8, got {self.depth!r}")
        if self.base_channels * 2**self.depth > MAX_CHANNELS:
            raise InputError(f"UNetConfig: base_channels * 2**depth = {self.base_channels * 2**self.depth} channels at "
                             f"the bottom, over the limit of {MAX_CHANNELS} (the paper's net has 1024)")  # fmt: skip
        if self.padding not in ("valid", "same"):
            raise InputError(f"UNetConfig.padding must be 'valid' or 'same', got {self.padding!r}")
        if self.norm not in (None, "batch", "instance", "group"):
            raise InputError(f"UNetConfig.norm must be None, 'batch', 'instance' or 'group', got {self.norm!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.dims, int) or isinstance(self.dims, bool) or self.dims not in (2, 3):
            raise InputError(f"UNetConfig.dims must be 2 or 3, got {self.dims!r}")

    # ---- shape arithmetic (per spatial axis) --------------------------------------------
    @property
    def halo(self) -> int:
        """Context in pixels per side that one output pixel needs: ``6 * 2**depth - 4``.

        For valid padding this is exactly (input size - output size) / 2: 92 px for the paper
        net. For same padding it is the half-width of the receptive field, the overlap that
        tiles need so that every kept pixel has its full context.
        """
        return 6 * 2**self.depth - 4

    @property
    def stride(self) -> int:
        """Translation step (``2**depth``) under which the network is exactly equivariant."""
        return 2**self.depth

    def output_size(self, input_size: int) -> int:
        """Output size for a valid ``input_size`` (raises :class:`ValueError` otherwise)."""
        self.check_input_size(input_size)
        return input_size if self.padding == "same" else input_size - 2 * self.halo

    def check_input_size(self, input_size: int) -> None:
        """Raise a :class:`ValueError` naming the nearest valid sizes if ``input_size`` is invalid."""
        if not self.is_valid_input_size(input_size):
            lower = self.valid_input_at_most(input_size)
            upper = self.valid_input_size(input_size)
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise InputError(
                f"input size {input_size} is not valid for this U-Net ({self.padding} padding, depth {self.depth}): "
                f"feature maps would be odd before a pooling or empty; nearest valid sizes: {nearest}"
            )

    def is_valid_input_size(self, input_size: int) -> bool:
        """Whether every feature map is even before each pooling and the output is non-empty."""
        if input_size < 1:
            return False
        if self.padding == "same":
            return input_size % self.stride == 0
        size = input_size
        for _ in range(self.depth):
            size -= 4
            if size < 2 or size % 2:
                return False
            size //= 2
        size -= 4
        if size < 1:
            return False
        for _ in range(self.depth):
            size = 2 * size - 4
        return size >= 1

    def valid_input_size(self, at_least: int) -> int:
        """The smallest valid input size that is >= ``at_least``."""
        # Valid sizes form an arithmetic progression with step 2**depth: the search is short.
        size = max(int(at_least), 1)
        while not self.is_valid_input_size(size):
            size += 1
        return size

    def valid_input_at_most(self, at_most: int) -> int | None:
        size = int(at_most)
        while size >= 1 and not self.is_valid_input_size(size):
            size -= 1
        return size if size >= 1 else None

    def input_size_for(self, output_size: int) -> int:
        """The smallest valid input size whose (cropped) output covers ``output_size`` pixels.

        For valid padding the output of that input is >= ``output_size`` (388 -> 572); for same
        padding the input is the smallest multiple of ``2**depth`` that is >= ``output_size``.
        """
        if output_size < 1:
            raise InputError(f"output size must be >= 1, got {output_size}")
        extra = 0 if self.padding == "same" else 2 * self.halo
        return self.valid_input_size(output_size + extra)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown U-Net config fields: {', '.join(sorted(unknown))}")
        return cls(**data)


#: The colour conversions a model can ask for (:attr:`ModelInfo.color`).
COLOR_CONVERSIONS = ("keep", "luminance")


@dataclass(frozen=True)
class ModelInfo:
    """What travels with the weights besides the architecture.

    Attributes
    ----------
    normalization : (float, float) or None
        Percentiles (low, high) used to scale each input image (see
        :func:`biounet.io.normalize_percentile`); None if inputs are used as they are.
    class_names : tuple of str
        One name per output class (``("background", "cell")`` by default).
    postprocess : dict
        Keyword arguments of :func:`biounet.postprocess.probabilities_to_labels` that turn
        this model's probabilities into instances (e.g. ``{"split": "distance"}``).
    provenance : dict
        Free-form facts: data set, recipe, scores, biounet version, date.
    color : {"keep", "luminance"}
        What is done to a colour image before normalisation: ``"keep"`` feeds its channels
        as they are (the network's ``in_channels`` must match), ``"luminance"`` turns an RGB
        image into its luminance (:func:`biounet.io.to_luminance`), the conversion the model
        was trained with; gray images pass unchanged.
    background : {"as-is", "dark", "inverted"}
        What normalisation does to an image's polarity (``background`` of
        :func:`biounet.io.normalize_percentile`): ``"dark"`` inverts images with a bright
        background (dark objects on a bright one, as in brightfield and H&E), as the model
        was trained; ``"inverted"`` inverts every image.
    """

    normalization: tuple[float, float] | None = (1.0, 99.8)
    class_names: tuple[str, ...] = ("background", "cell")
    postprocess: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    color: str = "keep"
    background: str = "as-is"

    def __post_init__(self) -> None:
        from biounet.io._intensity import check_background
        from biounet.postprocess import check_postprocess

        check_background(self.background)
        if self.color not in COLOR_CONVERSIONS:
            raise InputError(f"color must be one of {', '.join(COLOR_CONVERSIONS)}, got {self.color!r}")
        if self.normalization is not None:
            if len(self.normalization) != 2 or not all(_is_number(v) for v in self.normalization):
                raise InputError(f"normalization must be None or (low, high) percentiles, got {self.normalization!r}")
            low, high = self.normalization
            if not 0.0 <= low < high <= 100.0:  # NaN fails too
                raise InputError(f"normalization must be percentiles [low, high] with 0 <= low < high <= 100, got "
                                 f"{list(self.normalization)}")  # fmt: skip
        if not self.class_names or not all(isinstance(n, str) for n in self.class_names):
            raise InputError(f"class_names must be a list of strings, got {list(self.class_names)!r}")
        try:
            check_postprocess(self.postprocess)
        except ValueError as exc:
            raise InputError(f"postprocess: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "normalization": list(self.normalization) if self.normalization else None,
            "class_names": list(self.class_names),
            "postprocess": dict(self.postprocess),
            "color": self.color,
            "background": self.background,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        """From the ``config.json`` document; every field's type is checked (one ``ValueError``)."""
        norm = data.get("normalization")
        if norm is not None and not (isinstance(norm, list) and len(norm) == 2
                                     and all(_is_number(v) for v in norm)):  # fmt: skip
            raise InputError(f"normalization must be null or [low, high] percentiles, got {norm!r}")
        for name, kind in (("class_names", list), ("postprocess", dict), ("provenance", dict), ("color", str),
                           ("background", str)):  # fmt: skip
            if name in data and not isinstance(data[name], kind):
                raise InputError(f"{name} must be a JSON {'array' if kind is list else 'object' if kind is dict else 'string'}, "
                                 f"got {data[name]!r}")  # fmt: skip
        return cls(
            normalization=(float(norm[0]), float(norm[1])) if norm else None,
            class_names=tuple(data.get("class_names", ("background", "cell"))),
            postprocess=dict(data.get("postprocess", {})),
            provenance=dict(data.get("provenance", {})),
            color=data.get("color", "keep"),
            background=data.get("background", "as-is"),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm_layer(kind: Norm | None, channels: int, dims: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by optional normalisation and a ReLU."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig) -> None:
        conv = _conv(cfg.dims)
        pad = 1 if cfg.padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers += [conv(c, c_out, 3, padding=pad), _norm_layer(cfg.norm, c_out, cfg.dims), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def center_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (N, C, *spatial) to ``shape`` around their centre."""
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], shape, strict=True):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class UNet(nn.Module):
    """U-Net for 2D (or 3D) segmentation; the paper's network by default.

    Parameters
    ----------
    in_channels, num_classes, depth, base_channels, padding, norm, dropout, dims
        See :class:`UNetConfig`.
    config : UNetConfig
        Instead of those: the whole architecture as the only positional argument,
        ``UNet(UNetConfig(depth=2))`` (the same network as ``UNet(depth=2)``).
    info : ModelInfo, optional
        Normalisation, class names and provenance stored with the weights.

    Notes
    -----
    Initialisation follows the paper: every weight is drawn from a Gaussian with standard
    deviation ``sqrt(2 / N)``, N the number of incoming nodes of one neuron (He et al. 2015).
    For a k x k convolution over ``C_in`` channels N = k*k*C_in (3x3 over 64 channels: 576).
    For the 2x2 stride-2 up-convolution every output pixel receives exactly one input pixel
    per channel, so N = C_in. Biases start at 0.

    The forward pass returns logits of shape (N, num_classes, *out_spatial); apply a softmax
    over axis 1 for probabilities (:func:`biounet.predict` does).
    """

    @overload
    def __init__(self, config: UNetConfig, /, *, info: ModelInfo | None = None) -> None: ...

    @overload
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 4,
        base_channels: int = 64,
        padding: Padding = "valid",
        norm: Norm | None = None,
        dropout: float = 0.5,
        dims: Literal[2, 3] = 2,
        *,
        info: ModelInfo | None = None,
    ) -> None: ...

    def __init__(self, *args: Any, info: ModelInfo | None = None, **kwargs: Any) -> None:
        super().__init__()
        if args and isinstance(args[0], UNetConfig):
            if len(args) > 1 or kwargs:
                extra = [f.name for f in dataclasses.fields(UNetConfig)][1 : len(args)] + list(kwargs)
                raise InputError(f"UNet takes a UNetConfig or the architecture's arguments, not both: got a "
                                 f"UNetConfig and {', '.join(extra)}")  # fmt: skip
            cfg = args[0]
        else:
            cfg = UNetConfig(*args, **kwargs)
        in_channels, num_classes, depth, base_channels = cfg.in_channels, cfg.num_classes, cfg.depth, cfg.base_channels
        dropout, dims = cfg.dropout, cfg.dims
        self.config = cfg
        self.info = info if info is not None else ModelInfo()
        if len(self.info.class_names) != num_classes:
            self.info = dataclasses.replace(
                self.info, class_names=tuple(f"class_{i}" for i in range(num_classes))
            )
        widths = [base_channels * 2**level for level in range(depth + 1)]
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.down = nn.ModuleList()
        c_prev = in_channels
        for width in widths[:-1]:
            self.down.append(DoubleConv(c_prev, width, cfg))
            c_prev = width
        self.pool = pool(2, 2)
        self.bottom = DoubleConv(c_prev, widths[-1], cfg)
        self.dropout = nn.Dropout(dropout) if dims == 2 else nn.Dropout3d(dropout)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(up(widths[level + 1], widths[level], kernel_size=2, stride=2))
            self.up_conv.append(DoubleConv(2 * widths[level], widths[level], cfg))
        self.head = _conv(dims)(widths[0], num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw all weights from N(0, sqrt(2/N)) as in the paper (see the class notes)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = module.in_channels  # one input pixel per output pixel (stride == kernel)
            else:
                continue
            with torch.no_grad():
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()

    # ---- conveniences delegating to the config --------------------------------------------
    @property
    def halo(self) -> int:
        """Context per side in pixels (92 for the paper net); see :attr:`UNetConfig.halo`."""
        return self.config.halo

    def output_size(self, input_size: int) -> int:
        return self.config.output_size(input_size)

    def input_size_for(self, output_size: int) -> int:
        return self.config.input_size_for(output_size)

    def valid_input_size(self, at_least: int) -> int:
        return self.config.valid_input_size(at_least)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != cfg.dims + 2 or x.shape[1] != cfg.in_channels:
            raise InputError(
                f"UNet expects input of shape (N, {cfg.in_channels}, {', '.join('S' * cfg.dims)}), got {tuple(x.shape)}"
            )
        for size in x.shape[2:]:
            cfg.check_input_size(int(size))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottom(x))
        for up, block, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = up(x)
            x = block(torch.cat([center_crop(skip, tuple(x.shape[2:])), x], dim=1))
        return self.head(x)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save to folder ``path``: ``weights.safetensors`` + ``config.json``.

        A new folder, or one that holds only those two files, is written as one rename
        (:func:`biounet.io.atomic_folder`), so a crash leaves the old model or the new one.
        A folder with other files in it (or a symbolic link) gets each file atomically, weights first; the
        config records the weights' SHA-256, so :func:`load_model` refuses a folder whose
        two files come from different saves.
        """
        from safetensors.torch import save_file

        from biounet.io._files import atomic_folder, atomic_write

        folder = Path(path)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: cannot create model folder: {exc.strerror or exc}") from exc
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; cannot save a model there")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

        def write(weights: Path, config: Path) -> None:
            with atomic_write(weights) as tmp:
                # one metadata entry: safetensors keeps them in a hash map, so two would be written in
                # either order and the same weights would give files of different bytes and SHA-256
                save_file(state, str(tmp), metadata={"format": "biounet"})
            document = {"format_version": FORMAT_VERSION, "architecture": self.config.to_dict(),
                        "weights_sha256": _sha256(weights), **self.info.to_dict()}  # fmt: skip
            with atomic_write(config) as tmp:
                tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

        if not folder.is_symlink() and (not folder.exists()
                                        or {p.name for p in folder.iterdir()} <= {WEIGHTS_FILE, CONFIG_FILE}):
            with atomic_folder(folder) as tmp_folder:
                write(tmp_folder / WEIGHTS_FILE, tmp_folder / CONFIG_FILE)
        else:
            write(folder / WEIGHTS_FILE, folder / CONFIG_FILE)
        return folder


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> UNet:
    """Load a model saved by :meth:`UNet.save`, or a shipped model by name.

    Parameters
    ----------
    path : str or Path
        A model folder (with ``config.json`` and ``weights.safetensors``), or the name of a
        model shipped inside the package (see :func:`available_models`).
    device : str or torch.device
        Where to put the weights.

    Returns
    -------
    UNet
        In eval mode.
    """
    from safetensors.torch import load_file

    from biounet.device import check_device

    device = check_device(device)
    folder = Path(path)
    if str(path) in available_models() and not (folder / CONFIG_FILE).is_file():
        if folder.exists():  # e.g. a data folder named like a shipped model in the working directory
            log.info("%s is not a model folder; loading the shipped model %r", folder, str(path))
        folder = _models_dir() / str(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        shipped = ", ".join(available_models()) or "none"
        raise InputError(
            f"{folder}: not a biounet model (needs {CONFIG_FILE} and {WEIGHTS_FILE}); shipped models: {shipped}"
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise InputError(f"expected a JSON object, got {type(document).__name__}")
        version = document.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise InputError(f"format_version {version!r} is not one this biounet reads (1..{FORMAT_VERSION}); a "
                             "newer biounet may read it")  # fmt: skip
        if not isinstance(document.get("architecture"), dict):
            raise InputError("architecture must be a JSON object of U-Net config fields")
        config = UNetConfig.from_dict(document["architecture"])
        info = ModelInfo.from_dict(document)
        if len(info.class_names) != config.num_classes:
            raise InputError(f"{len(info.class_names)} class_names for num_classes={config.num_classes}")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{config_path}: invalid model config: {exc}") from exc
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated or foreign files
        raise InputError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    recorded = document.get("weights_sha256")  # absent in models saved before it was recorded
    if recorded is not None and recorded != _sha256(weights_path):
        raise InputError(f"{weights_path}: not the weights {config_path} was saved with (their SHA-256 differs): "
                         "the file was replaced or changed after saving, or the folder mixes two saves")  # fmt: skip
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise InputError(f"{weights_path}: weights hold NaN or infinite values ({', '.join(broken[:3])}): the model "
                         "is broken; retrain it or use an earlier one")  # fmt: skip
    model = UNet(**config.to_dict(), info=info)
    expected = model.state_dict()
    kinds = [name for name, tensor in state.items()
             if name in expected and tensor.is_floating_point() != expected[name].is_floating_point()]  # fmt: skip
    if kinds:
        raise InputError(f"{weights_path}: tensor {kinds[0]} is {state[kinds[0]].dtype}, the model needs "
                         f"{expected[kinds[0]].dtype}")  # fmt: skip
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    for problem, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if names:
            first = names[0] + (f" {tuple(state[names[0]].shape)}, the config needs {tuple(expected[names[0]].shape)}"
                                if problem == "of another shape" else "")  # fmt: skip
            raise InputError(f"{weights_path}: weights do not match {config_path}: {len(names)} tensor(s) {problem} "
                             f"(first: {first})")  # fmt: skip
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{weights_path}: weights do not match {config_path}: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _models_dir() -> Path:
    return Path(__file__).parent / "models"


def available_models() -> list[str]:
    """Names of the models shipped inside the package (loadable by :func:`load_model`)."""
    root = _models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def count_conv_layers(model: nn.Module) -> int:
    """Number of convolution and up-convolution layers (23 for the paper net)."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return sum(isinstance(m, kinds) for m in model.modules())
