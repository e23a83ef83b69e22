"""Images in and out: whole files, lazy opening of images larger than memory, OME-Zarr (NGFF)
images with their labels and pyramids, pixel sizes, intensity scaling, overlays, and atomic writes that never leave a half-written file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from biounet._exports import lazy_exports

#: public name -> the private module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "label_overlay": "_display",
    "PathLike": "_files",
    "STALE_AFTER_SECONDS": "_files",
    "atomic_folder": "_files",
    "atomic_write": "_files",
    "ensure_writable_folder": "_files",
    "sweep_stale_temporaries": "_files",
    "IMAGE_SUFFIXES": "_images",
    "image_files": "_images",
    "read_image": "_images",
    "read_image_axes": "_images",
    "to_luminance": "_images",
    "write_png": "_images",
    "write_tiff": "_images",
    "write_tiff_tiled": "_images",
    "BACKGROUNDS": "_intensity",
    "has_bright_background": "_intensity",
    "normalize_percentile": "_intensity",
    "rescale_intensity": "_intensity",
    "to_uint8": "_intensity",
    "LazyImage": "_lazy",
    "MAX_EXACT_PERCENTILE_PIXELS": "_lazy",
    "intensity_percentiles": "_lazy",
    "open_image": "_lazy",
    "ngff_attributes": "_ngff",
    "ngff_image": "_ngff",
    "ngff_label": "_ngff",
    "write_pyramid": "_ngff",
    "ngff_unit": "_pixel_size",
    "tiff_pixel_size": "_pixel_size",
    "ZARR_MARKERS": "_zarr",
    "is_zarr": "_zarr",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from biounet.io._display import label_overlay  # noqa: F401
    from biounet.io._files import (  # noqa: F401
        STALE_AFTER_SECONDS,
        PathLike,
        atomic_folder,
        atomic_write,
        ensure_writable_folder,
        sweep_stale_temporaries,
    )
    from biounet.io._images import (  # noqa: F401
        IMAGE_SUFFIXES,
        image_files,
        read_image,
        read_image_axes,
        to_luminance,
        write_png,
        write_tiff,
        write_tiff_tiled,
    )
    from biounet.io._intensity import (  # noqa: F401
        BACKGROUNDS,
        has_bright_background,
        normalize_percentile,
        rescale_intensity,
        to_uint8,
    )
    from biounet.io._lazy import (  # noqa: F401
        MAX_EXACT_PERCENTILE_PIXELS,
        LazyImage,
        intensity_percentiles,
        open_image,
    )
    from biounet.io._ngff import ngff_attributes, ngff_image, ngff_label, write_pyramid  # noqa: F401
    from biounet.io._pixel_size import ngff_unit, tiff_pixel_size  # noqa: F401
    from biounet.io._zarr import ZARR_MARKERS, is_zarr  # noqa: F401
