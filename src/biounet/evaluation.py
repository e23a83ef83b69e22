"""Scoring prediction files against ground truth: what ``biounet evaluate`` runs.

:func:`pair_files` pairs prediction files with ground-truth files by name
(:func:`pairing_key`), :func:`evaluate_files` reads each pair and scores it with the
metrics of :mod:`biounet.metrics`, and :func:`write_report` writes the per-image scores and
their mean (:func:`mean_row`) to a CSV or JSON file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from biounet.data._weights import binary_to_instances
from biounet.errors import InputError
from biounet.io._files import PathLike, atomic_write
from biounet.io._images import IMAGE_SUFFIXES, image_files, read_image, read_image_axes
from biounet.metrics._isbi import isbi_scores
from biounet.metrics._instances import score_instances
from biounet.metrics._matching import IOU_THRESHOLDS
from biounet.postprocess import Split, probabilities_to_labels

log = logging.getLogger(__name__)

MetricSet = Literal["isbi", "cells", "all"]

Prefer = Literal["probabilities", "labels"]
_PROBABILITY_SUFFIXES = ("_probabilities", "_probability", "_probs", "_prob")
#: Name endings ignored when pairing predictions with ground truth (``a_probabilities.tif``
#: pairs with ``a.png``); checked case-insensitively, repeatedly.
NAME_SUFFIXES = (
    *_PROBABILITY_SUFFIXES, "_prediction", "_pred", "_labels", "_label", "_masks", "_mask", "_seg", "_gt",
)


def pairing_key(path: PathLike) -> str:
    """The name by which :func:`pair_files` pairs a file.

    The file name in lower case without its image extension (and ``.ome``), without any
    of :data:`NAME_SUFFIXES` at its end, and without the Cell Tracking Challenge prefixes
    ``man_seg`` (ground truth) and ``mask`` (results) before a frame number:
    ``a_probabilities.tif``, ``A_labels.png`` and ``a.tif`` all give ``"a"``;
    ``man_seg007.tif`` and ``mask007.tif`` give ``"007"``.
    """
    key = Path(path).name.lower()
    for ext in (*IMAGE_SUFFIXES, ".ome"):
        key = key.removesuffix(ext)
    stripped = True
    while stripped:
        stripped = False
        for suffix in NAME_SUFFIXES:
            if key.endswith(suffix) and len(key) > len(suffix):
                key, stripped = key[: -len(suffix)], True
    for prefix in ("man_seg", "mask"):
        if key.startswith(prefix) and key[len(prefix) :].lstrip("_").isdigit():
            return key[len(prefix) :].lstrip("_")
    return key


def _expand(paths: Sequence[PathLike], what: str) -> tuple[list[Path], bool]:
    """Files of ``paths``, folders replaced by their image files; whether any was a folder."""
    files, folder = [], False
    for path in map(Path, paths):
        if path.is_dir():
            folder = True
            files += [p for p in image_files(path) if not p.stem.lower().endswith("_overlay")]
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such {what} file or folder")
    if not files:
        raise InputError(f"no {what} images found in {', '.join(map(str, paths))}")
    return files, folder


def pair_files(
    predictions: Sequence[PathLike], ground_truth: Sequence[PathLike], *, prefer: Prefer = "probabilities"
) -> list[tuple[Path, Path]]:
    """Pair prediction files with ground-truth files by :func:`pairing_key`.

    Folders stand for the image files in them (not recursive; ``*_overlay.png`` previews
    of ``biounet predict`` are skipped). Where two predictions share a key (a folder
    written by ``biounet predict`` holds ``a_probabilities.tif`` and ``a_labels.tif``),
    ``prefer`` picks the probability map (what the ISBI scores need) or the other file,
    the labels (what the model's own post-processing made: what the cell metrics should
    score). Files found in a folder may stay unpaired (as result masks of frames without
    Cell Tracking Challenge ground truth); they are skipped.

    Raises
    ------
    ValueError
        If a file given by name has no partner, nothing pairs, or two files compete for
        one key; the message names the files.
    """
    pred_files, pred_folder = _expand(predictions, "prediction")
    gt_files, gt_folder = _expand(ground_truth, "ground-truth")
    by_key: dict[str, Path] = {}
    for path in gt_files:
        other = by_key.setdefault(pairing_key(path), path)
        if other != path:
            raise InputError(f"ground-truth files {other} and {path} have the same name key {pairing_key(path)!r}")
    chosen: dict[str, Path] = {}
    for path in pred_files:
        key = pairing_key(path)
        other = chosen.setdefault(key, path)
        if other == path:
            continue
        probability = [p for p in (other, path) if p.stem.lower().endswith(_PROBABILITY_SUFFIXES)]
        if len(probability) != 1:
            raise InputError(f"predictions {other} and {path} both pair with the name key {key!r}")
        chosen[key] = probability[0] if prefer == "probabilities" else ({other, path} - set(probability)).pop()
    missing = [str(p) for k, p in chosen.items() if k not in by_key]
    if missing and (not pred_folder or len(missing) == len(chosen)):
        raise InputError(
            f"no ground truth for {', '.join(missing)} (paired by name key, e.g. {pairing_key(missing[0])!r}) "
            f"among {len(gt_files)} ground-truth file(s) in {', '.join(map(str, ground_truth))}"
        )
    unused = [str(p) for k, p in by_key.items() if k not in chosen]
    if unused and not gt_folder:
        raise InputError(f"no prediction for ground truth {', '.join(unused)}")
    if missing or unused:
        log.info("unpaired files skipped: %s", ", ".join(missing + unused))
    return [(path, by_key[key]) for key, path in sorted(chosen.items()) if key in by_key]


def _as_instances(labels: np.ndarray) -> np.ndarray:
    """Instance labels; a binary mask (one nonzero value) becomes its 4-connected components."""
    if np.unique(labels[labels != 0]).size <= 1:
        return binary_to_instances(labels, connectivity=1)
    return labels


def _read_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth): the prediction as float probabilities or integer labels."""
    gt = read_image(gt_path)
    if gt.dtype.kind not in "biu":
        raise InputError(f"{gt_path}: ground truth must hold integer labels, not {gt.dtype}")
    pred, axes = read_image_axes(pred_path)
    if pred.dtype.kind == "f":
        if pred.ndim == gt.ndim + 1:  # a class axis, as written by ``biounet predict`` (CYX, ZCYX)
            axis = axes.index("C") if "C" in axes else 0  # .npy files store no axes: classes first
            pred = np.take(pred, 1 if pred.shape[axis] > 1 else 0, axis=axis)
        pred = pred.astype(np.float32)
        if not np.isfinite(pred).all() or pred.min() < 0 or pred.max() > 1:
            raise InputError(f"{pred_path}: a float prediction must hold probabilities in [0, 1]")
    if pred.shape != gt.shape:
        raise InputError(f"{pred_path} has shape {pred.shape} but its ground truth {gt_path} has shape {gt.shape}")
    return pred, gt


