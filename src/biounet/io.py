"""Reading and writing images: TIFF (ImageJ, OME), PNG/JPEG, ``.npy``; atomic writes.

Every reader raises one :class:`ValueError` that names the file and the problem; every
writer goes through :func:`atomic_write`, so an interrupted run never leaves a
half-written file behind and never destroys the previous version of a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: File endings :func:`read_image` understands.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")

_SUPPORTED_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def image_files(folder: PathLike) -> list[Path]:
    """The visible image files of ``folder`` (suffixes :data:`IMAGE_SUFFIXES`), sorted by name."""
    return sorted(
        f for f in Path(folder).iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
    )  # fmt: skip


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    The temporary file keeps the suffix of ``path`` (so writers that choose the format by
    file name still work) and lives in the same folder (so the final ``os.replace`` is an
    atomic rename on POSIX and Windows). On success the file and then its folder are
    flushed to disk (``fsync``), so a power cut after the call leaves the new file, not an
    empty one. On any exception it is removed and ``path`` is left exactly as it was. A
    temporary file that a killed process (``SIGKILL``) left behind is removed by the next
    write into the same folder (:func:`sweep_stale_temporaries`).

    Examples
    --------
    >>> with atomic_write("out.tif") as tmp:  # doctest: +SKIP
    ...     tifffile.imwrite(tmp, array)
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{path}: output folder {folder} does not exist")
    sweep_stale_temporaries(folder)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}{_temporary_mark()}", suffix=f".tmp{path.suffix}",
                                        dir=folder)  # fmt: skip
    except OSError as exc:
        raise ValueError(f"{path}: cannot write to folder {folder}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces ``path`` on success.

    The folder form of :func:`atomic_write`, for outputs that are folders (Zarr, OME-Zarr,
    a model): on success every file in it is flushed to disk, an existing ``path`` is moved
    aside, the new folder renamed into place and the old one deleted; on any exception the
    temporary folder is removed and ``path`` is left as it was (moved back if the exception
    came between the two renames; a process killed right there leaves the old folder aside,
    and the next sweep of the folder puts it back).
    """
    path = Path(path)
    sweep_stale_temporaries(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_temporary_mark()}", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise ValueError(f"{path}: cannot write to folder {path.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}{_temporary_mark()}{uuid.uuid4().hex}.old")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            tmp.rename(path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: What marks the temporary files and folders of :func:`atomic_write` and
#: :func:`atomic_folder`: ``.biounet@<host>@<pid>@`` in the name, so that a later run can tell
#: those of a process that died from those of one still writing.
_TEMPORARY = re.compile(r"\.biounet@(?P<host>[^@/\\]+)@(?P<pid>\d+)@.*\.(?P<kind>tmp|old)(\.[^.]*)?$")
#: A temporary is swept only when it has not changed for this long, besides its writer being
#: gone: containers that share a host name but not process ids cannot take each other's.
STALE_AFTER_SECONDS = 15 * 60
_swept: set[Path] = set()


def _temporary_mark() -> str:
    return f".biounet@{socket.gethostname()}@{os.getpid()}@"


