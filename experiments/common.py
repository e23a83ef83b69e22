"""Shared pieces of the reproduction experiments: splits, scores, tables, figures, hardware.

Everything here is deterministic and independent of where the data lies; ``reproduce.py``
does the training and bookkeeping, and ``tests/test_reproduce.py`` checks the pieces.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from biounet.data import Sample, make_sample, read_manifest  # noqa: F401 (read_manifest: re-exported)
from biounet.postprocess import labels_from_probabilities
from biounet.io import atomic_write, label_overlay, to_uint8
from biounet.metrics import isbi_scores, score_instances

#: Data set folders under ``$BIOUNET_DATA``.
EM_DIR, NUCLEI_DIR = "isbi2012-em", "dsb2018-nuclei"
DATASETS = ("em", "nuclei")
#: Variants in the order they run (most important first, for ``--time-limit``).
VARIANTS = ("unet", "monai", "cellpose", "seed-1", "seed-2", "as-is-background", "previous-recipe", "float32",
            "pick-objects", "balance-image", "balance-none", "border-class", "wide", "precise-bn", "no-elastic",
            "no-border", "same-padding")
#: Ablations and the one thing each changes (``configs/ablation-<name>.toml``).
ABLATIONS = {
    "float32": "float32 eager, contiguous memory (the CPU default before bfloat16 and channels-last)",
    "previous-recipe": "the previous CPU recipe's net and tiles: 3 poolings, 204 px tiles in batches of 4",
    "border-class": 'a third class for the cells\' outermost pixels; objects grow from the interiors (`target = '
                    '"border"`, `split = "border"`)',
    "wide": "twice the width (`base_channels = 32`, 4x the computation per step, fewer steps in the budget)",
    "as-is-background": 'every image as it is, dark nuclei on a bright background (brightfield, H&E) beside bright '
                        'nuclei on a dark one (fluorescence), none inverted (`background = "as-is"`)',
    "pick-objects": 'the image of each training tile drawn in proportion to its labelled objects, not every image '
                    'equally often (`pick = "objects"`)',
    "balance-image": "the class weights of the loss from the class frequencies of each image, not of all training "
                     'images together (`class_balance = "image"`, the paper\'s and the default)',
    "balance-none": 'no class weights in the loss, only the border term (`class_balance = "none"`)',
    "precise-bn": "batch-norm statistics recomputed over 50 training batches before each validation and at the end "
                  "(`precise_bn = 50`; its time counts in the budget)",
    "seed-1": "nothing but the seed (`seed = 1`): the run-to-run noise",
    "seed-2": "nothing but the seed (`seed = 2`): the run-to-run noise",
    "no-elastic": "no elastic deformation (`elastic_std = 0`)",
    "no-border": "no border term of the weight map (`w0 = 0`)",
    "same-padding": 'same padding (`padding = "same"`), tiled at the training tile, with its seams',
}
#: Recipes trained again with other seeds: the variant and its seed variants (their spread is the noise).
SEED_VARIANTS = {"unet": ("seed-1", "seed-2")}
#: Peers: trained with their own code and recipe, not the U-Net's.
PEERS = ("monai", "cellpose")
#: Variants for instance segmentation only: they run on the nuclei whenever selected (an
#: ablation among them whatever ``--ablation-datasets`` says), never on the EM membranes.
NUCLEI_ONLY = ("cellpose", "border-class", "wide", "as-is-background", "pick-objects", "balance-image",
               "balance-none")
LABELS = {"unet": "biounet U-Net", "monai": "MONAI BasicUNet (peer)", "cellpose": "Cellpose 3.1 (peer)", **{k: f"U-Net, {k}" for k in ABLATIONS}}
N_FOLDS = 5
#: The paper's ISBI 2012 scores (Ronneberger et al. 2015, Table 1), on the challenge's test set.
PAPER_EM = {"warping_error": 0.000353, "rand_error": 0.0382, "pixel_error": 0.0611}

#: ISBI 2012 scores reported per fold: name -> (higher is better, format).
EM_METRICS: dict[str, tuple[bool, str]] = {
    "v_rand": (True, ".4f"),
    "v_info": (True, ".4f"),
    "rand_error": (False, ".4f"),
    "pixel_error": (False, ".4f"),
    "warping_error": (False, ".6f"),
}
#: Nuclei scores reported per image: name -> (higher is better, format).
NUCLEI_METRICS: dict[str, tuple[bool, str]] = {
    "iou": (True, ".3f"),
    "seg": (True, ".3f"),
    "f1": (True, ".3f"),
    "ap": (True, ".3f"),
}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def contiguous_folds(names: Sequence[str], n_folds: int) -> list[list[str]]:
    """Split ``names`` (in their order) into ``n_folds`` contiguous blocks of equal size.

    Neighbouring ISBI slices are 50 nm apart and look alike, so each fold holds out a block
    of consecutive slices (fold k of 25 slices: slices 5k .. 5k + 4): a held-out slice never
    has its immediate neighbours in the training set except at the block ends.

    Raises
    ------
    ValueError
        If ``len(names)`` is not a positive multiple of ``n_folds``.
    """
    if n_folds < 1 or not names or len(names) % n_folds:
        raise ValueError(f"n_folds={n_folds} must divide the number of images {len(names)}")
    size = len(names) // n_folds
    return [list(names[k * size : (k + 1) * size]) for k in range(n_folds)]


def stratified_split(
    categories: Mapping[str, str], fraction: float, *, seed: int
) -> tuple[list[str], list[str]]:
    """Hold out ``ceil(fraction * n_c)`` images of each category ``c``, chosen by ``seed``.

    Categories are visited in sorted order and the ids of each in sorted order; one
    ``numpy.random.default_rng(seed)`` permutes them in turn. Returns sorted
    ``(train_ids, validation_ids)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for category in sorted(set(categories.values())):
        ids = sorted(i for i, c in categories.items() if c == category)
        order = rng.permutation(len(ids))
        n_val = math.ceil(fraction * len(ids))
        if n_val >= len(ids):
            raise ValueError(f"category {category!r} has {len(ids)} image(s): too few to hold out {n_val}")
        held += [ids[i] for i in order[:n_val]]
        train += [ids[i] for i in order[n_val:]]
    return sorted(train), sorted(held)


