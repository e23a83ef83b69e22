"""``make demo``: the main job on the embedded synthetic data, start to finish on a CPU.

Generate touching synthetic cells, train the ``fast`` preset, segment a held-out image
larger than one tile with the overlap-tile predictor, score its instances (foreground IoU,
object F1 at IoU 0.5: :func:`biounet.metrics.score_instances`) and write an overlay and the
training curves. Then segment a real-looking image with the shipped ``nuclei`` model: a
held-out image of the DSB 2018 set it was validated on when ``$BIOUNET_DATA`` holds it,
else synthetic fluorescence cells.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedResult:
    """A shipped model's segmentation of one image in the demo."""

    model: str
    source: str
    shape: tuple[int, ...]
    seconds: float
    objects: int
    f1: float
    overlay: Path


@dataclass(frozen=True)
class DemoResult:
    iou: float
    f1: float
    train_seconds: float
    predict_seconds: float
    tiles: int
    files: tuple[Path, ...]
    shipped: ShippedResult | None = None


def run_demo(
    out_dir: Path, *, steps: int | None = None, n_train: int = 12, seed: int = 0, progress: bool = True
) -> DemoResult:
    """Train on synthetic cells and segment a held-out image; see the module docstring."""
    import torch

    from biounet.data import make_sample, synthetic_cells
    from biounet.io import label_overlay, write_png, write_tiff
    from biounet.metrics import score_instances
    from biounet.postprocess import labels_from_probabilities
    from biounet.prediction import plan_tiles, predict
    from biounet.training import TrainConfig, train

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
    scores = score_instances(truth, labels, thresholds=(0.5,))
    iou, f1 = scores.foreground_iou, float(scores.f1[0])
    files = (
        write_tiff(out_dir / "heldout_image.tif", image),
        write_tiff(out_dir / "heldout_labels.tif", labels),
        write_png(out_dir / "heldout_overlay.png", label_overlay(image, labels)),
        run_dir / "curves.png",
    )
    tiles = int(np.prod([a.count for a in layout]))
    shipped = segment_with_shipped_model(out_dir, seed=seed, progress=progress)
    return DemoResult(iou, f1, train_seconds, predict_seconds, tiles, (*files, shipped.overlay), shipped)


def segment_with_shipped_model(
    out_dir: Path, *, name: str = "nuclei", seed: int = 0, progress: bool = True
) -> ShippedResult:
    """Segment one real-looking image with a shipped model; write its overlay to ``out_dir``.

    The image is the first fluorescence image (by the data set's ``manifest.csv``; else the
    first image) among the model's held-out evaluation images (recorded in its provenance)
    found under ``$BIOUNET_DATA``; without the data, a 512x512 synthetic fluorescence
    image. The time covers prediction and post-processing, not loading.
    """
    from biounet.data import read_manifest, read_sample, synthetic_cells
    from biounet.io import label_overlay, write_png
    from biounet.metrics import score_instances
    from biounet.model import load_model
    from biounet.postprocess import labels_from_probabilities
    from biounet.prediction import predict

    model = load_model(name)
    evaluation = model.info.provenance.get("evaluation", {})
    found: list[str] = []
    if data := os.environ.get("BIOUNET_DATA"):
        root = Path(data) / str(evaluation.get("dataset", ""))
        found = [i for i in evaluation.get("images", []) if (root / "images" / f"{i}.png").is_file()]
        try:
            categories = read_manifest(root / "manifest.csv")
        except ValueError:  # no manifest: the images in their order
            categories = {}
        found.sort(key=lambda i: categories.get(i) != "fluorescence")  # fluorescence first, else in order
    if found:
        sample = read_sample(found[0], root / "images" / f"{found[0]}.png", root / "labels" / f"{found[0]}.tif",
                             as_gray=True)  # fmt: skip
        image, truth = sample.image, sample.labels
        source = f"{evaluation['dataset']} image {found[0][:8]} (held out from training)"
    else:
        image, truth = synthetic_cells(1, (512, 512), seed=seed + 2000)[0]
        source = "synthetic fluorescence cells"
    t0 = time.perf_counter()
    prob = predict(model, image, progress=progress)
    labels = labels_from_probabilities(prob, **model.info.postprocess)
    seconds = time.perf_counter() - t0
    overlay = write_png(Path(out_dir) / f"shipped_{name}_overlay.png", label_overlay(image, labels))
    f1 = float(score_instances(truth, labels, thresholds=(0.5,)).f1[0])
    objects = int(np.count_nonzero(np.unique(labels)))
    return ShippedResult(name, source, image.shape, seconds, objects, f1, overlay)

