"""Training data: annotated samples and their class targets (``_samples``), data set readers
(``_readers``), splits (``_split``), the loss weight map of the paper's eq. 2 (``_weights``), elastic
augmentation (``_augment``), random training tiles (``_tiles``) and synthetic touching cells
(``_synthetic``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

#: public name -> the private module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "AugmentConfig": "_augment",
    "Interpolation": "_augment",
    "augment": "_augment",
    "augment_batch": "_augment",
    "elastic_displacement": "_augment",
    "random_grid_values": "_augment",
    "warp": "_augment",
    "Layout": "_readers",
    "detect_layout": "_readers",
    "load_ctc": "_readers",
    "load_dataset": "_readers",
    "load_folders": "_readers",
    "load_isbi": "_readers",
    "read_manifest": "_readers",
    "read_sample": "_readers",
    "INSTANCE_LABELS": "_samples",
    "ISBI_MEMBRANES": "_samples",
    "LabelFormat": "_samples",
    "LabelKind": "_samples",
    "PathLike": "_samples",
    "Sample": "_samples",
    "TargetKind": "_samples",
    "make_sample": "_samples",
    "separate_touching": "_samples",
    "split_samples": "_split",
    "Style": "_synthetic",
    "synthetic_cells": "_synthetic",
    "Pick": "_samples",
    "TargetWindow": "_tiles",
    "Tile": "_tiles",
    "TileDataset": "_tiles",
    "extract_tile": "_tiles",
    "ClassWeights": "_weights",
    "binary_to_instances": "_weights",
    "class_frequencies": "_weights",
    "render_weight_map": "_weights",
    "weight_map": "_weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.data._augment import (  # noqa: F401
        AugmentConfig,
        Interpolation,
        augment,
        augment_batch,
        elastic_displacement,
        random_grid_values,
        warp,
    )
    from biounet.data._readers import (  # noqa: F401
        Layout,
        detect_layout,
        load_ctc,
        load_dataset,
        load_folders,
        load_isbi,
        read_manifest,
        read_sample,
    )
    from biounet.data._samples import (  # noqa: F401
        INSTANCE_LABELS,
        ISBI_MEMBRANES,
        LabelFormat,
        LabelKind,
        PathLike,
        Pick,
        Sample,
        TargetKind,
        make_sample,
        separate_touching,
    )
    from biounet.data._split import split_samples  # noqa: F401
    from biounet.data._synthetic import Style, synthetic_cells  # noqa: F401
    from biounet.data._tiles import TargetWindow, Tile, TileDataset, extract_tile  # noqa: F401
    from biounet.data._weights import (  # noqa: F401
        ClassWeights,
        binary_to_instances,
        class_frequencies,
        render_weight_map,
        weight_map,
    )