def crop_sample(sample: Sample, size: int) -> Sample:
    """The top-left ``size`` x ``size`` corner of a sample, objects renumbered (for ``--quick``)."""
    return make_sample(sample.image[:size, :size], sample.labels[:size, :size], name=sample.name)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def em_scores(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[str, float]:
    """ISBI 2012 scores of the held-out slices of one fold, at one threshold per fold.

    For every threshold of :data:`biounet.metrics.ISBI_THRESHOLDS`, V_rand, V_info, the pixel
    F-score and the warping error (:func:`biounet.metrics.isbi_scores`) are averaged over
    the slices; each score is then taken at its best threshold, as the challenge picks one
    threshold per test stack. ``rand_error = 1 - V_rand``, ``pixel_error = 1 - F``.

    Parameters
    ----------
    probabilities : sequence of ndarray
        Cell probability maps ``(H, W)`` in [0, 1], one per slice.
    truths : sequence of ndarray
        Ground truth per slice, nonzero = cell.
    """
    if not probabilities or len(probabilities) != len(truths):
        raise ValueError(f"need one truth per probability map, got {len(probabilities)} and {len(truths)}")
    per_slice = [isbi_scores(p, t) for p, t in zip(probabilities, truths, strict=True)]
    v_rand = np.mean([s.v_rand for s in per_slice], axis=0)
    v_info = np.mean([s.v_info for s in per_slice], axis=0)
    fscore = np.mean([s.pixel_fscore for s in per_slice], axis=0)
    warping = np.mean([[w.error for w in s.warping] for s in per_slice], axis=0)
    return {
        "v_rand": float(v_rand.max()),
        "v_info": float(v_info.max()),
        "rand_error": 1.0 - float(v_rand.max()),
        "pixel_error": 1.0 - float(fscore.max()),
        "warping_error": float(warping.min()),
    }


def touching_pairs(labels: np.ndarray) -> np.ndarray:
    """Pairs ``(a, b)``, ``a < b``, of objects with 4-adjacent pixels (sorted, unique), shape (k, 2)."""
    labels = np.asarray(labels)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for axis in range(labels.ndim):
        moved = np.moveaxis(labels, axis, 0)
        first, second = moved[:-1].ravel().astype(np.int64), moved[1:].ravel().astype(np.int64)
        touching = (first > 0) & (second > 0) & (first != second)
        a, b = first[touching], second[touching]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.unique(np.concatenate(found), axis=0)


def majority_owner(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """For each true object, the predicted object covering more than half of it (0 if none).

    The Cell Tracking Challenge's matching rule (SEG): at most one predicted object can
    qualify. Returns an array indexed by the true label (entry 0 unused).
    """
    gt, pred = np.asarray(gt).astype(np.int64), np.asarray(pred).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    sizes = np.bincount(gt.ravel(), minlength=int(gt.max(initial=0)) + 1)
    both = (gt > 0) & (pred > 0)
    pairs, counts = np.unique(np.stack([gt[both], pred[both]]), axis=1, return_counts=True)
    owner = np.zeros(sizes.size, dtype=np.int64)
    major = counts > 0.5 * sizes[pairs[0]]
    owner[pairs[0][major]] = pairs[1][major]
    return owner


def merged_touching_pairs(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """Touching true pairs, and how many of them come out merged.

    A pair of 4-adjacent true objects is *merged* when both are matched (more than half of
    each covered, :func:`majority_owner`) by the same predicted object.

    Returns
    -------
    (n_touching, n_merged) : (int, int)
    """
    pairs = touching_pairs(gt)
    owner = majority_owner(gt, pred)
    a, b = owner[pairs[:, 0]], owner[pairs[:, 1]]
    return len(pairs), int(np.count_nonzero((a == b) & (a > 0)))


def nuclei_scores(
    gt: np.ndarray, probabilities: np.ndarray, postprocess: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Scores of one image from its ``(2, H, W)`` class probabilities.

    The objects come from :func:`biounet.postprocess.labels_from_probabilities` with
    ``postprocess`` (a model's ``info.postprocess``, e.g. ``{"split": "distance"}``), the
    labels that ``biounet predict`` writes for that model. Keys: ``iou`` (foreground IoU),
    ``seg`` (Cell Tracking Challenge SEG), ``f1`` and ``ap`` (object F1 and
    TP / (TP + FP + FN) at IoU > 0.5), all of :func:`biounet.metrics.score_instances`, and
    ``touching`` and ``merged`` (:func:`merged_touching_pairs`).
    """
    return nuclei_label_scores(gt, labels_from_probabilities(probabilities, **(postprocess or {})))


def nuclei_label_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """:func:`nuclei_scores` of predicted instance labels (a peer's masks, e.g. Cellpose's)."""
    scores = score_instances(gt, pred, thresholds=(0.5,))
    touching, merged = merged_touching_pairs(gt, pred)
    return {
        "iou": scores.foreground_iou,
        "seg": scores.seg,
        "f1": float(scores.f1[0]),
        "ap": float(scores.average_precision[0]),
        "touching": touching,
        "merged": merged,
    }


def mean_nuclei_scores(images: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means of the :data:`NUCLEI_METRICS` over images, and the total touching and merged pairs."""
    out = {m: float(np.mean([i[m] for i in images])) for m in NUCLEI_METRICS}
    out |= {"touching": int(sum(i["touching"] for i in images)), "merged": int(sum(i["merged"] for i in images))}
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def mean_spread(values: Sequence[float], fmt: str) -> str:
    """``"mean ± std"`` (sample standard deviation) of ``values``; the mean alone for one value."""
    values = [float(v) for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values, ddof=1)), fmt)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    """``"12.3 min"`` (or seconds below a minute)."""
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------
def cpu_vectors() -> str:
    """The CPU's vector instructions as torch uses them, e.g. ``"AVX512, native bfloat16"`` or ``"AVX2"``.

    Cloud machines of one model name differ here, and with it the training speed (the CPU recipe
    ran 5.6 steps/s on a 2-core AMD EPYC VM with AVX512-BF16 and 1.5 on a 2-core AMD EPYC VM with
    AVX2 only): rows trained for equal minutes compare only where this matches.
    """
    import torch

    from biounet.device import cpu_has_native_bfloat16

    capability = torch.backends.cpu.get_cpu_capability()
    return f"{capability}, native bfloat16" if cpu_has_native_bfloat16() else capability


def hardware(device: str) -> dict[str, str]:
    """What the numbers were measured on: CPU model, cores, load, GPU, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": f"{cpu} ({cpu_vectors()}), {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads",
        "load": ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def error_overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB uint8: the image dimmed, false-positive pixels magenta, false-negative pixels green."""
    gray = to_uint8(image if image.ndim == 2 else image.mean(axis=-1)).astype(np.float32) * 0.5
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[predicted & ~truth] = (255, 0, 255)
    rgb[~predicted & truth] = (0, 220, 0)
    return rgb.astype(np.uint8)


def save_panels(path: Path, panels: Sequence[tuple[str, np.ndarray]], title: str) -> Path:
    """Write a row of images with titles to the PNG ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels, strict=True):
        ax.imshow(picture, cmap="gray", vmin=0, vmax=255 if picture.dtype == np.uint8 else 1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def em_figure(path: Path, sample: Sample, probability: np.ndarray, caption: str) -> Path:
    """Input | cell probability | ground truth | pixel errors at 0.5, for an EM slice."""
    truth = sample.labels > 0
    panels = [
        ("input", to_uint8(sample.image)),
        ("prediction p(cell)", probability.astype(np.float32)),
        ("ground truth (cell)", truth.astype(np.uint8) * 255),
        ("errors at p > 0.5: FP magenta, FN green", error_overlay(sample.image, probability > 0.5, truth)),
    ]
    return save_panels(path, panels, caption)


def nuclei_figure(
    path: Path, sample: Sample, probabilities: np.ndarray, caption: str, postprocess: Mapping[str, Any] | None = None
) -> Path:
    """Input | predicted objects | true objects | pixel errors, for a nuclei image."""
    pred = labels_from_probabilities(probabilities, **(postprocess or {}))
    panels = [
        ("input", to_uint8(sample.image)),
        (f"prediction ({pred.max()} objects)", label_overlay(sample.image, pred)),
        (f"ground truth ({sample.labels.max()} nuclei)", label_overlay(sample.image, sample.labels)),
        ("errors: FP magenta, FN green", error_overlay(sample.image, pred > 0, sample.labels > 0)),
    ]
    return save_panels(path, panels, caption)
