"""Run folders, checkpoints and exact resumption."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from biounet.errors import InputError
from biounet.io._files import atomic_write, ensure_writable_folder
from biounet.training._config import TrainConfig

log = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.pt"


#: Fields a resumed run may change: how long it runs and how often it validates and saves.
RESUMABLE_CHANGES = ("steps", "val_every", "checkpoint_every")


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's ``train_config.json`` as a dict (as saved, unchecked), or a clear error naming it."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise InputError("not a JSON object")
        return saved
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's configuration: {exc}") from exc


def run_config(run_dir: Path) -> TrainConfig | None:
    """The recipe a run folder was started with (its ``train_config.json``), or None if it has none.

    What ``resume`` continues; a file that is not a valid recipe is one error naming it.
    """
    path = Path(run_dir) / "train_config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(read_run_config(path))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: {exc}") from exc


def check_resumable(path: Path, saved: Mapping[str, Any], config: TrainConfig) -> None:
    """Refuse, before anything is written, to resume a run with a recipe other than its own.

    Only the fields the run recorded are compared (a run of an older version lacks the
    newer ones); values are compared as :meth:`TrainConfig.from_dict` reads them.
    """
    if not saved:
        return
    try:
        before = dataclasses.asdict(TrainConfig.from_dict({**dataclasses.asdict(config), **saved}))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: cannot read the run's configuration: {exc}") from exc
    now = dataclasses.asdict(TrainConfig.from_dict(dataclasses.asdict(config)))
    changed = [k for k in saved if k in now and k not in RESUMABLE_CHANGES and now[k] != before[k]]
    if changed:
        what = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise InputError(f"{path.parent}: cannot resume with a changed recipe ({what}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change. The run is unchanged and still resumable.")  # fmt: skip


def write_config(path: Path, config: TrainConfig) -> None:
    """The run's recipe as ``path`` (``train_config.json``, what resuming reads) and, beside it, as
    TOML tables (``train_config.toml``: :meth:`TrainConfig.to_toml`, to copy and edit)."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    with atomic_write(path.with_suffix(".toml")) as tmp:
        tmp.write_text(config.to_toml())


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    ensure_writable_folder(run_dir, "run folder")
    if not resume and (run_dir / CHECKPOINT).exists():
        raise InputError(f"{run_dir}: holds a run already; resume it or choose another folder", option="resume")


def save_checkpoint(
    path: Path, model, optimizer, scheduler, rng_states: dict, step: int, best: float, best_step: int, best_by: str
) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        **rng_states, "step": step, "best": best, "best_step": best_step, "best_by": best_by,
    }  # fmt: skip
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def gather_rng_states(generator: torch.Generator, device: torch.device, world: int) -> dict[str, list[Any]]:
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


def restore_rng_states(
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


def resume_from(
    path: Path, best_by: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    generator: torch.Generator, rank: int, world: int, device: torch.device,
) -> tuple[int, float, int]:  # fmt: skip
    """Load the checkpoint at ``path`` into the run's objects; return its step, best score and best step.

    Model, optimiser, schedule and random streams (:func:`restore_rng_states`) continue
    exactly where the checkpoint was written. A checkpoint whose best model was chosen by
    another score restarts the choice. Any unreadable file (truncated, foreign, hostile:
    ``torch.load`` with ``weights_only=True`` never runs its code) is one error naming it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state, generator, rank, world, device)
        start, best, best_step = int(state["step"]), float(state["best"]), int(state.get("best_step", 0))
    except Exception as exc:  # torch, pickle and key errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{path}: not a checkpoint of this run ({type(exc).__name__}: {first}); the run folder "
                         "is unchanged") from exc  # fmt: skip
    if state.get("best_by", "iou") != best_by:  # checkpoints before best_by kept the IoU
        log.info("resuming with best_by=%s: the best model is chosen afresh", best_by)
        best, best_step = -math.inf, 0
    return start, best, best_step
