"""Training data: dataset readers, random training tiles and synthetic touching cells.

A data set is a list of :class:`Sample` (image, instance labels, name, source files). Three
on-disk layouts are read, and :func:`load_dataset` tells them apart:

``folders``
    ``images/<stem>.<ext>`` paired with ``labels/<stem>.<ext>`` by file stem (PNG, TIFF,
    JPEG, ``.npy``), e.g. the 2018 Data Science Bowl subset and ``biounet synth`` output.
``isbi``
    The ISBI 2012 EM challenge: the stacks ``train-volume.tif`` + ``train-labels.tif``, or
    the same slices as ``images/NN.png`` + ``labels/NN.png`` beside ``test-images/``.
``ctc``
    The Cell Tracking Challenge: ``01/t000.tif`` with ``01_GT/SEG/man_seg000.tif``; only
    frames with segmentation ground truth are read.

Label conventions
-----------------
Every sample holds *instance labels* (0 = background, 1..N = objects, int32) because the
border weight map of the paper needs objects, and derives the *class target* from them:
0 = background or membrane, 1 = cell, where a 1-px line of background is drawn between
objects that touch (:func:`separate_touching`), as in the paper's annotations (Fig. 3),
so that a 2-class network can learn to keep touching cells apart. The weight map is
computed on these separated objects, so the separating lines carry the high border weights.
The 3-class ``"border"`` target (:meth:`Sample.class_target`) also marks each object's
outermost pixels as class 2, so that a network can learn cell interiors that stay apart
where touching cells meet (Caicedo et al. 2019 compare it with the 2-class target on
nuclei).
Stored label images are read as one of two :class:`LabelFormat` kinds:

* ``"instances"``: any non-negative integers, one value per object (relabelled to 1..N);
* ``"mask"``: a binary mask with exactly two allowed values, ``foreground`` (cell) and
  ``background``; any other value is an error. The cells become instances by connected
  components with 4-connectivity (:func:`biounet.data.binary_to_instances`), so that two
  cells that meet only at a corner across a membrane stay separate. ISBI 2012 labels are
  ``ISBI_MEMBRANES``: 255 = cell, 0 = membrane.

Every reader checks all files before returning: unreadable files, unpaired files, image and
label shapes that differ, unexpected label values and empty data sets raise one
:class:`ValueError` naming the file.

References
----------
O. Ronneberger, P. Fischer, T. Brox. U-Net: Convolutional Networks for Biomedical Image
Segmentation. MICCAI 2015. arXiv:1505.04597.
J. C. Caicedo et al. Evaluation of Deep Learning Strategies for Nucleus Segmentation in
Fluorescence Images. Cytometry A 95, 952-965 (2019).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from biounet.data._weights import binary_to_instances
from biounet.errors import InputError

PathLike = str | os.PathLike
LabelKind = Literal["instances", "mask"]


TargetKind = Literal["binary", "border"]
#: How :class:`biounet.data.TileDataset` draws the image of each tile.
Pick = Literal["images", "pixels", "objects"]


@dataclass(frozen=True)
class LabelFormat:
    """How a stored label image encodes the ground truth.

    Attributes
    ----------
    kind : {"instances", "mask"}
        ``"instances"``: one non-negative integer per object, 0 = background.
        ``"mask"``: a binary mask whose only values are ``foreground`` and ``background``.
    foreground, background : int
        The cell and the background (membrane) values of a ``"mask"``; unused for instances.
    """

    kind: LabelKind = "instances"
    foreground: int = 255
    background: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("instances", "mask"):
            raise InputError(f"LabelFormat.kind must be 'instances' or 'mask', got {self.kind!r}")
        if self.foreground == self.background:
            raise InputError(f"LabelFormat: foreground and background are both {self.foreground}")


#: Instance label images (DSB, CTC, ``biounet synth``).
INSTANCE_LABELS = LabelFormat("instances")
#: ISBI 2012 membrane masks: 255 = cell interior (class 1), 0 = membrane (class 0).
ISBI_MEMBRANES = LabelFormat("mask", foreground=255, background=0)


@dataclass(frozen=True, eq=False)
class Sample:
    """One annotated image.

    Attributes
    ----------
    name : str
        Identifier, unique within a data set (file stem, ``"01_t000"``, slice ``"07"``).
    image : ndarray
        ``(H, W)`` or ``(H, W, C)`` pixels as stored (any real dtype).
    labels : ndarray
        ``(H, W)`` int32 instance labels, 0 = background, objects numbered 1..N.
    image_path, label_path : Path or None
        The files the sample came from (``None`` for data made in memory).
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    image_path: Path | None = None
    label_path: Path | None = None

    def __post_init__(self) -> None:
        _check_pair(self.image, self.labels, self._where())
        if self.labels.dtype != np.int32:
            raise TypeError(f"{self._where()}: Sample.labels must be int32, got {self.labels.dtype}")

    @functools.cached_property
    def separated(self) -> np.ndarray:
        """The instance labels with a background line between touching objects (:func:`separate_touching`).

        Computed once per sample (``target`` and the weight map both need it) and read-only.
        """
        separated = separate_touching(self.labels)
        separated.flags.writeable = False
        return separated

    @property
    def target(self) -> np.ndarray:
        """``(H, W)`` uint8 class target: 0 = background/membrane and lines between touching cells, 1 = cell."""
        return self.class_target("binary")

    def class_target(self, kind: TargetKind = "binary") -> np.ndarray:
        """``(H, W)`` uint8 class target of ``kind``.

        ``"binary"``: :attr:`target`. ``"border"``: 0 = background (and the lines between
        touching cells), 1 = cell interior, 2 = cell border, the pixels of a separated object
        with a face neighbour outside it; the image edge is no border (a cell cut by it
        stays interior there). Touching cells thus meet in border, line, border, and their
        interiors are at least 3 px apart.
        """
        if kind not in ("binary", "border"):
            raise InputError(f"target kind must be 'binary' or 'border', got {kind!r}")
        cells = self.separated > 0
        if kind == "binary":
            return cells.astype(np.uint8)
        interior = ndi.binary_erosion(cells, ndi.generate_binary_structure(2, 1), border_value=1)
        return np.where(interior, 1, np.where(cells, 2, 0)).astype(np.uint8)

    @property
    def n_instances(self) -> int:
        """Number of objects N (labels are 1..N)."""
        return int(self.labels.max())

    def _where(self) -> str:
        return _where(self.name, self.label_path or self.image_path)


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Set to background every object pixel that touches a *lower-numbered* object.

    Of two 4-adjacent pixels of different objects the one with the higher label becomes 0,
    so a 1-px background line (8-connected) runs between touching objects and their
    4-connected components are separate. Objects that touch nothing are unchanged.
    Returns a new array; ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    out = labels.copy()
    for axis in range(labels.ndim):
        a = np.swapaxes(labels, 0, axis)
        o = np.swapaxes(out, 0, axis)  # a view: writing to it writes to out
        first, second = a[:-1], a[1:]
        touching = (first > 0) & (second > 0) & (first != second)
        o[:-1][touching & (first > second)] = 0
        o[1:][touching & (second > first)] = 0
    return out


