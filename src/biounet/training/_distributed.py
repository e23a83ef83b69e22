"""Distributed data-parallel training (``torchrun``): process groups, ranks and devices."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from biounet.errors import TrainingError
from biounet.io._files import atomic_write
from biounet.model import UNet


def from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (so that all ranks train alike); ``value`` itself in one process."""
    if world == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def check_replicas_agree(model: UNet, run_dir: Path, rank: int, world: int) -> None:
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


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def rank_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` each process takes its own GPU: ``cuda`` becomes ``cuda:$LOCAL_RANK``.

    An explicit index (``cuda:1``) and non-CUDA devices are kept.
    """
    local, world = os.environ.get("LOCAL_RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is None and local is not None and world > 1:
        return torch.device("cuda", int(local))
    return device


def distributed_setup(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()
