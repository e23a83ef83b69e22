"""ONNX export with dynamic batch and spatial axes, checked in onnxruntime against PyTorch.

torch 2.13's ``torch.onnx.export`` has two exporters. The default (``dynamo=True``, through
``torch.export``) is used: the TorchScript-based one (``dynamo=False``) also gives dynamic
axes but is deprecated and warns so. With ``dynamo=True`` plain ``Dim`` spatial axes are not
enough: ``forward`` checks that every feature map is even before each pooling, so
``torch.export`` silently specialises height and width to the example's sizes (a file that
accepts one size only). Declaring each spatial axis as the network's own size rule,
``min + step * k`` (:func:`~biounet.export._network.size_rule`, e.g. ``188 + 16 k`` for the
shipped models), makes those checks provable for every ``k``: the file's input axes are
``batch``, the channels, and ``16*ky + 188``, ``16*kx + 188``. The example input has
``k >= 2`` and batch 2, since ``torch.export`` specialises sizes 0 and 1.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from biounet.export import ONNX_OPSET
from biounet.export._network import ExportedNetwork, check_shapes, max_difference, size_rule
from biounet.model import UNet

#: The ONNX graph's input and output names.
INPUT_NAME, OUTPUT_NAME = "input", "output"
_AXIS_NAMES = ("z", "y", "x")


def write_onnx(model: UNet, path: Path, *, softmax: bool) -> None:
    """Export ``model`` (a private eval-mode copy) to the ONNX file ``path`` (opset :data:`ONNX_OPSET`).

    The batch axis and every spatial axis are dynamic; ``softmax`` as in
    :func:`~biounet.export._torchscript.write_torchscript`. The weights are stored inside
    the file (no external data file).
    """
    config = model.config
    network = ExportedNetwork(model, softmax=softmax)
    first, step = size_rule(config)
    names = _AXIS_NAMES[-config.dims :]
    spatial = {2 + i: step * torch.export.Dim(f"k{name}", min=0) + first for i, name in enumerate(names)}
    dynamic = {"x": {0: torch.export.Dim("batch", min=1), **spatial}}
    example = torch.zeros((2, config.in_channels, *(first + (2 + i) * step for i in range(config.dims))))
    with _quiet():
        program = torch.onnx.export(network, (example,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic)  # fmt: skip
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.save(str(path), external_data=False)


def check_onnx(path: Path, model: UNet, *, softmax: bool) -> float:
    """Largest absolute difference between the file at ``path`` in onnxruntime (CPU) and PyTorch.

    Measured on random inputs at the three :func:`check_shapes` of ``model``.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    return max_difference(run, ExportedNetwork(model, softmax=softmax), check_shapes(model.config))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision operators, deprecations) during an export."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
