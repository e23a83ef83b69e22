"""Benchmark: biounet.data.weight_map against the naive eq. 2 (one full distance transform per cell).

Run ``python benchmarks/weights.py``; with ``BIOUNET_DATA`` set it also times the 1024x1024
brightfield DSB 2018 label image with the most nuclei. Prints a Markdown table.
"""

from __future__ import annotations

import csv
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage as ndi

from biounet.io import read_image
from biounet.data import weight_map


def naive_weight_map(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Eq. 2 the slow way, with the same balanced class weights as :func:`weight_map`."""
    cells = [k for k in np.unique(labels) if k != 0]
    foreground = labels > 0
    counts = np.bincount(foreground.ravel(), minlength=2)
    present = counts > 0
    w = np.where(present, labels.size / (present.sum() * np.maximum(counts, 1)), 0.0)[foreground.astype(int)]
    if len(cells) < 2:
        return w
    distances = np.sort(np.stack([ndi.distance_transform_edt(labels != k) for k in cells]), axis=0)
    return w + w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2)) * ~foreground


def touching_cells(
    shape: tuple[int, int] = (512, 512), n: int = 150, radius: float = 24.0, seed: int = 0
) -> np.ndarray:
    """Voronoi cells around random seeds, cut to discs of ``radius``: clumps of touching cells."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[tuple(rng.integers(0, shape, size=(n, 2)).T)] = np.arange(1, n + 1)
    distance, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(distance < radius, seeds[tuple(nearest)], 0)


def touching_pairs(labels: np.ndarray) -> int:
    """Number of pairs of cells with 4-adjacent pixels."""
    pairs = set()
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist())}
    return len(pairs)


def best_of(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    synthetic = touching_cells()
    cases = [(f"synthetic, touching (150 Voronoi cells cut to discs, {touching_pairs(synthetic)} touching pairs)",
              synthetic)]  # fmt: skip
    data = os.environ.get("BIOUNET_DATA")
    if data and Path(data, "dsb2018-nuclei", "manifest.csv").is_file():
        root = Path(data, "dsb2018-nuclei")
        with open(root / "manifest.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["category"] == "brightfield_gray"]
        busiest = max(rows, key=lambda r: int(r["n_instances"]))
        cases.append((f"DSB brightfield {busiest['id'][:8]}", read_image(root / "labels" / f"{busiest['id']}.tif")))
    print(f"weight_map (w0=10, sigma=5), {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}, scipy {scipy.__version__}")  # fmt: skip
    print()
    print("| image | size | cells | naive (s) | biounet (ms) | speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, labels in cases:
        fast = weight_map(labels)
        naive = naive_weight_map(labels)
        t_fast = best_of(lambda labels=labels: weight_map(labels), 5)
        t_naive = best_of(lambda labels=labels: naive_weight_map(labels), 2)
        n_cells = np.unique(labels[labels > 0]).size
        print(
            f"| {name} | {labels.shape[0]}x{labels.shape[1]} | {n_cells} | {t_naive:.2f} | {t_fast * 1e3:.1f} "
            f"| {t_naive / t_fast:.0f}x | {np.abs(fast - naive).max():.1e} |"
        )


if __name__ == "__main__":
    main()
