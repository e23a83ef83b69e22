"""Benchmark: elastic deformation of a 512x512 image + labels, biounet vs elasticdeform vs MONAI.

Run ``python benchmarks/augment.py``. Every library deforms the image with cubic
interpolation and the labels with nearest neighbour, mirrored borders, one random
N(0, 10 px) displacement grid per image. Prints a Markdown table (per-image time and
throughput); a GPU row is added when CUDA is available.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
import torch

from biounet.data import AugmentConfig, augment_batch

SIZE = 512
ELASTIC_ONLY = AugmentConfig(
    max_shift=0.0, max_rotation=0.0, flip=False, gamma=0.0, contrast=0.0, brightness=0.0, noise_std=0.0
)


def per_call_seconds(function: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of one call, after two warm-up calls."""
    for _ in range(2):
        function()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    import elasticdeform
    from monai.transforms import Rand2DElastic

    rng = np.random.default_rng(0)
    image = rng.random((SIZE, SIZE), dtype=np.float32)
    labels = rng.integers(0, 200, (SIZE, SIZE)).astype(np.int32)
    image_t, labels_t = torch.from_numpy(image)[None, None], torch.from_numpy(labels)[None]
    monai = Rand2DElastic(spacing=(256, 256), magnitude_range=(10, 10), prob=1.0, padding_mode="reflection")
    monai.set_random_state(0)

    def run_elasticdeform() -> None:
        elasticdeform.deform_random_grid([image, labels], sigma=10, points=3, order=[3, 0], mode="mirror")

    def run_monai() -> None:
        monai(image[None], mode="bicubic")
        monai(labels[None].astype(np.float32), mode="nearest", randomize=False)

    def run_biounet(x: torch.Tensor, y: torch.Tensor, config: AugmentConfig) -> Callable[[], None]:
        gen = torch.Generator(device=x.device).manual_seed(0)
        return lambda: augment_batch(x, y, config=config, generator=gen)

    paper, batch, threads = AugmentConfig.paper(), 8, torch.get_num_threads()
    image_b, labels_b = image_t.repeat(batch, 1, 1, 1), labels_t.repeat(batch, 1, 1)
    # (method, torch threads, images per call, function, repeats)
    cases: list[tuple[str, int | None, int, Callable[[], object], int]] = [
        ("elasticdeform.deform_random_grid (3x3; cubic B-spline / order 0)", None, 1, run_elasticdeform, 20),
        ("MONAI Rand2DElastic (spacing 256; bicubic / nearest)", threads, 1, run_monai, 10),
    ]
    for n_threads in sorted({1, threads}):
        cases += [
            ("biounet augment_batch, elastic only (3x3; bicubic / nearest)", n_threads, 1,
             run_biounet(image_t, labels_t, ELASTIC_ONLY), 50),
            ("biounet augment_batch, paper config", n_threads, 1, run_biounet(image_t, labels_t, paper), 50),
            (f"biounet augment_batch, paper config, batch of {batch}", n_threads, batch,
             run_biounet(image_b, labels_b, paper), 10),
        ]  # fmt: skip
    gpu = torch.cuda.is_available()
    if gpu:
        gpu_batch, cuda = 32, torch.device("cuda")
        image_g, labels_g = image_t.repeat(gpu_batch, 1, 1, 1).to(cuda), labels_t.repeat(gpu_batch, 1, 1).to(cuda)
        cases.append((f"biounet augment_batch, paper config, batch of {gpu_batch}, GPU {torch.cuda.get_device_name()}",
                      None, gpu_batch, run_biounet(image_g, labels_g, paper), 20))  # fmt: skip
    print(
        f"{SIZE}x{SIZE} float32 image + int32 labels; {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"torch {torch.__version__}, elasticdeform {version('elasticdeform')}, monai {version('monai')}"
    )
    print()
    print("| method | torch threads | ms / image | Mpx/s | vs elasticdeform |")
    print("| --- | --- | --- | --- | --- |")
    reference = None
    for name, n_threads, images, function, repeats in cases:
        torch.set_num_threads(n_threads or threads)
        sync = torch.cuda.synchronize if gpu and "GPU" in name else lambda: None
        per_image = per_call_seconds(function, repeats, sync) / images
        reference = reference or per_image
        mpx = SIZE * SIZE / per_image / 1e6
        print(f"| {name} | {n_threads or '-'} | {per_image * 1e3:.1f} | {mpx:.1f} | {reference / per_image:.1f}x |")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
