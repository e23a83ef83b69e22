"""The napari reader: image files with their axes and pixel sizes, and OME-Zarr images with their labels.

Files (TIFF, PNG, JPEG, ``.npy``) are read as :func:`biounet.io.read_image_axes` reads them:
a channel axis (``C``, or ``S`` before the plane) becomes napari's ``channel_axis`` (one layer
per channel), RGB(A) samples last (and PNG/JPEG colour) an RGB layer, and an integer image named like labels
(``*_labels``, ``*_masks``, or in a ``labels/`` or ``masks/`` folder) a labels layer. TIFFs
larger than :data:`biounet.prediction.STREAM_ABOVE_PIXELS` pixels are opened lazily.

OME-Zarr follows the NGFF specification (0.4 on Zarr v2; 0.5 on Zarr v3, metadata under
``"ome"``) and nothing specific to biounet: every level of ``multiscales[0]`` is a lazy Dask
array (a multiscale layer when there are several), the first level's ``scale`` and
``translation`` (after the multiscale's own transformations) give the layer's, a
``channel`` axis becomes ``channel_axis``, an image with ``image-label`` metadata is a labels
layer, and every label image listed in the ``labels/`` group is a labels layer of its own.

References
----------
OME-NGFF specification, "multiscales", "labels" and "image-label" metadata,
https://ngff.openmicroscopy.org/0.4/ and https://ngff.openmicroscopy.org/0.5/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import InputError
from biounet.io import IMAGE_SUFFIXES, is_zarr, ngff_unit, read_image_axes, tiff_pixel_size

log = logging.getLogger(__name__)

#: What napari takes from a reader: ``(data, layer keyword arguments, layer type)``.
LayerData = tuple[Any, dict[str, Any], str]

#: File stems (ends) and folder names that mark an integer image as labels.
LABEL_STEMS = ("_labels", "_label", "_masks", "_mask")
LABEL_FOLDERS = ("labels", "masks")

#: Axis names of tifffile letters, as napari shows them.
_AXIS_NAMES = {"T": "t", "Z": "z", "Y": "y", "X": "x", "C": "c", "S": "c"}


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """The reader of ``path`` (napari's ``get_reader`` hook), or None when biounet does not read it.

    Parameters
    ----------
    path : str or sequence of str
        A file, an OME-Zarr folder, or several of them (each must be readable).
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_layers


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """The napari layers of one path or several (see the module notes).

    Raises
    ------
    InputError
        If a path is not an image file or an OME-Zarr image or labels; the message names it.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for p in map(Path, paths):
        if not is_zarr(p):
            layers += read_file(p)
        elif _is_zarr_array(p):
            layers += read_zarr_array(p)
        else:
            layers += read_ome_zarr(p)
    return layers


def _readable(path: Path) -> bool:
    if is_zarr(path):
        try:
            return _is_zarr_array(path) or bool(_ngff_content(path))
        except (OSError, ValueError, KeyError, TypeError):  # a store zarr cannot open: another reader's business
            return False
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _is_zarr_array(path: Path) -> bool:
    import zarr

    return isinstance(zarr.open(str(path), mode="r"), zarr.Array)


# ---- files ---------------------------------------------------------------------------------
def read_file(path: Path) -> list[LayerData]:
    """One image file as napari layers: its axes, channels, pixel size, and labels by name."""
    path = Path(path)
    scale: dict[str, float] = {}
    units: dict[str, str] = {}
    if path.suffix.lower() in (".tif", ".tiff"):
        data, axes, scale, units = _read_tiff(path)
    else:
        data, axes = read_image_axes(path)
    kwargs: dict[str, Any] = {"name": path.stem, "metadata": {"path": str(path), "axes": axes}}
    picture = path.suffix.lower() in (".png", ".jpg", ".jpeg")
    if (axes.endswith("S") or (picture and axes.endswith("C"))) and data.shape[-1] in (3, 4):  # RGB: one layer
        kwargs["rgb"] = True
        plane_axes = axes[:-1]
        return [(data, {**kwargs, **_geometry(plane_axes, scale, units)}, "image")]
    channels = [i for i, a in enumerate(axes) if a in "CS"]
    if channels:
        channel_axis = channels[0]
        plane_axes = axes[:channel_axis] + axes[channel_axis + 1 :]
        n = data.shape[channel_axis]
        geometry = _geometry(plane_axes, scale, units)
        per_channel = {key: [value] * n for key, value in geometry.items()}  # napari splits lists by channel
        names = [f"{path.stem} [{k}]" for k in range(n)]
        return [(data, {**kwargs, **per_channel, "channel_axis": channel_axis, "name": names}, "image")]
    kind = "labels" if _is_labels(path, data) else "image"
    return [(data, {**kwargs, **_geometry(axes, scale, units)}, kind)]


def _read_tiff(path: Path) -> tuple[Any, str, dict[str, float], dict[str, str]]:
    import tifffile

    from biounet.prediction import STREAM_ABOVE_PIXELS

    try:
        with tifffile.TiffFile(path) as tif:
            scale, units = tiff_pixel_size(tif)
            large = bool(tif.series) and math.prod(tif.series[0].shape) > STREAM_ABOVE_PIXELS
    except Exception as exc:  # corrupt files raise whatever the decoder raises
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if large:
        from biounet.io import open_image

        lazy = open_image(path)
        return lazy.array, lazy.axes, scale, units
    data, axes = read_image_axes(path)
    return data, axes, scale, units


def _is_labels(path: Path, data: Any) -> bool:
    named = path.stem.lower().endswith(LABEL_STEMS) or path.parent.name.lower() in LABEL_FOLDERS
    return named and np.dtype(data.dtype).kind in "biu"


def _geometry(axes: str, scale: Mapping[str, float], units: Mapping[str, str]) -> dict[str, Any]:
    """napari's ``scale``, ``units`` and ``axis_labels`` of a layer with tifffile ``axes``."""
    names = [_AXIS_NAMES.get(a, a.lower()) for a in axes]
    out: dict[str, Any] = {"axis_labels": _unique(names)}
    if scale:
        out["scale"] = [float(scale.get(a, 1.0)) for a in axes]
    if units:
        out["units"] = [units.get(a) for a in axes]
    return out


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` with repeats numbered (``q``, ``q``, ``y``, ``x`` -> ``q0``, ``q1``, ``y``, ``x``), as napari needs."""
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if counts[n] > 1:
            out.append(f"{n}{seen.get(n, 0)}")
            seen[n] = seen.get(n, 0) + 1
        else:
            out.append(n)
    return tuple(out)


# ---- Zarr and OME-Zarr ----------------------------------------------------------------------
def read_zarr_array(path: Path) -> list[LayerData]:
    """A plain Zarr array as a lazy image layer, its axes from ``_ARRAY_DIMENSIONS`` or ``dimension_names``."""
    from biounet.io import open_image

    lazy = open_image(path)
    meta = {"path": str(path), "axes": lazy.axes}
    kwargs: dict[str, Any] = {"name": path.name.removesuffix(".zarr"), "metadata": meta}
    channels = [i for i, a in enumerate(lazy.axes) if a == "C"]
    if channels:
        plane_axes = lazy.axes.replace("C", "", 1)
        n = lazy.array.shape[channels[0]]
        geometry = {key: [value] * n for key, value in _geometry(plane_axes, {}, {}).items()}
        return [(lazy.array, {**kwargs, **geometry, "channel_axis": channels[0]}, "image")]
    return [(lazy.array, {**kwargs, **_geometry(lazy.axes, {}, {})}, "image")]


def _ngff(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The NGFF metadata of a group's attributes: under ``"ome"`` in 0.5, at the top before."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, Mapping) else attrs


def _ngff_content(path: Path) -> list[tuple[str, Any, bool]]:
    """The multiscale images of an OME-Zarr: ``(name, group, is_label)``, the image first, then its labels."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    meta = _ngff(root.attrs.asdict())
    stem = path.name.removesuffix(".zarr").removesuffix(".ome")
    found: list[tuple[str, Any, bool]] = []
    if meta.get("multiscales"):
        found.append((stem, root, "image-label" in meta))
    if "labels" in root and isinstance(root["labels"], zarr.Group):
        listed = _ngff(root["labels"].attrs.asdict()).get("labels") or []
        for name in listed:
            if name in root["labels"] and isinstance(root["labels"][name], zarr.Group):
                found.append((f"{stem} {name}", root["labels"][name], True))
            else:
                log.warning("%s: labels/%s is listed but missing; skipped", path, name)
    return found


def read_ome_zarr(path: Path) -> list[LayerData]:
    """An OME-Zarr image and its label images as napari layers (lazy Dask arrays).

    Raises
    ------
    InputError
        If ``path`` holds neither ``multiscales`` nor listed ``labels``.
    """
    path = Path(path)
    try:
        content = _ngff_content(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot open as OME-Zarr ({type(exc).__name__}: {exc})") from exc
    if not content:
        raise InputError(f"{path}: no OME-Zarr 'multiscales' image and no 'labels' in it")
    layers = []
    for name, group, is_label in content:
        try:
            layers.append(_multiscale_layer(group, name, is_label, path))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: invalid OME-Zarr metadata in {group.path or '/'} ({exc})") from exc
    return layers


def _multiscale_layer(group: Any, name: str, is_label: bool, path: Path) -> LayerData:
    """The layer of ``multiscales[0]`` of ``group``: every level, the first level's scale and translation."""
    import dask.array as da

    meta = _ngff(group.attrs.asdict())
    image = meta["multiscales"][0]
    axes = [a if isinstance(a, Mapping) else {"name": str(a)} for a in image.get("axes", [])]
    datasets = image["datasets"]
    levels = [da.from_zarr(group[d["path"]]) for d in datasets]
    ndim = levels[0].ndim
    if len(axes) != ndim:  # NGFF before 0.3 had no axes
        axes = [{"name": n} for n in ("t", "c", "z", "y", "x")[-ndim:]] if ndim <= 5 else [{"name": ""}] * ndim
    scale, translate = _transforms(datasets[0].get("coordinateTransformations", []), ndim)
    outer_scale, outer_translate = _transforms(image.get("coordinateTransformations", []), ndim)
    scale, translate = scale * outer_scale, translate * outer_scale + outer_translate
    names = [str(a.get("name", "")) for a in axes]
    units = [ngff_unit(a.get("unit")) for a in axes]
    channels = [i for i, a in enumerate(axes) if a.get("type") == "channel" or (not a.get("type") and names[i] == "c")]
    kwargs: dict[str, Any] = {"name": image.get("name") or name, "metadata": {"path": str(path), "ngff": dict(meta)}}
    if is_label:
        kwargs["name"] = name
        if channels and levels[0].shape[channels[0]] == 1:  # a label image has no channels; drop an axis of 1
            c = channels[0]
            levels = [level.squeeze(axis=c) for level in levels]
            keep = [i for i in range(ndim) if i != c]
            scale, translate = scale[keep], translate[keep]
            names, units = [names[i] for i in keep], [units[i] for i in keep]
            channels = []
    geometry: dict[str, Any] = {"scale": scale.tolist(), "translate": translate.tolist()}
    if any(units):
        geometry["units"] = units
    if all(names) and len(set(names)) == len(names):
        geometry["axis_labels"] = tuple(names)
    data: Any = levels if len(levels) > 1 else levels[0]
    kwargs["multiscale"] = len(levels) > 1
    if channels and not is_label:
        c = channels[0]
        keep = [i for i in range(ndim) if i != c]
        n = levels[0].shape[c]
        per_channel = {key: [[value[i] for i in keep] if key != "axis_labels" else tuple(value[i] for i in keep)] * n
                       for key, value in geometry.items()}  # fmt: skip
        labels = [ch.get("label") for ch in (meta.get("omero") or {}).get("channels", [])]
        kwargs["name"] = [lab if lab else f"{kwargs['name']} [{k}]" for k, lab in
                          zip(range(n), labels + [None] * n, strict=False)]  # fmt: skip
        return data, {**kwargs, **per_channel, "channel_axis": c}, "image"
    return data, {**kwargs, **geometry}, "labels" if is_label else "image"


def _transforms(transforms: Sequence[Mapping[str, Any]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``scale`` and ``translation`` of a list of NGFF coordinate transformations (identity if absent)."""
    scale, translate = np.ones(ndim), np.zeros(ndim)
    for transform in transforms:
        kind = transform.get("type")
        if kind == "scale" and "scale" in transform:
            values = np.asarray(transform["scale"], float)
            if values.shape != (ndim,):
                raise ValueError(f"scale {transform['scale']} for {ndim} axes")
            scale, translate = scale * values, translate * values
        elif kind == "translation" and "translation" in transform:
            values = np.asarray(transform["translation"], float)
            if values.shape != (ndim,):
                raise ValueError(f"translation {transform['translation']} for {ndim} axes")
            translate = translate + values
        elif kind not in ("identity", None):
            log.warning("coordinate transformation %r ignored (only scale and translation are read)", kind)
    return scale, translate
