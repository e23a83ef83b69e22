"""The training recipe: one frozen, type-checked configuration, saved with every run."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from biounet.data._samples import Pick
from biounet.errors import InputError
from biounet.io._intensity import Background
from biounet.model import MAX_CHANNELS, ModelInfo, UNet, UNetConfig

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "poly", "cosine"]
Precision = Literal["auto", "float32", "bfloat16"]
#: Validation scores a run can keep its ``best`` model by (:func:`evaluate_samples`).
BestBy = Literal["v_rand", "ap", "iou"]
#: How colour images became the training input (:func:`biounet.io.to_luminance`).
Color = Literal["keep", "luminance"]
#: Where the class weights :math:`w_c` of the loss (eq. 2) take the class frequencies from
#: (:func:`biounet.training.loss_weights`).
ClassBalance = Literal["image", "dataset", "none"]


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
    IoU 0.5, for instance models) or ``"iou"`` (foreground IoU); ``best_margin`` lets a later
    model take over ``best`` when its score is at most that far below the highest so far (0:
    only a higher score), so that the noise of a few validation images does not keep an early
    model over a later one of the same score. ``color = "luminance"``
    trains on the luminance of colour images and makes the model convert colour inputs the
    same way at prediction. ``precise_bn = N`` recomputes the BatchNorm layers' running
    statistics as a plain average over ``N`` batches of training tiles (not augmented) before
    every validation and before the last model is saved
    (:func:`biounet.training.recompute_batch_norm`; 0: the moving averages of training as
    they are). ``background = "dark"`` inverts the images with a bright background after
    normalisation (:func:`biounet.io.has_bright_background`: brightfield and H&E beside
    fluorescence), for training and, stored with the model, at prediction.
    ``target = "border"`` trains 3 classes (background, cell interior, cell border:
    :meth:`biounet.data.Sample.class_target`) instead of the paper's 2, and goes with
    ``split = "border"``: objects grow from the interiors. ``pick`` chooses the image of each
    training tile: every image equally often (``"images"``), in proportion to its pixels or to
    its labelled objects (:class:`biounet.data.TileDataset`). ``tune_postprocess = true``
    tunes the post-processing's threshold and seed setting of the ``best`` and ``last``
    models on the validation images at the end (:func:`biounet.training.tune_postprocess`);
    the models store the values chosen. ``class_balance`` is where the class weights
    :math:`w_c` of eq. 2 take the class frequencies from: each image's own (``"image"``, as
    the paper's per-image weight maps), the pooled pixels of all training images
    (``"dataset"``), or no balancing, :math:`w_c = 1` (``"none"``); see
    :func:`biounet.training.loss_weights`.

    The fields are flat (``config.lr``) and also grouped into TOML tables, :attr:`SECTIONS`
    (``[optimization] lr``): :meth:`from_toml` reads either form, :meth:`to_toml` writes the
    tables, and :meth:`updated` takes ``lr=0.001`` or ``optimization.lr=0.001``. The flat
    names are what ``train_config.json`` records.
    """

    #: The TOML tables of a recipe and the fields in each, in the order :meth:`to_toml` writes
    #: them; every field is in exactly one table.
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "network": ("depth", "base_channels", "padding", "norm", "dropout"),
        "data": ("tile", "batch_size", "normalization", "color", "background", "target", "pick"),
        "augmentation": ("augment", "elastic_std", "elastic_grid"),
        "loss": ("w0", "sigma", "class_balance", "dice"),
        "optimization": ("optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup", "steps", "minutes"),
        "postprocess": ("split", "min_size", "tune_postprocess"),
        "run": ("val_every", "precise_bn", "checkpoint_every", "best_by", "best_margin", "seed", "deterministic",
                "precision", "compile", "channels_last"),
    }  # fmt: skip

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
    class_balance: ClassBalance = "image"
    augment: bool = True
    elastic_std: float = 10.0
    elastic_grid: int = 3
    target: Literal["binary", "border"] = "binary"
    pick: Pick = "images"
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
    tune_postprocess: bool = False
    # bookkeeping
    val_every: int = 500
    precise_bn: int = 0
    checkpoint_every: int = 100
    seed: int = 0
    deterministic: bool = False
    precision: Precision = "auto"
    compile: bool = False
    channels_last: bool = True
    minutes: float | None = None
    best_by: BestBy = "ap"
    best_margin: float = 0.0
    color: Color = "keep"
    background: Background = "as-is"

    def __post_init__(self) -> None:
        if isinstance(self.normalization, list | tuple):  # one form, however it was given
            object.__setattr__(self, "normalization", tuple(float(v) for v in self.normalization))
        for field in dataclasses.fields(self):
            problem = _value_problem(field.name, getattr(self, field.name))
            if problem:
                raise InputError(f"TrainConfig.{field.name} {problem}")
        if self.base_channels * 2**self.depth > MAX_CHANNELS:
            raise InputError(f"TrainConfig: base_channels * 2**depth = {self.base_channels * 2**self.depth} channels "
                             f"at the bottom of the network, over the limit of {MAX_CHANNELS} (the paper's has 1024)")  # fmt: skip
        if (self.target == "border") != (self.split == "border"):
            raise InputError(f'TrainConfig: target = "border" and split = "border" go together (the interiors of the '
                             f"3-class target seed the objects); got target = {self.target!r}, split = {self.split!r}")

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
        """Apply ``field=value`` strings of TOML values: ``lr=0.001``, ``norm="batch"``, ``augment=false``.

        A field may be named by its table too (``optimization.lr=0.001``, :attr:`SECTIONS`); a
        bare word is a string, and ``none`` is no value where the field may have none.
        """
        values = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise InputError(f"override {item!r} is not field=value", option="set")
            table, dot, name = key.strip().rpartition(".")
            if dot:
                problem = _table_problem(table, name)
                if problem:
                    raise InputError(f"override {item!r}: {problem}", option="set")
            try:
                value = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw.strip()  # a bare word: a string
            values[name] = _none_for(name, value)
        return TrainConfig.from_dict({**dataclasses.asdict(self), **values})

    @classmethod
    def from_toml(cls, path: Path, base: TrainConfig | None = None) -> TrainConfig:
        """Read a TOML recipe: the tables of :attr:`SECTIONS`, flat fields, or both.

        ``preset = "fast"`` at the top level picks the recipe the file's values are laid over
        (else ``base``, else the defaults). TOML has no null: the string ``"none"`` stands for
        no value where a field may have none (``norm = "none"``). Everything is checked here,
        before any data is read: an unknown table or key, a key in the wrong table, a field
        given twice, or a value of the wrong type or range is one :class:`InputError` naming
        the file, the table and the key and what was expected.
        """
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"{path}: cannot read training config: {exc}") from exc
        preset = data.pop("preset", None)
        if preset is not None and not isinstance(preset, str):
            raise InputError(f"{path}: preset must be a string ('paper' or 'fast'), got {preset!r}")
        values = _file_values(data, str(path))
        try:
            start = cls.preset(preset) if preset is not None else (base or cls())  # type: ignore[arg-type]
            return cls.from_dict({**dataclasses.asdict(start), **values})
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: {exc}") from exc

    def to_toml(self) -> str:
        """This recipe as TOML, one table per entry of :attr:`SECTIONS` and every field written.

        :meth:`from_toml` reads it back to an equal recipe; no value (None) is written as
        ``"none"``. Every run folder holds one, ``train_config.toml``, to copy and edit.
        """
        lines = ["# A biounet training recipe: biounet train DATA -o RUN --config THIS_FILE (docs/training.md).",
                 '# TOML has no null: "none" stands for no value.']  # fmt: skip
        for table, names in self.SECTIONS.items():
            lines += ["", f"[{table}]", *(f"{name} = {_toml_value(getattr(self, name))}" for name in names)]
        return "\n".join(lines) + "\n"

    @property
    def postprocess(self) -> dict[str, Any]:
        """The post-processing stored with a new model (:func:`biounet.postprocess.probabilities_to_labels`)."""
        return {"split": self.split, "min_size": self.min_size}

    def net_config(self, in_channels: int, num_classes: int = 2) -> UNetConfig:
        """The architecture of this recipe's network (no weights are made)."""
        return UNetConfig(in_channels, num_classes, self.depth, self.base_channels, self.padding, self.norm,
                          self.dropout)  # fmt: skip

    def model(self, in_channels: int, num_classes: int, info: ModelInfo) -> UNet:
        """A new network of this recipe's architecture (:meth:`net_config`) carrying ``info``."""
        return UNet(self.net_config(in_channels, num_classes), info=info)


