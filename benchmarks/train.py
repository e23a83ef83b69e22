"""Training speed: the paper recipe's step, with and without its data pipeline, against MONAI.

Measures in one run, on one device:

* ``bare``: one optimiser step of the paper U-Net on a ready tile (572 px in, 388 px out,
  batch 1, weighted cross-entropy, SGD momentum 0.99), no data pipeline;
* ``biounet, augmentation off``: the same step fed by :class:`biounet.data.TileDataset`
  (random tile, mirrored borders, precomputed weight map);
* ``biounet, paper augmentation``: plus :func:`biounet.data.augment_batch` (elastic 3x3
  grid, 10 px, bicubic; rotation, flips, shift, gray values) on the device;
* ``MONAI``: ``BasicUNet`` of the same widths, one 512 px tile, ``Rand2DElastic`` (same
  grid spacing and magnitude as far as MONAI's parameters allow) and ``DiceCELoss``.

Reported: steps per second, output megapixels per second (labelled output pixels trained on
per second) and the share of the bare step rate. ``--precision bfloat16``, ``--compile``
and ``--channels-last`` set the fast path on a GPU. Timings are medians over ``--steps``
steps after ``--warmup`` steps; the load average before and after is printed, because
other jobs on the machine change CPU timings.

``--recipe cpu`` measures instead the CPU recipe (the ``fast`` preset: width 16, depth 4,
batch norm, 380 px tiles in batches of 2, AdamW), each step fed by its whole data pipeline (random tile,
mirrored borders, precomputed weight map, the paper's augmentation), in float32 eager
(``channels_last = false``) against the fast configuration (bfloat16 autocast and
channels-last, the ``precision = "auto"`` default where the CPU has AVX512-BF16 or AMX;
``--compile`` adds a ``torch.compile`` row), and, in the same run, the results page's MONAI
peer (``experiments/peer_monai.py``: ``BasicUNet`` 16-256, 256 px crops in batches of 4, its
own augmentation, ``DiceCELoss``, Adam at 1e-4, float32), in steps/s and labelled output Mpx/s.

Usage::

    python benchmarks/train.py                         # CPU, paper net: minutes on 2 cores
    python benchmarks/train.py --recipe cpu --steps 40 --warmup 5   # the CPU recipe, fp32 vs bf16 vs MONAI
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
from biounet.data import AugmentConfig, augment_batch
from biounet.data import TileDataset, make_sample, synthetic_cells
from biounet.training import weighted_cross_entropy
from biounet.model import ModelInfo
from biounet.training import TrainConfig, make_optimizer


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


def cpu_recipe_steps(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[float, int, int]]:
    """Seconds per step of the ``fast`` preset with its data pipeline, by configuration; tile in and out sides."""
    from biounet.device import resolve_precision
    from biounet.data import weight_map

    config = TrainConfig.preset("fast")
    pairs = synthetic_cells(4, (512, 512), seed=0)
    samples = [make_sample(image, labels, name=str(i)) for i, (image, labels) in enumerate(pairs)]
    variants = {"float32 eager (contiguous)": ("float32", False, False),
                f"{resolve_precision(device)} + channels-last (the default)": (resolve_precision(device), True, False)}
    if args.compile:
        variants[f"{resolve_precision(device)} + channels-last + torch.compile"] = (resolve_precision(device), True, True)
    out: dict[str, tuple[float, int, int]] = {}
    for label, (precision, channels_last, compiled) in variants.items():
        torch.manual_seed(0)
        model = config.model(1, 2, ModelInfo()).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = torch.compile(model) if compiled else model
        optimizer = make_optimizer(model, config)
        tile_in = model.valid_input_size(config.tile)
        tile_out = model.output_size(tile_in)
        crop = slice((tile_in - tile_out) // 2, (tile_in + tile_out) // 2)
        tiles = TileDataset(samples, tile_in, tile_out, targets="input", length=10**6,
                            weight_fn=lambda labels: weight_map(labels, w0=config.w0, sigma=config.sigma))  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(0)
        counter = iter(range(10**6))

        items = [tiles[next(counter)] for _ in range(config.batch_size)]
        ready = tuple(torch.stack(t).to(device) for t in zip(*items, strict=True))

        def step(bare: bool = False) -> None:
            if bare:  # the same batch every step: the network and optimiser alone
                image, target, weight = ready
            else:
                items = [tiles[next(counter)] for _ in range(config.batch_size)]
                image, target, weight = (torch.stack(t).to(device) for t in zip(*items, strict=True))
                image, target, weight = augment_batch(image, target, weight, config=AugmentConfig.paper(),
                                                      generator=generator)  # fmt: skip
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logits = net(image)
            loss = weighted_cross_entropy(logits, target[:, crop, crop], weight[:, crop, crop])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out[label] = (timed(step, device, args.warmup, args.steps), tile_in, tile_out)
        out[label + ", bare step (no data pipeline)"] = (timed(lambda: step(True), device, args.warmup, args.steps),
                                                         tile_in, tile_out)  # fmt: skip
    return out


def monai_cpu_recipe_step(args: argparse.Namespace, device: torch.device) -> tuple[float, int, int]:
    """Seconds per step of the results page's MONAI peer (``experiments/peer_monai.py``); crop side and batch."""
    import sys
    from pathlib import Path

    from monai.losses import DiceCELoss

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import peer_monai

    config = peer_monai.peer_config(TrainConfig.preset("fast"))
    pairs = synthetic_cells(4, (512, 512), seed=0)
    data = peer_monai.peer_data([make_sample(image, labels, name=str(i)) for i, (image, labels) in enumerate(pairs)])
    net = peer_monai.peer_network(config).to(device)
    optimizer = make_optimizer(net, config)
    transform = peer_monai.augmentation(peer_monai.peer_tile(config), seed=0)
    loss_fn, rng = DiceCELoss(to_onehot_y=True, softmax=True), np.random.default_rng(0)

    def step() -> None:
        peer_monai.peer_step(net, optimizer, loss_fn, transform, data, rng, config.batch_size, device)

    return timed(step, device, args.warmup, args.steps), peer_monai.peer_tile(config), config.batch_size


