"""Training: the paper's recipe end to end, readable top to bottom.

One step: draw random tiles with their labels and weight maps (``biounet.datasets``),
augment image, labels and weights jointly (``biounet.augment``: elastic deformation,
rotations, flips, shifts, gray values), crop the labels to the network's output, take the
weighted cross-entropy (paper, eq. 1) and an optimiser step. Every ``val_every`` steps the
model segments the validation images with the overlap-tile predictor and is scored; the
best and last models are saved in the format ``biounet predict`` reads. Checkpoints (model,
optimiser, scheduler, random states, step) are written atomically, so a killed run resumes
exactly where its last checkpoint left it.

With ``torchrun --nproc_per_node N -m biounet train ...`` each process trains on its own
random tiles under DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from biounet.io import atomic_write, ensure_writable_folder
from biounet.losses import soft_dice_loss, weighted_cross_entropy
from biounet.model import ModelInfo, UNet, UNetConfig
from biounet.tiling import check_device

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "poly", "cosine"]
Precision = Literal["auto", "float32", "bfloat16"]
#: Validation scores a run can keep its ``best`` model by (:func:`evaluate_samples`).
BestBy = Literal["v_rand", "ap", "iou"]
#: How colour images became the training input (:func:`biounet.io.to_luminance`).
Color = Literal["keep", "luminance"]
CHECKPOINT = "checkpoint.pt"
#: Steps timed before a run with a time budget (``minutes``) fixes its number of steps.
BUDGET_PROBE_STEPS = 30


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
    :func:`biounet.tiling.resolve_precision`), else in float32; the resolved value is what the run folder
    records. ``minutes`` gives the run a time budget instead of a number of steps: after
    :data:`BUDGET_PROBE_STEPS` steps (and one timed validation) the number of steps that
    fits the budget is fixed and recorded, so the rest of the run, and a resumed run, is
    deterministic (:func:`plan_steps`). ``best_by`` is the validation score that picks the
    ``best`` model: ``"v_rand"`` (ISBI 2012, for membrane models), ``"ap"`` (object AP at
    IoU 0.5, for instance models) or ``"iou"`` (foreground IoU). ``color = "luminance"``
    trains on the luminance of colour images and makes the model convert colour inputs the
    same way at prediction. ``target = "border"`` trains 3 classes (background, cell
    interior, cell border: :meth:`biounet.datasets.Sample.class_target`) instead of the
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
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"TrainConfig.optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "poly", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant', 'poly' or 'cosine', got {self.schedule!r}")
        if self.split not in ("none", "distance", "probability", "border"):
            raise ValueError(f"TrainConfig.split must be 'none', 'distance', 'probability' or 'border', got {self.split!r}")
        if (self.target == "border") != (self.split == "border"):
            raise ValueError(f'TrainConfig: target = "border" and split = "border" go together (the interiors of the '
                             f"3-class target seed the objects); got target = {self.target!r}, split = {self.split!r}")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"TrainConfig.min_size must be an integer >= 0, got {self.min_size!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")
        if self.minutes is not None and not (isinstance(self.minutes, int | float) and 0 < self.minutes < math.inf):
            raise ValueError(f"TrainConfig.minutes must be a positive number of minutes, got {self.minutes!r}")
        if self.best_by not in ("v_rand", "ap", "iou"):
            raise ValueError(f"TrainConfig.best_by must be 'v_rand', 'ap' or 'iou', got {self.best_by!r}")
        if self.color not in ("keep", "luminance"):
            raise ValueError(f"TrainConfig.color must be 'keep' or 'luminance', got {self.color!r}")

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
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. TOML or JSON); unknown keys and bad types are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(fields)}")
        values = dict(data)
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                raise ValueError(f"training option {name} must be {_type_name(hints[name])}, got {value!r}")
        if values.get("normalization") is not None:
            values["normalization"] = tuple(float(v) for v in values["normalization"])
        return cls(**values)

    def updated(self, assignments: Sequence[str]) -> TrainConfig:
        """Apply ``field=value`` strings (TOML values: ``lr=0.001``, ``norm="batch"``, ``augment=false``)."""
        values = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects field=value, got {item!r}")
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
            raise ValueError(f"{path}: cannot read training config: {exc}") from exc
        preset = data.pop("preset", None)
        start = cls.preset(preset) if preset else (base or cls())
        try:
            return cls.from_dict({**dataclasses.asdict(start), **data})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

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


@dataclass(frozen=True)
class Status:
    """One training step, as yielded by :func:`train_steps` (for progress bars and GUIs)."""

    step: int
    loss: float
    lr: float
    seconds: float
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 0  # the run's number of steps; 0 until a time budget has fixed it


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss); the message says which checkpoint is kept."""


