"""The ISBI 2012 challenge's scores of a membrane probability map, at Fiji's thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as label_components

from biounet.errors import InputError
from biounet.metrics._common import check_labels, check_pair, check_probabilities
from biounet.metrics._split_merge import (
    contingency_table,
    fscore,
    info_from_table,
    rand_from_table,
)
from biounet.metrics._warping import (
    ERROR_COUNTS,
    WarpingResult,
    thin_borders,
    warp_and_classify,
)


def _fiji_thresholds() -> tuple[float, ...]:
    values, t = [], 0.0
    while t <= 1.0:
        values.append(t)
        t += 0.1
    return tuple(values)


#: The thresholds of the ISBI 2012 evaluation: 0.0, 0.1, ..., 0.9999999999999999 (11 values).
ISBI_THRESHOLDS: tuple[float, ...] = _fiji_thresholds()


@dataclass(frozen=True)
class IsbiScores:
    """All ISBI 2012 scores of one slice, per threshold of :data:`ISBI_THRESHOLDS`.

    Arrays have one value per threshold. ``pixel_fscore`` is the F-score of the
    foreground pixels (precision 1 without false positives, recall 1 without false
    negatives, as Fiji); ``misclassification`` the fraction of wrong pixels; ``warping``
    holds one :class:`WarpingResult` per threshold (empty if not computed). Best values:
    :meth:`summary`.
    """

    thresholds: np.ndarray
    v_rand: np.ndarray
    v_rand_split: np.ndarray
    v_rand_merge: np.ndarray
    v_info: np.ndarray
    v_info_split: np.ndarray
    v_info_merge: np.ndarray
    pixel_fscore: np.ndarray
    misclassification: np.ndarray
    warping: tuple[WarpingResult, ...] = ()

    def summary(self) -> dict[str, float]:
        """The challenge's numbers: each score at its best threshold (the first on ties).

        Keys: ``v_rand``, ``rand_error`` (1 - V_rand), ``v_info``, ``pixel_error``
        (1 - maximal pixel F-score), ``misclassification`` (minimal), each with its
        ``*_threshold``. With warping also ``warping_error`` (minimal classic warping
        error) and ``warping_threshold`` with the error counts there (``splits``,
        ``mergers``, ``object_additions``, ...), and ``splits_mergers_error``, the minimal
        fraction of split and merger pixels (the "minimum splits and mergers warping
        error" of the original 2012 leaderboard), with ``splits_mergers_threshold``.
        """
        t = self.thresholds
        i_rand, i_info = int(np.argmax(self.v_rand)), int(np.argmax(self.v_info))
        i_pixel, i_miss = int(np.argmax(self.pixel_fscore)), int(np.argmin(self.misclassification))
        out = {
            "v_rand": float(self.v_rand[i_rand]),
            "rand_error": 1.0 - float(self.v_rand[i_rand]),
            "v_rand_threshold": float(t[i_rand]),
            "v_info": float(self.v_info[i_info]),
            "v_info_threshold": float(t[i_info]),
            "pixel_error": 1.0 - float(self.pixel_fscore[i_pixel]),
            "pixel_error_threshold": float(t[i_pixel]),
            "misclassification": float(self.misclassification[i_miss]),
            "misclassification_threshold": float(t[i_miss]),
        }
        if self.warping:
            best = min(self.warping, key=lambda w: w.error)
            fewest = min(self.warping, key=lambda w: w.split_merge_error)
            out |= {
                "warping_error": best.error,
                "warping_threshold": best.threshold,
                "splits_mergers_error": fewest.split_merge_error,
                "splits_mergers_threshold": fewest.threshold,
            }
            out |= {name: float(getattr(best, name)) for name in ERROR_COUNTS}
        return out


def isbi_scores(prob: np.ndarray, gt: np.ndarray, *, warping: bool = True) -> IsbiScores:
    """The ISBI 2012 EM challenge scores of a cell probability map, as Fiji computes them.

    At each threshold ``t`` of :data:`ISBI_THRESHOLDS` the proposal ``prob > t``:

    * is thinned (Fiji's watershed, see the module notes) and compared with the
      4-connected components of the ground truth by :func:`v_rand` and :func:`v_info`;
    * gives the pixel F-score and the misclassification rate against ``gt > 0``;
    * with ``warping``, gives :func:`warping_error` (the slow part).

    The challenge reports V_rand and V_info at their maximum over thresholds (Rand error =
    1 - V_rand) and the pixel error 1 - maximal F-score: see :meth:`IsbiScores.summary`.
    A proposal without foreground is one segment (V_rand = 2q / (1 + q) with
    q = sum of the squared true segment fractions; V_info = 0), and has pixel error 1.

    Parameters
    ----------
    prob : ndarray, shape (H, W)
        Probability of the cell (foreground, white in the ISBI labels) class, in [0, 1]; a
        binary 0/1 proposal works too. Rounded to float32 as in Fiji.
    gt : ndarray, shape (H, W)
        Ground truth: nonzero is cell, 0 is membrane/background. An instance label image
        works too: its segments are the 4-connected regions of equal label.
    warping : bool
        Also compute the warping error at every threshold.

    Returns
    -------
    IsbiScores

    References
    ----------
    .. [1] I. Arganda-Carreras et al. (2015). Crowdsourcing the creation of image
       segmentation algorithms for connectomics. Front. Neuroanat. 9:142.
    """
    prob = check_probabilities(prob)
    gt = check_labels(gt, "gt")
    check_pair(prob, gt, ("prob", "gt"), ndim=2)
    truth = gt != 0
    if not truth.any():
        raise InputError("gt has no foreground (cell) pixels: the ISBI scores are undefined")
    segments = label_components(gt, connectivity=1, background=0)[truth]
    rows: list[tuple[float, ...]] = []
    warps: list[WarpingResult] = []
    for t in ISBI_THRESHOLDS:
        proposal = prob > t
        thinned = thin_borders(proposal)
        table = contingency_table(segments, thinned[truth], int(thinned.max()))
        rand, info = rand_from_table(table), info_from_table(table)
        tp = np.count_nonzero(proposal & truth)
        fp = np.count_nonzero(proposal) - tp
        fn = np.count_nonzero(truth) - tp
        precision = tp / (tp + fp) if fp else 1.0
        recall = tp / (tp + fn) if fn else 1.0
        rows.append((t, rand.score, rand.split, rand.merge, info.score, info.split, info.merge,
                     fscore(recall, precision), (fp + fn) / truth.size))
        if warping:
            warps.append(warp_and_classify(prob, truth, t))
    columns = [np.array(c) for c in zip(*rows)]
    return IsbiScores(*columns, warping=tuple(warps))
