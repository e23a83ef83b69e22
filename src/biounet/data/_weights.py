r"""Pixel-wise loss weights that force a U-Net to learn the borders between touching cells.

Ronneberger, Fischer and Brox (2015), eq. 2, weight every pixel ``x`` of the training target by

.. math::

    w(x) = w_c(x) + w_0 \exp\left(-\frac{(d_1(x) + d_2(x))^2}{2\sigma^2}\right)

where :math:`w_c` balances the class frequencies and :math:`d_1, d_2` are the Euclidean
distances to the nearest and to the second-nearest cell. :func:`weight_map` computes it for an
instance label image; :func:`binary_to_instances` turns a binary mask (e.g. the ISBI 2012
membrane labels) into such an image; :func:`render_weight_map` draws it like the paper's
Fig. 3d.

References
----------
O. Ronneberger, P. Fischer, T. Brox. "U-Net: Convolutional Networks for Biomedical Image
Segmentation." MICCAI 2015, LNCS 9351, pp. 234-241. https://arxiv.org/abs/1505.04597
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from biounet.errors import InputError

log = logging.getLogger(__name__)


ClassWeights = Literal["balanced"] | Mapping[int, float] | Sequence[float] | np.ndarray | None

__all__ = ["binary_to_instances", "class_frequencies", "render_weight_map", "weight_map"]


def weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = "balanced",
    *,
    class_frequencies: Sequence[float] | np.ndarray | None = None,
    border: Literal["background", "all"] = "background",
    tol: float = 1e-6,
) -> np.ndarray:
    """Loss weight map of the U-Net paper (eq. 2) for an instance label image.

    .. math::

        w(x) = w_c(x) + w_0 \\exp\\left(-\\frac{(d_1(x) + d_2(x))^2}{2\\sigma^2}\\right)

    Every distinct non-zero label value is one cell (it need not be connected); 0 is
    background. :math:`d_k(x)` is the Euclidean distance from the centre of pixel ``x`` to the
    centre of the nearest pixel of the k-th nearest cell (0 inside that cell), as computed by
    :func:`scipy.ndimage.distance_transform_edt`.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W) or (D, H, W)
        Instance labels, 0 = background; any non-negative integer ids (not necessarily
        consecutive). Convert a binary mask with :func:`binary_to_instances` first.
    w0 : float
        Amplitude :math:`w_0` of the border term (paper: 10).
    sigma : float
        Width :math:`\\sigma` of the border term in pixels (paper: about 5).
    class_weights : "balanced", None, sequence or mapping
        :math:`w_c` for the two classes (0 = background, 1 = cell). ``"balanced"``:
        :math:`w_c = 1 / (K f_c)` with :math:`f_c` the class frequency and ``K`` the number of
        classes present (the weights are 1 when both classes are equally frequent), from this
        image or from ``class_frequencies``. ``None``: :math:`w_c = 1`. A length-2 sequence or
        a mapping ``{0: w_background, 1: w_cell}``: these weights.
    class_frequencies : sequence of 2 floats, optional
        Dataset frequencies ``(f_background, f_cell)`` for ``class_weights="balanced"`` (see
        :func:`class_frequencies`); normalised to sum 1. Default: this image's frequencies.
    border : {"background", "all"}
        Where the border term is added. ``"background"`` (default): on background pixels
        only; cell pixels get :math:`w_c` alone. This is what the paper's Fig. 3d shows (high
        weights in the gaps separating touching cells, which the network must learn to
        predict as background) and what the widely used re-implementations do. ``"all"``:
        on every pixel, as eq. 2 reads literally; inside a cell :math:`d_1 = 0` and
        :math:`d_2` is the distance to the nearest other cell, so cell pixels next to a
        touching neighbour get high weights too.
    tol : float
        Truncation tolerance (see Notes); 0 computes every distance in full.

    Returns
    -------
    ndarray of float32, same shape as ``labels``
        The weights, all >= 0 (> 0 unless a class weight is 0).

    Raises
    ------
    TypeError
        If ``labels`` is not an integer array.
    ValueError
        If ``labels`` is not 2D/3D or has negative values, or a parameter is out of range.

    Notes
    -----
    *Fewer than two cells*: :math:`d_2` is undefined, the border term is 0 and
    :math:`w = w_c` everywhere.

    *Truncation*: the border term is below ``tol`` wherever :math:`d_1 + d_2 > R` with
    :math:`R = \\sigma \\sqrt{2 \\ln(w_0 / \\text{tol})}` (about 28.4 px for the defaults). So
    each cell's distance transform is computed only inside its bounding box grown by
    :math:`\\lceil R \\rceil` pixels, where it is exact, and taken as infinite outside, where
    the true distance exceeds ``R``; the two smallest distances are kept per pixel. Where
    the true :math:`d_2 \\le R` both nearest cells are found with their exact distances, so
    the result is exact; elsewhere the true and the computed term both lie in
    :math:`[0, \\text{tol})`. Hence ``|weight_map(...) - eq. 2| < tol`` for every pixel
    (before the final rounding to float32). The cost is one small distance transform per
    cell instead of one over the whole image per cell.

    References
    ----------
    Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015, eq. 2 and Fig. 3.

    Examples
    --------
    >>> labels = np.zeros((8, 12), dtype=np.int32)
    >>> labels[2:6, 1:5], labels[2:6, 6:10] = 1, 2
    >>> w = weight_map(labels, class_weights=None)
    >>> bool(w[3, 5] > w[3, 11] > 1.0)  # the gap between the cells weighs most
    True
    """
    labels = _check_labels(labels)
    for name, value in (("w0", w0), ("sigma", sigma)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"weight_map: {name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise InputError(f"weight_map: tol must be a finite number >= 0, got {tol!r}")
    if border not in ("background", "all"):
        raise InputError(f"weight_map: border must be 'background' or 'all', got {border!r}")
    foreground = labels > 0
    weights = _class_weight_image(foreground, class_weights, class_frequencies)
    if w0 > 0 and sigma > 0:
        d1, d2 = _two_nearest_distances(labels, _cutoff(w0, sigma, tol))
        term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
        weights += term if border == "all" else np.where(foreground, 0.0, term)
    return weights.astype(np.float32)


def _cutoff(w0: float, sigma: float, tol: float) -> float:
    """Distance beyond which ``w0 * exp(-d**2 / (2 sigma**2)) < tol`` (inf for tol = 0)."""
    if tol == 0:
        return math.inf
    return sigma * math.sqrt(2.0 * math.log(w0 / tol)) if w0 > tol else 0.0


def _two_nearest_distances(labels: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel distances to the nearest and second-nearest cell, exact where <= ``cutoff``.

    Outside each cell's bounding box grown by ``ceil(cutoff)`` that cell's distance is taken
    as infinite (the true one is larger than ``cutoff`` there).
    """
    if labels.max(initial=0) > labels.size:  # sparse ids: find_objects is O(max label)
        labels = relabel_sequential(labels)[0]
    margin = max(labels.shape) if math.isinf(cutoff) else math.ceil(cutoff)
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    boxes = ndi.find_objects(labels)
    log.debug("weight_map: %d cells, distances within %d px of each cell", len(boxes) - boxes.count(None), margin)
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, labels.shape))
        distance = ndi.distance_transform_edt(labels[grown] != index)
        near, second = d1[grown], d2[grown]  # views: updated in place
        np.minimum(second, np.maximum(near, distance), out=second)
        np.minimum(near, distance, out=near)
    return d1, d2


