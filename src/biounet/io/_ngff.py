"""OME-Zarr (NGFF) images and labels: metadata, arrays, pyramids, and writing Dask arrays into Zarr.

The layout follows the NGFF specification (0.4 on Zarr v2, 0.5 on Zarr v3): an image is a
group with ``multiscales`` metadata and one array per resolution level (``"0"`` the full
resolution); its labels live in the image's ``labels/`` group, each a multiscale image of
its own with ``image-label`` metadata and as many levels as the image, so that viewers such
as napari (napari-ome-zarr) open them as labels layers. The metadata is built and validated
by ome-zarr-models' pydantic models; arrays are written by Dask without locks.

References
----------
OME-NGFF specification, "multiscales" and "labels" metadata, https://ngff.openmicroscopy.org/0.4/
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from biounet.errors import InputError

#: ``(name, type)`` pairs, e.g. ``[("c", "channel"), ("y", "space"), ("x", "space")]``.
Axes = Sequence[tuple[str, str]]

#: Axes halved from one pyramid level to the next (as ome-zarr-py's default ``Scaler``).
DOWNSCALED_AXES = ("y", "x")


def store_blocks(array: da.Array, target: zarr.Array) -> Any:
    """Dask work that writes ``array`` into ``target`` chunk by chunk, without locks.

    Every Dask chunk must cover whole Zarr chunks (or end at the array end), so that no two
    tasks ever write into the same Zarr chunk, also from different processes.
    """
    if array.shape != target.shape:
        raise InputError(f"target: shape {target.shape} differs from the array's {array.shape}")
    for axis, (blocks, size) in enumerate(zip(array.chunks, target.chunks, strict=True)):
        if np.any(np.cumsum(blocks)[:-1] % size):
            raise InputError(f"target: its chunks {target.chunks} do not tile the chunks {blocks} of axis {axis}")
    return da.store(array, target, lock=False, compute=False)


def level_scale(axes: Axes, scale: Sequence[float], level: int) -> list[float]:
    """Pixel size per axis at pyramid ``level``: ``scale`` times ``2**level`` on y and x."""
    return [float(s) * (2**level if name in DOWNSCALED_AXES else 1) for (name, _), s in zip(axes, scale, strict=True)]


def ngff_attributes(
    axes: Axes,
    scale: Sequence[float],
    *,
    zarr_format: int,
    name: str,
    levels: int = 1,
    units: Mapping[str, str] | None = None,
    label: bool = False,
    label_source: str | None = "../../",
) -> dict:
    """OME-Zarr metadata of an image (or a label image) whose levels are the arrays ``"0"``, ``"1"``, ...

    NGFF 0.4 (Zarr v2: ``{"multiscales": [...]}`` with ``"version": "0.4"``) or NGFF 0.5
    (Zarr v3: the same under ``{"ome": {"version": "0.5", ...}}``).

    Parameters
    ----------
    axes : sequence of (name, type)
        Ordered time, channel, space, as the specification requires.
    scale : sequence of float
        Pixel size per axis at full resolution; level ``k`` has ``scale * 2**k`` on y and x
        (:func:`level_scale`), one ``scale`` transformation per level.
    zarr_format : {2, 3}
    name : str
    levels : int
        Number of resolution levels.
    units : mapping of axis name to str, optional
        Units (``"micrometer"``, ``"second"``...) of the axes that have one.
    label : bool
        Add ``image-label`` metadata: viewers show the image as labels.
    label_source : str or None
        The ``image-label`` ``source``: the image the labels belong to, relative to them
        (``"../../"`` inside an image's ``labels/`` group); None for a label image of its own.

    Raises
    ------
    InputError
        When the axes break the specification (e.g. a channel axis after a space axis), as
        ome-zarr-models' ``Multiscale`` model of that version decides.
    """
    if len(scale) != len(axes):
        raise InputError(f"ngff_attributes: {len(scale)} scale values for {len(axes)} axes")
    if levels < 1:
        raise InputError(f"ngff_attributes: levels must be at least 1, got {levels}")
    if zarr_format == 2:
        from ome_zarr_models.v04.axes import Axis
        from ome_zarr_models.v04.image_label_types import Label
        from ome_zarr_models.v04.multiscales import Dataset, Multiscale
    else:
        from ome_zarr_models.v05.axes import Axis  # type: ignore[assignment]
        from ome_zarr_models.v05.image_label_types import Label  # type: ignore[assignment]
        from ome_zarr_models.v05.multiscales import Dataset, Multiscale  # type: ignore[assignment]
    units = dict(units or {})
    try:
        multiscale = Multiscale(
            axes=[Axis(name=n, type=t, unit=units.get(n)) for n, t in axes],
            datasets=[
                Dataset.build(path=str(k), scale=level_scale(axes, scale, k), translation=None) for k in range(levels)
            ],
            name=name,
        )
    except ValueError as exc:  # pydantic's ValidationError
        raise InputError(f"ngff_attributes: axes {list(axes)} are not valid OME-Zarr axes: {exc}") from exc
    image: dict[str, Any] = {"multiscales": [multiscale.model_dump(mode="json", by_alias=True, exclude_none=True)]}
    if label:
        source = {"source": {"image": label_source}} if label_source else {}
        image["image-label"] = Label(**source).model_dump(mode="json", by_alias=True, exclude_none=True)
    if zarr_format == 2:
        image["multiscales"][0] = {"version": "0.4", **image["multiscales"][0]}
        if label:
            image["image-label"] = {"version": "0.4", **image["image-label"]}
        return image
    return {"ome": {"version": "0.5", **image}}


def ngff_image(
    folder: Path,
    name: str,
    like: da.Array,
    dtype: Any,
    axes: Axes,
    scale: Mapping[str, float],
    zarr_format: int,
    *,
    levels: int = 1,
    units: Mapping[str, str] | None = None,
    label: bool = False,
    label_source: str | None = None,
) -> zarr.Array:
    """Create the OME-Zarr image group ``folder`` and return its array ``"0"``, to hold ``like``.

    Zarr chunks are ``like``'s regular chunks (one class per chunk on a channel axis), so
    that every Dask chunk covers whole Zarr chunks. ``scale`` and ``units`` are keyed by
    axis letter (``"Y"``, ``"X"``, ``"Z"``, ``"T"``), as :class:`biounet.io.LazyImage`
    reads them; the levels past ``"0"`` are written by :func:`write_pyramid` once level 0
    holds its pixels. ``label`` and ``label_source`` as for :func:`ngff_attributes` (no
    source by default: a label image of its own).
    """
    group = zarr.open_group(str(folder), mode="w", zarr_format=zarr_format)
    sizes = [scale.get(n.upper(), 1.0) if t in ("space", "time") else 1.0 for n, t in axes]
    axis_units = {n: units[n.upper()] for n, _ in axes if units and n.upper() in units}
    group.attrs.update(ngff_attributes(axes, sizes, zarr_format=zarr_format, name=name, levels=levels,
                                       units=axis_units, label=label, label_source=label_source))  # fmt: skip
    chunks = tuple(1 if t == "channel" else c[0] for (_, t), c in zip(axes, like.chunks, strict=True))
    return _create_level(group, "0", like.shape, chunks, dtype, axes, zarr_format)


def ngff_label(
    image: Path, name: str, like: da.Array, axes: Axes, scale: Mapping[str, float], zarr_format: int, *,
    levels: int = 1, units: Mapping[str, str] | None = None,
) -> zarr.Array:  # fmt: skip
    """Add the label image ``name`` to the OME-Zarr image at ``image``; return its array ``"0"``.

    Writes ``image/labels`` (its ``labels`` list naming ``name``) and ``image/labels/name``,
    an :func:`ngff_image` with ``image-label`` metadata and uint32 pixels. NGFF asks a label
    image for as many levels as its image: give the image's ``levels``.
    """
    labels = zarr.open_group(str(image / "labels"), mode="a", zarr_format=zarr_format)
    key = "labels"
    if zarr_format == 2:
        names = list(labels.attrs.get(key, []))
        labels.attrs[key] = [*names, name] if name not in names else names
    else:
        ome = dict(labels.attrs.get("ome", {"version": "0.5"}))
        names = list(ome.get(key, []))
        labels.attrs["ome"] = {**ome, key: [*names, name] if name not in names else names}
    return ngff_image(image / "labels" / name, name, like, np.uint32, axes, scale, zarr_format, levels=levels,
                      units=units, label=True, label_source="../../")  # fmt: skip


def _create_level(
    group: zarr.Group, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, axes: Axes,
    zarr_format: int,
) -> zarr.Array:  # fmt: skip
    extra: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}  # NGFF 0.4 requires "/"
        if zarr_format == 2
        else {"dimension_names": [n for n, _ in axes]}
    )
    chunks = tuple(min(c, s) or 1 for c, s in zip(chunks, shape, strict=True))
    return group.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **extra)


def write_pyramid(folder: Path) -> None:
    """Fill the levels past ``"0"`` that the OME-Zarr image at ``folder`` declares.

    Each level keeps every second pixel of the one before along y and x (nearest-neighbour
    downsampling, ome-zarr-py's default ``Scaler.nearest``): the only rule that keeps label
    values labels, used for images too so that an image and its labels stay aligned level
    by level; pixel ``i`` of level ``k`` lies at ``i * 2**k`` full-resolution pixels, as the
    ``scale`` transformations say, with no translation. Computed with Dask from the level
    before, chunk by chunk, in the level's own chunks.
    """
    group = zarr.open_group(str(folder), mode="r+")
    attrs = group.attrs.asdict()
    image = attrs.get("ome", attrs)["multiscales"][0]
    names = [axis["name"] for axis in image["axes"]]
    paths = [dataset["path"] for dataset in image["datasets"]]
    zarr_format = group.metadata.zarr_format
    axes = [(axis["name"], axis.get("type", "")) for axis in image["axes"]]
    for previous, path in itertools.pairwise(paths):
        source = group[previous]
        step = tuple(slice(None, None, 2) if n in DOWNSCALED_AXES else slice(None) for n in names)
        smaller = da.from_zarr(source)[step]
        target = _create_level(group, path, smaller.shape, source.chunks, source.dtype, axes, zarr_format)
        da.store(smaller.rechunk(target.chunks), target, lock=False)
