"""The training loop."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biounet.device import check_device
from biounet.errors import InputError, TrainingError
from biounet.model import ModelInfo, UNet
from biounet.training._batch_norm import batch_norm_layers, recompute_batch_norm
from biounet.training._budget import BUDGET_PROBE_STEPS, auto_tile, plan_steps
from biounet.training._checkpoint import (
    CHECKPOINT,
    check_resumable,
    gather_rng_states,
    prepare_run_dir,
    read_run_config,
    resume_from,
    save_checkpoint,
    write_config,
)
from biounet.training._config import Color, TrainConfig
from biounet.training._distributed import (
    check_replicas_agree,
    distributed_setup,
    from_rank0,
    is_rank0,
    rank_device,
)
from biounet.training._losses import loss_weights, soft_dice_loss, weighted_cross_entropy
from biounet.training._optim import lr_factor, make_optimizer
from biounet.training._validation import VALIDATION_SCORES, evaluate_samples

log = logging.getLogger(__name__)
#: The tiles of ``precise_bn`` are drawn with seed ``config.seed * 1000 + PRECISE_BN_SEED``; a rank's training
#: tiles use ``config.seed * 1000 + rank``.
PRECISE_BN_SEED = 999


@dataclass(frozen=True)
class Status:
    """One training step, as yielded by :func:`train_steps` (for progress bars and GUIs)."""

    step: int
    loss: float
    lr: float
    seconds: float
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 0  # the run's number of steps; 0 until a time budget has fixed it


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
    """Train a U-Net on ``samples`` (:class:`biounet.data.Sample`) and return the last model.

    Writes to ``run_dir``: ``train_config.json`` and ``.toml``, ``log.csv``, TensorBoard event files,
    ``checkpoint.pt``, ``last/`` and ``best/`` model folders, ``curves.png``. See
    :func:`train_steps` for the generator form.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=None if config.minutes else config.steps, desc="train", unit="step",
               disable=not progress or not is_rank0())  # fmt: skip
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
    if last is not None and is_rank0():
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
    """Generator form of :func:`train`: yields a :class:`Status` after every step.

    The loop, top to bottom: a step; with a time budget, after :data:`BUDGET_PROBE_STEPS`
    timed steps the number of steps is fixed (:func:`plan_steps`); validation every
    ``val_every`` steps keeps the best model; a row of the log; a checkpoint every
    ``checkpoint_every`` steps (none before the budget is fixed, so a resumed run is exact).
    With ``precise_bn``, the BatchNorm statistics are recomputed before every validation and
    before the last model is saved (:func:`_precise_bn`); the weights never see it.
    The run is built by :func:`_start_run`. Tiles are fetched in this process, not by
    DataLoader workers: the fetch is 1 ms of a 138 ms CPU step and a worker's hand-over costs
    3 ms (``benchmarks/dataloader.py``, ``docs/benchmarks.md``); the augmentation, the larger
    part, runs on the training device.
    """
    run = _start_run(samples, Path(run_dir), config, val_samples, device, resume)
    started = time.perf_counter()
    planned = run.config.minutes is None or run.start >= BUDGET_PROBE_STEPS
    if not planned:  # until the probe steps have been timed, the run has no end
        run.config = dataclasses.replace(run.config, steps=10**9)
    warm = run.start + max(1, min(5, (BUDGET_PROBE_STEPS - run.start) // 2))  # the first steps warm the kernels up
    probe_started, probe_from = started, run.start
    try:
        for step in range(run.start + 1, run.config.steps + 1):
            t0 = time.perf_counter()
            loss = _train_step(run, step)
            row: dict[str, float] = {"step": step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                                     "seconds": time.perf_counter() - started,
                                     "tiles_per_s": run.config.batch_size / (time.perf_counter() - t0)}  # fmt: skip
            metrics: dict[str, float] = {}
            if not planned and step == BUDGET_PROBE_STEPS:  # a time budget: fix the number of steps now
                metrics = _fix_budget(run, step, started, (time.perf_counter() - probe_started) / (step - probe_from))
                planned = True
            elif run.val_samples and (step % run.config.val_every == 0 or step == run.config.steps) and run.rank == 0:
                metrics = _validate(run, step)
            elif step == run.config.steps:
                _precise_bn(run)  # the last model, without validation (or on another rank) but with its statistics
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if run.rank == 0:
                run.csv_log.write(row)
                run.events.scalars(step, {k: v for k, v in row.items() if k != "step"})
            if step == warm:
                probe_started, probe_from = time.perf_counter(), step
            if planned and (step % run.config.checkpoint_every == 0 or step == run.config.steps):
                _save(run, step)
            yield Status(step, row["loss"], row["lr"], row["seconds"], metrics, run.config.steps if planned else 0)
            if step >= run.config.steps:
                break
    finally:
        if run.events is not None:
            run.events.close()  # also when a step fails or the caller stops early: its events on disk
    _finish(run)


@dataclass
class _Run:
    """What a training run holds between steps (built by :func:`_start_run`)."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: UNet
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    tiles: Any
    augment: Any
    generator: torch.Generator
    inner: slice
    val_samples: list[Any]
    csv_log: Any
    events: Any
    #: Tiles for :func:`_precise_bn` (not augmented), or None when ``precise_bn`` is 0.
    bn_tiles: Any = None
    start: int = 0
    best: float = -math.inf
    best_step: int = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT


def _start_run(
    samples: Sequence[Any], run_dir: Path, config: TrainConfig, val_samples: Sequence[Any], device: str, resume: bool
) -> _Run:  # fmt: skip
    """Check the data, build the network, optimiser, tiles and augmentation, and resume if asked."""
    from biounet.data._augment import AugmentConfig
    from biounet.data._tiles import TileDataset
    from biounet.device import resolve_precision
    from biounet.training._logs import CsvLog, EventWriter

    device_ = rank_device(check_device(device))
    if device_.type == "cuda" and device_.index is not None:
        torch.cuda.set_device(device_)  # NCCL's collectives use the current device
    rank, world = distributed_setup(device_)
    samples, val_samples = _as_input(list(samples), config.color), _as_input(list(val_samples), config.color)
    _check_data(samples, "training data")
    if val_samples:
        _check_data(val_samples, "validation data")
    in_channels = 1 if samples[0].image.ndim == 2 else samples[0].image.shape[2]
    if rank == 0:
        prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    elif device_.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one tile size throughout: let cuDNN pick its fastest kernels

    # ---- what a resumed run keeps: its precision and its tile (measured in that precision) ---
    saved_config = run_dir / "train_config.json"
    saved = read_run_config(saved_config) if resume and saved_config.is_file() else {}
    if config.precision == "auto":
        precision = saved.get("precision")
        config = dataclasses.replace(config, precision=precision if precision in ("float32", "bfloat16")
                                     else resolve_precision(device_))  # fmt: skip
    if config.tile == "auto":
        tile = saved.get("tile")
        tile = tile if isinstance(tile, int) else auto_tile(config, samples, device_, in_channels)
        config = dataclasses.replace(config, tile=from_rank0(tile, world))
        log.info("training tile: %d px, the largest valid tile that the data and memory allow", config.tile)

    # ---- model, optimiser, schedule ----------------------------------------------------------
    class_names = ("background", "cell") if config.target == "binary" else ("background", "interior", "border")
    info = ModelInfo(normalization=config.normalization, class_names=class_names,
                     postprocess=config.postprocess, color=config.color, background=config.background,
                     provenance={"recipe": dataclasses.asdict(config), "data": _names(samples)})  # fmt: skip
    model = config.model(in_channels, len(class_names), info).to(device_)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tile_in = model.config.valid_input_size(config.tile)
    tile_out = model.output_size(tile_in)
    optimizer = make_optimizer(model, config)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device_.index] if device_.type == "cuda" else None)

    # ---- data: labels and weights the size of the input, so they can be warped with the image --
    # a time budget fixes the number of steps later; the draws depend on the item index only
    tiles = TileDataset(
        samples, tile_in, tile_out, targets="input", kind=config.target, length=(config.steps if config.minutes is None else 10**9) * config.batch_size,
        seed=config.seed * 1000 + rank,
        pick=config.pick, normalization=config.normalization, background=config.background,
        weight_fn=loss_weights(config, samples),
    )  # fmt: skip
    bn_tiles = None
    if config.precise_bn and batch_norm_layers(model):  # images only: no weight maps
        bn_tiles = TileDataset(samples, tile_in, tile_out, kind=config.target, length=config.precise_bn * config.batch_size,
                               seed=config.seed * 1000 + PRECISE_BN_SEED, normalization=config.normalization,
                               pick=config.pick, background=config.background, weight_fn=lambda labels: np.zeros(labels.shape, np.float32))  # fmt: skip
    crop = (tile_in - tile_out) // 2
    run = _Run(
        config=config, run_dir=run_dir, device=device_, rank=rank, world=world, model=model,
        forward=torch.compile(net) if config.compile else net, optimizer=optimizer, scheduler=None, tiles=tiles,
        augment=dataclasses.replace(AugmentConfig.paper(), elastic_std=config.elastic_std,
                                    elastic_grid=(config.elastic_grid,) * 2),
        # augmentation draws on the training device (no per-step host-to-device copies of noise and grids)
        generator=torch.Generator(device=device_).manual_seed(config.seed * 1000 + rank),
        inner=slice(crop, crop + tile_out), val_samples=val_samples, csv_log=None, events=None, bn_tiles=bn_tiles,
    )  # fmt: skip
    # the schedule reads the run's config at every step: a time budget's planned steps, once fixed
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, run.config))
    if resume and run.checkpoint_path.is_file():
        if config.minutes is not None and isinstance(saved.get("steps"), int):
            run.config = dataclasses.replace(config, steps=saved["steps"])  # a budgeted run keeps its planned steps
        check_resumable(saved_config, saved, run.config)
        run.start, run.best, run.best_step = resume_from(run.checkpoint_path, run.config.best_by, model, optimizer,
                                                         run.scheduler, run.generator, rank, world, device_)  # fmt: skip
        log.info("resuming %s at step %d", run_dir, run.start)
    elif resume and rank == 0:
        log.warning("%s: no checkpoint to resume from; starting a new run", run_dir)
    if rank == 0:
        fields = ["step", "loss", "lr", "seconds", "tiles_per_s", *(f"val_{k}" for k in VALIDATION_SCORES)]
        run.csv_log = CsvLog(run_dir / "log.csv", fields, keep_until_step=run.start)
        run.events = EventWriter(run_dir, purge_step=run.start + 1 if run.start else None)
        write_config(saved_config, run.config)
    return run


def _train_step(run: _Run, step: int) -> float:
    """One optimisation step on the tiles of ``step`` (augmented on the device); returns the loss."""
    from biounet.data._augment import augment_batch

    config = run.config
    run.model.train()
    items = [run.tiles[(step - 1) * config.batch_size + i] for i in range(config.batch_size)]
    image, target, weight = (torch.stack([getattr(t, name) for t in items]).to(run.device, non_blocking=True)
                             for name in ("image", "target", "weight"))  # fmt: skip
    if config.augment:
        image, target, weight = augment_batch(image, target, weight, config=run.augment, generator=run.generator)
    target, weight = target[:, run.inner, run.inner], weight[:, run.inner, run.inner]
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
        logits = run.forward(image)
    loss = weighted_cross_entropy(logits, target, weight)
    if config.dice > 0:
        loss = loss + config.dice * soft_dice_loss(logits, target, weight > 0)
    if not torch.isfinite(loss):
        kept = (f"the last good checkpoint (step {run.start}) is kept in {run.checkpoint_path}" if run.start
                else "no checkpoint yet")  # fmt: skip
        raise TrainingError(f"loss became {loss.item()} at step {step}; stopping: {kept}. Try a lower lr.")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss.item()


def _precise_bn(run: _Run) -> None:
    """Recompute the BatchNorm statistics over ``precise_bn`` batches of the run's own tiles (:mod:`._batch_norm`).

    The same tiles every time, drawn from a seed of their own, in the run's precision and memory format:
    every rank gets the same statistics, and a resumed run the same as an uninterrupted one.
    """
    if run.bn_tiles is None:
        return
    config, n = run.config, run.config.batch_size

    def batches() -> Iterator[torch.Tensor]:
        for b in range(config.precise_bn):
            image = torch.stack([run.bn_tiles[b * n + i].image for i in range(n)]).to(run.device)
            yield image.contiguous(memory_format=torch.channels_last) if config.channels_last else image

    recompute_batch_norm(run.model, batches(), bfloat16=config.precision == "bfloat16")


def _validate(run: _Run, step: int) -> dict[str, float]:
    """Score on the validation images (after :func:`_precise_bn`); keep the best model by ``config.best_by``.

    The model becomes ``best`` when its score is above the highest so far (``run.best``), or
    at most ``config.best_margin`` below it: of models whose scores differ by less than the
    noise of the validation images, the later one (trained longer, at a lower learning rate).
    """
    _precise_bn(run)
    config, model = run.config, run.model
    metrics = evaluate_samples(model, run.val_samples, device=run.device, v_rand=config.best_by == "v_rand")
    score = metrics[config.best_by]
    if score > run.best or (config.best_margin > 0 and score >= run.best - config.best_margin):
        run.best, run.best_step = max(score, run.best), step
        info = model.info
        chosen = {"by": config.best_by, "value": score, "step": step, "margin": config.best_margin,
                  "highest": run.best}  # fmt: skip
        model.info = dataclasses.replace(info, provenance={**info.provenance, "best": chosen})
        try:
            model.save(run.run_dir / "best")
        finally:
            model.info = info  # ``last`` records no selection
    return metrics


def _fix_budget(run: _Run, step: int, started: float, step_seconds: float) -> dict[str, float]:
    """Fix the number of steps of a time budget from the timed steps and one timed validation."""
    metrics, val_seconds = {}, 0.0
    if run.val_samples and run.rank == 0:
        t_val = time.perf_counter()
        metrics = _validate(run, step)
        val_seconds = time.perf_counter() - t_val
    config = run.config
    steps = plan_steps(config.minutes * 60, time.perf_counter() - started, step, step_seconds,
                       val_seconds if run.val_samples else 0.0, config.val_every)  # fmt: skip
    run.config = config = dataclasses.replace(config, steps=from_rank0(steps, run.world))
    run.model.info = dataclasses.replace(run.model.info, provenance={
        **run.model.info.provenance, "recipe": dataclasses.asdict(config)})  # fmt: skip
    log.info("time budget %.3g min: %d steps (%.3f s per step, %.2f s per validation)",
             config.minutes, config.steps, step_seconds, val_seconds)  # fmt: skip
    if run.rank == 0:
        write_config(run.run_dir / "train_config.json", config)
    return metrics


def _save(run: _Run, step: int) -> None:
    """The ``last`` model and the checkpoint at ``step``; never from non-finite weights."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise TrainingError(f"weights became non-finite at step {step}; stopping: the last good "
                            f"checkpoint (step {run.start}) is kept in {run.checkpoint_path}. Try a lower lr.")  # fmt: skip
    rng_states = gather_rng_states(run.generator, run.device, run.world)
    if run.rank == 0:
        run.model.save(run.run_dir / "last")
        save_checkpoint(run.checkpoint_path, run.model, run.optimizer, run.scheduler, rng_states, step, run.best,
                        run.best_step, run.config.best_by)  # fmt: skip
    run.start = step


def _finish(run: _Run) -> None:
    """Close the logs, make sure there is a ``best`` model, plot the curves, check the replicas agree."""
    from biounet.training._logs import CsvLog, plot_curves

    if run.rank == 0:
        if not run.val_samples or not (run.run_dir / "best").is_dir():  # no validation or no finite score
            run.model.save(run.run_dir / "best")
        if run.config.tune_postprocess and run.val_samples:
            _tune_saved_models(run)
        rows = CsvLog.read(run.run_dir / "log.csv")
        plot_curves(rows, run.run_dir / "curves.png", title=str(run.run_dir.name))
        chosen = (f"highest validation {run.config.best_by} {run.best:.4f}, best model of step {run.best_step}"
                  if run.val_samples else "no validation")  # fmt: skip
        log.info("done: %s steps, loss %s, %s, run folder %s", rows[-1]["step"], rows[-1]["loss"], chosen, run.run_dir)
    if run.world > 1:
        check_replicas_agree(run.model, run.run_dir, run.rank, run.world)


def _tune_saved_models(run: _Run) -> None:
    """``tune_postprocess``: the post-processing of ``best`` and ``last`` tuned on the validation images.

    Each model's probabilities are predicted once; :func:`tune_postprocess` picks, starting
    from the recipe's post-processing (so a resumed run that finishes again chooses the same),
    the threshold and seed setting with the highest mean AP at IoU 0.5, and the model is
    saved again with them and, in its provenance, what was tried, the scores before and after
    and the seconds it took (after the time budget, if any). Rank 0 does it alone while the
    other ranks wait at the replica check.
    """
    from biounet.model import load_model
    from biounet.training._tune import tune_postprocess
    from biounet.training._validation import predict_sample

    truth = [s.labels for s in run.val_samples]
    for name in ("best", "last"):
        started = time.perf_counter()
        model = load_model(run.run_dir / name, device=run.device)
        probabilities = [predict_sample(model, s, run.device) for s in run.val_samples]
        tuned = tune_postprocess(probabilities, truth, run.config.postprocess)
        tuning = {"images": len(truth), "grid": {k: list(v) for k, v in tuned.grid.items()}, "by": "ap",
                  "before": tuned.default_score, "after": tuned.score,
                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        model.info = dataclasses.replace(model.info, postprocess=tuned.options,
                                         provenance={**model.info.provenance, "postprocess_tuned": tuning})  # fmt: skip
        model.save(run.run_dir / name)


def _as_input(samples: list[Any], color: Color) -> list[Any]:
    """The samples as the network sees them: colour images as luminance for ``color="luminance"``."""
    from biounet.io._images import to_luminance

    if color == "keep":
        return samples
    return [dataclasses.replace(s, image=to_luminance(s.image, s.image_path or s.name)) if s.image.ndim == 3 else s
            for s in samples]  # fmt: skip


def _check_data(samples: Sequence[Any], what: str) -> None:
    if not samples:
        raise InputError(f"{what}: no annotated images")
    channels = {1 if s.image.ndim == 2 else s.image.shape[2] for s in samples}
    if len(channels) > 1:
        raise InputError(f"{what}: images differ in channel count {sorted(channels)}")


def _names(samples: Sequence[Any]) -> list[str]:
    return [s.name for s in samples][:200]
