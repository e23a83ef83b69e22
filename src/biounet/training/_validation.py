"""Validation scores during training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from biounet.model import UNet

#: The scores :func:`evaluate_samples` returns, in the order of the log's columns.
VALIDATION_SCORES = ("pixel_error", "iou", "f1", "ap", "v_rand")


def predict_sample(model: UNet, sample: Any, device: str | torch.device) -> np.ndarray:
    """Class probabilities of one annotated sample's image (gray, or channels last)."""
    from biounet.prediction._stitch import predict

    channel_axis = None if sample.image.ndim == 2 else -1
    return predict(model, sample.image, channel_axis=channel_axis, device=device, progress=False)


def evaluate_samples(
    model: UNet, samples: Sequence[Any], *, device: str | torch.device | None = None, v_rand: bool = True
) -> dict[str, float]:
    """Validation scores of ``model`` on annotated samples (:data:`VALIDATION_SCORES`).

    * ``pixel_error`` and ``iou``: misclassified pixels and foreground IoU of the instances
      that the model's own post-processing makes (``labels > 0`` against ``gt > 0``, as
      :func:`biounet.metrics.score_instances` counts them), pixels pooled over the samples
      (IoU 1 when no sample has foreground on either side);
    * ``f1`` and ``ap``: object F1 and AP = TP / (TP + FP + FN) at IoU 0.5 (DSB 2018) of the
      instances that the model's own post-processing makes, mean over the samples;
    * ``v_rand``: the ISBI 2012 foreground-restricted Rand score with Fiji's border
      thinning, at the threshold that is best for the mean over the samples (one threshold
      per stack, as the challenge picks it), without the warping error (the slow part).

    The first four follow a cell's outline; V_rand follows the topology of a membrane map
    (one gap in a membrane merges two cells and costs V_rand, hardly any IoU), so membrane
    models are selected by it (``TrainConfig.best_by``). ``v_rand=False`` skips it (NaN),
    the slowest part. ``device``: where to predict, by default the model's.
    """
    from biounet.metrics._isbi import isbi_scores
    from biounet.metrics._instances import score_instances
    from biounet.postprocess import foreground_probability, labels_from_probabilities

    device = device if device is not None else next(model.parameters()).device
    wrong = union = inter = total = 0
    f1, ap, rands = [], [], []
    for sample in samples:
        prob = predict_sample(model, sample, device)
        foreground = foreground_probability(prob)
        labels = labels_from_probabilities(prob, **model.info.postprocess)
        scores = score_instances(sample.labels, labels, thresholds=(0.5,))
        wrong += scores.foreground_union - scores.foreground_intersection
        total += scores.pixels
        inter += scores.foreground_intersection
        union += scores.foreground_union
        f1.append(scores.f1[0])
        ap.append(scores.average_precision[0])
        if v_rand and scores.n_true:  # V_rand is undefined without foreground
            rands.append(isbi_scores(foreground, sample.labels, warping=False).v_rand)
    rand = float(np.max(np.mean(rands, axis=0))) if rands else math.nan
    return {"pixel_error": wrong / total, "iou": inter / union if union else 1.0, "f1": float(np.mean(f1)),
            "ap": float(np.mean(ap)), "v_rand": rand}  # fmt: skip
