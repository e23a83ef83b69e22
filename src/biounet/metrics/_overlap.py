"""Per-class IoU and Dice of class maps."""

from __future__ import annotations

import numpy as np

from biounet.errors import InputError
from biounet.metrics._common import check_labels, check_pair


def _class_overlaps(gt: np.ndarray, pred: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, ...]:
    gt = check_labels(gt, "gt")
    pred = check_labels(pred, "pred")
    check_pair(gt, pred, ("gt", "pred"))
    n = int(max(gt.max(), pred.max())) + 1 if num_classes is None else num_classes
    if num_classes is not None and max(gt.max(), pred.max()) >= num_classes:
        raise InputError(f"num_classes={num_classes} but the images hold class {max(gt.max(), pred.max())}")
    joint = np.bincount(gt.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)
    return np.diag(joint).astype(np.float64), joint.sum(axis=1).astype(np.float64), joint.sum(axis=0)


def iou_per_class(gt: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    r"""Intersection over union (Jaccard index) of each class, :math:`|G_c \cap P_c| / |G_c \cup P_c|`.

    Parameters
    ----------
    gt, pred : ndarray of int
        Class maps (0, 1, ..., C-1) of the same shape; for instance labels pass
        ``labels > 0`` to get background and foreground.
    num_classes : int, optional
        C; default the largest class present plus one.

    Returns
    -------
    ndarray of float, shape (C,)
        A class absent from both images scores 1 (empty agrees with empty).

    References
    ----------
    .. [1] P. Jaccard (1912). The distribution of the flora in the alpine zone. New
       Phytologist 11(2), 37-50.
    """
    inter, size_gt, size_pred = _class_overlaps(gt, pred, num_classes)
    union = size_gt + size_pred - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice_per_class(gt: np.ndarray, pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    r"""Dice coefficient of each class, :math:`2 |G_c \cap P_c| / (|G_c| + |P_c|)`.

    Same inputs and conventions as :func:`iou_per_class` (``dice = 2 iou / (1 + iou)``).

    References
    ----------
    .. [1] L. R. Dice (1945). Measures of the amount of ecologic association between
       species. Ecology 26(3), 297-302.
    """
    inter, size_gt, size_pred = _class_overlaps(gt, pred, num_classes)
    total = size_gt + size_pred
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