# ------------------------------------------------------------------------------------------
def train(
    samples: Sequence[Any],
    run_dir: Path,
    config: TrainConfig,
    *,
    val_samples: Sequence[Any] = (),
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
) -> UNet:
    """Train a U-Net on ``samples`` (:class:`biounet.datasets.Sample`) and return the last model.

    Writes to ``run_dir``: ``train_config.json``, ``log.csv``, TensorBoard event files,
    ``checkpoint.pt``, ``last/`` and ``best/`` model folders, ``curves.png``. See
    :func:`train_steps` for the generator form.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=None if config.minutes else config.steps, desc="train", unit="step",
               disable=not progress or not _is_rank0())  # fmt: skip
    last: Status | None = None
    for status in train_steps(samples, run_dir, config, val_samples=val_samples, device=device, resume=resume):
        if status.steps and bar.total != status.steps:
            bar.total = status.steps
            bar.refresh()
        if bar.n == 0 and status.step > 1:
            bar.update(status.step - 1)
        bar.update(1)
        bar.set_postfix(loss=f"{status.loss:.4f}", **{k: f"{v:.3f}" for k, v in status.metrics.items()})
        last = status
    bar.close()
    from biounet.model import load_model

    model = load_model(Path(run_dir) / "last", device=device)
    if last is not None and _is_rank0():
        log.info("trained %d steps; last model: %s", last.step, Path(run_dir) / "last")
    return model


def train_steps(
    samples: Sequence[Any],
    run_dir: Path,
    config: TrainConfig,
    *,
    val_samples: Sequence[Any] = (),
    device: str = "cpu",
    resume: bool = False,
) -> Iterator[Status]:
    """Generator form of :func:`train`: yields a :class:`Status` after every step."""
    from biounet.augment import AugmentConfig, augment_batch
    from biounet.datasets import TileDataset
    from biounet.logs import CsvLog, EventWriter, plot_curves
    from biounet.weights import weight_map

    run_dir, device_ = Path(run_dir), rank_device(check_device(device))
    if device_.type == "cuda" and device_.index is not None:
        torch.cuda.set_device(device_)  # NCCL's collectives use the current device
    rank, world = _distributed_setup(device_)
    samples = _as_input(list(samples), config.color)
    _check_data(samples, "training data")
    in_channels = 1 if samples[0].image.ndim == 2 else samples[0].image.shape[2]
    val_samples = _as_input(list(val_samples), config.color)
    if val_samples:
        _check_data(val_samples, "validation data")
    if rank == 0:
        _prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    elif device_.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one tile size throughout: let cuDNN pick its fastest kernels

    # ---- model, optimiser, schedule ------------------------------------------------------
    saved_config = run_dir / "train_config.json"
    saved = read_run_config(saved_config) if resume and saved_config.is_file() else {}
    from biounet.tiling import resolve_precision

    if config.precision == "auto":  # a resumed run keeps the precision it started with
        precision = saved.get("precision")
        config = dataclasses.replace(config, precision=precision if precision in ("float32", "bfloat16")
                                     else resolve_precision(device_))  # fmt: skip
    if config.tile == "auto":  # a resumed run keeps the tile it started with (measured in its precision)
        tile = saved.get("tile")
        tile = tile if isinstance(tile, int) else auto_tile(config, samples, device_, in_channels)
        config = dataclasses.replace(config, tile=_from_rank0(tile, world))
        log.info("training tile: %d px, the largest valid tile that the data and memory allow", config.tile)
    class_names = ("background", "cell") if config.target == "binary" else ("background", "interior", "border")
    info = ModelInfo(normalization=config.normalization, class_names=class_names,
                     postprocess=config.postprocess, color=config.color,
                     provenance={"recipe": dataclasses.asdict(config), "data": _names(samples)})  # fmt: skip
    model = config.model(in_channels, len(class_names), info).to(device_)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tile_in = model.config.valid_input_size(config.tile)
    tile_out = model.output_size(tile_in)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device_.index] if device_.type == "cuda" else None)
    forward = torch.compile(net) if config.compile else net

    # ---- data: labels and weights the size of the input, so they can be warped with the image --
    # a time budget fixes the number of steps later; the draws depend on the item index only
    tiles = TileDataset(
        samples, tile_in, tile_out, targets="input", kind=config.target, length=(config.steps if config.minutes is None else 10**9) * config.batch_size,
        seed=config.seed * 1000 + rank,
        normalization=config.normalization,
        weight_fn=lambda labels: weight_map(labels, w0=config.w0, sigma=config.sigma),
    )  # fmt: skip
    aug_config = dataclasses.replace(
        AugmentConfig.paper(), elastic_std=config.elastic_std, elastic_grid=(config.elastic_grid,) * 2
    )
    # augmentation draws on the training device (no per-step host-to-device copies of noise and grids)
    generator = torch.Generator(device=device_).manual_seed(config.seed * 1000 + rank)

    # ---- resume ----------------------------------------------------------------------------
    start, best, best_step = 0, -math.inf, 0
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.is_file():
        if config.minutes is not None and isinstance(saved.get("steps"), int):
            config = dataclasses.replace(config, steps=saved["steps"])  # a budgeted run keeps its planned steps
        _check_resumable(saved_config, saved, config)
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _restore_rng_states(state, generator, rank, world, device_)
            start, best, best_step = int(state["step"]), float(state["best"]), int(state.get("best_step", 0))
            if state.get("best_by", "iou") != config.best_by:  # checkpoints before best_by kept the IoU
                log.info("resuming with best_by=%s: the best model is chosen afresh", config.best_by)
                best, best_step = -math.inf, 0
        except Exception as exc:  # truncated, foreign or hostile files: torch, pickle and key errors alike
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"{checkpoint_path}: not a checkpoint of this run ({type(exc).__name__}: {first}); the "
                             "run folder is unchanged") from exc  # fmt: skip
        log.info("resuming %s at step %d", run_dir, start)
    elif resume and rank == 0:
        log.warning("%s: no checkpoint to resume from; starting a new run", run_dir)
    fields = ["step", "loss", "lr", "seconds", "tiles_per_s", *(f"val_{k}" for k in VALIDATION_SCORES)]
    csv_log = CsvLog(run_dir / "log.csv", fields, keep_until_step=start) if rank == 0 else None
    events = EventWriter(run_dir) if rank == 0 else None
    if rank == 0:
        _write_config(saved_config, config)
    planned = config.minutes is None or start >= BUDGET_PROBE_STEPS

    def validate(step: int) -> dict[str, float]:
        """Score on the validation images; keep the best model by ``config.best_by``."""
        nonlocal best, best_step
        metrics = evaluate_samples(model, val_samples, device=device_, v_rand=config.best_by == "v_rand")
        # predict() runs the model channels-last where faster; give training back its own layout
        model.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        if metrics[config.best_by] > best:
            best, best_step = metrics[config.best_by], step
            info = model.info
            model.info = dataclasses.replace(info, provenance={
                **info.provenance, "best": {"by": config.best_by, "value": best, "step": step}})  # fmt: skip
            try:
                model.save(run_dir / "best")
            finally:
                model.info = info  # ``last`` records no selection
        return metrics

    # ---- the loop --------------------------------------------------------------------------
    crop = (tile_in - tile_out) // 2
    inner = slice(crop, crop + tile_out)
    started = time.perf_counter()
    if not planned:  # until the probe steps have been timed, the run has no end
        config = dataclasses.replace(config, steps=10**9)
    warm = start + max(1, min(5, (BUDGET_PROBE_STEPS - start) // 2))  # the first steps warm the kernels up
    probe_started, probe_from = started, start
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        model.train()
        items = [tiles[(step - 1) * config.batch_size + i] for i in range(config.batch_size)]
        image = torch.stack([t.image for t in items]).to(device_, non_blocking=True)
        target = torch.stack([t.target for t in items]).to(device_, non_blocking=True)
        weight = torch.stack([t.weight for t in items]).to(device_, non_blocking=True)
        if config.augment:
            image, target, weight = augment_batch(image, target, weight, config=aug_config, generator=generator)
        target, weight = target[:, inner, inner], weight[:, inner, inner]
        if config.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
            logits = forward(image)
        loss = weighted_cross_entropy(logits, target, weight)
        if config.dice > 0:
            loss = loss + config.dice * soft_dice_loss(logits, target, weight > 0)
        if not torch.isfinite(loss):
            kept = f"the last good checkpoint (step {start}) is kept in {checkpoint_path}" if start else "no checkpoint yet"
            raise TrainingError(f"loss became {loss.item()} at step {step}; stopping: {kept}. Try a lower lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        row: dict[str, float] = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                                 "seconds": time.perf_counter() - started,
                                 "tiles_per_s": config.batch_size / (time.perf_counter() - t0)}  # fmt: skip
        metrics: dict[str, float] = {}
        if not planned and step == BUDGET_PROBE_STEPS:  # a time budget: fix the number of steps now
            step_seconds = (time.perf_counter() - probe_started) / (step - probe_from)
            val_seconds = 0.0
            if val_samples and rank == 0:
                t_val = time.perf_counter()
                metrics = validate(step)
                val_seconds = time.perf_counter() - t_val
            steps = plan_steps(config.minutes * 60, time.perf_counter() - started, step, step_seconds,
                               val_seconds if val_samples else 0.0, config.val_every)  # fmt: skip
            config = dataclasses.replace(config, steps=_from_rank0(steps, world))
            planned = True
            model.info = dataclasses.replace(model.info, provenance={
                **model.info.provenance, "recipe": dataclasses.asdict(config)})  # fmt: skip
            log.info("time budget %.3g min: %d steps (%.3f s per step, %.2f s per validation)",
                     config.minutes, config.steps, step_seconds, val_seconds)  # fmt: skip
            if rank == 0:
                _write_config(saved_config, config)
        elif val_samples and (step % config.val_every == 0 or step == config.steps) and rank == 0:
            metrics = validate(step)
        row.update({f"val_{k}": v for k, v in metrics.items()})
        if rank == 0:
            csv_log.write(row)
            events.scalars(step, {k: v for k, v in row.items() if k != "step"})
        if step == warm:
            probe_started, probe_from = time.perf_counter(), step
        if planned and (step % config.checkpoint_every == 0 or step == config.steps):  # none before the plan
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingError(f"weights became non-finite at step {step}; stopping: the last good "
                                    f"checkpoint (step {start}) is kept in {checkpoint_path}. Try a lower lr.")  # fmt: skip
            rng_states = _gather_rng_states(generator, device_, world)
            if rank == 0:
                model.save(run_dir / "last")
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, rng_states, step, best, best_step,
                                 config.best_by)  # fmt: skip
            start = step
        yield Status(step, row["loss"], row["lr"], row["seconds"], metrics, config.steps if planned else 0)
        if step >= config.steps:
            break

    if rank == 0:
        if not val_samples or not (run_dir / "best").is_dir():  # no validation, or no finite score: best is last
            model.save(run_dir / "best")
        plot_curves(CsvLog.read(run_dir / "log.csv"), run_dir / "curves.png", title=str(run_dir.name))
        summary = CsvLog.read(run_dir / "log.csv")[-1]
        log.info("done: %s steps, loss %s, best validation %s %s (step %d), run folder %s", summary["step"],
                 summary["loss"], config.best_by, f"{best:.4f}" if val_samples else "-", best_step, run_dir)  # fmt: skip
    if world > 1:
        _check_replicas_agree(model, run_dir, rank, world)


#: Largest automatic training tile (input px): a cap on the time of one step (chosen, not measured).
AUTO_TILE_MAX = 1084
#: Share of the free GPU memory that an automatic training tile may take.
AUTO_TILE_MEMORY_SHARE = 0.8


def auto_tile(config: TrainConfig, samples: Sequence[Any], device: str | torch.device, in_channels: int = 1) -> int:
    """The largest valid training tile (input px) that the images and the device's memory allow.

    Larger tiles give each output pixel more context per step and waste less on the halo,
    which is why the paper trains on one large tile rather than a batch. The output window
    need not be larger than the largest image side, so the cap is the smallest valid input
    whose output covers it (700 px for 512 px ISBI slices with the paper net), at most
    :data:`AUTO_TILE_MAX`. On CUDA, one training step (forward and backward, in the
    configured precision) at a probe tile measures the peak memory; memory grows with the
    tile's pixels, so the largest valid tile whose predicted peak, ``peak * (tile /
    probe)**2``, fits in :data:`AUTO_TILE_MEMORY_SHARE` of the free memory is chosen. On
    other devices the cap is used.
    """
    config_net = config.net_config(in_channels)
    side = max(max(s.image.shape[:2]) for s in samples)
    cap = min(config_net.input_size_for(side), config_net._valid_input_at_most(AUTO_TILE_MAX) or AUTO_TILE_MAX)
    device = torch.device(device)
    if device.type != "cuda":
        return cap
    probe = min(cap, config_net.valid_input_size(572))
    free, _ = torch.cuda.mem_get_info(device)
    with torch.random.fork_rng(devices=[device]):  # the probe's weights and dropout leave the seeded streams alone
        probe_bytes = _step_peak_bytes(config, in_channels, probe, device)
    return largest_tile_within(config_net, cap, probe, probe_bytes, AUTO_TILE_MEMORY_SHARE * free)


def largest_tile_within(config: UNetConfig, cap: int, probe: int, probe_bytes: float, budget: float) -> int:
    """The largest valid input size <= ``cap`` whose memory ``probe_bytes * (size / probe)**2`` is <= ``budget``.

    Never below the smallest valid size.
    """
    size = cap
    while probe_bytes * (size / probe) ** 2 > budget:
        smaller = config._valid_input_at_most(size - 1)
        if smaller is None:
            break
        size = smaller
    return size


def _step_peak_bytes(config: TrainConfig, in_channels: int, tile: int, device: torch.device) -> int:
    """Peak CUDA memory of one training step of ``config``'s net on a batch of ``tile`` px tiles."""
    model = config.model(in_channels, 2, ModelInfo()).to(device)
    out = model.output_size(tile)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros(config.batch_size, in_channels, tile, tile, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
        logits = model(x)
    loss = weighted_cross_entropy(logits, torch.zeros(config.batch_size, out, out, dtype=torch.long, device=device),
                                  torch.ones(config.batch_size, out, out, device=device))  # fmt: skip
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, x, logits, loss
    torch.cuda.empty_cache()
    return peak


def _from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (so that all ranks train alike); ``value`` itself in one process."""
    if world == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _check_replicas_agree(model: UNet, run_dir: Path, rank: int, world: int) -> None:
    """All-gather a checksum of every rank's weights; rank 0 records them in ``ddp.json``."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    checksum = torch.tensor([flat.sum().item(), (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum().item()])
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        agree = all(torch.equal(g, gathered[0]) for g in gathered)
        with atomic_write(run_dir / "ddp.json") as tmp:
            tmp.write_text(json.dumps({"world_size": world, "checksums": [g.tolist() for g in gathered],
                                       "replicas_identical": agree}, indent=2) + "\n")  # fmt: skip
        if not agree:
            raise TrainingError(f"replicas disagree after training: {gathered}")
    dist.barrier()


# ------------------------------------------------------------------------------------------
#: The scores :func:`evaluate_samples` returns, in the order of the log's columns.
VALIDATION_SCORES = ("pixel_error", "iou", "f1", "ap", "v_rand")


def evaluate_samples(
    model: UNet, samples: Sequence[Any], *, device: str | torch.device | None = None, v_rand: bool = True
) -> dict[str, float]:
    """Validation scores of ``model`` on annotated samples (:data:`VALIDATION_SCORES`).

    * ``pixel_error`` and ``iou``: misclassified pixels and foreground IoU of ``p(not background) > 0.5``,
      pixels pooled over the samples;
    * ``f1`` and ``ap``: object F1 and AP = TP / (TP + FP + FN) at IoU 0.5 (DSB 2018) of the
      instances that the model's own post-processing makes, mean over the samples;
    * ``v_rand``: the ISBI 2012 foreground-restricted Rand score with Fiji's border
      thinning, at the threshold that is best for the mean over the samples (one threshold
      per stack, as the challenge picks it), without the warping error (the slow part).

    The first four follow a cell's outline; V_rand follows the topology of a membrane map
    (one gap in a membrane merges two cells and costs V_rand, hardly any IoU), so membrane
    models are selected by it (``TrainConfig.best_by``). ``v_rand=False`` skips it (NaN),
    the slowest part. ``device``: where to predict, by default the model's.
    """
    from biounet.inference import labels_from_probabilities
    from biounet.metrics import isbi_scores, match_objects
    from biounet.postprocess import foreground_probability
    from biounet.tiling import predict

    device = device if device is not None else next(model.parameters()).device
    wrong = union = inter = total = 0
    f1, ap, rands = [], [], []
    for sample in samples:
        channel_axis = None if sample.image.ndim == 2 else -1
        prob = predict(model, sample.image, channel_axis=channel_axis, device=device, progress=False)
        foreground = foreground_probability(prob)
        fg, truth = foreground > 0.5, sample.labels > 0
        wrong += int(np.count_nonzero(fg != truth))
        total += truth.size
        inter += int(np.count_nonzero(fg & truth))
        union += int(np.count_nonzero(fg | truth))
        labels = labels_from_probabilities(prob, **model.info.postprocess)
        matching = match_objects(sample.labels, labels, thresholds=(0.5,))
        f1.append(matching.f1[0])
        ap.append(matching.average_precision[0])
        if v_rand and truth.any():  # V_rand is undefined without foreground
            rands.append(isbi_scores(foreground, sample.labels, warping=False).v_rand)
    rand = float(np.max(np.mean(rands, axis=0))) if rands else math.nan
    return {"pixel_error": wrong / total, "iou": inter / max(union, 1), "f1": float(np.mean(f1)),
            "ap": float(np.mean(ap)), "v_rand": rand}  # fmt: skip


def plan_steps(
    budget: float, elapsed: float, done: int, step_seconds: float, val_seconds: float, val_every: int
) -> int:
    r"""The number of steps of a run with a time budget, from the speed of its first steps.

    .. math::  n = n_0 + \left\lfloor \frac{B - t_0 - t_v}{t_s + t_v / k} \right\rfloor

    with ``budget`` :math:`B` and ``elapsed`` :math:`t_0` seconds, ``done`` :math:`n_0`
    steps, ``step_seconds`` :math:`t_s` per step, ``val_seconds`` :math:`t_v` per validation
    (0 without validation images), one every ``val_every`` :math:`k` steps and one at the
    end. Never fewer than ``done``.
    """
    if not (budget > 0 and step_seconds > 0 and val_every >= 1):
        raise ValueError(f"plan_steps needs budget > 0, step_seconds > 0, val_every >= 1, got "
                         f"{budget!r}, {step_seconds!r}, {val_every!r}")  # fmt: skip
    per_step = step_seconds + val_seconds / val_every
    return done + max(0, math.floor((budget - elapsed - val_seconds) / per_step))


#: Fields a resumed run may change: how long it runs and how often it validates and saves.
RESUMABLE_CHANGES = ("steps", "val_every", "checkpoint_every")


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's ``train_config.json`` as a dict (as saved, unchecked), or a clear error naming it."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        return saved
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the run's configuration: {exc}") from exc


def _check_resumable(path: Path, saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse, before anything is written, to resume a run with a recipe other than its own.

    Only the fields the run recorded are compared (a run of an older version lacks the
    newer ones); values are compared as :meth:`TrainConfig.from_dict` reads them.
    """
    if not saved:
        return
    try:
        before = dataclasses.asdict(TrainConfig.from_dict({**dataclasses.asdict(config), **saved}))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read the run's configuration: {exc}") from exc
    now = dataclasses.asdict(TrainConfig.from_dict(dataclasses.asdict(config)))
    changed = [k for k in saved if k in now and k not in RESUMABLE_CHANGES and now[k] != before[k]]
    if changed:
        what = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"{path.parent}: cannot resume with a changed recipe ({what}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change. The run is unchanged and still resumable.")  # fmt: skip


def _write_config(path: Path, config: TrainConfig) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def _as_input(samples: list[Any], color: Color) -> list[Any]:
    """The samples as the network sees them: colour images as luminance for ``color="luminance"``."""
    from biounet.io import to_luminance

    if color == "keep":
        return samples
    return [dataclasses.replace(s, image=to_luminance(s.image, s.image_path or s.name)) if s.image.ndim == 3 else s
            for s in samples]  # fmt: skip


def split_samples(samples: Sequence[Any], fraction: float, *, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Hold out ``ceil(fraction * n)`` samples (at least one if ``fraction > 0``), chosen by ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    samples = list(samples)
    n_val = math.ceil(fraction * len(samples)) if fraction > 0 else 0
    if n_val and n_val >= len(samples):
        raise ValueError(f"cannot hold out {n_val} of {len(samples)} images and still train")
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _check_data(samples: Sequence[Any], what: str) -> None:
    if not samples:
        raise ValueError(f"{what}: no annotated images")
    channels = {1 if s.image.ndim == 2 else s.image.shape[2] for s in samples}
    if len(channels) > 1:
        raise ValueError(f"{what}: images differ in channel count {sorted(channels)}")


def _names(samples: Sequence[Any]) -> list[str]:
    return [s.name for s in samples][:200]


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    ensure_writable_folder(run_dir, "run folder")
    if not resume and (run_dir / CHECKPOINT).exists():
        raise ValueError(f"{run_dir}: holds a run already; use --resume to continue it or choose another folder")


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``config``: SGD with Nesterov momentum, Adam or AdamW, over ``model``'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=True)  # fmt: skip
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then constant, polynomial (power 0.9) or cosine decay."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    if config.schedule == "poly":
        return (1.0 - progress) ** 0.9
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _save_checkpoint(
    path: Path, model, optimizer, scheduler, rng_states: dict, step: int, best: float, best_step: int, best_by: str
) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        **rng_states, "step": step, "best": best, "best_step": best_step, "best_by": best_by,
    }  # fmt: skip
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _gather_rng_states(generator: torch.Generator, device: torch.device, world: int) -> dict[str, list[Any]]:
    """Every rank's augmentation generator, torch CPU and CUDA (dropout) RNG states, in rank order.

    All ranks call this (an all-gather); CUDA states are None on other devices.
    """
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    local = (generator.get_state(), torch.get_rng_state(), cuda)
    states = [local]
    if world > 1:
        import torch.distributed as dist

        states = [None] * world
        dist.all_gather_object(states, local)
    return {"generators": [g for g, _, _ in states], "torch_rngs": [t for _, t, _ in states],
            "cuda_rngs": [c for _, _, c in states]}  # fmt: skip


def _restore_rng_states(
    state: dict, generator: torch.Generator, rank: int, world: int, device: torch.device | None = None
) -> None:
    """Give this rank back its own random streams from a checkpoint of the same number of ranks.

    With another number of ranks the streams cannot continue; each rank keeps the fresh
    stream of its seed and the run is no longer bit-identical to an uninterrupted one.
    """
    generators = state.get("generators") or [state["generator"]]  # checkpoints before per-rank states
    torch_rngs = state.get("torch_rngs") or [state["torch_rng"]]
    if len(generators) != world:
        log.warning("resuming %d process(es) from a checkpoint of %d: random streams restart from the seeds",
                    world, len(generators))  # fmt: skip
        return
    generator.set_state(generators[rank])
    torch.set_rng_state(torch_rngs[rank])
    cuda = (state.get("cuda_rngs") or [None] * world)[rank]
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` each process takes its own GPU: ``cuda`` becomes ``cuda:$LOCAL_RANK``.

    An explicit index (``cuda:1``) and non-CUDA devices are kept.
    """
    local, world = os.environ.get("LOCAL_RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is None and local is not None and world > 1:
        return torch.device("cuda", int(local))
    return device


def _distributed_setup(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()