#: Fields that must be positive integers (``tile`` may also be ``"auto"``).
_POSITIVE = ("depth", "base_channels", "batch_size", "steps", "val_every", "checkpoint_every", "tile")
#: Fields with a fixed set of string values (the values: their ``Literal`` annotations).
_CHOICES = ("optimizer", "schedule", "split", "precision", "best_by", "color", "background", "pick", "class_balance")
#: Fields that must be finite numbers >= 0.
_AT_LEAST_ZERO = ("w0", "sigma", "elastic_std", "dice", "weight_decay", "warmup", "best_margin")
#: The deepest network (:class:`UNetConfig`: up to 8 poolings).
_MAX_DEPTH = 8


@functools.cache
def _hints() -> dict[str, Any]:
    """The annotation of each :class:`TrainConfig` field."""
    return {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}


@functools.cache
def _table_of() -> dict[str, str]:
    """The :attr:`TrainConfig.SECTIONS` table of each field."""
    return {name: table for table, names in TrainConfig.SECTIONS.items() for name in names}


def _value_problem(name: str, value: Any) -> str | None:
    """What is wrong with the value of one field on its own, or None (no type checks: :func:`_has_type`)."""
    if name in _POSITIVE and not (name == "tile" and value == "auto"):
        if not isinstance(value, int) or value < 1:
            return f"must be a positive integer, got {value!r}"
    elif name in _CHOICES:
        choices = typing.get_args(_hints()[name])
        if value not in choices:
            return f"must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got {value!r}"
    elif name in ("min_size", "precise_bn") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return f"must be an integer >= 0, got {value!r}"
    elif name == "lr" and not (isinstance(value, int | float) and value > 0):
        return f"must be > 0, got {value!r}"
    elif name == "minutes" and value is not None and not (isinstance(value, int | float) and 0 < value < math.inf):
        return f"must be a positive number of minutes, got {value!r}"
    elif name in _AT_LEAST_ZERO and not (isinstance(value, int | float) and 0 <= value < math.inf):
        return f"must be a finite number >= 0, got {value!r}"
    elif name in ("dropout", "momentum") and not (isinstance(value, int | float) and 0 <= value < 1):
        return f"must be in [0, 1), got {value!r}"
    elif name == "elastic_grid" and not (isinstance(value, int) and value >= 2):
        return f"must be an integer >= 2 (control points per axis), got {value!r}"
    elif name == "normalization" and value is not None:
        low, high = value if isinstance(value, list | tuple) and len(value) == 2 else (None, None)
        if not (isinstance(low, int | float) and isinstance(high, int | float) and 0 <= low < high <= 100):
            return f"must be percentiles [low, high] with 0 <= low < high <= 100 (or none), got {value!r}"
    if name == "depth" and isinstance(value, int) and value > _MAX_DEPTH:
        return f"must be at most {_MAX_DEPTH}, got {value!r}"
    return None


