"""How a prediction runs: one frozen set of options, the same for every entry point."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from biounet.device import check_device
from biounet.errors import InputError
from biounet.prediction._device import CompileMode, Precision, check_compile

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PredictOptions:
    """How to run a prediction: tiles, batches, device, precision, compilation, TTA, progress.

    One object for :func:`biounet.predict`, :func:`biounet.predict_steps`, the chunked
    :func:`biounet.predict_dask` and :func:`biounet.predict_to_zarr`, and
    :func:`biounet.predict_files`; none of them changes what the result means, only how fast
    it comes (TTA excepted: it averages the 8 flips and rotations). Every value is checked
    when the object is made.

    Attributes
    ----------
    tile : int or tuple of int, optional
        Largest input tile per axis (the nearest valid size at or below it is used; default
        700 for 2D models, :func:`biounet.plan_tiles`).
    batch_size : int
        Tiles per forward pass.
    device : str or torch.device, optional
        Where to compute (default: where the model's weights are).
    precision : {"float32", "auto", "bfloat16", "float16"}
        Autocast precision of the forward pass; the softmax is float32. ``"auto"``: bfloat16
        where the device computes it natively (:func:`biounet.device.resolve_precision`).
    compile : bool or {"default", "reduce-overhead", "max-autotune"}
        Run the network through ``torch.compile``.
    tta : bool
        Average the predictions of the 8 flips and 90-degree rotations (2D models).
    progress : bool
        Show a tqdm bar.
    """

    tile: int | tuple[int, ...] | None = None
    batch_size: int = 4
    device: str | torch.device | None = None
    precision: Precision = "float32"
    compile: bool | CompileMode = False
    tta: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tile, list):
            object.__setattr__(self, "tile", tuple(self.tile))
        tiles = self.tile if isinstance(self.tile, tuple) else () if self.tile is None else (self.tile,)
        if not all(_positive_int(t) for t in tiles) or (isinstance(self.tile, tuple) and not tiles):
            raise InputError(f"tile must be a positive number of pixels (or one per axis), got {self.tile!r}")
        if not _positive_int(self.batch_size):
            raise InputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}")
        check_compile(self.compile)
        for name in ("tta", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.device is not None:
            check_device(self.device)

    def replace(self, **changes: Any) -> PredictOptions:
        """A copy with ``changes`` (unknown names are an error naming them)."""
        return dataclasses.replace(self, **_known(changes))

    @classmethod
    def of(cls, options: PredictOptions | None, overrides: Mapping[str, Any]) -> PredictOptions:
        """``options`` (default: the defaults) with the keyword ``overrides`` a call gave."""
        if options is not None and not isinstance(options, PredictOptions):
            raise InputError(f"options must be a PredictOptions, got {type(options).__name__}")
        base = options or cls()
        return base.replace(**overrides) if overrides else base


def _known(changes: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(PredictOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise InputError(f"unknown prediction option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(changes)


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