def _class_weight_image(
    foreground: np.ndarray,
    class_weights: ClassWeights,
    frequencies: Sequence[float] | np.ndarray | None,
) -> np.ndarray:
    """:math:`w_c(x)` as a float64 image."""
    if frequencies is not None and not (isinstance(class_weights, str) and class_weights == "balanced"):
        raise InputError("weight_map: class_frequencies is only used with class_weights='balanced'")
    if class_weights is None:
        return np.ones(foreground.shape)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise InputError(f"weight_map: class_weights must be 'balanced', None or 2 weights, got {class_weights!r}")
        if frequencies is None:
            counts = np.bincount(foreground.ravel(), minlength=2).astype(np.float64)
            present = counts > 0
            per_class = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
        else:
            freq = _two_values(frequencies, "class_frequencies")
            if not (freq > 0).all():
                raise InputError(f"weight_map: class_frequencies must both be > 0, got {freq.tolist()}")
            per_class = freq.sum() / (2.0 * freq)
    else:
        if isinstance(class_weights, Mapping):
            if set(class_weights) != {0, 1}:
                raise InputError(f"weight_map: class_weights mapping needs keys {{0, 1}}, got {sorted(class_weights)}")
            class_weights = [class_weights[0], class_weights[1]]
        per_class = _two_values(class_weights, "class_weights")
    return per_class[foreground.astype(np.intp)]


