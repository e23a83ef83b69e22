"""Training speed: the paper recipe's step, with and without its data pipeline, against MONAI.

Measures in one run, on one device:

* ``bare``: one optimiser step of the paper U-Net on a ready tile (572 px in, 388 px out,
  batch 1, weighted cross-entropy, SGD momentum 0.99), no data pipeline;
* ``biounet, augmentation off``: the same step fed by :class:`biounet.datasets.TileDataset`
  (random tile, mirrored borders, precomputed weight map);
* ``biounet, paper augmentation``: plus :func:`biounet.augment.augment_batch` (elastic 3x3
  grid, 10 px, bicubic; rotation, flips, shift, gray values) on the device;
* ``MONAI``: ``BasicUNet`` of the same widths, one 512 px tile, ``Rand2DElastic`` (same
  grid spacing and magnitude as far as MONAI's parameters allow) and ``DiceCELoss``.

Reported: steps per second, output megapixels per second (labelled output pixels trained on
per second) and the share of the bare step rate. ``--precision bfloat16``, ``--compile``
and ``--channels-last`` set the fast path on a GPU. Timings are medians over ``--steps``
steps after ``--warmup`` steps; the load average before and after is printed, because
other jobs on the machine change CPU timings.

Usage::

    python benchmarks/train.py                         # CPU, paper net: minutes on 2 cores
    python benchmarks/train.py --quick                 # 8-channel nets, seconds
    python benchmarks/train.py --device cuda --precision bfloat16 --compile --channels-last
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from biounet import UNet
from biounet.augment import AugmentConfig, augment_batch
from biounet.datasets import TileDataset, make_sample, synthetic_cells
from biounet.losses import weighted_cross_entropy
from biounet.train import TrainConfig, make_optimizer


def timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``step`` after ``warmup`` calls."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def biounet_steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = UNet(base_channels=args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model, TrainConfig.preset("paper"))  # the recipe's: SGD, momentum 0.99, Nesterov
    tile_in = model.valid_input_size(args.tile)
    tile_out = model.output_size(tile_in)
    crop = slice((tile_in - tile_out) // 2, (tile_in + tile_out) // 2)
    pairs = synthetic_cells(4, (512, 512), seed=0)
    samples = [make_sample(image, labels, name=str(i)) for i, (image, labels) in enumerate(pairs)]
    tiles = TileDataset(samples, tile_in, tile_out, targets="input", length=10**6)
    generator = torch.Generator(device=device).manual_seed(0)
    counter = iter(range(10**6))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    ready = tiles[0]
    ready = (ready.image[None].to(device), ready.target[None, crop, crop].to(device),
             ready.weight[None, crop, crop].to(device))  # fmt: skip

    def optimise(image: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> None:
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = net(image)
        loss = weighted_cross_entropy(logits, target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def pipeline(augment: bool) -> Callable[[], None]:
        def step() -> None:
            item = tiles[next(counter)]
            image, target, weight = (t[None].to(device, non_blocking=True) for t in item)
            if augment:
                image, target, weight = augment_batch(image, target, weight, config=AugmentConfig.paper(),
                                                      generator=generator)  # fmt: skip
            optimise(image, target[:, crop, crop], weight[:, crop, crop])

        return step

    return {
        "tile": tile_in, "output": tile_out,
        "bare": timed(lambda: optimise(*ready), device, args.warmup, args.steps),
        "biounet, augmentation off": timed(pipeline(False), device, args.warmup, args.steps),
        "biounet, paper augmentation": timed(pipeline(True), device, args.warmup, args.steps),
    }  # fmt: skip


def monai_step(args: argparse.Namespace, device: torch.device) -> tuple[float, int]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import Rand2DElastic

    w = args.width
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(w, 2 * w, 4 * w, 8 * w, 16 * w, w))
    net = net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    size = 512 if not args.quick else 128
    elastic = Rand2DElastic(spacing=(size // 2, size // 2), magnitude_range=(10, 10), prob=1.0, rotate_range=np.pi,
                            padding_mode="reflection", mode="bilinear", device=device)  # fmt: skip
    image, labels = synthetic_cells(1, (size, size), seed=0)[0]
    image = torch.from_numpy(image.astype(np.float32) / image.max())[None]
    target = torch.from_numpy((labels > 0).astype(np.float32))[None]

    def step() -> None:
        both = elastic(torch.cat([image, target]).to(device))
        x, y = both[:1][None], (both[1:][None] > 0.5).float()
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, args.warmup, args.steps), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="8-channel nets, 284 px tiles: a smoke check")
    args = parser.parse_args()
    if args.quick:
        args.width, args.tile = 8, 284
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()[0]
    ours = biounet_steps(args, device)
    monai_seconds, monai_size = monai_step(args, device)
    load_after = os.getloadavg()[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; width {args.width}; precision {args.precision}; "
          f"compile {args.compile}; load average {load_before:.1f} -> {load_after:.1f}\n")  # fmt: skip
    print("| step | tile in -> out | steps/s | output Mpx/s | of bare |")
    print("| --- | --- | --- | --- | --- |")
    bare = ours["bare"]
    for key in ("bare", "biounet, augmentation off", "biounet, paper augmentation"):
        mpx = ours["output"] ** 2 / ours[key] / 1e6
        print(f"| {key} | {ours['tile']} -> {ours['output']} | {1 / ours[key]:.3g} | {mpx:.3g} | {bare / ours[key]:.0%} |")
    print(f"| MONAI BasicUNet + Rand2DElastic + DiceCE | {monai_size} -> {monai_size} | {1 / monai_seconds:.3g} | "
          f"{monai_size**2 / monai_seconds / 1e6:.3g} | - |")  # fmt: skip


if __name__ == "__main__":
    main()
