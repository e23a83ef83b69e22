"""biounet: U-Net (Ronneberger, Fischer & Brox, 2015) for microscopy image segmentation.

The public API is flat: ``biounet.UNet``, ``biounet.predict``, ``biounet.load_model`` ...
Training is ``biounet.train.train`` (the submodule keeps its name). Names are imported lazily (PEP 562, as scikit-image does), so ``import biounet`` and the
``biounet`` command answer instantly and torch is loaded only when a name needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # model
    "UNet": "model",
    "UNetConfig": "model",
    "ModelInfo": "model",
    "load_model": "model",
    "available_models": "model",
    # tiling
    "predict": "tiling",
    "predict_steps": "tiling",
    "plan_tiles": "tiling",
    "tiling_efficiency": "tiling",
    "mirror_pad": "tiling",
    "chunk_context": "tiling",
    # out of core
    "predict_dask": "largeimage",
    "predict_to_zarr": "largeimage",
    "open_image": "largeimage",
    "label_chunked": "largeimage",
    "intensity_percentiles": "largeimage",
    # files
    "predict_files": "inference",
    "read_image": "io",
    "write_tiff": "io",
    "write_png": "io",
    "normalize_percentile": "io",
    # data
    "Sample": "datasets",
    "LabelFormat": "datasets",
    "INSTANCE_LABELS": "datasets",
    "ISBI_MEMBRANES": "datasets",
    "load_dataset": "datasets",
    "make_sample": "datasets",
    "TileDataset": "datasets",
    "synthetic_cells": "datasets",
    # weight maps and augmentation
    "weight_map": "weights",
    "binary_to_instances": "weights",
    "class_frequencies": "weights",
    "AugmentConfig": "augment",
    "augment_batch": "augment",
    # training
    "TrainConfig": "train",
    "weighted_cross_entropy": "losses",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'biounet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"biounet.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.augment import AugmentConfig, augment_batch
    from biounet.datasets import (
        INSTANCE_LABELS,
        ISBI_MEMBRANES,
        LabelFormat,
        Sample,
        TileDataset,
        load_dataset,
        make_sample,
        synthetic_cells,
    )
    from biounet.inference import predict_files
    from biounet.io import normalize_percentile, read_image, write_png, write_tiff
    from biounet.model import ModelInfo, UNet, UNetConfig, available_models, load_model
    from biounet.largeimage import intensity_percentiles, label_chunked, open_image, predict_dask, predict_to_zarr
    from biounet.losses import weighted_cross_entropy
    from biounet.tiling import chunk_context, mirror_pad, plan_tiles, predict, predict_steps, tiling_efficiency
    from biounet.train import TrainConfig
    from biounet.weights import binary_to_instances, class_frequencies, weight_map