def evaluate_files(
    pairs: Sequence[tuple[PathLike, PathLike]],
    *,
    metrics: MetricSet = "all",
    threshold: float = 0.5,
    split: Split = "none",
    min_size: int = 0,
    warping: bool = True,
    progress: bool = True,
) -> list[dict[str, str | float]]:
    """Score each (prediction, ground truth) file pair; one dict of scores per pair.

    Predictions are probability maps (float, the foreground probability; a classes-first
    ``(C, H, W)`` map of ``biounet predict`` gives its class 1, the cells) or label
    images (integers; a binary mask is split into 4-connected components). Ground truth
    is a label image: instances, or a binary mask such as the ISBI 2012 labels (nonzero =
    cell), whose 4-connected components are the instances.

    * ``"isbi"``: :func:`~biounet.metrics.isbi_scores` (2D only; a label prediction counts
      as a binary proposal ``labels > 0``), the keys of
      :meth:`~biounet.metrics.IsbiScores.summary`.
    * ``"cells"``: from :func:`~biounet.metrics.score_instances`, foreground ``iou`` and
      ``dice`` (of ``labels > 0`` against ``gt > 0``), ``seg`` (the Cell Tracking Challenge
      SEG), ``ap50``, ``ap75``, ``map`` (mean AP over IoU 0.5...0.95), ``precision50``,
      ``recall50``, ``f1_50``, ``n_true``, ``n_pred``.
      Probability maps become instances with
      :func:`biounet.postprocess.probabilities_to_labels` (``threshold``, ``split``,
      ``min_size``).

    Each dict starts with ``prediction`` and ``ground_truth`` (the file names). The
    post-processing options are checked before any file is read; they apply to probability
    maps only, so a label-image prediction with options other than the defaults is refused
    rather than scored without them.
    """
    from tqdm.auto import tqdm

    from biounet.postprocess import DEFAULTS, check_postprocess

    if metrics not in ("isbi", "cells", "all"):
        raise InputError(f"metrics must be 'isbi', 'cells' or 'all', got {metrics!r}")
    options = {"threshold": threshold, "split": split, "min_size": min_size}
    check_postprocess(options)
    custom = [name for name, value in options.items() if value != DEFAULTS[name]]
    if custom and metrics == "isbi":
        raise InputError(f"{', '.join(custom)}: the ISBI scores take the probabilities as they are (V_rand at its "
                         "best threshold); post-processing options are for the cell metrics")  # fmt: skip
    rows: list[dict[str, str | float]] = []
    for pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="image", disable=not progress or len(pairs) < 2):
        pred_path, gt_path = Path(pred_path), Path(gt_path)
        pred, gt = _read_pair(pred_path, gt_path)
        row: dict[str, str | float] = {"prediction": str(pred_path), "ground_truth": str(gt_path)}
        if metrics in ("isbi", "all"):
            if gt.ndim != 2:
                raise InputError(
                    f"{pred_path}: the ISBI scores are for 2D images, got shape {gt.shape}; choose the 'cells' metrics"
                )
            prob = pred if pred.dtype.kind == "f" else (pred != 0).astype(np.float32)
            row |= isbi_scores(prob, gt, warping=warping).summary()
        if metrics in ("cells", "all"):
            if custom and pred.dtype.kind != "f":
                raise InputError(f"{pred_path}: a label image; {', '.join(custom)} "
                                 f"{'applies' if len(custom) == 1 else 'apply'} to probability maps only (score its "
                                 "probabilities, or leave the option at its default)")  # fmt: skip
            if pred.dtype.kind == "f":
                labels = probabilities_to_labels(pred, threshold=threshold, split=split, min_size=min_size)
            else:
                labels = _as_instances(pred)
            truth = _as_instances(gt)
            scores = score_instances(truth, labels, thresholds=IOU_THRESHOLDS)
            i50, i75 = 0, int(np.flatnonzero(np.isclose(scores.thresholds, 0.75))[0])
            row |= {
                "iou": scores.foreground_iou,
                "dice": scores.foreground_dice,
                "seg": scores.seg,
                "ap50": float(scores.average_precision[i50]),
                "ap75": float(scores.average_precision[i75]),
                "map": scores.mean_average_precision,
                "precision50": float(scores.precision[i50]),
                "recall50": float(scores.recall[i50]),
                "f1_50": float(scores.f1[i50]),
                "n_true": float(scores.n_true),
                "n_pred": float(scores.n_pred),
            }
        log.debug("%s: %s", pred_path, row)
        rows.append(row)
    return rows


