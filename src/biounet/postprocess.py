"""From a foreground probability map to instance labels.

``probabilities_to_labels`` thresholds the map, labels connected components, optionally
splits touching objects with a seeded watershed, and removes objects below a size. It is
the one post-processing used by ``biounet predict --save labels``, ``biounet evaluate``
and the demo.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import relabel_sequential, watershed

from biounet.errors import InputError

log = logging.getLogger(__name__)

Split = Literal["none", "distance", "probability", "border"]
SPLITS: tuple[str, ...] = ("none", "distance", "probability", "border")


def probabilities_to_labels(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    split: Split = "none",
    seed_threshold: float = 0.9,
    min_seed_height: float = 2.0,
    min_size: int = 0,
    connectivity: int = 1,
    interior: np.ndarray | None = None,
) -> np.ndarray:
    """Instance labels of the objects in a foreground probability map.

    1. The foreground is ``prob > threshold``; its connected components are the objects
       (``connectivity`` 1: 4-/6-neighbours, as the U-Net's separating borders and the
       ISBI evaluation assume; ``prob.ndim``: 8-/26-neighbours).
    2. With ``split``, touching objects are separated by a seeded watershed (Beucher &
       Meyer 1993) restricted to the foreground:

       * ``"distance"``: the seeds are the maxima of the Euclidean distance to the
         background whose dynamic exceeds ``min_seed_height`` pixels, i.e. that rise more
         than that above the saddle to a higher (or equal) maximum: the regional maxima
         of the h-maxima transform (Soille 2003, sec. 6.3.4). They are flooded on the
         negated distance, so round objects joined by a narrower neck are cut there;
       * ``"probability"``: the seeds are the connected regions of
         ``prob > seed_threshold`` (confident object cores), flooded on ``-prob``, so the
         cut follows the valley of the probability between cores;
       * ``"border"``: for a 3-class model (background, cell interior, cell border;
         :meth:`biounet.data.Sample.class_target`), ``prob`` is the foreground
         (interior + border) and ``interior`` the interior probability; the seeds are the
         connected regions of ``interior > threshold``, flooded on ``-interior``, so
         touching cells part along the border class between their interiors.

       A component without a seed keeps its own label.
    3. Objects smaller than ``min_size`` pixels are removed; labels are renumbered
       1..N consecutively.

    Parameters
    ----------
    prob : ndarray, 2D or 3D
        Probability of the foreground class, in [0, 1] (e.g. ``biounet.predict(...)[1]``).
    threshold : float
        Foreground threshold, in [0, 1).
    split : {"none", "distance", "probability", "border"}
        How to separate touching objects; default none.
    seed_threshold : float
        Core threshold for ``split="probability"``, in (threshold, 1).
    min_seed_height : float
        Dynamic (pixels) a distance maximum must exceed to seed an object, for
        ``split="distance"``; larger values split less.
    min_size : int
        Smallest object kept, in pixels (0 keeps all).
    connectivity : int
        1 (face neighbours) up to ``prob.ndim`` (all neighbours).
    interior : ndarray, optional
        The cell-interior probability, the shape of ``prob``; required by ``split="border"``
        and only used by it.

    Returns
    -------
    ndarray of int32
        0 = background, 1..N = objects.

    References
    ----------
    .. [1] S. Beucher, F. Meyer (1993). The morphological approach to segmentation: the
       watershed transformation. In: Mathematical Morphology in Image Processing, 433-481.
    .. [2] P. Soille (2003). Morphological Image Analysis, 2nd ed., Springer, sec. 6.3.
    """
    prob = np.asarray(prob)
    if prob.dtype.kind not in "biuf" or prob.ndim not in (2, 3):
        raise InputError(f"prob must be a real 2D or 3D array, got {prob.dtype} with shape {prob.shape}")
    if prob.size and (not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1):
        raise InputError("prob must hold finite probabilities in [0, 1]")
    check_postprocess(dict(threshold=threshold, split=split, seed_threshold=seed_threshold,
                           min_seed_height=min_seed_height, min_size=min_size, connectivity=connectivity))  # fmt: skip
    if not 1 <= connectivity <= prob.ndim:
        raise InputError(f"connectivity must be in 1..{prob.ndim} for a {prob.ndim}D map, got {connectivity}")
    if (split == "border") != (interior is not None):
        raise InputError('split="border" needs the interior probability of a 3-class model (interior=...), and '
                         f"only it takes one; got split={split!r} with{'out' if interior is None else ''} interior")
    if interior is not None:
        interior = np.asarray(interior)
        if interior.shape != prob.shape or interior.dtype.kind not in "biuf":
            raise InputError(f"interior must be a real map of prob's shape {prob.shape}, got {interior.dtype} "
                             f"{interior.shape}")  # fmt: skip

    structure = ndimage.generate_binary_structure(prob.ndim, connectivity)
    foreground = prob > threshold
    if split == "none":
        labels, _ = ndimage.label(foreground, structure)
    else:
        labels = _split_touching(prob, foreground, split, seed_threshold, min_seed_height, structure, interior,
                                 threshold)  # fmt: skip
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_size] = 0
    labels = relabel_sequential(labels)[0].astype(np.int32, copy=False)
    log.debug("probabilities_to_labels: %d objects", labels.max())
    return labels


#: The options of :func:`probabilities_to_labels` and the types they take.
OPTIONS: dict[str, type] = {
    "threshold": numbers.Real, "split": str, "seed_threshold": numbers.Real, "min_seed_height": numbers.Real,
    "min_size": numbers.Integral, "connectivity": numbers.Integral,
}  # fmt: skip


#: The defaults of :func:`probabilities_to_labels`, read from its signature.
DEFAULTS: dict[str, Any] = {name: p.default for name, p in inspect.signature(probabilities_to_labels).parameters.items()
                            if p.kind is inspect.Parameter.KEYWORD_ONLY and name in OPTIONS}  # fmt: skip


def check_postprocess(options: dict[str, Any]) -> dict[str, Any]:
    """Check keyword arguments of :func:`probabilities_to_labels` before any work; return them.

    Every key must be one of its options, of its type (booleans are not numbers here) and in
    its range; a ``connectivity`` above the map's dimensions is only caught by the function.
    Raises one :class:`ValueError` naming the option.
    """
    if not isinstance(options, dict):
        raise InputError(f"post-processing options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown post-processing option(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(OPTIONS)}")  # fmt: skip
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, OPTIONS[name]):
            kind = {str: "a string", numbers.Integral: "an integer", numbers.Real: "a number"}[OPTIONS[name]]
            raise InputError(f"post-processing option {name} must be {kind}, got {value!r}")
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise InputError(f"post-processing option {name} must be finite, got {value!r}")
    o = {**DEFAULTS, **options}
    if not 0.0 <= o["threshold"] < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {o['threshold']}")
    if o["split"] not in SPLITS:
        raise InputError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {o['split']!r}")
    if o["split"] == "probability" and not o["threshold"] < o["seed_threshold"] < 1.0:
        raise InputError(f"seed_threshold must be in (threshold={o['threshold']}, 1), got {o['seed_threshold']}")
    if o["split"] == "distance" and o["min_seed_height"] <= 0:
        raise InputError(f"min_seed_height must be > 0, got {o['min_seed_height']}")
    if o["min_size"] < 0:
        raise InputError(f"min_size must be >= 0, got {o['min_size']}")
    if not 1 <= o["connectivity"] <= 3:
        raise InputError(f"connectivity must be in 1..3, got {o['connectivity']}")
    return options


def _split_touching(
    prob: np.ndarray,
    foreground: np.ndarray,
    split: Split,
    seed_threshold: float,
    min_seed_height: float,
    structure: np.ndarray,
    interior: np.ndarray | None,
    threshold: float,
) -> np.ndarray:
    if split == "border":
        seeds = (interior > threshold) & foreground
        seed_structure = structure
        relief = -interior.astype(np.float64)
    elif split == "distance":
        distance = ndimage.distance_transform_edt(foreground)
        # regional maxima of the h-maxima transform: one seed per maximum of dynamic > h. A
        # maximum is a plateau connected through corners too (the reconstruction and
        # local_maxima use full connectivity), so its pixels are one seed even when they touch
        # only diagonally, as on a ridge at 45 degrees.
        flooded = reconstruction(distance - min_seed_height, distance, method="dilation")
        seeds = local_maxima(flooded, connectivity=structure.ndim) & foreground
        seed_structure = ndimage.generate_binary_structure(prob.ndim, prob.ndim)
        relief = -distance
    else:
        seeds = prob > seed_threshold
        seed_structure = structure
        relief = -prob.astype(np.float64)
    markers, n_seeds = ndimage.label(seeds, seed_structure)
    labels = watershed(relief, markers, mask=foreground, connectivity=structure)
    unseeded, _ = ndimage.label(foreground & (labels == 0), structure)
    labels[unseeded > 0] = unseeded[unseeded > 0] + n_seeds
    return labels


def foreground_probability(prob: np.ndarray) -> np.ndarray:
    """The probability of "not background" of ``(C, *spatial)`` class probabilities.

    Class 1 for a 2-class model (exactly the value it predicts), else ``1 - prob[0]``: the
    interior plus the border of a 3-class ``"border"`` model.
    """
    prob = np.asarray(prob)
    if prob.ndim < 2 or prob.shape[0] < 2:
        raise InputError(f"need (classes >= 2, *spatial) probabilities, got shape {prob.shape}")
    return prob[1] if prob.shape[0] == 2 else 1.0 - prob[0]


def labels_from_probabilities(prob: np.ndarray, **postprocess: Any) -> np.ndarray:
    """Instance labels (2 classes, or 3 with ``split="border"``) or the arg-max class map of (C, *spatial) probabilities.

    For 2 classes the foreground probability goes through
    :func:`biounet.postprocess.probabilities_to_labels` with ``postprocess`` (a model carries
    its own in ``model.info.postprocess``, e.g. ``{"split": "distance"}``); a 3-class
    (background, interior, border) model with ``split="border"`` gives it the foreground
    ``1 - prob[0]`` and its interior ``prob[1]`` as seeds. Other class counts give the
    arg-max class map.
    """
    if postprocess.get("split") == "border":
        if prob.shape[0] != 3:
            raise InputError(f'split="border" needs the 3 classes of a border model, got {prob.shape[0]}')
        return probabilities_to_labels(foreground_probability(prob), interior=prob[1], **postprocess)
    if prob.shape[0] == 2:
        return probabilities_to_labels(prob[1], **postprocess)
    return np.argmax(prob, axis=0).astype(np.uint16)


def labels_of_planes(prob: np.ndarray, spatial_dims: int, **postprocess: Any) -> np.ndarray:
    """:func:`labels_from_probabilities` of each ``(C, *spatial)`` item of ``(*stack, C, *spatial)`` probabilities.

    Each plane (or volume) is post-processed on its own, as ``biounet predict`` does for
    stacks; the result has the shape ``(*stack, *spatial)``.
    """
    items = prob.reshape(-1, *prob.shape[-1 - spatial_dims :])
    labels = np.stack([labels_from_probabilities(p, **postprocess) for p in items])
    return labels.reshape(*prob.shape[: -1 - spatial_dims], *prob.shape[-spatial_dims:])
