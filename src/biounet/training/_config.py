"""The training recipe: one frozen, type-checked configuration, saved with every run."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from biounet.errors import InputError
from biounet.model import ModelInfo, UNet, UNetConfig

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "poly", "cosine"]
Precision = Literal["auto", "float32", "bfloat16"]
#: Validation scores a run can keep its ``best`` model by (:func:`evaluate_samples`).
BestBy = Literal["v_rand", "ap", "iou"]
#: How colour images became the training input (:func:`biounet.io.to_luminance`).
Color = Literal["keep", "luminance"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as ``train_config.json`` in the run folder.

    Presets (:meth:`preset`): ``paper`` is faithful to the paper (width 64, depth 4, valid
    padding, SGD with momentum 0.99, one large tile per step: ``tile = "auto"``, the largest
    valid tile that the images and the device's memory allow, see :func:`auto_tile`; the
    paper's was 572x572; elastic deformation on a 3x3 grid with 10 px standard deviation,
    border weights w0 = 10, sigma = 5). ``tile`` is the input tile side in px (rounded up to
    a valid size) or ``"auto"``. The learning rate
    (0.01, polynomial decay with power 0.9 after a 50-step linear warm-up) is not given in
    the paper; it is nnU-Net's, which uses the same momentum. ``fast`` is a narrow network
    (width 16, depth 4, batch norm) on 380 px tiles in batches of 2, trained with AdamW,
    small enough for a 2-core CPU in minutes (chosen among five recipes trained for the same
    5 minutes on ISBI fold 0; ``docs/results.md`` has the ablations); its models split
    touching objects that still merge with a distance-transform watershed (``split =
    "distance"``, stored with the model as its post-processing).

    ``precision = "auto"`` trains in bfloat16 autocast where the device runs it natively (a
    CPU with AVX512-BF16 or AMX, a CUDA GPU of compute capability 8 or more; see
    :func:`biounet.device.resolve_precision`), else in float32; the resolved value is what the run folder
    records. ``minutes`` gives the run a time budget instead of a number of steps: after
    :data:`BUDGET_PROBE_STEPS` steps (and one timed validation) the number of steps that
    fits the budget is fixed and recorded, so the rest of the run, and a resumed run, is
    deterministic (:func:`plan_steps`). ``best_by`` is the validation score that picks the
    ``best`` model: ``"v_rand"`` (ISBI 2012, for membrane models), ``"ap"`` (object AP at
    IoU 0.5, for instance models) or ``"iou"`` (foreground IoU). ``color = "luminance"``
    trains on the luminance of colour images and makes the model convert colour inputs the
    same way at prediction. ``target = "border"`` trains 3 classes (background, cell
    interior, cell border: :meth:`biounet.data.Sample.class_target`) instead of the
    paper's 2, and goes with ``split = "border"``: objects grow from the interiors.
    """

    # network
    depth: int = 4
    base_channels: int = 64
    padding: Literal["valid", "same"] = "valid"
    norm: Literal["batch", "instance", "group"] | None = None
    dropout: float = 0.5
    # data
    tile: int | Literal["auto"] = "auto"
    batch_size: int = 1
    normalization: tuple[float, float] | None = (1.0, 99.8)
    w0: float = 10.0
    sigma: float = 5.0
    augment: bool = True
    elastic_std: float = 10.0
    elastic_grid: int = 3
    target: Literal["binary", "border"] = "binary"
    # optimisation
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 0.0
    schedule: Schedule = "poly"
    warmup: int = 50
    steps: int = 10_000
    dice: float = 0.0
    split: Literal["none", "distance", "probability", "border"] = "none"
    min_size: int = 0
    # bookkeeping
    val_every: int = 500
    checkpoint_every: int = 100
    seed: int = 0
    deterministic: bool = False
    precision: Precision = "auto"
    compile: bool = False
    channels_last: bool = True
    minutes: float | None = None
    best_by: BestBy = "ap"
    color: Color = "keep"

    def __post_init__(self) -> None:
        if isinstance(self.normalization, list | tuple):  # one form, however it was given
            object.__setattr__(self, "normalization", tuple(float(v) for v in self.normalization))
        positive = ("depth", "base_channels", "batch_size", "steps", "val_every", "checkpoint_every")
        positive += () if self.tile == "auto" else ("tile",)
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise InputError(f"TrainConfig.optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "poly", "cosine"):
            raise InputError(f"TrainConfig.schedule must be 'constant', 'poly' or 'cosine', got {self.schedule!r}")
        if self.split not in ("none", "distance", "probability", "border"):
            raise InputError(f"TrainConfig.split must be 'none', 'distance', 'probability' or 'border', got {self.split!r}")
        if (self.target == "border") != (self.split == "border"):
            raise InputError(f'TrainConfig: target = "border" and split = "border" go together (the interiors of the '
                             f"3-class target seed the objects); got target = {self.target!r}, split = {self.split!r}")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise InputError(f"TrainConfig.min_size must be an integer >= 0, got {self.min_size!r}")
        if not self.lr > 0:
            raise InputError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise InputError(f"TrainConfig.precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")
        if self.minutes is not None and not (isinstance(self.minutes, int | float) and 0 < self.minutes < math.inf):
            raise InputError(f"TrainConfig.minutes must be a positive number of minutes, got {self.minutes!r}")
        if self.best_by not in ("v_rand", "ap", "iou"):
            raise InputError(f"TrainConfig.best_by must be 'v_rand', 'ap' or 'iou', got {self.best_by!r}")
        if self.color not in ("keep", "luminance"):
            raise InputError(f"TrainConfig.color must be 'keep' or 'luminance', got {self.color!r}")

    @classmethod
    def preset(cls, name: Literal["paper", "fast"], **overrides: Any) -> TrainConfig:
        """The ``paper`` or ``fast`` recipe, with ``overrides`` applied."""
        presets: dict[str, dict[str, Any]] = {
            "paper": {},
            "fast": {
                "depth": 4, "base_channels": 16, "norm": "batch", "tile": 380, "batch_size": 2, "dropout": 0.1,
                "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup": 20,
                "steps": 600, "val_every": 100, "checkpoint_every": 50, "split": "distance",
            },
        }
        if name not in presets:
            raise InputError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. TOML or JSON); unknown keys and bad types are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(fields)}")
        values = dict(data)
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                raise InputError(f"training option {name} must be {_type_name(hints[name])}, got {value!r}")
        if values.get("normalization") is not None:
            values["normalization"] = tuple(float(v) for v in values["normalization"])
        return cls(**values)

    def updated(self, assignments: Sequence[str]) -> TrainConfig:
        """Apply ``field=value`` strings (TOML values: ``lr=0.001``, ``norm="batch"``, ``augment=false``)."""
        values = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise InputError(f"override {item!r} is not field=value", option="set")
            try:
                values[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                values[key.strip()] = raw.strip()  # a bare word: a string
        return TrainConfig.from_dict({**dataclasses.asdict(self), **values})

    @classmethod
    def from_toml(cls, path: Path, base: TrainConfig | None = None) -> TrainConfig:
        """Read a TOML file of fields (a ``preset = "fast"`` key picks the base recipe)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"{path}: cannot read training config: {exc}") from exc
        preset = data.pop("preset", None)
        start = cls.preset(preset) if preset else (base or cls())
        try:
            return cls.from_dict({**dataclasses.asdict(start), **data})
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: {exc}") from exc

    @property
    def postprocess(self) -> dict[str, Any]:
        """The post-processing stored with the model (:func:`biounet.postprocess.probabilities_to_labels`)."""
        return {"split": self.split, "min_size": self.min_size}

    def net_config(self, in_channels: int, num_classes: int = 2) -> UNetConfig:
        """The architecture of this recipe's network (no weights are made)."""
        return UNetConfig(in_channels, num_classes, self.depth, self.base_channels, self.padding, self.norm,
                          self.dropout)  # fmt: skip

    def model(self, in_channels: int, num_classes: int, info: ModelInfo) -> UNet:
        return UNet(**self.net_config(in_channels, num_classes).to_dict(), info=info)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from TOML or JSON) fits the annotation ``hint`` of a :class:`TrainConfig` field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, list | tuple) and len(value) == len(args) and all(map(_has_type, value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {type(None): "none", float: "a number", int: "an integer", bool: "true or false"}.get(hint, str(hint))
