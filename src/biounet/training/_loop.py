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

import torch

from biounet.errors import TrainingError
from biounet.model import ModelInfo, UNet
from biounet.prediction._device import check_device
from biounet.training._budget import BUDGET_PROBE_STEPS, auto_tile, plan_steps
from biounet.training._checkpoint import (
    CHECKPOINT,
    check_resumable,
    gather_rng_states,
    prepare_run_dir,
    read_run_config,
    restore_rng_states,
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
from biounet.training._losses import soft_dice_loss, weighted_cross_entropy
from biounet.training._optim import lr_factor, make_optimizer
from biounet.training._validation import VALIDATION_SCORES, evaluate_samples

log = logging.getLogger(__name__)


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

    Writes to ``run_dir``: ``train_config.json``, ``log.csv``, TensorBoard event files,
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
    """Generator form of :func:`train`: yields a :class:`Status` after every step."""
    from biounet.data._augment import AugmentConfig, augment_batch
    from biounet.data._tiles import TileDataset
    from biounet.data._weights import weight_map
    from biounet.training._logs import CsvLog, EventWriter, plot_curves

    run_dir, device_ = Path(run_dir), rank_device(check_device(device))
    if device_.type == "cuda" and device_.index is not None:
        torch.cuda.set_device(device_)  # NCCL's collectives use the current device
    rank, world = distributed_setup(device_)
    samples = _as_input(list(samples), config.color)
    _check_data(samples, "training data")
    in_channels = 1 if samples[0].image.ndim == 2 else samples[0].image.shape[2]
    val_samples = _as_input(list(val_samples), config.color)
    if val_samples:
        _check_data(val_samples, "validation data")
    if rank == 0:
        prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    elif device_.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one tile size throughout: let cuDNN pick its fastest kernels

    # ---- model, optimiser, schedule ------------------------------------------------------
    saved_config = run_dir / "train_config.json"
    saved = read_run_config(saved_config) if resume and saved_config.is_file() else {}
    from biounet.prediction._device import resolve_precision

    if config.precision == "auto":  # a resumed run keeps the precision it started with
        precision = saved.get("precision")
        config = dataclasses.replace(config, precision=precision if precision in ("float32", "bfloat16")
                                     else resolve_precision(device_))  # fmt: skip
    if config.tile == "auto":  # a resumed run keeps the tile it started with (measured in its precision)
        tile = saved.get("tile")
        tile = tile if isinstance(tile, int) else auto_tile(config, samples, device_, in_channels)
        config = dataclasses.replace(config, tile=from_rank0(tile, world))
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
        check_resumable(saved_config, saved, config)
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng_states(state, generator, rank, world, device_)
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
        write_config(saved_config, config)
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
            config = dataclasses.replace(config, steps=from_rank0(steps, world))
            planned = True
            model.info = dataclasses.replace(model.info, provenance={
                **model.info.provenance, "recipe": dataclasses.asdict(config)})  # fmt: skip
            log.info("time budget %.3g min: %d steps (%.3f s per step, %.2f s per validation)",
                     config.minutes, config.steps, step_seconds, val_seconds)  # fmt: skip
            if rank == 0:
                write_config(saved_config, config)
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
            rng_states = gather_rng_states(generator, device_, world)
            if rank == 0:
                model.save(run_dir / "last")
                save_checkpoint(checkpoint_path, model, optimizer, scheduler, rng_states, step, best, best_step,
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
        check_replicas_agree(model, run_dir, rank, world)


def _as_input(samples: list[Any], color: Color) -> list[Any]:
    """The samples as the network sees them: colour images as luminance for ``color="luminance"``."""
    from biounet.io._images import to_luminance

    if color == "keep":
        return samples
    return [dataclasses.replace(s, image=to_luminance(s.image, s.image_path or s.name)) if s.image.ndim == 3 else s
            for s in samples]  # fmt: skip


def _check_data(samples: Sequence[Any], what: str) -> None:
    if not samples:
        raise ValueError(f"{what}: no annotated images")
    channels = {1 if s.image.ndim == 2 else s.image.shape[2] for s in samples}
    if len(channels) > 1:
        raise ValueError(f"{what}: images differ in channel count {sorted(channels)}")


def _names(samples: Sequence[Any]) -> list[str]:
    return [s.name for s in samples][:200]
