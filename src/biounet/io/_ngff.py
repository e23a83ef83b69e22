"""OME-Zarr (NGFF) metadata and arrays, and writing Dask arrays into Zarr."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from biounet.errors import InputError


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


def ngff_attributes(axes: Sequence[tuple[str, str]], scale: Sequence[float], *, zarr_format: int, name: str) -> dict:
    """OME-Zarr ``multiscales`` metadata of a single-scale image whose array is at path ``"0"``.

    NGFF 0.4 (Zarr v2: ``{"multiscales": [...]}`` with ``"version": "0.4"``) or NGFF 0.5
    (Zarr v3: the same under ``{"ome": {"version": "0.5", ...}}``). ``axes`` are ``(name,
    type)`` pairs, ordered time, channel, space as the specification requires; one
    ``scale`` transformation per dataset. Built and validated by ome-zarr-models'
    ``Multiscale`` model of that version (an :class:`~biounet.errors.InputError` when the
    axes break the specification, e.g. a channel axis after a space axis).

    References
    ----------
    OME-NGFF specification 0.4, "multiscales" metadata, https://ngff.openmicroscopy.org/0.4/
    """
    if len(scale) != len(axes):
        raise InputError(f"ngff_attributes: {len(scale)} scale values for {len(axes)} axes")
    if zarr_format == 2:
        from ome_zarr_models.v04.axes import Axis
        from ome_zarr_models.v04.multiscales import Dataset, Multiscale
    else:
        from ome_zarr_models.v05.axes import Axis  # type: ignore[assignment]
        from ome_zarr_models.v05.multiscales import Dataset, Multiscale  # type: ignore[assignment]
    try:
        multiscale = Multiscale(
            axes=[Axis(name=n, type=t) for n, t in axes],
            datasets=[Dataset.build(path="0", scale=list(map(float, scale)), translation=None)],
            name=name,
        )
    except ValueError as exc:  # pydantic's ValidationError
        raise InputError(f"ngff_attributes: axes {list(axes)} are not valid OME-Zarr axes: {exc}") from exc
    image = multiscale.model_dump(mode="json", by_alias=True, exclude_none=True)
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **image}]}
    return {"ome": {"version": "0.5", "multiscales": [image]}}


def ngff_array(
    folder: Path, name: str, like: da.Array, dtype: Any, axes: Sequence[tuple[str, str]], scale: dict[str, float],
    zarr_format: int,
) -> zarr.Array:  # fmt: skip
    """An OME-Zarr image at ``folder`` whose array ``"0"`` will hold ``like``, chunked like it.

    Zarr chunks are ``like``'s regular chunks (one class per chunk on a channel axis), so
    that every Dask chunk covers whole Zarr chunks.
    """
    group = zarr.open_group(str(folder), mode="w", zarr_format=zarr_format)
    sizes = [scale.get(n.upper(), 1.0) if t == "space" else 1.0 for n, t in axes]
    group.attrs.update(ngff_attributes(axes, sizes, zarr_format=zarr_format, name=name))
    chunks = tuple(1 if t == "channel" else c[0] for (_, t), c in zip(axes, like.chunks, strict=True))
    extra: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}  # NGFF 0.4 requires "/"
        if zarr_format == 2
        else {"dimension_names": [n for n, _ in axes]}
    )
    return group.create_array("0", shape=like.shape, chunks=chunks, dtype=dtype, fill_value=0, **extra)
