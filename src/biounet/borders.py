"""The one mirror rule: how an image is extended beyond its border.

Training tiles (:mod:`biounet.data`), prediction tiles and chunks (:mod:`biounet.prediction`)
all read pixels past the image edge through :func:`mirror_indices`, so a network sees the
same context wherever a tile lies. It is NumPy's ``"reflect"`` (the edge pixel is not
repeated), extended to any width by reflecting again, as the paper's Fig. 2 mirrors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from biounet.errors import InputError


def mirror_indices(size: int, before: int, after: int) -> np.ndarray:
    """Source index of every position of an axis of length ``size`` padded by mirroring.

    Position ``i`` in ``[-before, size + after)`` reads pixel ``m(i)`` where ``m`` reflects
    about the first and last pixel without repeating them (period ``2 * (size - 1)``), the
    rule of ``numpy.pad(mode="reflect")``. For ``size == 1`` every position reads pixel 0.
    The value at a position does not depend on ``before``/``after``: padding more never
    changes pixels already padded, which is what makes tiling and streaming exact.
    """
    if size < 1 or before < 0 or after < 0:
        raise InputError(f"mirror_indices: need size >= 1 and non-negative pads, got {size}, {before}, {after}")
    positions = np.arange(-before, size + after)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def mirror_pad(array: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mirror-pad the last ``len(pads)`` axes of ``array`` (see :func:`mirror_indices`)."""
    out = np.asarray(array)
    first = out.ndim - len(pads)
    for axis, (before, after) in enumerate(pads, start=first):
        out = np.take(out, mirror_indices(out.shape[axis], before, after), axis=axis)
    return out
