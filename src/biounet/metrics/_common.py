"""Input checks and small helpers shared by the metrics."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from biounet.errors import InputError

CROSS = ndimage.generate_binary_structure(2, 1)
SQUARE = ndimage.generate_binary_structure(2, 2)
# The 8 neighbours (dy, dx) in ring order; bit k of a neighbourhood code is neighbour k.
RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str], *, ndim: int | None = None) -> None:
    if a.shape != b.shape:
        raise InputError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if ndim is not None and a.ndim != ndim:
        raise InputError(f"{names[0]} and {names[1]} must be {ndim}D, got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{names[0]} and {names[1]} are empty (shape {a.shape})")


def check_labels(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x.astype(np.uint8)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or boolean label image, got dtype {x.dtype}")
    if x.dtype.kind == "i" and x.size and x.min() < 0:
        raise InputError(f"{name} has negative labels (min {x.min()})")
    return x


def check_probabilities(prob: np.ndarray, name: str = "prob") -> np.ndarray:
    prob = np.asarray(prob)
    if prob.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real-valued array, got dtype {prob.dtype}")
    # Fiji holds 32-bit pixels and compares them, promoted, with double thresholds: round to
    # float32, compare in float64 (a float32 comparison would round 0.9999999999999999 to 1).
    prob = prob.astype(np.float32).astype(np.float64)
    if not np.isfinite(prob).all():
        raise InputError(f"{name} has NaN or infinite values")
    if prob.size and (prob.min() < 0.0 or prob.max() > 1.0):
        raise InputError(f"{name} must be probabilities in [0, 1], got values in [{prob.min()}, {prob.max()}]")
    return prob


def sequential_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0 (kept), 1..n in increasing order of the original ids, and n."""
    sequential = relabel_sequential(labels)[0].astype(np.int64, copy=False)  # int64: pair indices must not wrap
    return sequential, int(sequential.max(initial=0))


def scan_order(mask: np.ndarray) -> np.ndarray:
    """Flat (row-major) indices of ``mask``'s pixels in Fiji's scan order: x outer, y inner."""
    height, width = mask.shape
    x, y = np.divmod(np.flatnonzero(mask.T), height)
    return y * width + x


def pack(bits: np.ndarray) -> np.ndarray:
    """Neighbourhood codes of an (n, 8) array of 0/1 values in ring order."""
    return np.packbits(bits, axis=1, bitorder="little").ravel()


def unique_values(values: np.ndarray) -> np.ndarray:
    """The distinct entries of ``values``, in no particular order (faster than np.unique)."""
    values = values.ravel()
    owner = np.empty(int(values.max()) + 1 if values.size else 0, np.int64)
    index = np.arange(values.size)
    owner[values] = index  # one of the writers of each value wins
    return values[owner[values] == index]
