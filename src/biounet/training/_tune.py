"""Post-processing tuned on validation images: the threshold and seed setting with the best AP.

As StarDist's ``optimize_thresholds`` tunes its probability and overlap thresholds on the
validation images after training, this chooses, on a small grid, the foreground threshold
and the seed setting of the model's split (:func:`biounet.postprocess.probabilities_to_labels`)
that give the highest mean object AP at IoU 0.5 (DSB 2018) on annotated images the model
did not train on. Written here because the search runs over biounet's own post-processing;
the probabilities are predicted once and only the post-processing is repeated.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from biounet.errors import InputError

log = logging.getLogger(__name__)

#: Foreground thresholds tried for every split.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: The seed option of each split and the values tried (``"none"`` and ``"border"``: none).
SEED_OPTIONS: dict[str, tuple[str, tuple[float, ...]]] = {
    "distance": ("min_seed_height", (1.0, 1.5, 2.0, 3.0)),
    "probability": ("seed_threshold", (0.8, 0.9, 0.95)),
}


@dataclass(frozen=True)
class TunedPostprocess:
    """The result of :func:`tune_postprocess`.

    Attributes
    ----------
    options : dict
        The post-processing with the highest score: the options given, with the grid's values
        that beat them laid over (the options as given when none did).
    score, default_score : float
        Mean AP at IoU 0.5 over the images with ``options`` and with the options as given.
    grid : dict
        The values tried per option.
    """

    options: dict[str, Any]
    score: float
    default_score: float
    grid: dict[str, tuple[Any, ...]]


def postprocess_grid(postprocess: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """The default grid for ``postprocess``: :data:`THRESHOLDS` and its split's :data:`SEED_OPTIONS`."""
    grid: dict[str, tuple[Any, ...]] = {"threshold": THRESHOLDS}
    if postprocess.get("split", "none") in SEED_OPTIONS:
        name, values = SEED_OPTIONS[postprocess["split"]]
        grid[name] = values
    return grid


def tune_postprocess(
    probabilities: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    postprocess: Mapping[str, Any],
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> TunedPostprocess:
    """The post-processing options, on a grid, with the highest mean AP at IoU 0.5.

    For every combination of the grid's values laid over ``postprocess``, the objects of
    each image come from :func:`biounet.postprocess.labels_from_probabilities` and are
    scored against its labels by :func:`biounet.metrics.score_instances` (AP = TP / (TP +
    FP + FN) at IoU 0.5, the DSB 2018 definition); the combination with the highest mean
    over the images wins. The options as given are scored first and are kept unless a
    combination scores strictly higher, so a tie never moves them; of combinations with the
    same score, the one that changes the fewest options wins, then the first in the grid's
    order. Combinations that :func:`biounet.postprocess.check_postprocess` rejects (a seed
    threshold at or below the foreground threshold) are skipped.

    Parameters
    ----------
    probabilities : sequence of ndarray
        ``(C, H, W)`` class probabilities per image (what :func:`biounet.predict` returns).
    labels : sequence of ndarray
        ``(H, W)`` true instance labels of the same images.
    postprocess : mapping
        The model's post-processing (``model.info.postprocess``).
    grid : mapping of str to sequence, optional
        Values to try per option; default :func:`postprocess_grid`.

    Returns
    -------
    TunedPostprocess

    Raises
    ------
    ValueError
        If there are no images, the two sequences differ in length, an image's shapes do not
        match, the probabilities are not of 2 classes (or 3 with ``split="border"``), or the
        grid is empty, names an unknown option, or holds a value that no combination accepts.

    References
    ----------
    Schmidt, Weigert, Broaddus & Myers (2018), "Cell Detection with Star-convex Polygons",
    MICCAI: thresholds optimised on the validation images after training.
    """
    from biounet.metrics._instances import score_instances
    from biounet.postprocess import DEFAULTS, OPTIONS, check_postprocess, labels_from_probabilities

    if not len(probabilities) or len(probabilities) != len(labels):
        raise InputError(f"need one label image per probability map and at least one, got {len(probabilities)} "
                         f"probability map(s) and {len(labels)} label image(s)")  # fmt: skip
    base = check_postprocess(dict(postprocess))
    classes = 3 if base.get("split") == "border" else 2
    for i, (prob, truth) in enumerate(zip(probabilities, labels, strict=True)):
        if np.ndim(prob) != 3 or np.shape(prob)[1:] != np.shape(truth):
            raise InputError(f"image {i}: probabilities of shape {np.shape(prob)} do not fit labels of shape "
                             f"{np.shape(truth)}; need (C, H, W) and (H, W)")  # fmt: skip
        if np.shape(prob)[0] != classes:
            raise InputError(f"image {i}: {np.shape(prob)[0]} classes of probabilities; split "
                             f"{base.get('split', 'none')!r} makes objects of {classes}")  # fmt: skip
    grid = {name: tuple(values) for name, values in (postprocess_grid(base) if grid is None else grid).items()}
    unknown = sorted(set(grid) - set(OPTIONS))
    if not grid or unknown:
        raise InputError(f"grid: {'unknown option(s) ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; "
                         f"the options are {', '.join(OPTIONS)}")  # fmt: skip
    given = {**DEFAULTS, **base}
    combinations, accepted, problems = [], {name: [] for name in grid}, {}
    for values in itertools.product(*grid.values()):
        options = {**base, **dict(zip(grid, values, strict=True))}
        try:
            check_postprocess(options)
        except InputError as error:  # a seed threshold at or below the threshold, say
            problems.setdefault(values, str(error))
            continue
        for name, value in zip(grid, values, strict=True):
            accepted[name].append(value)
        if {**DEFAULTS, **options} != given:  # the options as given are scored first
            combinations.append(options)
    for name, values in grid.items():
        refused = [v for v in values if v not in accepted[name]]
        if refused:
            example = next(p for v, p in problems.items() if v[list(grid).index(name)] == refused[0])
            raise InputError(f"grid: {name} = {refused[0]!r} fits no combination ({example})")

    def mean_ap(options: dict[str, Any]) -> float:
        pairs = zip(probabilities, labels, strict=True)
        return float(np.mean([score_instances(truth, labels_from_probabilities(prob, **options), thresholds=(0.5,))
                              .average_precision[0] for prob, truth in pairs]))  # fmt: skip

    default_score = mean_ap(base)
    best, best_score = base, default_score
    combinations.sort(key=lambda options: sum(options[k] != given[k] for k in grid))  # fewest changes first
    for options in combinations:
        score = mean_ap(options)
        if score > best_score:
            best, best_score = options, score
    log.info("post-processing tuned on %d image(s): mean AP @ 0.5 %.4f -> %.4f with %s", len(labels), default_score,
             best_score, {k: best.get(k) for k in grid})  # fmt: skip
    return TunedPostprocess(best, best_score, default_score, grid)
