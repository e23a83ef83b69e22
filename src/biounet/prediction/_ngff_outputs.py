"""Predictions as OME-Zarr: the NGFF layout of probabilities and labels, streamed or from memory.

One layout for both paths: ``<stem>_probabilities.ome.zarr`` is an NGFF image (classes on the
channel axis) whose ``labels/`` group holds the labels (``labels/<name>``, ``image-label``
metadata, so that napari opens them as labels), or, when only labels are saved,
``<stem>_labels.ome.zarr`` is a label image of its own. Axes follow NGFF's order (time,
channel, space): the item axis of a plane stack becomes ``z`` after the classes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from biounet.io._files import atomic_folder
from biounet.io._ngff import Axes, ngff_image, ngff_label, store_blocks, write_pyramid
from biounet.model import UNet

#: Chunk per spatial axis of OME-Zarr outputs written from memory.
MEMORY_CHUNK = 1024


def label_name(model: UNet) -> str:
    """The name of a model's instance labels in an OME-Zarr ``labels/`` group: its last class (``"cell"``).

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``, so that the
    name is one path component.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", model.info.class_names[-1]).strip(".") or "objects"


def makes_instances(model: UNet) -> bool:
    """Whether the model's labels are instances (2-class and border models), not arg-max classes."""
    return model.config.num_classes == 2 or model.info.postprocess.get("split") == "border"


def ngff_axes(stack_axis: str | None, dims: int) -> tuple[Axes, Axes]:
    """The NGFF axes of the probabilities and of the labels of an item stack along ``stack_axis`` (or one item).

    A single item has no item axis; a time stack (``"T"``) keeps it first; any other stack
    letter becomes a ``z`` space axis after the classes (2D models only).
    """
    space = [(a, "space") for a in "zyx"[3 - dims :]]
    if stack_axis is None:
        return [("c", "channel"), *space], space
    if stack_axis == "T":
        return [("t", "time"), ("c", "channel"), *space], [("t", "time"), *space]
    return [("c", "channel"), ("z", "space"), *space], [("z", "space"), *space]


def ngff_order(prob: Any, stack_axis: str | None) -> Any:
    """``(items, classes, *spatial)`` probabilities (numpy or Dask) in the axis order of :func:`ngff_axes`."""
    if stack_axis is None:
        return prob[0]
    return prob if stack_axis == "T" else prob.transpose(1, 0, *range(2, prob.ndim))


class NgffOutputs:
    """The OME-Zarr folders of one prediction, each written to a temporary folder and renamed when complete.

    Use inside a :class:`contextlib.ExitStack` (``stack``) that stays open until every array
    holds its pixels; :meth:`finish` then writes the pyramids.
    """

    def __init__(self, stack: contextlib.ExitStack, output: Path, stem: str, *, zarr_format: int,
                 scale: Mapping[str, float] | None, units: Mapping[str, str] | None, levels: int) -> None:  # fmt: skip
        self.stack, self.output, self.stem = stack, output, stem
        self.geometry: dict[str, Any] = {"scale": scale or {}, "zarr_format": zarr_format, "levels": levels,
                                         "units": units}  # fmt: skip
        self.written: list[Path] = []
        self.image: Path | None = None
        self._pyramids: list[Path] = []

    def _folder(self, kind: str) -> Path:
        path = self.output / f"{self.stem}_{kind}.ome.zarr"
        self.written.append(path)
        return self.stack.enter_context(atomic_folder(path))

    def probabilities(self, like: da.Array, axes: Axes) -> zarr.Array:
        """The array ``"0"`` of ``<stem>_probabilities.ome.zarr`` (float32), chunked like ``like``."""
        self.image = self._folder("probabilities")
        self._pyramids.append(self.image)
        return ngff_image(self.image, f"{self.stem}_probabilities", like, np.float32, axes, **self.geometry)

    def labels(self, like: da.Array, axes: Axes, name: str) -> zarr.Array:
        """The uint32 array ``"0"`` of the labels: in the image's ``labels/`` group, else ``<stem>_labels.ome.zarr``."""
        if self.image is not None:
            self._pyramids.append(self.image / "labels" / name)
            return ngff_label(self.image, name, like, axes, **self.geometry)
        folder = self._folder("labels")
        self._pyramids.append(folder)
        return ngff_image(folder, name, like, np.uint32, axes, label=True, **self.geometry)

    def finish(self) -> list[Path]:
        """Write the levels past ``"0"`` of every image (level 0 must be complete); return the folders."""
        if self.geometry["levels"] > 1:
            for folder in self._pyramids:
                write_pyramid(folder)
        return self.written


def write_ngff_prediction(
    output: Path, stem: str, prob: np.ndarray | None, labels: np.ndarray | None, *, model: UNet,
    stack_axis: str | None = None, zarr_format: int = 2, scale: Mapping[str, float] | None = None,
    units: Mapping[str, str] | None = None, levels: int = 1,
) -> list[Path]:  # fmt: skip
    """Write probabilities and labels computed in memory as OME-Zarr, in the layout of :func:`predict_to_zarr`.

    ``prob`` is ``(classes, *spatial)`` or ``(items, classes, *spatial)`` with ``stack_axis``;
    ``labels`` the matching ``(*spatial)`` or ``(items, *spatial)``; either may be None.
    """
    dims = model.config.dims
    with contextlib.ExitStack() as stack:
        outputs = NgffOutputs(stack, output, stem, zarr_format=zarr_format, scale=scale, units=units, levels=levels)
        work = []
        prob_axes, label_axes = ngff_axes(stack_axis, dims)
        if prob is not None:
            arranged = ngff_order(prob if stack_axis is not None else prob[None], stack_axis)
            lazy = da.from_array(arranged, chunks=_chunks(arranged.shape, dims))
            work.append(store_blocks(lazy, outputs.probabilities(lazy, prob_axes)))
        if labels is not None:  # (items, *spatial) or (*spatial): NGFF's order already
            lazy = da.from_array(labels.astype(np.uint32, copy=False), chunks=_chunks(labels.shape, dims))
            name = label_name(model) if makes_instances(model) else "classes"
            work.append(store_blocks(lazy, outputs.labels(lazy, label_axes, name)))
        da.compute(*work)
        return outputs.finish()


def _chunks(shape: tuple[int, ...], dims: int) -> tuple[int, ...]:
    """One class and one plane per chunk, :data:`MEMORY_CHUNK` px per spatial axis."""
    chunks = [1] * (len(shape) - dims) + [MEMORY_CHUNK] * dims
    return tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))
