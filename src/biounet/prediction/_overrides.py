"""Predict-time overrides of a model's normalisation and post-processing."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

from biounet.errors import InputError
from biounet.model import UNet
from biounet.postprocess import check_postprocess

log = logging.getLogger(__name__)

#: A normalisation override: the model's, none, or (low, high) percentiles.
Normalization = tuple[float, float] | Literal["model", "none"]


# --------------------------------------------------------------------------------------------
# predict-time overrides of the model's normalisation and post-processing
# --------------------------------------------------------------------------------------------
def with_overrides(model: UNet, postprocess: Mapping[str, Any] | None, normalization: Normalization) -> UNet:
    """``model`` itself, or a shallow copy sharing its weights whose :class:`~biounet.ModelInfo` carries the overrides.

    Every path reads the copy's ``info`` (the in-memory stitcher, the streamed predictor and
    its per-object post-processing), so the overrides reach them all.
    """
    info = model.info
    changes: dict[str, Any] = {}
    if postprocess:
        if not isinstance(postprocess, Mapping):
            raise InputError(f"postprocess must be a mapping of post-processing options, got {postprocess!r}")
        for key, value in postprocess.items():
            try:
                check_postprocess({key: value})
            except ValueError as exc:
                raise InputError(f"postprocess: {exc}", option=str(key)) from None
        merged = {**info.postprocess, **postprocess}
        _check_instances(model, info.postprocess, merged, postprocess)
        try:
            check_postprocess(merged)
        except ValueError as exc:
            raise InputError(f"postprocess {merged}: {exc}") from None
        changes["postprocess"] = merged
        log.info("post-processing %s (the model's: %s)", merged, dict(info.postprocess) or "the defaults")
    if not (isinstance(normalization, str) and normalization == "model"):
        percentiles = None
        if not (isinstance(normalization, str) and normalization == "none"):
            try:
                low, high = normalization
                percentiles = (float(low), float(high))
                dataclasses.replace(info, normalization=percentiles)  # checks the range
            except (TypeError, ValueError) as exc:
                message = str(exc) if isinstance(exc, InputError) else (
                    f"normalization must be 'model', 'none' or (low, high) percentiles, got {normalization!r}")
                raise InputError(message, option="normalization") from None
        changes["normalization"] = percentiles
        log.info("normalisation %s (the model's: %s)", _percentiles(percentiles), _percentiles(info.normalization))
    if not changes:
        return model
    clone = _shallow_copy(model)
    clone.info = dataclasses.replace(info, **changes)
    return clone


def _shallow_copy(model: UNet) -> UNet:
    """A second :class:`UNet` object with the same parameters, buffers and submodules (nothing is copied)."""
    import copy

    return copy.copy(model)


def _percentiles(normalization: tuple[float, float] | None) -> str:
    return "none" if normalization is None else f"percentiles {normalization[0]:g}-{normalization[1]:g}"


def _check_instances(
    model: UNet, own: Mapping[str, Any], merged: Mapping[str, Any], overrides: Mapping[str, Any]
) -> None:
    """Refuse post-processing that ``labels_from_probabilities`` would not apply to this model's classes."""
    classes = model.config.num_classes
    border = own.get("split") == "border"
    if merged.get("split") == "border" and classes != 3:
        raise InputError(f"postprocess: split 'border' needs a 3-class border model (background, interior, border); "
                         f"this model has {classes} classes", option="split")  # fmt: skip
    if border and merged.get("split") != "border":
        raise InputError(f"postprocess: this 3-class model separates cells by its border class (split 'border'); split "
                         f"{merged.get('split', 'none')!r} needs a 2-class model", option="split")  # fmt: skip
    if classes != 2 and not border and merged.get("split") != "border":
        key = next(iter(overrides))
        raise InputError(f"postprocess: this model has {classes} classes and writes the arg-max class of each pixel; "
                         f"{key} applies to 2-class models and 3-class border models", option=str(key))  # fmt: skip