def cpu_recipe_main(args: argparse.Namespace, device: torch.device) -> None:
    load_before = os.getloadavg()[0]
    ours = cpu_recipe_steps(args, device)
    monai_seconds, size, batch = monai_cpu_recipe_step(args, device)
    load_after = os.getloadavg()[0]
    batch_size = TrainConfig.preset("fast").batch_size
    print(f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; CPU recipe (fast preset, "
          f"batch {batch_size}); load average {load_before:.1f} -> {load_after:.1f}\n")  # fmt: skip
    print("| recipe and configuration | tile in -> out | steps/s | output Mpx/s | of float32 eager |")
    print("| --- | --- | --- | --- | --- |")
    base = next(iter(ours.values()))[0]  # float32 eager with its pipeline
    for label, (seconds, tile_in, out) in ours.items():
        print(f"| biounet fast, {label} | {tile_in} -> {out} | {1 / seconds:.3g} | "
              f"{batch_size * out**2 / seconds / 1e6:.3g} | {base / seconds:.2f}x |")  # fmt: skip
    print(f"| MONAI BasicUNet 16-256, float32 | {size} -> {size} | {1 / monai_seconds:.3g} | "
          f"{batch * size**2 / monai_seconds / 1e6:.3g} | - |")  # fmt: skip


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
    parser.add_argument("--recipe", choices=("paper", "cpu"), default="paper",
                        help="the paper's step (default) or the CPU recipe with its pipeline against MONAI's")
    args = parser.parse_args()
    if args.quick:
        args.width, args.tile = 8, 284
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.recipe == "cpu":
        return cpu_recipe_main(args, device)
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