def mean_row(rows: Sequence[dict[str, str | float]]) -> dict[str, str | float]:
    """The mean of each score over ``rows`` (thresholds and counts included)."""
    keys = [k for k, v in rows[0].items() if not isinstance(v, str)]
    return {"prediction": "mean", "ground_truth": ""} | {k: float(np.mean([r[k] for r in rows])) for k in keys}


def check_report_path(path: PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`, checked to name a ``.csv`` or ``.json`` file.

    :func:`write_report` checks its ``path`` with it; call it first to fail before scoring.

    Raises
    ------
    ValueError
        If ``path`` ends otherwise; the message names it.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise InputError(f"{path}: the report must be a .csv or .json file")
    if path.is_dir():
        raise InputError(f"{path}: a folder; the report must be a file")
    return path


def write_report(path: PathLike, rows: Sequence[dict[str, str | float]]) -> Path:
    """Write per-image scores and their mean to ``path`` (``.csv`` or ``.json``), atomically.

    CSV: one line per image, then a ``mean`` line. JSON: ``{"images": [...], "mean": {...}}``.
    """
    import csv
    import json

    path = check_report_path(path)
    mean = mean_row(rows)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".json":
                json.dump({"images": list(rows), "mean": mean}, f, indent=2)
                f.write("\n")
            else:
                writer = csv.DictWriter(f, fieldnames=list(mean))
                writer.writeheader()
                writer.writerows([*rows, mean])
    return path
