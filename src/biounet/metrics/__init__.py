"""Segmentation metrics: the ISBI 2012 EM challenge scores, the Cell Tracking Challenge SEG
measure, per-class IoU/Dice and object matching (DSB 2018 / StarDist average precision).

ISBI 2012 scores follow the challenge's official evaluation, Fiji's
``trainableSegmentation.metrics`` (``RandError``, ``VariationOfInformation``, ``PixelError``,
``WarpingError``) as called by the challenge's script: re-derived from that code and
vectorised with NumPy/SciPy, not translated line by line.

* The probability map ``prob`` (probability of *cell*, the white class of the ISBI labels) is
  binarised as ``prob > t`` for ``t`` in :data:`ISBI_THRESHOLDS`, the eleven values Fiji's loop
  ``for (t = 0.0; t <= 1.0; t += 0.1)`` visits. They are accumulated in double precision, so
  the last one is ``0.9999999999999999``: a pixel of probability exactly 1 is foreground at
  every threshold. ``prob`` is rounded to float32 (Fiji's 32-bit images) and compared in
  double precision, as Java does.
* Ground-truth segments are the 4-connected components of the cells (``gt > 0``).
* Border thinning (the challenge's final V_rand and V_info are "after thinning"): the
  binarised proposal is inverted (cells 0, borders 255) and flooded with Fiji's classic
  Vincent-Soille watershed, 4-connected. Each 4-connected cell region is a basin; the border
  pixels are assigned, in breadth-first order from the cells, to the basin that reaches them,
  and a pixel reached by two basins becomes a watershed line (label 0), so the proposal's
  borders end up 1 pixel wide and every border pixel joins a cell. A proposal without any
  cell pixel is one single segment. :func:`thin_borders` reproduces Fiji's FIFO order
  exactly (first the border pixels next to a cell in Fiji's column-major scan order, then
  the order in which the queue discovers them, neighbours left, up, right, down).
* V_rand and V_info are computed on the ground-truth foreground only; proposal line pixels
  (label 0) count as singletons. Each is the best value over the thresholds.
* The warping error warps the ground truth toward each binarised proposal with Fiji's
  ``simplePointWarp2d`` (same visiting order, same 4/8 simple-point test, so the same
  warped image) and classifies the remaining mismatches as Fiji's ``classifyMismatches2d``.

Everything else in the module (IoU/Dice, the Cell Tracking Challenge SEG, object matching)
works on label images of any dimension; :func:`score_instances` gives them all for one
instance image, and is what training validation, the demo, ``biounet evaluate`` and the
experiments score with. Scoring files (``biounet evaluate``) is :mod:`biounet.evaluation`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

#: public name -> the private module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "ISBI_THRESHOLDS": "_isbi",
    "IsbiScores": "_isbi",
    "isbi_scores": "_isbi",
    "InstanceScores": "_instances",
    "score_instances": "_instances",
    "IOU_THRESHOLDS": "_matching",
    "MatchingScores": "_matching",
    "match_objects": "_matching",
    "seg_jaccard": "_matching",
    "seg_score": "_matching",
    "dice_per_class": "_overlap",
    "iou_per_class": "_overlap",
    "SplitMergeScore": "_split_merge",
    "v_info": "_split_merge",
    "v_rand": "_split_merge",
    "TopologyError": "_warping",
    "WarpingResult": "_warping",
    "warping_error": "_warping",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.metrics._instances import InstanceScores, score_instances  # noqa: F401
    from biounet.metrics._isbi import ISBI_THRESHOLDS, IsbiScores, isbi_scores  # noqa: F401
    from biounet.metrics._matching import (  # noqa: F401
        IOU_THRESHOLDS,
        MatchingScores,
        match_objects,
        seg_jaccard,
        seg_score,
    )
    from biounet.metrics._overlap import dice_per_class, iou_per_class  # noqa: F401
    from biounet.metrics._split_merge import SplitMergeScore, v_info, v_rand  # noqa: F401
    from biounet.metrics._warping import TopologyError, WarpingResult, warping_error  # noqa: F401
