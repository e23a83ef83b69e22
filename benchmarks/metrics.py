"""Benchmark: all ISBI 2012 scores of one 512x512 slice, and scikit-image in the same run.

Run ``python benchmarks/metrics.py`` (with ``BIOUNET_DATA`` set, the ground truth is the ISBI
training slice ``isbi2012-em/labels/00.png``; without it, a synthetic 512x512 slice of
Voronoi cells with 2-px membranes). The prediction is the ground truth's cell mask blurred
(Gaussian, sigma 2 px) plus smooth noise (Gaussian-filtered, sigma 4 px, amplitude 0.15),
clipped to [0, 1]: borders are uncertain, so the scores vary over the thresholds.

Times (median and best wall clock, best CPU time of the process, over the repeats):

* ``biounet.metrics.isbi_scores``: V_rand and V_info after Fiji's border thinning, the pixel
  error, and the warping error with its classified mismatches, at the 11 thresholds;
* the same without the warping error, and the warping error alone at 0.5;
* scikit-image's ``adapted_rand_error`` and ``variation_of_information`` on the
  4-connected components of the ground truth and of ``prob > 0.5``: one threshold, no
  thinning, no warping (scikit-image has no ISBI evaluation; this is its nearest
  equivalent), and the same for the 11 thresholds.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
from scipy import ndimage

from biounet import metrics

REPEATS = 5


def ground_truth() -> tuple[np.ndarray, str]:
    """The ISBI slice 00 if ``BIOUNET_DATA`` holds it, else synthetic Voronoi cells."""
    root = os.environ.get("BIOUNET_DATA")
    path = Path(root, "isbi2012-em", "labels", "00.png") if root else None
    if path is not None and path.is_file():
        import imageio.v3 as iio

        return iio.imread(path), "ISBI 2012 labels/00.png"
    rng = np.random.default_rng(0)
    seeds = np.zeros((512, 512), bool)
    seeds[rng.integers(0, 512, 300), rng.integers(0, 512, 300)] = True
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cells = iy * 512 + ix
    border = ndimage.grey_dilation(cells, size=3) != ndimage.grey_erosion(cells, size=3)
    return np.where(border, 0, 255).astype(np.uint8), "synthetic Voronoi cells (no BIOUNET_DATA)"


def prediction(gt: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    blurred = ndimage.gaussian_filter((gt > 0).astype(np.float32), 2.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(gt.shape).astype(np.float32), 4.0)
    noise *= 0.15 / noise.std()
    return np.clip(blurred + noise, 0.0, 1.0).astype(np.float32)


def timed(function: Callable[[], object]) -> tuple[float, float, float]:
    """(median wall, best wall, best CPU) seconds over REPEATS calls after a warm-up call.

    The CPU time of this process is the steadier number on a machine shared with other jobs.
    """
    function()
    wall, cpu = [], []
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.min(wall)), float(np.min(cpu))


def main() -> None:
    from skimage.metrics import adapted_rand_error, variation_of_information

    gt, source = ground_truth()
    prob = prediction(gt)
    gt_labels = ndimage.label(gt > 0)[0]

    def skimage_once(t: float = 0.5) -> None:
        pred_labels = ndimage.label(prob > t)[0]
        adapted_rand_error(gt_labels, pred_labels)
        variation_of_information(gt_labels, pred_labels, ignore_labels=[0])

    rows = [
        ("biounet isbi_scores: all scores, 11 thresholds", lambda: metrics.isbi_scores(prob, gt)),
        ("biounet isbi_scores(warping=False): V_rand, V_info, pixel error, 11 thresholds",
         lambda: metrics.isbi_scores(prob, gt, warping=False)),
        ("biounet warping_error at 0.5 (warp + classify)", lambda: metrics.warping_error(prob, gt)),
        ("skimage adapted_rand_error + variation_of_information, 1 threshold, no thinning", skimage_once),
        ("the same, 11 thresholds", lambda: [skimage_once(t) for t in metrics.ISBI_THRESHOLDS]),
    ]
    print(f"ground truth: {source}, {gt.shape[0]}x{gt.shape[1]}, {gt_labels.max()} cells")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {version('scipy')}, "
          f"scikit-image {version('scikit-image')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    print("| computation | median wall (ms) | best wall (ms) | best CPU (ms) |")
    print("| --- | --- | --- | --- |")
    for name, function in rows:
        median, best, cpu = timed(function)
        print(f"| {name} | {1000 * median:.0f} | {1000 * best:.0f} | {1000 * cpu:.0f} |")
    summary = metrics.isbi_scores(prob, gt).summary()
    print("\n| score | value | threshold |")
    print("| --- | --- | --- |")
    for name, threshold in (("v_rand", "v_rand_threshold"), ("v_info", "v_info_threshold"),
                            ("pixel_error", "pixel_error_threshold"), ("warping_error", "warping_threshold"),
                            ("splits_mergers_error", "splits_mergers_threshold")):
        print(f"| {name} | {summary[name]:.6f} | {summary[threshold]:.1f} |")


if __name__ == "__main__":
    main()
