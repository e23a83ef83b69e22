"""Losses: the paper's pixel-wise weighted cross-entropy (eq. 1), its weight maps (eq. 2) as a
recipe makes them, and an optional soft Dice term."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from biounet.errors import InputError

if TYPE_CHECKING:
    from biounet.data import Sample
    from biounet.training._config import TrainConfig


def loss_weights(config: TrainConfig, samples: Sequence[Sample]) -> Callable[[np.ndarray], np.ndarray]:
    """The weight map of the recipe (eq. 2) as a function of a training label image.

    .. math::

        w(x) = w_c(x) + w_0 \\exp\\left(-\\frac{(d_1(x) + d_2(x))^2}{2\\sigma^2}\\right),
        \\qquad w_c = \\frac{1}{K f_c}

    (:func:`biounet.data.weight_map`), with the class frequencies :math:`f_c` as
    ``config.class_balance`` says: ``"image"``, those of each label image itself (the default);
    ``"dataset"``, those of all the ``samples``' pixels together
    (:func:`biounet.data.class_frequencies`), so that every image weighs its classes alike;
    ``"none"``, :math:`w_c = 1`. Per image, an image with 2% foreground (the brightfield
    images of the DSB 2018 subset) weighs a cell pixel 49 times a background pixel, one with
    25% foreground 3 times: the net learns each kind of image with another prior and, where it
    is unsure, calls the background of the sparse kinds foreground.

    Parameters
    ----------
    config : TrainConfig
        The recipe: ``w0``, ``sigma`` and ``class_balance``.
    samples : sequence of Sample
        The training samples (their ``separated`` labels give the ``"dataset"`` frequencies).

    Returns
    -------
    callable
        ``weights(labels) -> float32 array`` of the labels' shape, the weight map of one label
        image, as :class:`biounet.data.TileDataset` takes it (``weight_fn``).

    References
    ----------
    Ronneberger, Fischer & Brox (2015), U-Net: Convolutional Networks for Biomedical Image
    Segmentation, eq. 2.
    """
    from biounet.data._weights import class_frequencies, weight_map

    balance = config.class_balance
    if balance not in ("image", "dataset", "none"):
        raise InputError(f"class_balance must be 'image', 'dataset' or 'none', got {balance!r}")
    frequencies = class_frequencies(s.separated for s in samples) if balance == "dataset" else None
    class_weights = None if balance == "none" else "balanced"

    def weights(labels: np.ndarray) -> np.ndarray:
        return weight_map(labels, w0=config.w0, sigma=config.sigma, class_weights=class_weights,
                          class_frequencies=frequencies)  # fmt: skip

    return weights


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pixel-wise softmax cross-entropy weighted by a weight map (paper, eq. 1).

    .. math::

        E = \\frac{1}{|\\Omega_+|} \\sum_{x \\in \\Omega} w(x) \\, (-\\log p_{\\ell(x)}(x)),
        \\qquad p_k(x) = \\frac{\\exp a_k(x)}{\\sum_{k'} \\exp a_{k'}(x)}

    where :math:`\\ell(x)` is the true class of pixel :math:`x`, :math:`w` the weight map
    (:func:`biounet.data.weight_map`) and :math:`\\Omega_+` the pixels with ``w > 0``
    (pixels outside the image carry weight 0 and do not count). The paper sums the energy;
    dividing by the number of labelled pixels keeps the learning rate independent of the tile
    size.

    Parameters
    ----------
    logits : Tensor, shape (N, K, *spatial)
        Network output before the softmax.
    target : Tensor of int, shape (N, *spatial)
        Class index per pixel, in ``0 .. K-1``.
    weight : Tensor, shape (N, *spatial)
        Non-negative loss weight per pixel.

    Returns
    -------
    Tensor
        Scalar loss (0 if no pixel has positive weight).

    References
    ----------
    Ronneberger, Fischer & Brox (2015), eq. 1.
    """
    if logits.ndim < 3 or target.shape != logits.shape[:1] + logits.shape[2:] or weight.shape != target.shape:
        raise InputError(
            f"weighted_cross_entropy: logits {tuple(logits.shape)} must be (N, K, *S) with target and weight (N, *S);"
            f" got target {tuple(target.shape)}, weight {tuple(weight.shape)}"
        )
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    weight = weight.float()
    return (weight * ce).sum() / (weight > 0).sum().clamp_min(1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the foreground classes ``1 .. K-1``, on pixels where ``mask`` is true.

    ``1 - mean_k (2 sum p_k g_k + eps) / (sum p_k + sum g_k + eps)`` with ``p`` the softmax and
    ``g`` the one-hot target (Milletari et al., V-Net, 2016).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    m = mask.unsqueeze(1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot * m).sum(dims)[1:]
    total = ((probs + onehot) * m).sum(dims)[1:]
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()
