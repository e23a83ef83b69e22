"""TorchScript export: the network traced with ``torch.jit.trace``, checked after ``torch.jit.load``.

``torch.jit.script`` cannot compile :class:`~biounet.model.UNet` (its ``forward`` reads the
Python dataclass ``self.config`` to check the input shape), so the network is traced. The
trace records the centre crops of the skip connections as operations on the input's size,
so one trace runs at every valid size and batch size: the check compares the loaded file
with PyTorch at three of them (:func:`~biounet.export._network.check_shapes`). The shape
check of ``forward`` is not part of the trace: given an invalid size, a traced file (like the
ONNX file) floors odd feature maps at the poolings and returns a misaligned output without an
error, so callers must keep to the valid sizes (a bioimage.io package states them).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from biounet.export._network import ExportedNetwork, check_shapes, max_difference
from biounet.model import UNet


def write_torchscript(model: UNet, path: Path, *, softmax: bool) -> None:
    """Trace ``model`` (a private eval-mode copy) and save it to ``path`` with ``torch.jit.save``.

    ``softmax=True`` appends a softmax over the classes (the file outputs probabilities);
    ``False`` keeps the logits, as the network computes them.
    """
    network = ExportedNetwork(model, softmax=softmax)
    example = torch.zeros(check_shapes(model.config)[1])
    with warnings.catch_warnings():
        # the trace warns that Python ints taken from sizes are constants: they are only
        # used by forward's shape check, which the trace drops; and that torch.jit is deprecated
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, example, check_trace=False)
        torch.jit.save(traced, str(path))


def check_torchscript(path: Path, model: UNet, *, softmax: bool) -> float:
    """Largest absolute difference between the file at ``path`` (after ``torch.jit.load``) and PyTorch.

    Measured on random inputs at the three :func:`check_shapes` of ``model``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(x)).numpy()

    return max_difference(run, ExportedNetwork(model, softmax=softmax), check_shapes(model.config))
