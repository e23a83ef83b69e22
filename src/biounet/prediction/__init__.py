"""Prediction, from the tile plan to files: the overlap-tile plan and mirror rule
(``_tiling``), the device, precision and the network as a pure function (``_device``), the one
set of options (``_options``), the network's input (``_input``),
the exact stitcher (``_stitch``), chunked prediction of images larger than memory with Dask
(``_chunked``, ``_chunk_labels``), predictions as OME-Zarr (``_ngff_outputs``), and image files:
which files and output names (``_names``), predict-time overrides (``_overrides``) and the
files themselves (``_files``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

#: public name -> the private module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "label_chunked": "_chunk_labels",
    "ChunkPlan": "_chunked",
    "DEFAULT_CHUNK_2D": "_chunked",
    "DEFAULT_CHUNK_3D": "_chunked",
    "FOREGROUND_THRESHOLD": "_chunked",
    "plan_chunks": "_chunked",
    "predict_dask": "_chunked",
    "predict_to_zarr": "_chunked",
    "COMPILE_MODES": "_device",
    "CompileMode": "_device",
    "Precision": "_device",
    "check_compile": "_device",
    "Forward": "_device",
    "model_forward": "_device",
    "PredictOptions": "_options",
    "CHANNEL_LETTERS": "_files",
    "PredictReport": "_files",
    "channel_axis_of": "_files",
    "model_items_of": "_files",
    "predict_files": "_files",
    "NAME_FIELDS": "_names",
    "OUTPUT_FORMATS": "_names",
    "OUTPUT_NAME": "_names",
    "OutputFormat": "_names",
    "PREVIOUS_OUTPUTS": "_names",
    "SAVE_KINDS": "_names",
    "STREAM_ABOVE_PIXELS": "_names",
    "Targets": "_names",
    "check_name": "_names",
    "find_images": "_names",
    "output_format_of": "_names",
    "output_name": "_names",
    "output_stem": "_names",
    "plan_outputs": "_names",
    "label_name": "_ngff_outputs",
    "write_ngff_prediction": "_ngff_outputs",
    "Normalization": "_overrides",
    "with_overrides": "_overrides",
    "as_model_input": "_input",
    "converts_to_luminance": "_input",
    "model_items": "_input",
    "normalize_items": "_input",
    "DIHEDRAL": "_stitch",
    "Progress": "_stitch",
    "dihedral": "_stitch",
    "dihedral_inverse": "_stitch",
    "predict": "_stitch",
    "predict_steps": "_stitch",
    "stitch_steps": "_stitch",
    "AxisTiling": "_tiling",
    "DEFAULT_TILE_2D": "_tiling",
    "DEFAULT_TILE_3D": "_tiling",
    "chunk_context": "_tiling",
    "plan_axis": "_tiling",
    "plan_tiles": "_tiling",
    "tile_input_shapes": "_tiling",
    "tiling_efficiency": "_tiling",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.prediction._chunk_labels import label_chunked  # noqa: F401
    from biounet.prediction._chunked import (  # noqa: F401
        DEFAULT_CHUNK_2D,
        DEFAULT_CHUNK_3D,
        FOREGROUND_THRESHOLD,
        ChunkPlan,
        plan_chunks,
        predict_dask,
        predict_to_zarr,
    )
    from biounet.prediction._device import (  # noqa: F401
        COMPILE_MODES,
        CompileMode,
        Precision,
        check_compile,
    )
    from biounet.prediction._files import (  # noqa: F401
        CHANNEL_LETTERS,
        PredictReport,
        channel_axis_of,
        model_items_of,
        predict_files,
    )
    from biounet.prediction._names import (  # noqa: F401
        NAME_FIELDS,
        OUTPUT_FORMATS,
        OUTPUT_NAME,
        PREVIOUS_OUTPUTS,
        SAVE_KINDS,
        STREAM_ABOVE_PIXELS,
        OutputFormat,
        Targets,
        check_name,
        find_images,
        output_format_of,
        output_name,
        output_stem,
        plan_outputs,
    )
    from biounet.prediction._ngff_outputs import label_name, write_ngff_prediction  # noqa: F401
    from biounet.prediction._overrides import Normalization, with_overrides  # noqa: F401
    from biounet.prediction._input import (  # noqa: F401
        as_model_input,
        converts_to_luminance,
        model_items,
        normalize_items,
    )
    from biounet.prediction._device import Forward, model_forward  # noqa: F401
    from biounet.prediction._options import PredictOptions  # noqa: F401
    from biounet.prediction._stitch import stitch_steps  # noqa: F401
    from biounet.prediction._stitch import (  # noqa: F401
        DIHEDRAL,
        Progress,
        dihedral,
        dihedral_inverse,
        predict,
        predict_steps,
    )
    from biounet.prediction._tiling import (  # noqa: F401
        DEFAULT_TILE_2D,
        DEFAULT_TILE_3D,
        AxisTiling,
        chunk_context,
        plan_axis,
        plan_tiles,
        tile_input_shapes,
        tiling_efficiency,
    )
