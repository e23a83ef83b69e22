"""The ISBI 2012 foreground-restricted Rand and information scores (V_rand, V_info)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biounet.errors import InputError
from biounet.metrics._common import check_labels, check_pair, sequential_labels


@dataclass(frozen=True)
class SplitMergeScore:
    """An F-score and its two halves: ``score = 2 split merge / (split + merge)``.

    ``split`` is 1 when the proposal never splits a true segment (Fiji's "recall"),
    ``merge`` is 1 when it never merges two (Fiji's "precision").
    """

    score: float
    split: float
    merge: float


def fscore(split: float, merge: float) -> float:
    return 2.0 * split * merge / (split + merge) if split + merge > 0 else 0.0


def contingency_table(gt: np.ndarray, pred: np.ndarray, n_pred: int) -> np.ndarray:
    """Contingency counts ``n[i, j]``: ground-truth segment i >= 1 (rows 1..), proposal j >= 0."""
    index = gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel()
    n_gt = int(gt.max()) if gt.size else 0
    return np.bincount(index, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)[1:]


def rand_from_table(n: np.ndarray) -> SplitMergeScore:
    counts = n.astype(np.float64)
    singletons = counts[:, 0].sum()  # proposal background: every pixel its own segment
    sum_ab = (counts[:, 1:] ** 2).sum() + singletons
    sum_a = (counts.sum(axis=1) ** 2).sum()
    sum_b = (counts[:, 1:].sum(axis=0) ** 2).sum() + singletons
    split, merge = sum_ab / sum_a, sum_ab / sum_b
    return SplitMergeScore(fscore(split, merge), split, merge)


def _xlogx(x: np.ndarray) -> float:
    x = x[x > 0]
    return float((x * np.log(x)).sum())


def info_from_table(n: np.ndarray) -> SplitMergeScore:
    total = float(n.sum())
    p = n.astype(np.float64) / total
    singletons = p[:, 0].sum()
    h_a = -_xlogx(p.sum(axis=1))
    h_b = -_xlogx(p[:, 1:].sum(axis=0)) + singletons * np.log(total)
    h_ab = -_xlogx(p[:, 1:]) + singletons * np.log(total)
    mutual = max(h_a + h_b - h_ab, 0.0)
    if h_b == 0:  # Fiji's conventions for a side with a single segment
        merge, split = 1.0, 0.0
    elif h_a == 0:
        merge, split = 0.0, 1.0
    else:
        merge, split = min(mutual / h_a, 1.0), min(mutual / h_b, 1.0)
    return SplitMergeScore(fscore(split, merge), split, merge)


def _label_tables(gt_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    gt_labels = check_labels(gt_labels, "gt_labels")
    pred_labels = check_labels(pred_labels, "pred_labels")
    check_pair(gt_labels, pred_labels, ("gt_labels", "pred_labels"))
    if not gt_labels.any():
        raise InputError("gt_labels has no foreground (all 0): the foreground-restricted score is undefined")
    gt_seq, _ = sequential_labels(gt_labels)
    pred_seq, n_pred = sequential_labels(pred_labels)
    return contingency_table(gt_seq, pred_seq, n_pred)


def v_rand(gt_labels: np.ndarray, pred_labels: np.ndarray) -> SplitMergeScore:
    r"""Foreground-restricted Rand F-score V_rand of a proposal against the ground truth.

    With :math:`p_{ij}` the fraction of ground-truth foreground pixels in true segment *i*
    and proposed segment *j*, :math:`t_i = \sum_j p_{ij}` and :math:`s_j = \sum_i p_{ij}`,

    .. math::
        V^{split} = \frac{\sum_{ij} p_{ij}^2}{\sum_i t_i^2}, \quad
        V^{merge} = \frac{\sum_{ij} p_{ij}^2}{\sum_j s_j^2}, \quad
        V_{rand} = \frac{2 V^{split} V^{merge}}{V^{split} + V^{merge}}

    (Arganda-Carreras et al. 2015, eq. 3-5). Pixels with ``gt_labels == 0`` are ignored;
    proposed pixels labelled 0 are each a segment of their own, as in Fiji. The Rand error
    of the challenge is ``1 - V_rand``.

    This is scikit-image's :func:`~skimage.metrics.adapted_rand_error` except for two
    conventions: pairs are drawn with replacement (``n^2`` normalisation, a pixel pairs with
    itself) where scikit-image counts distinct pairs, and label 0 of the proposal is
    singletons where scikit-image treats it as one segment. (scikit-image also names the
    halves the other way round: its ``precision`` is ``split`` here.)

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int
        Label images of the same shape; ``gt_labels`` needs some nonzero pixels.

    Returns
    -------
    SplitMergeScore
        ``score`` = V_rand, with its ``split`` and ``merge`` halves, all in (0, 1].

    References
    ----------
    .. [1] I. Arganda-Carreras et al. (2015). Crowdsourcing the creation of image
       segmentation algorithms for connectomics. Front. Neuroanat. 9:142.
    """
    return rand_from_table(_label_tables(gt_labels, pred_labels))


def v_info(gt_labels: np.ndarray, pred_labels: np.ndarray) -> SplitMergeScore:
    r"""Foreground-restricted information-theoretic score V_info (ISBI 2012).

    With the entropies :math:`H(T)` of the true and :math:`H(S)` of the proposed segments
    over the ground-truth foreground and their mutual information :math:`I(S; T)`,

    .. math::
        V^{split} = \frac{I(S;T)}{H(S)}, \quad V^{merge} = \frac{I(S;T)}{H(T)}, \quad
        V_{info} = \frac{2 V^{split} V^{merge}}{V^{split} + V^{merge}}

    (Arganda-Carreras et al. 2015, eq. 6-8). Conventions are Fiji's: pixels with
    ``gt_labels == 0`` are ignored, proposal label 0 is singletons, a ground truth of one
    segment (:math:`H(T) = 0`) gives ``merge = 0, split = 1`` and a one-segment proposal
    (:math:`H(S) = 0`) gives ``merge = 1, split = 0``, so V_info = 0 in both cases.
    V_info = 0 also when :math:`I = 0` (Fiji returns NaN there).

    scikit-image's :func:`~skimage.metrics.variation_of_information` gives the conditional
    entropies ``[H(S|T), H(T|S)]`` (false splits, false merges): ``merge = 1 - H(T|S) / H(T)``
    and ``split = 1 - H(S|T) / H(S)`` when the proposal has no 0 inside the ground-truth
    foreground (scikit-image treats proposal 0 as one segment, Fiji as singletons).

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int
        Label images of the same shape; ``gt_labels`` needs some nonzero pixels.

    Returns
    -------
    SplitMergeScore
        ``score`` = V_info with its ``split`` and ``merge`` halves, all in [0, 1].
    """
    return info_from_table(_label_tables(gt_labels, pred_labels))
