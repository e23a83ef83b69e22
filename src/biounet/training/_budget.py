"""How much fits: the automatic training tile and the steps of a time budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from biounet.errors import InputError
from biounet.model import ModelInfo, UNetConfig
from biounet.training._config import TrainConfig
from biounet.training._losses import weighted_cross_entropy

#: Steps timed before a run with a time budget (``minutes``) fixes its number of steps.
BUDGET_PROBE_STEPS = 30


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
    cap = min(config_net.input_size_for(side), config_net.valid_input_at_most(AUTO_TILE_MAX) or AUTO_TILE_MAX)
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
        smaller = config.valid_input_at_most(size - 1)
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
        raise InputError(f"plan_steps needs budget > 0, step_seconds > 0, val_every >= 1, got "
                         f"{budget!r}, {step_seconds!r}, {val_every!r}")  # fmt: skip
    per_step = step_seconds + val_seconds / val_every
    return done + max(0, math.floor((budget - elapsed - val_seconds) / per_step))
