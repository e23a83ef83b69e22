"""biounet: U-Net (Ronneberger, Fischer & Brox, 2015) for microscopy image segmentation.

The public API is flat: ``biounet.UNet``, ``biounet.predict``, ``biounet.train``,
``biounet.load_model`` ... The folders show the pipeline, and each subpackage re-exports its
own public names:

* :mod:`biounet.io`: images in and out (files, lazy large images, OME-Zarr, atomic writes);
* :mod:`biounet.data`: annotated samples, data set readers, weight maps, augmentation, tiles;
* :mod:`biounet.model`: the network, its configuration and its saved form;
* :mod:`biounet.training`: the recipe, the loop, checkpoints, budgets, logs;
* :mod:`biounet.prediction`: the tile plan, the stitcher, chunked prediction, files;
* :mod:`biounet.postprocess`: from probabilities to instance labels;
* :mod:`biounet.measure`: one row per object (area, centroid, bounding box, intensity), CSV tables;
* :mod:`biounet.metrics` and :mod:`biounet.evaluation`: scores, and scoring files;
* :mod:`biounet.export`: bioimage.io packages, TorchScript and ONNX files;
* :mod:`biounet.cli` and :mod:`biounet.demo`: the command line and the demo.

Names are imported lazily (PEP 562, as scikit-image does), so ``import biounet`` and the
``biounet`` command answer instantly and torch is loaded only when a name needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

__version__ = "0.1.0"

#: public name -> the module or subpackage that provides it
_EXPORTS: dict[str, str] = {
    # model
    "UNet": "model",
    "UNetConfig": "model",
    "ModelInfo": "model",
    "load_model": "model",
    "available_models": "model",
    # export (bioimage.io, TorchScript, ONNX)
    "export_model": "export",
    # prediction
    "predict": "prediction",
    "predict_steps": "prediction",
    "PredictOptions": "prediction",
    "plan_tiles": "prediction",
    "tiling_efficiency": "prediction",
    "mirror_pad": "borders",
    "chunk_context": "prediction",
    "predict_dask": "prediction",
    "predict_to_zarr": "prediction",
    "label_chunked": "prediction",
    "predict_files": "prediction",
    "find_images": "prediction",
    # post-processing
    "probabilities_to_labels": "postprocess",
    "labels_from_probabilities": "postprocess",
    # measuring objects
    "measure_objects": "measure",
    "write_objects_csv": "measure",
    # images in and out
    "open_image": "io",
    "intensity_percentiles": "io",
    "read_image": "io",
    "write_tiff": "io",
    "write_png": "io",
    "normalize_percentile": "io",
    # data
    "Sample": "data",
    "LabelFormat": "data",
    "INSTANCE_LABELS": "data",
    "ISBI_MEMBRANES": "data",
    "load_dataset": "data",
    "make_sample": "data",
    "TileDataset": "data",
    "synthetic_cells": "data",
    "weight_map": "data",
    "binary_to_instances": "data",
    "class_frequencies": "data",
    "AugmentConfig": "data",
    "augment_batch": "data",
    # metrics
    "score_instances": "metrics",
    # training
    "TrainConfig": "training",
    "train": "training",
    "train_steps": "training",
    "weighted_cross_entropy": "training",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.borders import mirror_pad  # noqa: F401
    from biounet.data import (  # noqa: F401
        INSTANCE_LABELS,
        ISBI_MEMBRANES,
        AugmentConfig,
        LabelFormat,
        Sample,
        TileDataset,
        augment_batch,
        binary_to_instances,
        class_frequencies,
        load_dataset,
        make_sample,
        synthetic_cells,
        weight_map,
    )
    from biounet.export import export_model  # noqa: F401
    from biounet.io import (  # noqa: F401
        intensity_percentiles,
        normalize_percentile,
        open_image,
        read_image,
        write_png,
        write_tiff,
    )
    from biounet.measure import measure_objects, write_objects_csv  # noqa: F401
    from biounet.metrics import score_instances  # noqa: F401
    from biounet.model import ModelInfo, UNet, UNetConfig, available_models, load_model  # noqa: F401
    from biounet.postprocess import labels_from_probabilities, probabilities_to_labels  # noqa: F401
    from biounet.prediction import (  # noqa: F401
        PredictOptions,
        chunk_context,
        find_images,
        label_chunked,
        plan_tiles,
        predict,
        predict_dask,
        predict_files,
        predict_steps,
        predict_to_zarr,
        tiling_efficiency,
    )
    from biounet.training import TrainConfig, train, train_steps, weighted_cross_entropy  # noqa: F401