def make_sample(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    label_format: LabelFormat = INSTANCE_LABELS,
    image_path: PathLike | None = None,
    label_path: PathLike | None = None,
) -> Sample:
    """Check an image and its stored labels and turn them into a :class:`Sample`.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` or ``(H, W, C)`` pixels.
    labels : ndarray
        ``(H, W)`` integer label image in ``label_format``.
    name : str
        Identifier of the sample.
    label_format : LabelFormat
        ``INSTANCE_LABELS`` (relabelled to 1..N) or a mask such as ``ISBI_MEMBRANES`` (cells
        become instances by 4-connected components).
    image_path, label_path : str or os.PathLike, optional
        Source files, kept in the sample and named in error messages.

    Returns
    -------
    Sample

    Raises
    ------
    ValueError
        If the shapes differ, the labels are not integers, instance labels are negative or a
        mask has values other than its foreground and background; the message names the
        label file (or the name).
    """
    image_path = None if image_path is None else Path(image_path)
    label_path = None if label_path is None else Path(label_path)
    where = _where(name, label_path or image_path)
    image, labels = np.asarray(image), np.asarray(labels)
    _check_pair(image, labels, where)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"{_where(name, image_path or label_path)}: the image has NaN or infinite pixels")
    if labels.dtype.kind not in "biu":
        raise InputError(f"{where}: label image must hold integers, got dtype {labels.dtype}")
    if label_format.kind == "mask":
        unknown = np.setdiff1d(np.unique(labels), [label_format.background, label_format.foreground])
        if unknown.size:
            raise InputError(
                f"{where}: mask has values {_few(unknown)} besides background {label_format.background} "
                f"and foreground {label_format.foreground}"
            )
        instances = binary_to_instances(labels, foreground_value=label_format.foreground, connectivity=1)
    else:
        if labels.size and labels.min() < 0:
            raise InputError(f"{where}: instance labels must be >= 0, found {labels.min()}")
        instances = relabel_sequential(labels.astype(np.int64, copy=False))[0]
    return Sample(name, image, instances.astype(np.int32), image_path, label_path)


def _check_pair(image: np.ndarray, labels: np.ndarray, where: str) -> None:
    if image.ndim not in (2, 3) or image.size == 0:
        raise InputError(f"{where}: image must be (H, W) or (H, W, C), got shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise InputError(f"{where}: label shape {labels.shape} does not match image shape {image.shape}")


def _where(name: str, path: Path | None) -> str:
    return name if path is None else f"{path} ({name})" if path.stem != name else str(path)


def _few(values: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:k])
    return f"{{{shown}{', ...' if values.size > k else ''}}}"
