"""Precise batch-norm statistics: the running mean and variance recomputed as a plain average.

During training each BatchNorm layer keeps an exponential moving average of its batches' statistics
(``momentum = 0.1``: the last ~20 batches dominate). With few images of several kinds (fluorescence beside
H&E), those last batches decide what the evaluated network sees, and two models a few steps apart, at a learning
rate near zero, score far apart. Recomputing the statistics over many batches of the final weights removes that
noise ("PreciseBN": Wu & Johnson 2021, *Rethinking "Batch" in BatchNorm*, arXiv:2105.07576, section 3; as in
fvcore's ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn``). Written here, not taken from those two,
because the batches must be the training tiles in the run's precision and memory format, and the layers'
momentum and the model's mode must come back as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor], *, bfloat16: bool = False) -> int:
    """Replace every BatchNorm layer's running statistics by their average over ``batches``.

    For each layer and channel: ``running_mean = mean_b(mu_b)`` and ``running_var = mean_b(s2_b)``,
    the means over the batches of each batch's mean and unbiased variance (``momentum=None``,
    PyTorch's cumulative average), which is what the layer then uses in eval mode. The passes
    run in train mode with dropout off (the activations of evaluation, and no draw from torch's
    random generator, so a training run goes on exactly as without them). The weights are not
    changed; each layer's momentum and the model's train/eval mode are restored.
    ``bfloat16`` runs the forward passes in bfloat16 autocast, as the training steps did.

    Returns the number of batches used (0 if the model has no BatchNorm layer, or no batches).
    """
    layers = batch_norm_layers(model)
    batches = iter(batches)
    first = next(batches, None)
    if not layers or first is None:  # nothing to recompute, or nothing to recompute it from: kept as they are
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in model.modules():  # dropout off, as when the statistics are used (and no draw from torch's generator)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    used = 0
    try:
        for batch in itertools.chain([first], batches):
            with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bfloat16):
                model(batch)
            used += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
