"""The same-budget peer: MONAI's ``BasicUNet`` trained the MONAI way.

Same training data, class targets (cell vs background, with the 1-px lines between
touching objects) and budget (the same number of steps, or with ``minutes`` the same
wall-clock minutes on the same machine) as the biounet run it is compared with. Its
recipe is MONAI's own, :data:`PEER_RECIPE` (256 px crops, batch 4, Adam at a constant
1e-4, widths 16-256: what a MONAI user trains with), and so is everything else:

* network: ``BasicUNet`` (zero-padded convolutions, instance norm, LeakyReLU, four
  poolings) with the widths ``(16, 32, 64, 128, 256, 16)``;
* input scaling: ``ScaleIntensityRangePercentilesd`` (1st and 99.8th percentile to 0 and 1,
  per image), the same percentiles as biounet's;
* augmentation: random crop, flips, 90-degree rotations, ``Rand2DElasticd`` (control points
  every half tile, which MONAI makes a 6 x 6 grid for a 256 px tile; Gaussian offsets whose
  standard deviation is drawn from U(0, 10) px per sample, so weaker on average than the
  paper's 10 px; any rotation, 10 % scaling, reflection padding), intensity scaling and
  shifting and Gaussian noise;
* loss: ``DiceCELoss`` (soft Dice + cross-entropy, unweighted: no border weights);
* inference: ``sliding_window_inference`` with tiles of the training size, 25 % overlap and
  Gaussian blending (no test-time augmentation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biounet.data import Sample
from biounet.training import BUDGET_PROBE_STEPS, TrainConfig, lr_factor, make_optimizer, plan_steps

log = logging.getLogger(__name__)

#: MONAI ``BasicUNet`` pools four times, so tiles are multiples of 16.
STRIDE = 16
#: Range of the standard deviation of MONAI's elastic offsets in px (the paper's is 10).
ELASTIC_MAGNITUDE = (0.0, 10.0)
WEIGHTS = "peer.pt"
#: The peer's own recipe, laid over the biounet run's: MONAI's BasicUNet with the widths
#: 16-256 and the usual MONAI training (256 px crops, batch 4, Adam at a constant 1e-4).
PEER_RECIPE = {
    "base_channels": 16, "tile": 256, "batch_size": 4, "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0,
    "schedule": "constant", "warmup": 0,
}  # fmt: skip
#: The fields of the biounet run that the peer shares: budget, seed and post-processing
#: (its own network, augmentation, loss and :data:`PEER_RECIPE` replace the rest); a peer
#: run is reused when these and the recipe are unchanged.
RECIPE_FIELDS = (*PEER_RECIPE, "steps", "minutes", "seed", "split", "min_size")


def peer_config(config: TrainConfig) -> TrainConfig:
    """The biounet run's ``config`` with the peer's recipe (:data:`PEER_RECIPE`) laid over it."""
    return dataclasses.replace(config, **PEER_RECIPE)


def peer_tile(config: TrainConfig) -> int:
    """Training and inference tile: ``config.tile`` (the peer's 256 px) rounded up to a multiple of 16."""
    return -(-config.tile // STRIDE) * STRIDE


def peer_network(config: TrainConfig, in_channels: int = 1) -> torch.nn.Module:
    """``BasicUNet`` with the widths of ``config`` (``base_channels`` doubling per level)."""
    from monai.networks.nets import BasicUNet

    w = config.base_channels
    features = (w, 2 * w, 4 * w, 8 * w, 16 * w, w)
    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=2, features=features)


def _scale():
    """MONAI's percentile scaling, returning plain tensors (no MONAI metadata)."""
    from monai.data import set_track_meta
    from monai.transforms import ScaleIntensityRangePercentiles

    set_track_meta(False)
    return ScaleIntensityRangePercentiles(lower=1.0, upper=99.8, b_min=0.0, b_max=1.0, channel_wise=True)


def _channels_first(image: np.ndarray) -> np.ndarray:
    return (image[np.newaxis] if image.ndim == 2 else np.moveaxis(image, -1, 0)).astype(np.float32)


def augmentation(tile: int, seed: int):
    from monai.transforms import (
        Compose, Rand2DElasticd, RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd,
        RandShiftIntensityd, RandSpatialCropd, SpatialPadd,
    )  # fmt: skip

    keys = ("image", "label")
    transform = Compose([
        SpatialPadd(keys, spatial_size=(tile, tile), mode="reflect"),
        RandSpatialCropd(keys, roi_size=(tile, tile), random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5),
        Rand2DElasticd(keys, spacing=(tile // 2, tile // 2), magnitude_range=ELASTIC_MAGNITUDE, prob=1.0,
                       rotate_range=(np.pi,), scale_range=(0.1, 0.1), mode=("bilinear", "nearest"),
                       padding_mode="reflection"),
        RandScaleIntensityd("image", factors=0.2, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", std=0.02, prob=0.5),
    ])  # fmt: skip
    transform.set_random_state(seed=seed)
    return transform


def train_peer(
    samples: Sequence[Sample], run_dir: Path, config: TrainConfig, *, device: str = "cpu", progress: bool = False
) -> torch.nn.Module:
    """Train the peer on ``samples`` for ``config.steps`` steps; save ``run_dir/peer.pt``.

    ``config`` is the peer's (:func:`peer_config`). Each step draws ``config.batch_size``
    images uniformly (as biounet's tiles do), one random augmented tile from each, and
    takes one optimiser step on ``DiceCELoss``. With ``config.minutes`` the number of steps
    is fixed after :data:`biounet.training.BUDGET_PROBE_STEPS` timed steps, as biounet's
    training does (:func:`biounet.training.plan_steps`); the steps run are logged in
    ``run_dir/peer.json``.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data = peer_data(samples)
    tile = peer_tile(config)
    transform = augmentation(tile, config.seed)
    net = peer_network(config, data[0]["image"].shape[0]).to(device)
    optimizer = make_optimizer(net, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    started = time.perf_counter()
    steps = config.steps if config.minutes is None else math.inf
    bar = tqdm(desc="peer", disable=not progress)
    step = 0
    while step < steps:
        step += 1
        if step == 6:
            probe_started = time.perf_counter()  # the first steps warm the kernels up
        if step == BUDGET_PROBE_STEPS + 1 and config.minutes is not None:
            step_seconds = (time.perf_counter() - probe_started) / (BUDGET_PROBE_STEPS - 5)
            steps = plan_steps(60 * config.minutes, time.perf_counter() - started, BUDGET_PROBE_STEPS, step_seconds,
                               0.0, 1)  # fmt: skip
            config = dataclasses.replace(config, steps=steps)
            log.info("peer: time budget %.3g min: %d steps (%.3f s per step)", config.minutes, steps, step_seconds)
            if step > steps:
                break
        bar.update(1)
        loss = peer_step(net, optimizer, loss_fn, transform, data, rng, config.batch_size, device)
        scheduler.step()
        if step % 500 == 0 or step == steps:
            seconds = time.perf_counter() - started
            log.info("peer step %d/%s loss %.4f (%.0f s)", step, steps, loss.item(), seconds)
    bar.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run_dir / WEIGHTS)
    (run_dir / "peer.json").write_text(f'{{"steps": {min(step, steps)}}}\n')
    return net.eval()


def peer_data(samples: Sequence[Sample]) -> list[dict[str, np.ndarray]]:
    """The peer's training items: percentile-scaled ``image`` and the class target ``label``, channels first."""
    scale = _scale()
    return [{"image": np.asarray(scale(_channels_first(s.image))), "label": s.target[np.newaxis].astype(np.float32)}
            for s in samples]  # fmt: skip


def peer_step(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, transform, data: Sequence[dict],
    rng: np.random.Generator, batch_size: int, device: str | torch.device,
) -> torch.Tensor:  # fmt: skip
    """One optimiser step of the peer: ``batch_size`` items drawn uniformly, augmented, ``loss_fn``; the loss."""
    batch = [transform(data[int(i)]) for i in rng.integers(len(data), size=batch_size)]
    image = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device)
    label = torch.stack([torch.as_tensor(b["label"]) for b in batch]).to(device)
    loss = loss_fn(net(image), label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def predict_peer(net: torch.nn.Module, image: np.ndarray, config: TrainConfig, *, device: str = "cpu") -> np.ndarray:
    """``(2, H, W)`` softmax probabilities of ``image`` by MONAI's sliding-window inference."""
    from monai.inferers import sliding_window_inference

    net.eval()
    tile = peer_tile(config)
    x = torch.as_tensor(np.asarray(_scale()(_channels_first(image))))[None].to(device)
    logits = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=4, predictor=net, overlap=0.25,
                                      mode="gaussian")  # fmt: skip
    return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].cpu().numpy()


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
