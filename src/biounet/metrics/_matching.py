"""Object matching: the Cell Tracking Challenge SEG and object F1 / AP at IoU thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biounet.errors import InputError
from biounet.metrics._common import check_labels, check_pair, sequential_labels

#: IoU thresholds of the DSB 2018 / StarDist object matching: 0.5, 0.55, ..., 0.95.
IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


@dataclass(frozen=True)
class _Overlaps:
    """Object sizes and the overlapping (true, predicted) pairs of two instance images."""

    true_sizes: np.ndarray  # (n_true,)
    pred_sizes: np.ndarray  # (n_pred,)
    true_index: np.ndarray  # (n_pairs,) 0-based object index
    pred_index: np.ndarray
    intersection: np.ndarray

    def iou(self) -> np.ndarray:
        union = self.true_sizes[self.true_index] + self.pred_sizes[self.pred_index] - self.intersection
        return self.intersection / union


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> _Overlaps:
    gt = check_labels(gt, "gt")
    pred = check_labels(pred, "pred")
    check_pair(gt, pred, ("gt", "pred"))
    gt_seq, n_true = sequential_labels(gt)
    pred_seq, n_pred = sequential_labels(pred)
    both = (gt_seq > 0) & (pred_seq > 0)
    pairs, counts = np.unique(gt_seq[both].astype(np.int64) * (n_pred + 1) + pred_seq[both], return_counts=True)
    return _Overlaps(
        true_sizes=np.bincount(gt_seq.ravel(), minlength=n_true + 1)[1:].astype(np.float64),
        pred_sizes=np.bincount(pred_seq.ravel(), minlength=n_pred + 1)[1:].astype(np.float64),
        true_index=pairs // (n_pred + 1) - 1,
        pred_index=pairs % (n_pred + 1) - 1,
        intersection=counts.astype(np.float64),
    )


def seg_jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    r"""The Jaccard index of each reference object under the Cell Tracking Challenge rule.

    A reference object :math:`R` is matched by the predicted object :math:`S` with
    :math:`|R \cap S| > 0.5 |R|` (at most one can qualify) and scores
    :math:`J(R, S) = |R \cap S| / |R \cup S|`; an unmatched reference object scores 0.

    Parameters
    ----------
    gt, pred : ndarray of int
        Instance label images (0 = background) of the same shape, 2D or 3D.

    Returns
    -------
    ndarray of float, shape (n_reference,)
        In increasing order of the reference label.

    References
    ----------
    .. [1] V. Ulman et al. (2017). An objective comparison of cell-tracking algorithms.
       Nature Methods 14, 1141-1152.
    """
    o = _overlaps(gt, pred)
    jaccard = np.zeros(len(o.true_sizes))
    match = o.intersection > 0.5 * o.true_sizes[o.true_index]
    jaccard[o.true_index[match]] = o.iou()[match]
    return jaccard


def seg_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """The Cell Tracking Challenge SEG measure: the mean of :func:`seg_jaccard`.

    0 when ``gt`` has no objects, as in ``py-ctcmetrics``. For a sequence, the challenge
    pools all reference objects: ``np.concatenate([seg_jaccard(g, p) for ...]).mean()``.
    """
    jaccard = seg_jaccard(gt, pred)
    return float(jaccard.mean()) if jaccard.size else 0.0


@dataclass(frozen=True)
class MatchingScores:
    """Object matching counts and scores, one value per IoU threshold.

    ``average_precision`` is TP / (TP + FP + FN) (the DSB 2018 / StarDist "AP"); its mean
    over thresholds, :attr:`mean_average_precision`, is the DSB 2018 score.
    """

    thresholds: np.ndarray
    n_true: int
    n_pred: int
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    average_precision: np.ndarray

    @property
    def mean_average_precision(self) -> float:
        """Mean of ``average_precision`` over the thresholds."""
        return float(self.average_precision.mean())


def _ratio(numerator: np.ndarray, denominator: int | np.ndarray, empty: float) -> np.ndarray:
    denominator = np.asarray(denominator, np.float64)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), empty)


def match_objects(
    gt: np.ndarray, pred: np.ndarray, thresholds: tuple[float, ...] = IOU_THRESHOLDS
) -> MatchingScores:
    r"""Match predicted to true objects at IoU thresholds; precision, recall, F1, AP.

    A true and a predicted object match at threshold :math:`\tau` when their IoU exceeds
    :math:`\tau` (strictly, as in the DSB 2018 rules). For :math:`\tau \ge 0.5` an object
    has at most one such partner, so the matching is unique and no assignment algorithm is
    needed (StarDist's ``matching`` uses IoU :math:`\ge \tau` with a Hungarian assignment,
    which differs only when an IoU equals :math:`\tau` exactly). Then

    .. math::
        P = \frac{TP}{TP + FP}, \quad R = \frac{TP}{TP + FN}, \quad
        F_1 = \frac{2 TP}{2 TP + FP + FN}, \quad AP = \frac{TP}{TP + FP + FN}.

    With no objects on either side every score is 1; with no predictions precision is 0,
    with no true objects recall is 0.

    Parameters
    ----------
    gt, pred : ndarray of int
        Instance label images (0 = background) of the same shape.
    thresholds : tuple of float
        IoU thresholds, each in [0.5, 1); default 0.5, 0.55, ..., 0.95.

    Returns
    -------
    MatchingScores

    References
    ----------
    .. [1] J. C. Caicedo et al. (2019). Nucleus segmentation across imaging experiments:
       the 2018 Data Science Bowl. Nature Methods 16, 1247-1253.
    .. [2] U. Schmidt, M. Weigert, C. Broaddus, G. Myers (2018). Cell detection with
       star-convex polygons. MICCAI 2018.
    """
    taus = np.asarray(thresholds, np.float64)
    if taus.ndim != 1 or taus.size == 0 or taus.min() < 0.5 or taus.max() >= 1.0:
        raise InputError(f"thresholds must be a non-empty sequence of values in [0.5, 1), got {thresholds}")
    o = _overlaps(gt, pred)
    n_true, n_pred = len(o.true_sizes), len(o.pred_sizes)
    tp = (o.iou()[None, :] > taus[:, None]).sum(axis=1)
    fp, fn = n_pred - tp, n_true - tp
    return MatchingScores(
        thresholds=taus,
        n_true=n_true,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=_ratio(tp, n_pred, 1.0 if n_true == 0 else 0.0),
        recall=_ratio(tp, n_true, 1.0 if n_pred == 0 else 0.0),
        f1=_ratio(2 * tp, n_true + n_pred, 1.0),
        average_precision=_ratio(tp, n_true + n_pred - tp, 1.0),
    )
