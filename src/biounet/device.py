"""Which torch device to compute on, and in which precision it computes fastest.

Used by every stage that runs the network: loading a model, training and prediction.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from biounet.errors import InputError

log = logging.getLogger(__name__)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that this torch can use, or one ``ValueError``.

    Refused: strings torch does not parse (``"gpu"``), CUDA on a torch without CUDA or
    without a GPU, a CUDA index past the GPUs present, MPS where it is missing.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU "
                             "(torch.cuda.is_available() is False); use cpu")  # fmt: skip
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r}: MPS is not available here; use cpu")
    return parsed


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX512-BF16 or AMX tiles, as torch sees them."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(device: str | torch.device, *, level: int = logging.INFO) -> Literal["float32", "bfloat16"]:
    """``"bfloat16"`` where ``device`` computes it natively, else ``"float32"`` (with a log line at ``level``).

    Training logs the fallback at INFO (it halves a CPU's steps per minute); prediction at DEBUG,
    because float32 is the ordinary case on most CPUs and would otherwise precede every output.

    Native: a CPU with AVX512-BF16 or AMX tiles (oneDNN's bfloat16 convolutions run about
    twice float32 there; measured in ``benchmarks/train.py`` and
    ``benchmarks/precision.py``), or a CUDA GPU of compute
    capability 8.0 or more (Ampere and later). Elsewhere bfloat16 is emulated and slower.
    """
    device = check_device(device)
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8
    elif device.type == "cpu":
        native = cpu_has_native_bfloat16()
    else:
        native = False
    if not native:
        log.log(level, "precision auto: %s has no native bfloat16, computing in float32", device)
    return "bfloat16" if native else "float32"
