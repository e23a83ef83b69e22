"""Where and how the network runs: devices, precision, memory format and ``torch.compile``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from biounet.model import UNet

log = logging.getLogger(__name__)


Precision = Literal["auto", "float32", "bfloat16", "float16"]
#: ``torch.compile`` modes: ``"reduce-overhead"`` replays the forward pass as a CUDA graph
#: (one per tile shape and batch size), ``"max-autotune"`` also searches kernel variants.
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that this torch can use, or one ``ValueError``.

    Refused: strings torch does not parse (``"gpu"``), CUDA on a torch without CUDA or
    without a GPU, a CUDA index past the GPUs present, MPS where it is missing.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use cpu")  # fmt: skip
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available here; use cpu")
    return parsed


def resolve_precision(device: str | torch.device) -> Literal["float32", "bfloat16"]:
    """``"bfloat16"`` where ``device`` computes it natively, else ``"float32"`` (with a log line).

    Native: a CPU with AVX512-BF16 or AMX tiles (oneDNN's bfloat16 convolutions run about
    twice float32 there; measured in ``benchmarks/train.py`` and
    ``benchmarks/precision.py``), or a CUDA GPU of compute
    capability 8.0 or more (Ampere and later). Elsewhere bfloat16 is emulated and slower.
    """
    device = check_device(device)
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8
    elif device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    else:
        native = False
    if not native:
        log.info("precision auto: %s has no native bfloat16, computing in float32", device)
    return "bfloat16" if native else "float32"


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
    raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}; got {compile!r}")


def runner(model: UNet, device: torch.device, compile: bool | CompileMode) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs the forward pass: the model in its fastest memory format, compiled if asked.

    ``torch.compile`` caches the compiled code on the model's ``forward``, so calling this
    again for the same model and tile shape does not compile again. With
    ``"reduce-overhead"`` on CUDA each output lives in a CUDA graph's memory until the next
    replay; :func:`_forward` takes its softmax (a new tensor) at once.
    """
    memory_format = fast_memory_format(device, model.config.dims)
    if memory_format is not None:
        model.to(memory_format=memory_format)  # the same values in another layout; a no-op the second time
    if not compile:
        return model
    return torch.compile(model, dynamic=False, mode=None if compile is True else compile)