def _none_for(name: str, value: Any) -> Any:
    """None for the TOML string ``"none"`` where field ``name`` may be None; else ``value``."""
    hint = _hints().get(name)
    return None if value == "none" and hint is not None and _has_type(None, hint) else value


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.8)  # a typo, not another word
    return f" (did you mean {close[0]}?)" if close else ""


def _table_problem(table: str, name: str) -> str | None:
    """What is wrong with naming field ``name`` in ``table``, or None."""
    sections = TrainConfig.SECTIONS
    if table not in sections:
        return f"unknown table [{table}]{_did_you_mean(table, sections)}; the tables are {', '.join(sections)}"
    if name in sections[table]:
        return None
    if name in _table_of():
        return f"[{table}] has no key {name}: it belongs in [{_table_of()[name]}]"
    return f"[{table}] has no key {name}{_did_you_mean(name, sections[table])}; its keys are {', '.join(sections[table])}"


def _file_values(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of a TOML document (tables and/or flat keys), each checked on its own (see :meth:`from_toml`)."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    entries: list[tuple[str, Any, str]] = []  # (field, value, where it is in the file)
    for key, value in data.items():
        if key in TrainConfig.SECTIONS:
            if not isinstance(value, dict):
                raise InputError(f"{source}: {key} must be a table ([{key}]) of {', '.join(TrainConfig.SECTIONS[key])}, "
                                 f"got {value!r}")  # fmt: skip
            for name, item in value.items():
                problem = _table_problem(key, name)
                if problem:
                    raise InputError(f"{source}: {problem}")
                entries.append((name, item, f"[{key}] {name}"))
        elif key in _table_of():
            entries.append((key, value, key))
        elif isinstance(value, dict):
            raise InputError(f"{source}: unknown table [{key}]{_did_you_mean(key, TrainConfig.SECTIONS)}; the tables "
                             f"are {', '.join(TrainConfig.SECTIONS)}")  # fmt: skip
        else:
            raise InputError(f"{source}: unknown training option {key}{_did_you_mean(key, _table_of())}; the "
                             f"tables are {', '.join(TrainConfig.SECTIONS)}, and their keys may also stand at the top")  # fmt: skip
    for name, value, at in entries:
        if name in values:
            raise InputError(f"{source}: {name} is given twice, as {where[name]} and as {at}")
        value, hint = _none_for(name, value), _hints()[name]
        if not _has_type(value, hint):
            raise InputError(f"{source}: {at} must be {_type_name(hint)}, got {value!r}")
        problem = _value_problem(name, value)
        if problem:
            raise InputError(f"{source}: {at} {problem}")
        values[name], where[name] = value, at
    return values


def _toml_value(value: Any) -> str:
    """A TOML literal for a field's value (the types of :class:`TrainConfig` fields)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # shortest round-tripping form; TOML reads inf and nan too
    if isinstance(value, str):
        return json.dumps(value)  # the fields' strings are plain words, valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    raise TypeError(f"no TOML form for {value!r}")


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