def _two_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (2,) or not np.isfinite(array).all() or (array < 0).any():
        raise InputError(
            f"weight_map: {name} must be 2 finite values >= 0 (background, cell), got {np.asarray(values).tolist()}"
        )
    return array


def class_frequencies(label_images: Iterable[np.ndarray]) -> np.ndarray:
    """Frequencies ``(f_background, f_cell)`` of the two classes over a set of label images.

    Pass the result as ``class_frequencies=`` to :func:`weight_map` to balance the classes
    over a whole data set instead of per image.

    Parameters
    ----------
    label_images : iterable of ndarray
        Label images (instance ids or binary masks); non-zero = cell.

    Returns
    -------
    ndarray of float64, shape (2,)
        Pixel fractions of background and cells; they sum to 1.

    Raises
    ------
    ValueError
        If there are no pixels at all.
    """
    counts = np.zeros(2, dtype=np.int64)
    for image in label_images:
        image = np.asarray(image)
        cells = int(np.count_nonzero(image))
        counts += (image.size - cells, cells)
    if counts.sum() == 0:
        raise InputError("class_frequencies: label_images holds no pixels")
    return counts / counts.sum()


def binary_to_instances(
    mask: np.ndarray,
    foreground_value: float | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Label the connected components of a binary mask as cells.

    Parameters
    ----------
    mask : ndarray, shape (H, W) or (D, H, W)
        Binary mask, e.g. the ISBI 2012 labels (0 = membrane, 255 = cell interior).
    foreground_value : number, optional
        Pixels equal to this value are cells. Default: every non-zero pixel.
    connectivity : int
        Neighbourhood of :func:`scipy.ndimage.generate_binary_structure`: 1 joins pixels that
        share a face (4-connectivity in 2D, 6 in 3D), ``mask.ndim`` also joins diagonal
        neighbours (8-connectivity in 2D, 26 in 3D). With 1, cells that touch only at a
        corner (as across a one-pixel diagonal membrane) stay separate.

    Returns
    -------
    ndarray of int32
        0 = background, cells numbered 1..N in raster order of their first pixel.

    Raises
    ------
    ValueError
        If the mask is not 2D/3D or ``connectivity`` is not in ``1..mask.ndim``.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3) or mask.size == 0:
        raise InputError(f"binary_to_instances: mask must be a non-empty 2D or 3D array, got shape {mask.shape}")
    if not 1 <= connectivity <= mask.ndim:
        raise InputError(f"binary_to_instances: connectivity must be in 1..{mask.ndim}, got {connectivity!r}")
    cells = mask != 0 if foreground_value is None else mask == foreground_value
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    instances, _ = ndi.label(cells, structure=structure, output=np.int32)
    return instances


def render_weight_map(weights: np.ndarray, *, vmax: float | None = None) -> np.ndarray:
    """Colour picture of a weight map, like the paper's Fig. 3d (blue = low, red = high).

    Values are scaled linearly from 0 to ``vmax`` (default: the maximum) and coloured with
    matplotlib's "jet" map (256 colours, dark blue at 0, dark red at ``vmax``).

    Parameters
    ----------
    weights : ndarray, shape (H, W)
        A weight map (finite values >= 0).
    vmax : float, optional
        Value shown in dark red; larger values are clipped.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
        RGB pixels.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or not np.isfinite(weights).all():
        raise InputError(f"render_weight_map: weights must be a finite 2D array, got shape {weights.shape}")
    if vmax is not None and not (math.isfinite(vmax) and vmax > 0):
        raise InputError(f"render_weight_map: vmax must be a finite number > 0, got {vmax!r}")
    import matplotlib

    top = float(weights.max(initial=0.0)) if vmax is None else vmax
    t = np.clip(weights / top, 0.0, 1.0) if top > 0 else np.zeros_like(weights)
    return np.ascontiguousarray(matplotlib.colormaps["jet"](t, bytes=True)[..., :3])


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool or labels.dtype.kind not in "iu":
        raise TypeError(
            f"weight_map: labels must be an integer instance label image, got dtype {labels.dtype}"
            + ("; convert a binary mask with binary_to_instances()" if labels.dtype == bool else "")
        )
    if labels.ndim not in (2, 3) or labels.size == 0:
        raise InputError(f"weight_map: labels must be a non-empty 2D or 3D array, got shape {labels.shape}")
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise InputError(f"weight_map: labels has negative values (min {labels.min()}); 0 is background")
    return labels.astype(np.intp, copy=False)
