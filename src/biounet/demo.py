"""``make demo``: the main job on the embedded synthetic data, start to finish on a CPU.

Generate touching synthetic cells, train the ``fast`` preset, segment a held-out image
larger than one tile with the overlap-tile predictor, score it (foreground IoU, object F1 at
IoU 0.5) and write an overlay and the training curves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    iou: float
    f1: float
    train_seconds: float
    predict_seconds: float
    tiles: int
    files: tuple[Path, ...]


def run_demo(
    out_dir: Path, *, steps: int | None = None, n_train: int = 12, seed: int = 0, progress: bool = True
) -> DemoResult:
    """Train on synthetic cells and segment a held-out image; see the module docstring."""
    import torch

    from biounet.datasets import make_sample, synthetic_cells
    from biounet.inference import labels_from_probabilities
    from biounet.io import label_overlay, write_png, write_tiff
    from biounet.metrics import iou_per_class, match_objects
    from biounet.tiling import plan_tiles, predict
    from biounet.train import TrainConfig, train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = {"steps": steps} if steps else {}
    config = TrainConfig.preset("fast", seed=seed, **overrides)
    pairs = synthetic_cells(n_train + 1, (256, 256), seed=seed)
    samples = [make_sample(im, lab, name=f"synthetic_{i:02d}") for i, (im, lab) in enumerate(pairs[:n_train])]
    val = [make_sample(*pairs[n_train], name="synthetic_val")]
    log.info("demo: %d synthetic training images (256x256), %s preset, %d steps", n_train, "fast", config.steps)

    t0 = time.perf_counter()
    run_dir = out_dir / "run"
    model = train(samples, run_dir, config, val_samples=val, resume=(run_dir / "checkpoint.pt").exists(),
                  progress=progress)  # fmt: skip
    train_seconds = time.perf_counter() - t0

    image, truth = synthetic_cells(1, (480, 640), seed=seed + 1000)[0]
    tile = 320  # smaller than the image, so that the overlap-tile strategy is at work
    layout = plan_tiles(model.config, image.shape, tile)
    t0 = time.perf_counter()
    prob = predict(model, image, tile=tile, progress=progress)
    predict_seconds = time.perf_counter() - t0
    labels = labels_from_probabilities(prob, **model.info.postprocess)
    iou = float(iou_per_class(truth > 0, prob[1] > 0.5, num_classes=2)[1])
    f1 = float(match_objects(truth, labels, thresholds=(0.5,)).f1[0])
    files = (
        write_tiff(out_dir / "heldout_image.tif", image),
        write_tiff(out_dir / "heldout_labels.tif", labels),
        write_png(out_dir / "heldout_overlay.png", label_overlay(image, labels)),
        run_dir / "curves.png",
    )
    tiles = int(np.prod([a.count for a in layout]))
    return DemoResult(iou, f1, train_seconds, predict_seconds, tiles, files)
