"""Scores of one instance segmentation against its ground truth: the one scoring that the
training validation, the demo, ``biounet evaluate`` and the experiments share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biounet.metrics._common import check_labels, check_pair
from biounet.metrics._matching import match_objects, seg_score


@dataclass(frozen=True)
class InstanceScores:
    """The scores of :func:`score_instances`; per-threshold arrays follow ``thresholds``.

    Attributes
    ----------
    thresholds : ndarray of float
        The IoU thresholds of the object matching.
    foreground_iou, foreground_dice : float
        IoU and Dice of the foregrounds ``gt > 0`` and ``pred > 0`` of this image.
    seg : float
        The Cell Tracking Challenge SEG.
    precision, recall, f1, average_precision : ndarray of float
        Object scores at each threshold; ``average_precision`` is TP / (TP + FP + FN).
    n_true, n_pred : int
        Objects in the ground truth and in the prediction.
    tp, fp, fn : ndarray of int
        Matched, unmatched predicted and unmatched true objects at each threshold.
    pixels, foreground_intersection, foreground_union : int
        Pixels of the image, and of the intersection and the union of the foregrounds
        (``foreground_union - foreground_intersection`` pixels are misclassified): the
        parts to pool over several images.
    """

    thresholds: np.ndarray
    foreground_iou: float
    foreground_dice: float
    seg: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    average_precision: np.ndarray
    n_true: int
    n_pred: int
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    pixels: int
    foreground_intersection: int
    foreground_union: int

    @property
    def mean_average_precision(self) -> float:
        """Mean of ``average_precision`` over the thresholds (the DSB 2018 score with the
        thresholds 0.5, 0.55, ..., 0.95 of :data:`~biounet.metrics.IOU_THRESHOLDS`)."""
        return float(self.average_precision.mean())


def score_instances(
    gt_labels: np.ndarray, pred_labels: np.ndarray, *, thresholds: Sequence[float] = (0.5,)
) -> InstanceScores:
    r"""Foreground IoU and Dice, SEG, and object precision, recall, F1 and AP of one image.

    *Foreground IoU* has one meaning in biounet: the Jaccard index of the foregrounds of
    the two label images, :math:`G = \{gt > 0\}` and :math:`P = \{pred > 0\}`, over the
    pixels of this one image,

    .. math::
        IoU_{fg} = \frac{|G \cap P|}{|G \cup P|}, \qquad
        Dice_{fg} = \frac{2 |G \cap P|}{|G| + |P|},

    both 1 when both foregrounds are empty (as :func:`~biounet.metrics.iou_per_class`).
    The prediction is the instance image that post-processing made, so its foreground is
    what the objects cover (after ``min_size``, say), not a thresholded probability. A mean
    over images is the mean of these values; a score pooled over images sums
    ``foreground_intersection`` and ``foreground_union`` first.

    SEG (:func:`~biounet.metrics.seg_score`, the Cell Tracking Challenge measure) is the
    mean over the true objects :math:`R` of :math:`|R \cap S| / |R \cup S|` for the
    predicted object :math:`S` with :math:`|R \cap S| > 0.5 |R|` (0 if there is none); 0
    when the ground truth has no objects. Object matching
    (:func:`~biounet.metrics.match_objects`) pairs a true and a predicted object at
    threshold :math:`\tau` when their IoU exceeds :math:`\tau`, and gives

    .. math::
        P = \frac{TP}{TP + FP}, \quad R = \frac{TP}{TP + FN}, \quad
        F_1 = \frac{2 TP}{2 TP + FP + FN}, \quad AP = \frac{TP}{TP + FP + FN}.

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int or bool
        Instance label images (0 = background) of the same shape, 2D or 3D.
    thresholds : sequence of float
        IoU thresholds of the object matching, each in [0.5, 1); default 0.5 alone.

    Returns
    -------
    InstanceScores

    Raises
    ------
    ValueError
        If the shapes differ, an image is empty, has negative labels, or a threshold is
        outside [0.5, 1).

    References
    ----------
    .. [1] J. C. Caicedo et al. (2019). Nucleus segmentation across imaging experiments:
       the 2018 Data Science Bowl. Nature Methods 16, 1247-1253. (AP = TP / (TP + FP + FN))
    .. [2] V. Ulman et al. (2017). An objective comparison of cell-tracking algorithms.
       Nature Methods 14, 1141-1152. (SEG)
    .. [3] P. Jaccard (1912). The distribution of the flora in the alpine zone. New
       Phytologist 11(2), 37-50.
    """
    gt = check_labels(gt_labels, "gt_labels")
    pred = check_labels(pred_labels, "pred_labels")
    check_pair(gt, pred, ("gt_labels", "pred_labels"))
    matching = match_objects(gt, pred, tuple(thresholds))
    true_fg, pred_fg = gt > 0, pred > 0
    inter = int(np.count_nonzero(true_fg & pred_fg))
    union = int(np.count_nonzero(true_fg | pred_fg))
    return InstanceScores(
        thresholds=matching.thresholds,
        foreground_iou=inter / union if union else 1.0,
        foreground_dice=2.0 * inter / (inter + union) if union else 1.0,
        seg=seg_score(gt, pred),
        precision=matching.precision,
        recall=matching.recall,
        f1=matching.f1,
        average_precision=matching.average_precision,
        n_true=matching.n_true,
        n_pred=matching.n_pred,
        tp=matching.tp,
        fp=matching.fp,
        fn=matching.fn,
        pixels=int(gt.size),
        foreground_intersection=inter,
        foreground_union=union,
    )
