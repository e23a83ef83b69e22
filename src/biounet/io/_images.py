"""Reading and writing whole images: TIFF (with axes), PNG, JPEG and ``.npy``; luminance of colour images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import InputError
from biounet.io._files import PathLike, atomic_write

#: File endings :func:`read_image` understands.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")

_SUPPORTED_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def image_files(folder: PathLike) -> list[Path]:
    """The visible image files of ``folder`` (suffixes :data:`IMAGE_SUFFIXES`), sorted by name."""
    return sorted(
        f for f in Path(folder).iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
    )  # fmt: skip


def read_image_axes(path: PathLike) -> tuple[np.ndarray, str]:
    """Read an image file and return it with its axes string.

    Axes use tifffile's letters: ``Y``, ``X`` for the plane, ``C``/``S`` for channels or
    samples, ``Z`` for depth, ``T`` for time, ``Q``/``I`` for unnamed stack axes. For
    ImageJ hyperstacks and OME-TIFF the axes recorded in the file are kept; PNG/JPEG give
    ``YX`` or ``YXC`` (an alpha channel is dropped); ``.npy`` gives ``YX`` for 2D and
    ``Q...YX`` otherwise (a ``.npy`` file says nothing about its axes).

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    image : ndarray
        The pixels, in the file's dtype (bool becomes uint8).
    axes : str
        One letter per dimension of ``image``.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, corrupt, empty, of an unsupported format or
        dtype; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: a folder, not an image file" if path.is_dir() else f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        if suffix in (".tif", ".tiff"):
            image, axes = _read_tiff(path)
        elif suffix == ".npy":
            image = np.load(path, allow_pickle=False)
            axes = "Q" * (image.ndim - 2) + "YX"
        else:
            image, axes = _read_picture(path)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: cannot read image: {exc}") from exc
    except Exception as exc:  # corrupt files raise whatever the decoder raises
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.dtype.kind not in _SUPPORTED_KINDS:
        raise InputError(f"{path}: unsupported pixel type {image.dtype}; expected integers or floats")
    if image.ndim < 2 or image.size == 0:
        raise InputError(f"{path}: empty image or fewer than 2 dimensions (shape {image.shape})")
    return image, axes


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file (TIFF, PNG, JPEG, ``.npy``) into an array.

    See :func:`read_image_axes` for the formats, the axes and the errors.
    """
    return read_image_axes(path)[0]


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError("the TIFF holds no image series")
        series = tif.series[0]
        image = series.asarray()
        axes = series.axes
    if len(axes) != image.ndim:  # pragma: no cover - tifffile keeps them in step
        axes = "Q" * (image.ndim - 2) + "YX"
    return image, axes


def _read_picture(path: Path) -> tuple[np.ndarray, str]:
    import imageio.v3 as iio

    image = iio.imread(path, plugin="pillow")
    if image.ndim == 3 and image.shape[-1] in (2, 4):  # gray+alpha or RGBA: drop alpha
        image = image[..., :-1]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 3 and _is_gray(image):
        image = image[..., 0]
    return image, "YX" if image.ndim == 2 else "YXC"


def to_luminance(image: Any, where: object = "image", *, axis: int = -1) -> Any:
    """Luminance of an RGB image: ``Y = 0.2125 R + 0.7154 G + 0.0721 B``, float32.

    The conversion of :func:`skimage.color.rgb2gray` (ITU-R BT.709 weights, integer images
    scaled to [0, 1] by their dtype's range first), so that a model trained on the luminance
    of colour images (``as_gray=True``) sees the same numbers at prediction. ``image`` may be
    a numpy or a dask array (converted block by block, lazily); ``axis`` holds the 3
    channels and is removed.

    Raises
    ------
    ValueError
        If ``axis`` does not hold exactly 3 channels; the message names ``where``.
    """
    from skimage.color import rgb2gray

    if not -image.ndim <= axis < image.ndim or image.shape[axis] != 3:
        shape = tuple(image.shape)
        raise InputError(f"{where}: luminance needs 3 (RGB) channels on axis {axis}, got shape {shape}")
    axis %= image.ndim
    if isinstance(image, np.ndarray):
        return rgb2gray(image, channel_axis=axis).astype(np.float32)
    rechunked = image.rechunk({axis: -1})  # dask: the three channels in one block
    return rechunked.map_blocks(lambda block: rgb2gray(block, channel_axis=axis).astype(np.float32),
                                drop_axis=axis, dtype=np.float32)  # fmt: skip


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def write_tiff(path: PathLike, array: np.ndarray, *, axes: str | None = None, compress: bool = True) -> Path:
    """Write ``array`` to a TIFF file atomically (ImageJ-compatible where possible).

    Float data is written as float32, integer labels as uint16 when they fit, else uint32.
    ``axes`` (tifffile letters, e.g. ``"CYX"``, one per dimension) is stored in the file's
    metadata. Pages are gray (``minisblack``), so a stack of 3 or 4 planes is never taken
    for an RGB image and :func:`read_image_axes` gives the same array and axes back; only
    axes ending in ``S`` (samples), or no axes and a last dimension of 3 or 4 on a 3D array,
    write RGB pixels.
    """
    import tifffile

    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    elif array.dtype.kind in "biu":
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint32).max):
            raise InputError(f"{path}: integer values outside 0..2**32-1 cannot be written as labels")
        fits16 = not array.size or array.max() <= np.iinfo(np.uint16).max
        array = array.astype(np.uint16 if fits16 else np.uint32, copy=False)
    else:
        raise InputError(f"{path}: cannot write pixel type {array.dtype} to TIFF")
    if axes is not None and len(axes) != array.ndim:
        raise InputError(f"{path}: axes {axes!r} name {len(axes)} dimensions, the array has shape {array.shape}")
    metadata = {"axes": axes} if axes else None
    rgb = axes.endswith("S") if axes else array.ndim == 3 and array.shape[-1] in (3, 4)
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, array, metadata=metadata, photometric="rgb" if rgb else "minisblack",
                         compression="zlib" if compress else None)  # fmt: skip
    return Path(path)


#: Tile size of TIFFs written from arrays larger than memory (:func:`write_tiff_tiled`).
TIFF_TILE = 256

#: NGFF unit names and their OME-TIFF spelling.
OME_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m",
             "angstrom": "Å"}  # fmt: skip


def write_tiff_tiled(
    path: PathLike, array: Any, *, axes: str | None = None, scale: dict[str, float] | None = None,
    units: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write a Zarr or Dask array of any size to a tiled BigTIFF, one band of tiles in memory at a time.

    The counterpart of :func:`write_tiff` for streamed predictions: the same pixel types
    (float32; integer labels as uint16 when they fit, else uint32, decided by one pass over
    the array), ``axes`` in the metadata, gray pages, zlib-compressed
    :data:`TIFF_TILE` px tiles, written atomically. ``scale`` and ``units`` (per axis
    letter, as :class:`biounet.io.LazyImage` reads them) make it an OME-TIFF with the
    physical pixel sizes when the axes are OME's (``TZCYX``).
    """
    import dask.array as da
    import tifffile

    lazy = array if hasattr(array, "__dask_graph__") else da.from_array(array)
    if lazy.ndim < 2:
        raise InputError(f"{path}: a TIFF needs at least 2 dimensions, got shape {lazy.shape}")
    if axes is not None and len(axes) != lazy.ndim:
        raise InputError(f"{path}: axes {axes!r} name {len(axes)} dimensions, the array has shape {lazy.shape}")
    if lazy.dtype.kind == "f":
        dtype = np.dtype(np.float32)
    elif lazy.dtype.kind in "biu":
        low, high = (int(v) for v in da.compute(lazy.min(), lazy.max())) if lazy.size else (0, 0)
        if low < 0 or high > np.iinfo(np.uint32).max:
            raise InputError(f"{path}: integer values outside 0..2**32-1 cannot be written as labels")
        dtype = np.dtype(np.uint16 if high <= np.iinfo(np.uint16).max else np.uint32)
    else:
        raise InputError(f"{path}: cannot write pixel type {lazy.dtype} to TIFF")
    height, width = lazy.shape[-2:]

    def tiles():  # page by page, row of tiles by row of tiles: the order tifffile expects
        for page in np.ndindex(*lazy.shape[:-2]):
            for top in range(0, height, TIFF_TILE):
                band = np.asarray(lazy[page + (slice(top, top + TIFF_TILE),)].compute(), dtype=dtype)
                for left in range(0, width, TIFF_TILE):
                    tile = np.zeros((TIFF_TILE, TIFF_TILE), dtype)
                    part = band[:, left : left + TIFF_TILE]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield tile

    metadata: dict[str, Any] | None = {"axes": axes} if axes else None
    sizes = {a: scale[a] for a in "XYZ" if scale and units and scale.get(a) and units.get(a) in OME_UNITS}
    ome = bool(sizes) and axes is not None and set(axes) <= set("TZCYX")
    if ome:  # OME-TIFF: the one BigTIFF flavour whose pixel sizes ImageJ/Fiji, QuPath and tifffile read
        metadata = {"axes": axes, **{f"PhysicalSize{a}": v for a, v in sizes.items()},
                    **{f"PhysicalSize{a}Unit": OME_UNITS[units[a]] for a in sizes}}  # type: ignore[index]  # fmt: skip
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=lazy.shape, dtype=dtype, tile=(TIFF_TILE, TIFF_TILE), bigtiff=True,
                         ome=ome, metadata=metadata, photometric="minisblack", compression="zlib")  # fmt: skip
    return Path(path)


def write_png(path: PathLike, array: np.ndarray) -> Path:
    """Write an 8-bit gray (H, W) or RGB (H, W, 3) array to a PNG file atomically."""
    import imageio.v3 as iio

    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InputError(f"{path}: PNG needs uint8 (H, W) or (H, W, 3|4) pixels, got {array.dtype} {array.shape}")
    with atomic_write(path) as tmp:
        iio.imwrite(tmp, array, extension=".png")
    return Path(path)
