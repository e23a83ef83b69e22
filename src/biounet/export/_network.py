"""The network as an exported file runs it, the sizes it is checked at, and the check itself."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from biounet.model import UNet, UNetConfig

#: Largest absolute difference allowed between an exported file's output and PyTorch's, on
#: the CPU in float32, at each of the :func:`check_shapes` (measured: about 1e-5 on logits of
#: the shipped models, 1e-7 on their probabilities; ``docs/export.md``).
TOLERANCE = 1e-4


class ExportedNetwork(nn.Module):
    """An eval-mode float32 CPU copy of a :class:`~biounet.model.UNet`, optionally ending in a softmax.

    The caller's model is never changed. ``softmax=True``: the output is the class
    probabilities (what :func:`biounet.predict` returns per tile); ``False``: the logits.
    """

    def __init__(self, model: UNet, *, softmax: bool) -> None:
        super().__init__()
        self.net = frozen_copy(model)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return torch.softmax(logits, dim=1) if self.softmax else logits


def frozen_copy(model: UNet) -> UNet:
    """A float32 CPU copy of ``model`` in eval mode without gradients."""
    net = copy.deepcopy(model).float().cpu().eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def size_rule(config: UNetConfig) -> tuple[int, int]:
    """``(min, step)``: the valid input sizes per spatial axis are ``min + n * step``, n = 0, 1, 2 ...

    From the network's own shape arithmetic (:meth:`UNetConfig.is_valid_input_size`): the
    valid sizes form an arithmetic progression with step ``2**depth``, for valid and same
    padding.
    """
    return config.valid_input_size(1), config.stride


@dataclass(frozen=True)
class Geometry:
    """Sizes of an exported package, per spatial axis, from the network's shape arithmetic.

    Attributes
    ----------
    min, step : int
        Valid input sizes ``min + n * step`` (:func:`size_rule`; ``min`` raised for same
        padding so that an output keeps a pixel after its halo is cropped).
    offset : int
        Output size minus input size: ``-2 * halo`` for valid padding (the network crops),
        0 for same padding.
    halo : int
        Same padding only (else 0): pixels per side to crop from an output, because their
        context was zero padding. The network's own halo rounded up to a multiple of
        ``step / 2``, so that an input padded by it on both sides keeps a valid size.
    test_size : int
        Input size of the test tensors: the smallest valid size with at least
        ``test_output`` reliable output pixels.
    """

    min: int
    step: int
    offset: int
    halo: int
    test_size: int

    @classmethod
    def of(cls, config: UNetConfig, test_output: int) -> Geometry:
        first, step = size_rule(config)
        if config.padding == "valid":
            return cls(first, step, -2 * config.halo, 0, config.input_size_for(test_output))
        unit = max(step // 2, 1)
        halo = -(-config.halo // unit) * unit
        return cls(config.valid_input_size(2 * halo + 1), step, 0, halo, config.valid_input_size(2 * halo + test_output))

    def output_size(self, input_size: int) -> int:
        return input_size + self.offset


def check_shapes(config: UNetConfig) -> list[tuple[int, ...]]:
    """Three input shapes ``(batch, channels, *spatial)`` of valid sizes to check an export at.

    The three smallest valid sizes ``s0 < s1 < s2`` per axis: a square ``s0`` image, a batch
    of two ``(s1, s2)`` images and a ``(s2, s0)`` image (cycled likewise over a third axis),
    so that batch, height and width each change between checks.
    """
    first, step = size_rule(config)
    sizes = [first + k * step for k in range(3)]
    shapes = []
    for case, batch in enumerate((1, 2, 1)):
        spatial = (sizes[0],) * config.dims if case == 0 else tuple(sizes[(case + a) % 3] for a in range(config.dims))
        shapes.append((batch, config.in_channels, *spatial))
    return shapes


def max_difference(
    run: Callable[[np.ndarray], np.ndarray], reference: nn.Module, shapes: Sequence[tuple[int, ...]], *, seed: int = 0
) -> float:
    """Largest absolute difference between ``run(x)`` and ``reference(x)`` over random inputs of ``shapes``.

    The inputs are standard normal float32 (the range of normalised images); a shape
    mismatch or a non-finite output counts as an infinite difference.
    """
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in shapes:
        x = rng.standard_normal(shape, dtype=np.float32)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(x)).numpy()
        got = np.asarray(run(x))
        if got.shape != expected.shape or not np.isfinite(got).all():
            return float("inf")
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
    return worst
