"""Splitting annotated samples into training and validation sets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from biounet.errors import InputError


def split_samples(samples: Sequence[Any], fraction: float, *, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Hold out ``ceil(fraction * n)`` samples (at least one if ``fraction > 0``), chosen by ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"validation fraction must be in [0, 1), got {fraction}")
    samples = list(samples)
    n_val = math.ceil(fraction * len(samples)) if fraction > 0 else 0
    if n_val and n_val >= len(samples):
        raise InputError(f"cannot hold out {n_val} of {len(samples)} images and still train")
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
