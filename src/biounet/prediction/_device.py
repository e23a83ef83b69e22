"""Where and how the network runs: devices, precision, memory format and ``torch.compile``."""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from biounet.errors import InputError
from biounet.model import UNet



Precision = Literal["auto", "float32", "bfloat16", "float16"]
#: ``torch.compile`` modes: ``"reduce-overhead"`` replays the forward pass as a CUDA graph
#: (one per tile shape and batch size), ``"max-autotune"`` also searches kernel variants.
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")


def autocast_context(device: torch.device, precision: Precision):
    if precision == "float32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on during a CUDA forward pass (the fastest kernels
    for each tile shape are found once), restored afterwards; nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def fast_memory_format(device: torch.device, dims: int) -> torch.memory_format | None:
    """Channels-last on CUDA (cuDNN) and for 2D models on the CPU (oneDNN), where it is faster.

    Measured on a 2-core AMD EPYC CPU (torch 2.13, one 700 px tile, float32): 1.24x faster
    for the paper net, 2.0x for a depth-3, 8-channel net (``benchmarks/large_image.py``).
    """
    if device.type == "cuda":
        return torch.channels_last if dims == 2 else torch.channels_last_3d
    return torch.channels_last if device.type == "cpu" and dims == 2 else None


def check_compile(compile: object) -> bool | CompileMode:
    """``compile`` if it is a bool or one of :data:`COMPILE_MODES`, else a ValueError naming them."""
    if isinstance(compile, bool) or compile in COMPILE_MODES:
        return compile  # type: ignore[return-value]
    raise InputError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}; got {compile!r}")


#: A network as a pure function: ``forward(batch) -> logits`` on ``(N, C, *spatial)`` tensors.
Forward = Callable[[torch.Tensor], torch.Tensor]

# The prepared copies of callers' models, dropped with the model (see :func:`model_forward`).
_PREPARED: weakref.WeakKeyDictionary[UNet, tuple[tuple, torch.nn.Module]] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def model_forward(model: UNet, device: torch.device, precision: Precision, compile: bool | CompileMode) -> Forward:
    """``model`` as a :data:`Forward` on ``device``, without changing ``model``.

    The function runs a private copy of the network in eval mode, in the device's fastest
    memory format (:func:`fast_memory_format`), compiled if asked, under autocast in
    ``precision`` (``"float32"``, ``"bfloat16"`` or ``"float16"``); inputs go to the device
    through pinned memory on CUDA. The caller's model keeps its mode, memory layout and
    device. The copy is kept for the model's lifetime and made afresh when its weights
    change (a new tensor or an in-place update, as an optimiser step makes), so repeated
    predictions with the same weights reuse it and its compiled code. Writes through
    ``tensor.data`` bypass the version counter and are not seen: change weights in place
    under ``torch.no_grad()`` (or load a state dict) instead. With
    ``"reduce-overhead"`` on CUDA each output lives in a CUDA graph's memory until the next
    replay; take what you need from it (the stitcher's softmax is a new tensor) at once.
    """
    memory_format = fast_memory_format(device, model.config.dims)
    try:  # data_ptr and the in-place version counter of every tensor: which weights these are
        weights: tuple | None = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:  # tensors made under torch.inference_mode() count no versions: never reuse a copy
        weights = None
    key = (str(device), memory_format, compile, weights)
    with _PREPARED_LOCK:
        prepared = _PREPARED.get(model)
        if prepared is None or prepared[0] != key or weights is None:
            net = copy.deepcopy(model).to(device).eval().requires_grad_(False)
            if memory_format is not None:
                net = net.to(memory_format=memory_format)
            run = torch.compile(net, dynamic=False, mode=None if compile is True else compile) if compile else net
            prepared = _PREPARED[model] = (key, run)
    run = prepared[1]

    def forward(batch: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":  # the host prepares the next batch while the device computes
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        if memory_format is not None:
            batch = batch.contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast_context(device, precision), cudnn_benchmark(device):
            return run(batch)

    return forward
