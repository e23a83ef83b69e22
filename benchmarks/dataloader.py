"""Does a DataLoader with worker processes pay for biounet's training tiles on a small CPU?

Measures, for the CPU recipe's tiles (the ``fast`` preset: 380 px input, 196 px output,
batches of 2, precomputed weight maps, synthetic 512 px images):

* the inline fetch of one batch from :class:`biounet.data.TileDataset` (random window,
  mirrored borders, the cut of target and weights): the work a worker could take over;
* the paper augmentation of that batch (:func:`biounet.data.augment_batch`), which runs on
  the training device and so stays in the training process whatever the loader does;
* the delivery time per batch of ``torch.utils.data.DataLoader(num_workers=N)``, i.e. what
  the training process waits for each batch when workers prepare them.

Compare both with the step time of the recipe (``benchmarks/train.py --recipe cpu``). The load
average before and after is printed; run it with nothing else on the machine.

Usage::

    python benchmarks/dataloader.py --workers 1 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from biounet.data import AugmentConfig, TileDataset, augment_batch, make_sample, synthetic_cells, weight_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    samples = [make_sample(i, lab, name=str(k)) for k, (i, lab) in enumerate(synthetic_cells(8, (512, 512), seed=0))]
    tiles = TileDataset(samples, 380, 196, targets="input", length=4 * args.batches + 8, seed=0,
                        weight_fn=lambda labels: weight_map(labels, w0=10.0, sigma=5.0))  # fmt: skip
    fetch = []
    for i in range(args.batches):
        t0 = time.perf_counter()
        batch = [tiles[2 * i + j] for j in range(2)]
        fetch.append(time.perf_counter() - t0)
    config, generator, augment = AugmentConfig.paper(), torch.Generator().manual_seed(0), []
    for i in range(min(60, args.batches)):
        batch = [tiles[2 * i + j] for j in range(2)]
        image, target, weight = (torch.stack([getattr(t, n) for t in batch]) for n in ("image", "target", "weight"))
        t0 = time.perf_counter()
        augment_batch(image, target, weight, config=config, generator=generator)
        augment.append(time.perf_counter() - t0)
    loader = torch.utils.data.DataLoader(tiles, batch_size=2, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)  # fmt: skip
    batches = iter(loader)
    next(batches)  # workers started
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    delivery = (time.perf_counter() - t0) / args.batches
    print(f"inline fetch of a batch of 2 tiles: {statistics.median(fetch) * 1e3:.2f} ms (median)")
    print(f"paper augmentation of the batch (training process): {statistics.median(augment) * 1e3:.1f} ms (median)")
    print(f"DataLoader(num_workers={args.workers}) delivery: {delivery * 1e3:.2f} ms per batch (mean)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
