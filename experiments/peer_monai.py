"""The same-budget peer: MONAI's ``BasicUNet`` trained the MONAI way.

Same training data, class targets (cell vs background, with the 1-px lines between
touching objects), tile size, batch size, number of steps, optimiser and learning-rate
schedule as the biounet run it is compared with; everything else is MONAI's own:

* network: ``BasicUNet`` (zero-padded convolutions, instance norm, LeakyReLU) with the
  widths of the biounet run, ``(w, 2w, 4w, 8w, 16w, w)``. ``BasicUNet`` always has four
  poolings; for a shallower biounet net (the ``fast`` preset has three) the peer has one
  level more, i.e. more capacity, not less;
* input scaling: ``ScaleIntensityRangePercentilesd`` (1st and 99.8th percentile to 0 and 1,
  per image), the same percentiles as biounet's;
* augmentation: random crop, flips, 90-degree rotations, ``Rand2DElasticd`` (control points
  every half tile, which MONAI makes a 6 x 6 grid for a 208 px tile; Gaussian offsets whose
  standard deviation is drawn from U(0, 10) px per sample, so weaker on average than the
  paper's 10 px; any rotation, 10 % scaling, reflection padding), intensity scaling and
  shifting and Gaussian noise;
* loss: ``DiceCELoss`` (soft Dice + cross-entropy, unweighted: no border weights);
* inference: ``sliding_window_inference`` with tiles of the training size, 25 % overlap and
  Gaussian blending (no test-time augmentation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biounet.datasets import Sample
from biounet.train import TrainConfig, lr_factor, make_optimizer

log = logging.getLogger(__name__)

#: MONAI ``BasicUNet`` pools four times, so tiles are multiples of 16.
STRIDE = 16
#: Range of the standard deviation of MONAI's elastic offsets in px (the paper's is 10).
ELASTIC_MAGNITUDE = (0.0, 10.0)
WEIGHTS = "peer.pt"
#: The fields of the biounet recipe that the peer uses (its own network, augmentation and
#: loss replace the rest); a peer run is reused when these are unchanged.
RECIPE_FIELDS = (
    "base_channels", "tile", "batch_size", "steps", "optimizer", "lr", "momentum", "weight_decay", "schedule",
    "warmup", "seed", "split", "min_size",
)  # fmt: skip


def peer_tile(config: TrainConfig) -> int:
    """Training and inference tile: the biounet tile rounded up to a multiple of 16."""
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


def _augmentation(tile: int, seed: int):
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

    Each step draws ``config.batch_size`` images uniformly (as biounet's tiles do), one random
    augmented tile from each, and takes one optimiser step on ``DiceCELoss``.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    scale = _scale()
    data = [{"image": np.asarray(scale(_channels_first(s.image))), "label": s.target[np.newaxis].astype(np.float32)}
            for s in samples]  # fmt: skip
    tile = peer_tile(config)
    transform = _augmentation(tile, config.seed)
    net = peer_network(config, data[0]["image"].shape[0]).to(device)
    optimizer = make_optimizer(net, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    started = time.perf_counter()
    for step in tqdm(range(1, config.steps + 1), desc="peer", disable=not progress):
        batch = [transform(data[int(i)]) for i in rng.integers(len(data), size=config.batch_size)]
        image = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device)
        label = torch.stack([torch.as_tensor(b["label"]) for b in batch]).to(device)
        loss = loss_fn(net(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == config.steps:
            seconds = time.perf_counter() - started
            log.info("peer step %d/%d loss %.4f (%.0f s)", step, config.steps, loss.item(), seconds)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), run_dir / WEIGHTS)
    return net.eval()


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