def sweep_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files and folders that dead processes left in ``folder``.

    Only names that :func:`atomic_write` and :func:`atomic_folder` make are looked at, and
    of them only those of a process of this host that no longer runs (POSIX signal 0 says
    so; nothing is swept on Windows) and that have not changed for
    :data:`STALE_AFTER_SECONDS`. An old folder that :func:`atomic_folder` had moved aside
    is put back if nothing took its place, else removed. Each folder is swept once per
    process. Returns what was removed or put back.
    """
    folder = Path(folder).resolve()
    if folder in _swept or os.name == "nt":
        return []
    _swept.add(folder)
    removed = []
    host, now = socket.gethostname(), time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _TEMPORARY.search(entry.name)
        if not match or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            if now - entry.lstat().st_mtime < STALE_AFTER_SECONDS:
                continue
            target = folder / entry.name[1 : match.start()]
            if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
                entry.rename(target)  # killed between the two renames of atomic_folder
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    if removed:
        log.info("%s: removed %d temporary file(s) left by killed runs", folder, len(removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or a platform without signal 0
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders only where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on folders
        pass
    finally:
        os.close(fd)


def ensure_writable_folder(path: PathLike, what: str = "output folder") -> Path:
    """Create folder ``path`` if needed and check that files can be written in it.

    Raises one :class:`ValueError` naming the folder (``what`` says which one) otherwise, before
    any work is done.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".biounet-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{folder}: {what} cannot be written: {exc.strerror or exc}") from exc
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise ValueError(f"{path}: a folder, not an image file" if path.is_dir() else f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}")
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
        raise ValueError(f"{path}: cannot read image: {exc}") from exc
    except Exception as exc:  # corrupt files raise whatever the decoder raises
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if image.dtype.kind not in _SUPPORTED_KINDS:
        raise ValueError(f"{path}: unsupported pixel type {image.dtype}; expected integers or floats")
    if image.ndim < 2 or image.size == 0:
        raise ValueError(f"{path}: empty image or fewer than 2 dimensions (shape {image.shape})")
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
            raise ValueError("the TIFF holds no image series")
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
        raise ValueError(f"{where}: luminance needs 3 (RGB) channels on axis {axis}, got shape {shape}")
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
            raise ValueError(f"{path}: integer values outside 0..2**32-1 cannot be written as labels")
        fits16 = not array.size or array.max() <= np.iinfo(np.uint16).max
        array = array.astype(np.uint16 if fits16 else np.uint32, copy=False)
    else:
        raise ValueError(f"{path}: cannot write pixel type {array.dtype} to TIFF")
    if axes is not None and len(axes) != array.ndim:
        raise ValueError(f"{path}: axes {axes!r} name {len(axes)} dimensions, the array has shape {array.shape}")
    metadata = {"axes": axes} if axes else None
    rgb = axes.endswith("S") if axes else array.ndim == 3 and array.shape[-1] in (3, 4)
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, array, metadata=metadata, photometric="rgb" if rgb else "minisblack",
                         compression="zlib" if compress else None)  # fmt: skip
    return Path(path)


def write_png(path: PathLike, array: np.ndarray) -> Path:
    """Write an 8-bit gray (H, W) or RGB (H, W, 3) array to a PNG file atomically."""
    import imageio.v3 as iio

    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"{path}: PNG needs uint8 (H, W) or (H, W, 3|4) pixels, got {array.dtype} {array.shape}")
    with atomic_write(path) as tmp:
        iio.imwrite(tmp, array, extension=".png")
    return Path(path)


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, axis: int | tuple[int, ...] | None = None
) -> np.ndarray:
    """Scale intensities so that the ``low`` and ``high`` percentiles map to 0 and 1.

    ``out = (x - p_low) / max(p_high - p_low, eps)`` in float32, not clipped (as in CSBDeep
    and StarDist). With ``axis`` the percentiles are taken over those axes only (e.g. the
    spatial axes, so that each channel is scaled on its own). A constant image becomes 0.

    Raises
    ------
    ValueError
        If ``0 <= low < high <= 100`` does not hold or the image has non-finite pixels.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"normalize_percentile: need 0 <= low < high <= 100, got low={low}, high={high}")
    image = np.asarray(image)
    data = image.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise ValueError("normalize_percentile: the image has NaN or infinite pixels")
    lo, hi = np.percentile(data, [low, high], axis=axis, keepdims=axis is not None)
    return rescale_intensity(data, lo, hi)


def rescale_intensity(data: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> np.ndarray:
    """``(x - low) / max(high - low, 1e-12)`` in float32: ``low`` maps to 0, ``high`` to 1, not clipped."""
    scale = np.maximum(np.asarray(high) - low, np.float32(1e-12))
    return ((data - low) / scale).astype(np.float32, copy=False)


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map an image to uint8 for display, by percentiles, clipped."""
    scaled = normalize_percentile(image, low, high)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.35) -> np.ndarray:
    """RGB uint8 picture of ``labels`` over a gray ``image``: tinted objects, bright outlines.

    Objects get distinct colours from a fixed golden-angle hue sequence, so the same label
    always has the same colour; outlines are drawn on the object's own boundary pixels.
    """
    from skimage.segmentation import find_boundaries

    if image.shape[:2] != labels.shape:
        raise ValueError(f"label_overlay: image shape {image.shape} does not match labels shape {labels.shape}")
    gray = to_uint8(image if image.ndim == 2 else image.mean(axis=-1)).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    palette = _palette(int(labels.max()) + 1)
    colours = palette[labels]
    inside = labels > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colours[inside]
    edges = find_boundaries(labels, mode="inner") & inside
    rgb[edges] = colours[edges]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    from colorsys import hsv_to_rgb

    hues = (np.arange(n) * 0.618033988749895) % 1.0
    colours = np.array([hsv_to_rgb(h, 0.85, 1.0) for h in hues], dtype=np.float32) * 255.0
    colours[0] = 0.0
    return colours
