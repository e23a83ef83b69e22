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
  components with 4-connectivity (:func:`biounet.weights.binary_to_instances`), so that two
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
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import label as label_components
from skimage.segmentation import relabel_sequential
from tqdm.auto import tqdm

from biounet.io import image_files, normalize_percentile, read_image, to_luminance
from biounet.tiling import mirror_indices
from biounet.weights import binary_to_instances, weight_map

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
LabelKind = Literal["instances", "mask"]
Layout = Literal["auto", "folders", "isbi", "ctc"]
Style = Literal["fluorescence", "phase"]
Pick = Literal["images", "pixels"]
TargetWindow = Literal["output", "input"]
TargetKind = Literal["binary", "border"]


# ============================================================================================
# Samples and label conventions
# ============================================================================================
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
            raise ValueError(f"LabelFormat.kind must be 'instances' or 'mask', got {self.kind!r}")
        if self.foreground == self.background:
            raise ValueError(f"LabelFormat: foreground and background are both {self.foreground}")


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
            raise ValueError(f"target kind must be 'binary' or 'border', got {kind!r}")
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
        raise ValueError(f"{_where(name, image_path or label_path)}: the image has NaN or infinite pixels")
    if labels.dtype.kind not in "biu":
        raise ValueError(f"{where}: label image must hold integers, got dtype {labels.dtype}")
    if label_format.kind == "mask":
        unknown = np.setdiff1d(np.unique(labels), [label_format.background, label_format.foreground])
        if unknown.size:
            raise ValueError(
                f"{where}: mask has values {_few(unknown)} besides background {label_format.background} "
                f"and foreground {label_format.foreground}"
            )
        instances = binary_to_instances(labels, foreground_value=label_format.foreground, connectivity=1)
    else:
        if labels.size and labels.min() < 0:
            raise ValueError(f"{where}: instance labels must be >= 0, found {labels.min()}")
        instances = relabel_sequential(labels.astype(np.int64, copy=False))[0]
    return Sample(name, image, instances.astype(np.int32), image_path, label_path)


def _check_pair(image: np.ndarray, labels: np.ndarray, where: str) -> None:
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"{where}: image must be (H, W) or (H, W, C), got shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{where}: label shape {labels.shape} does not match image shape {image.shape}")


def _where(name: str, path: Path | None) -> str:
    return name if path is None else f"{path} ({name})" if path.stem != name else str(path)


def _few(values: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:k])
    return f"{{{shown}{', ...' if values.size > k else ''}}}"


# ============================================================================================
# Readers
# ============================================================================================
def load_dataset(
    path: PathLike,
    layout: Layout = "auto",
    *,
    label_format: LabelFormat | None = None,
    sequences: Sequence[str] | None = None,
    as_gray: bool = False,
    progress: bool = False,
) -> list[Sample]:
    """Read every annotated image of a data set folder.

    Parameters
    ----------
    path : str or os.PathLike
        The data set folder.
    layout : {"auto", "folders", "isbi", "ctc"}
        The layout (see the module docstring); ``"auto"`` uses :func:`detect_layout`.
    label_format : LabelFormat, optional
        How labels are stored; default ``ISBI_MEMBRANES`` for ``"isbi"``, else
        ``INSTANCE_LABELS``.
    sequences : sequence of str, optional
        CTC sequences to read (default all, e.g. ``("01", "02")``); only for ``"ctc"``.
    as_gray : bool
        Turn colour images into luminance (:func:`biounet.io.to_luminance`, float in [0, 1]).
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of Sample
        In a deterministic order (sorted by name within each folder or sequence).

    Raises
    ------
    ValueError
        If the layout is unknown or cannot be detected, or any file is bad (see the readers).
    """
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in ("folders", "isbi", "ctc"):
        raise ValueError(f"layout must be 'auto', 'folders', 'isbi' or 'ctc', got {layout!r}")
    if sequences is not None and layout != "ctc":
        raise ValueError(f"sequences only applies to the 'ctc' layout, not {layout!r}")
    if layout == "ctc":
        samples = load_ctc(
            path, sequences=sequences, label_format=label_format or INSTANCE_LABELS, as_gray=as_gray, progress=progress
        )
    else:
        reader = load_isbi if layout == "isbi" else load_folders
        default = ISBI_MEMBRANES if layout == "isbi" else INSTANCE_LABELS
        samples = reader(path, label_format=label_format or default, as_gray=as_gray, progress=progress)
    log.info("read %d annotated images (%s layout) from %s", len(samples), layout, path)
    return samples


def detect_layout(path: PathLike) -> Literal["folders", "isbi", "ctc"]:
    """Tell the layout of a data set folder from its structure.

    ``train-volume.tif``, or ``images/`` + ``labels/`` beside ``test-images/``, is ``"isbi"``;
    other ``images/`` + ``labels/`` folders are ``"folders"``; a ``NN_GT/SEG`` folder is
    ``"ctc"``.

    Raises
    ------
    ValueError
        If ``path`` is not a folder or matches none of the layouts.
    """
    root = _folder(path)
    paired = (root / "images").is_dir() and (root / "labels").is_dir()
    if (root / "train-volume.tif").is_file() or (paired and (root / "test-images").is_dir()):
        return "isbi"
    if paired:
        return "folders"
    if _ctc_sequences(root):
        return "ctc"
    raise ValueError(
        f"{root}: unknown data set layout; expected images/ + labels/, train-volume.tif + "
        "train-labels.tif, or Cell Tracking Challenge folders 01/ + 01_GT/SEG/"
    )


def load_folders(
    path: PathLike,
    *,
    label_format: LabelFormat = INSTANCE_LABELS,
    as_gray: bool = False,
    progress: bool = False,
) -> list[Sample]:
    """Read ``images/`` and ``labels/`` files paired by stem (layout ``"folders"``).

    Raises
    ------
    ValueError
        If a file has no partner, two files in one folder share a stem, the folders are
        empty, or a pair is bad (see :func:`make_sample`); the message names the file.
    """
    root = _folder(path)
    images, labels = _by_stem(root / "images"), _by_stem(root / "labels")
    for stem, file in (*images.items(), *labels.items()):
        if stem not in images or stem not in labels:
            other = "labels" if stem in images else "images"
            raise ValueError(f"{file}: no file with stem {stem!r} in {root / other}")
    if not images:
        raise ValueError(f"{root}: empty data set, no images in {root / 'images'}")
    pairs = [(stem, images[stem], labels[stem]) for stem in sorted(images)]
    return [
        read_sample(stem, image, label, label_format, as_gray)
        for stem, image, label in tqdm(pairs, desc="reading", disable=not progress)
    ]


def load_isbi(
    path: PathLike,
    *,
    label_format: LabelFormat = ISBI_MEMBRANES,
    as_gray: bool = False,
    progress: bool = False,
) -> list[Sample]:
    """Read the labelled ISBI 2012 slices (layout ``"isbi"``), named ``"00"``, ``"01"``, ...

    Reads ``train-volume.tif`` + ``train-labels.tif`` (multi-page TIFFs) if present, else
    ``images/`` + ``labels/`` as in :func:`load_folders`. Unlabelled test slices
    (``test-volume.tif``, ``test-images/``) are not read.

    Raises
    ------
    ValueError
        If the stacks differ in shape or a slice is bad (see :func:`make_sample`).
    """
    root = _folder(path)
    volume_path, labels_path = root / "train-volume.tif", root / "train-labels.tif"
    if not volume_path.is_file():
        return load_folders(root, label_format=label_format, as_gray=as_gray, progress=progress)
    if not labels_path.is_file():
        raise ValueError(f"{volume_path}: no {labels_path.name} beside it")
    volume, labels = read_image(volume_path), read_image(labels_path)
    volume, labels = (a[np.newaxis] if a.ndim == 2 else a for a in (volume, labels))
    if volume.ndim != 3 or volume.shape != labels.shape:
        raise ValueError(
            f"{labels_path}: stack shape {labels.shape} does not match {volume_path.name} shape {volume.shape}"
        )
    width = max(2, len(str(len(volume) - 1)))
    return [
        make_sample(
            volume[i], labels[i], name=f"{i:0{width}d}", label_format=label_format,
            image_path=volume_path, label_path=labels_path,
        )
        for i in tqdm(range(len(volume)), desc="reading", disable=not progress)
    ]


_CTC_IMAGE = re.compile(r"t(\d{3,4})\.tiff?")
_CTC_SEG = re.compile(r"man_seg(\d{3,4})\.tiff?")


def load_ctc(
    path: PathLike,
    *,
    sequences: Sequence[str] | None = None,
    label_format: LabelFormat = INSTANCE_LABELS,
    as_gray: bool = False,
    progress: bool = False,
) -> list[Sample]:
    """Read the frames of Cell Tracking Challenge sequences that have segmentation ground truth.

    ``<seq>/tTTT.tif`` (or ``tTTTT.tif``) is paired with ``<seq>_GT/SEG/man_segTTT.tif`` (or
    ``man_segTTTT.tif``) by frame number; samples are named ``"<seq>_tTTT"``. Frames without
    ground truth are skipped (CTC annotates only some frames).

    Raises
    ------
    ValueError
        If a sequence has no ``SEG`` folder, a ground-truth file has no frame or an
        unsupported name (``man_seg_TTT_ZZZ.tif`` slice annotations of 3D data), or a pair is
        bad (see :func:`make_sample`).
    """
    root = _folder(path)
    if sequences is None:
        sequences = _ctc_sequences(root)
    pairs = []
    for seq in sequences:
        seg = root / f"{seq}_GT" / "SEG"
        if not seg.is_dir():
            raise ValueError(f"{root}: sequence {seq!r} has no ground-truth folder {seg}")
        frames = {int(m[1]): f for f in image_files(root / seq) if (m := _CTC_IMAGE.fullmatch(f.name))}
        for gt in image_files(seg):
            match = _CTC_SEG.fullmatch(gt.name)
            if match is None:
                raise ValueError(f"{gt}: not a 2D CTC ground-truth name (man_segTTT.tif or man_segTTTT.tif)")
            frame = int(match[1])
            if frame not in frames:
                raise ValueError(f"{gt}: no image t{match[1]}.tif for frame {frame} in {root / seq}")
            pairs.append((f"{seq}_t{frame:03d}", frames[frame], gt))
    if not pairs:
        raise ValueError(f"{root}: empty data set, no CTC segmentation ground truth found")
    return [
        read_sample(name, image, label, label_format, as_gray)
        for name, image, label in tqdm(pairs, desc="reading", disable=not progress)
    ]


def read_manifest(path: PathLike) -> dict[str, str]:
    """``{id: category}`` from a data set's ``manifest.csv`` (columns ``id`` and ``category``).

    Raises
    ------
    ValueError
        If the file cannot be read or lacks one of the columns; the message names the file.
    """
    import csv

    try:
        with Path(path).open(newline="") as handle:
            return {row["id"]: row["category"] for row in csv.DictReader(handle)}
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the id and category columns: {exc}") from exc


def read_sample(
    name: str, image_path: Path, label_path: Path, label_format: LabelFormat = INSTANCE_LABELS, as_gray: bool = False
) -> Sample:
    """One annotated image from its two files (``as_gray``: colour images as luminance)."""
    image = read_image(image_path)
    if as_gray and image.ndim == 3:
        image = to_luminance(image, image_path)
    labels = read_image(label_path)
    return make_sample(
        image, labels, name=name, label_format=label_format, image_path=image_path, label_path=label_path
    )


def _folder(path: PathLike) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: a file, not a data set folder" if root.exists() else f"{root}: data set folder does not exist")
    return root


def _by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder does not exist")
    found: dict[str, Path] = {}
    for file in image_files(folder):
        if file.stem in found:
            raise ValueError(f"{file}: {found[file.stem].name} has the same stem {file.stem!r}")
        found[file.stem] = file
    return found


def _ctc_sequences(root: Path) -> list[str]:
    """Names of the sequences ``NN`` of ``root`` that have a ``NN_GT/SEG`` folder."""
    return sorted(
        d.name for d in root.iterdir() if re.fullmatch(r"\d\d", d.name) and (root / f"{d.name}_GT" / "SEG").is_dir()
    )


# ============================================================================================
# Random training tiles for the valid-padding U-Net
# ============================================================================================
class Tile(NamedTuple):
    """One training example (a namedtuple, so the default ``DataLoader`` collation works).

    Attributes
    ----------
    image : Tensor
        ``(C, in_h, in_w)`` float32 input tile, mirrored beyond the image border.
    target : Tensor
        ``(out_h, out_w)`` uint8 class target, 0 outside the image (``(in_h, in_w)`` with
        ``targets="input"``).
    weight : Tensor
        float32 loss weight of the same shape, 0 outside the image.
    """

    image: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def extract_tile(
    image: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    corner: tuple[int, int],
    output_size: tuple[int, int],
    halo: tuple[int, int],
    targets: TargetWindow = "output",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one training tile: an output window and its input window with context.

    Parameters
    ----------
    image : ndarray
        ``(C, H, W)`` image.
    target, weight : ndarray
        ``(H, W)`` class target and loss weights.
    corner : (int, int)
        Top-left pixel ``(y0, x0)`` of the output window; it may lie outside the image.
    output_size : (int, int)
        ``(out_h, out_w)``.
    halo : (int, int)
        Context per side, ``(in - out) / 2`` per axis.
    targets : {"output", "input"}
        Cut target and weight over the output window, or over the whole input window (for
        augmentations that warp labels with the image before the centre is cropped).

    Returns
    -------
    image_tile : ndarray
        ``(C, out_h + 2 halo_y, out_w + 2 halo_x)``, mirrored beyond the image border by
        the predictor's rule (:func:`biounet.tiling.mirror_indices`, ``np.pad`` "reflect").
    target_tile, weight_tile : ndarray
        ``(out_h, out_w)`` (or the input size); pixels outside the image have target 0 and
        weight 0, they are never mirrored.

    Raises
    ------
    ValueError
        If the shapes do not fit together, a size is not positive, a halo is negative or
        the output window does not overlap the image.
    """
    (y0, x0), (oh, ow), (hy, hx) = corner, output_size, halo
    if image.ndim != 3 or target.shape != image.shape[1:] or weight.shape != image.shape[1:]:
        raise ValueError(
            f"extract_tile: need image (C, H, W) and target, weight (H, W); got {image.shape}, "
            f"{target.shape}, {weight.shape}"
        )
    _, height, width = image.shape
    if min(oh, ow) < 1 or min(hy, hx) < 0:
        raise ValueError(f"extract_tile: output_size {output_size} must be positive and halo {halo} >= 0")
    if targets not in ("output", "input"):
        raise ValueError(f"extract_tile: targets must be 'output' or 'input', got {targets!r}")
    if not (1 - oh <= y0 < height and 1 - ow <= x0 < width):
        raise ValueError(
            f"extract_tile: output window at {corner} of size {output_size} misses the {height}x{width} image"
        )
    rows = _mirrored_range(y0 - hy, y0 + oh + hy, height)
    cols = _mirrored_range(x0 - hx, x0 + ow + hx, width)
    image_tile = image[:, rows[:, None], cols[None, :]]
    if targets == "input":
        (y0, x0), (oh, ow) = (y0 - hy, x0 - hx), (oh + 2 * hy, ow + 2 * hx)
    target_tile = np.zeros((oh, ow), dtype=target.dtype)
    weight_tile = np.zeros((oh, ow), dtype=weight.dtype)
    inside_y = slice(max(y0, 0), min(y0 + oh, height))
    inside_x = slice(max(x0, 0), min(x0 + ow, width))
    into = (slice(inside_y.start - y0, inside_y.stop - y0), slice(inside_x.start - x0, inside_x.stop - x0))
    target_tile[into] = target[inside_y, inside_x]
    weight_tile[into] = weight[inside_y, inside_x]
    return image_tile, target_tile, weight_tile


def _mirrored_range(start: int, stop: int, size: int) -> np.ndarray:
    """Source pixels of positions ``start..stop-1`` of an axis of ``size`` pixels, mirrored outside."""
    before, after = max(0, -start), max(0, stop - size)
    return mirror_indices(size, before, after)[start + before : stop + before]


class TileDataset(torch.utils.data.Dataset[Tile]):
    """Random training tiles for a U-Net with ``input = output + 2 * halo`` (paper, sec. 3).

    Each item picks a sample and an output window uniformly among all windows that overlap
    the image (``y0`` in ``-(out_h - 1) .. H - 1``), so every labelled pixel, the image
    border included, lies in a window equally often. The input window around it is
    mirrored beyond the border as the predictor does; target and weight pixels outside the
    image are 0, so they do not count in the loss.

    Item ``i`` of epoch ``e`` is drawn from ``np.random.default_rng([seed, e, i])``: a run is
    reproducible for any number of ``DataLoader`` workers and any sampler.

    Parameters
    ----------
    samples : sequence of Sample
        The training data, all with the same number of channels.
    input_size, output_size : int or (int, int)
        Network input and output sizes, e.g. 572 and 388 for the paper's net
        (``model.input_size_for(out)``); equal for ``padding="same"``.
    targets : {"output", "input"}
        Target and weight tiles of the output size, or of the input size (zero outside the
        image) so that an augmentation can warp them with the image and crop the centre;
        the output window is drawn as above either way.
    kind : {"binary", "border"}
        The class target (:meth:`Sample.class_target`): background and cell, or background,
        cell interior and cell border.
    length : int
        Items per epoch.
    seed : int
        Seed of the draws (>= 0).
    pick : {"images", "pixels"}
        Choose samples with equal probability, or in proportion to their number of windows
        (every pixel of the data set equally likely).
    normalization : (float, float) or None
        Percentiles mapped to 0 and 1 per image and channel by
        :func:`biounet.io.normalize_percentile` (as the predictor does), or None for raw
        values as float32.
    weight_fn : callable
        ``weight_fn(labels) -> (H, W)`` loss weights, computed once per sample. Default: the
        paper's eq. 2, :func:`biounet.weights.weight_map` with ``w0=10, sigma=5`` and
        per-image balanced class weights; use :func:`functools.partial` for other settings.
    progress : bool
        Show a progress bar while the weight maps are computed.

    Examples
    --------
    >>> data = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2))]
    >>> tiles = TileDataset(data, input_size=572, output_size=388, length=8)
    >>> [tuple(t.shape) for t in tiles[0]]
    [(1, 572, 572), (388, 388), (388, 388)]
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        input_size: int | tuple[int, int],
        output_size: int | tuple[int, int],
        *,
        targets: TargetWindow = "output",
        kind: TargetKind = "binary",
        length: int = 1000,
        seed: int = 0,
        pick: Pick = "images",
        normalization: tuple[float, float] | None = (1.0, 99.8),
        weight_fn: Callable[[np.ndarray], np.ndarray] = weight_map,
        progress: bool = False,
    ) -> None:
        inp, out = _pair(input_size, "input_size"), _pair(output_size, "output_size")
        if any(i < o or (i - o) % 2 for i, o in zip(inp, out)):
            raise ValueError(f"input_size {inp} must be output_size {out} plus an even number of pixels per axis")
        if not samples:
            raise ValueError("samples is empty")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if pick not in ("images", "pixels"):
            raise ValueError(f"pick must be 'images' or 'pixels', got {pick!r}")
        if targets not in ("output", "input"):
            raise ValueError(f"targets must be 'output' or 'input', got {targets!r}")
        channels = {s.image.shape[2:] for s in samples}
        if len(channels) > 1:
            raise ValueError(f"samples differ in channels {sorted(channels)}; load them with as_gray=True")
        self.output_size, self.halo = out, ((inp[0] - out[0]) // 2, (inp[1] - out[1]) // 2)
        self.targets, self.length, self.seed, self.epoch = targets, length, seed, 0
        self._images = [_channels_first(s.image, normalization) for s in samples]
        self._targets = [s.class_target(kind) for s in samples]
        self._weights = [
            np.asarray(weight_fn(s.separated), dtype=np.float32)
            for s in tqdm(samples, desc="weight maps", disable=not progress)
        ]
        windows = np.array([(t.shape[0] + out[0] - 1) * (t.shape[1] + out[1] - 1) for t in self._targets], float)
        self._p = windows / windows.sum() if pick == "pixels" else np.full(len(samples), 1 / len(samples))

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of tiles from now on (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Tile:
        if not 0 <= index < self.length:
            raise IndexError(f"TileDataset index {index} out of range 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self._images), p=self._p))
        height, width = self._targets[k].shape
        corner = (int(rng.integers(1 - self.output_size[0], height)), int(rng.integers(1 - self.output_size[1], width)))
        image, target, weight = extract_tile(
            self._images[k], self._targets[k], self._weights[k], corner, self.output_size, self.halo, self.targets
        )
        target = torch.from_numpy(target.astype(np.uint8, copy=False))  # classes: 8x less to copy, no range check
        return Tile(torch.from_numpy(image), target, torch.from_numpy(weight))


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def _channels_first(image: np.ndarray, normalization: tuple[float, float] | None) -> np.ndarray:
    """``(C, H, W)`` float32 copy of an ``(H, W)`` or ``(H, W, C)`` image, optionally normalised."""
    image = image[np.newaxis] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    if normalization is None:
        return np.ascontiguousarray(image, dtype=np.float32)
    return normalize_percentile(image, *normalization, axis=(1, 2))


# ============================================================================================
# Synthetic touching cells
# ============================================================================================
def synthetic_cells(
    n: int,
    shape: tuple[int, int] = (256, 256),
    seed: int = 0,
    style: Style = "fluorescence",
    *,
    radius: tuple[float, float] = (7.0, 13.0),
    clump_size: tuple[int, int] = (1, 12),
    gaps: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images of clumps of touching, irregular cells with their instance labels.

    Cells grow in clumps: each new cell is placed beside a random cell of its clump at 70-90%
    of the sum of their radii, so neighbours overlap and are cut apart by a multiplicatively
    weighted Voronoi (Apollonius) diagram whose cell outlines carry random harmonics
    ``r(theta) = r (1 + sum_k a_k cos(k theta + phi_k))``, k = 2..4, and a smooth wobble. Each
    pair of touching cells is then pulled apart by 0, 1 or 2 px of background (probabilities
    ``gaps``), so many cells touch with no visible gap at all.

    ``"fluorescence"``: bright textured cells dimming towards their outlines (so touching
    cells show only a faint dip between them) on a dark background. ``"phase"``: phase
    contrast, ``I = b - alpha (phi - G_s * phi) - beta phi`` for the optical thickness ``phi``
    (a high-pass of the phase, as the phase ring makes it): darker cells with bright halos
    around them and brighter seams where they touch, on mid-grey. Both are multiplied by a
    smooth uneven illumination, blurred by a Gaussian PSF and turned into camera counts with
    Poisson shot noise, Gaussian read noise and an offset of 100. The labels do not depend on
    ``style``: both styles of one seed show the same cells.

    Parameters
    ----------
    n : int
        Number of images. Image ``i`` depends only on ``seed`` and ``i``, not on ``n``.
    shape : (int, int)
        Image height and width (at least 16 x 16).
    seed : int
        Seed; the output is the same for the same arguments on any machine.
    style : {"fluorescence", "phase"}
        Imaging modality.
    radius : (float, float)
        Range of the cells' mean radii in pixels.
    clump_size : (int, int)
        Range of the number of cells per clump.
    gaps : (float, float, float)
        Probabilities of a 0, 1 and 2 px background gap between two touching cells.

    Returns
    -------
    list of (image, labels)
        ``image``: ``(H, W)`` uint16 camera counts (normalise before training, e.g. with
        :func:`biounet.io.normalize_percentile`); ``labels``: ``(H, W)`` uint16 instance
        labels, 0 = background, cells numbered 1..N in raster order.
    """
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shape = _pair(shape, "shape")
    if min(shape) < 16:
        raise ValueError(f"shape must be at least (16, 16), got {shape}")
    if style not in ("fluorescence", "phase"):
        raise ValueError(f"style must be 'fluorescence' or 'phase', got {style!r}")
    if not 0 < radius[0] <= radius[1]:
        raise ValueError(f"radius must be a range 0 < low <= high, got {radius}")
    if not 1 <= clump_size[0] <= clump_size[1]:
        raise ValueError(f"clump_size must be a range 1 <= low <= high, got {clump_size}")
    if len(gaps) != 3 or min(gaps) < 0 or not math.isclose(sum(gaps), 1.0):
        raise ValueError(f"gaps must be three probabilities that sum to 1, got {gaps}")
    out = []
    for child in np.random.SeedSequence(seed).spawn(n):
        rng = np.random.default_rng(child)
        labels = _cell_labels(rng, shape, radius, clump_size, gaps)
        render = _fluorescence if style == "fluorescence" else _phase_contrast
        out.append((render(rng, labels), labels))
    return out


def _cell_labels(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radius: tuple[float, float],
    clump_size: tuple[int, int],
    gaps: tuple[float, float, float],
) -> np.ndarray:
    """Instance labels (uint16, 1..N) of clumps of touching cells."""
    mean_size = (clump_size[0] + clump_size[1]) / 2
    n_clumps = max(1, round(0.3 * shape[0] * shape[1] / (mean_size * math.pi * np.mean(radius) ** 2)))
    centres, radii = _grow_clumps(rng, shape, radius, clump_size, n_clumps)
    labels = _apollonius_cells(rng, shape, centres, radii)
    labels = _open_gaps(rng, labels, gaps)
    return _one_piece_each(labels, min_area=round(0.5 * math.pi * radius[0] ** 2))


def _grow_clumps(
    rng: np.random.Generator, shape: tuple[int, int], radius: tuple[float, float], clump_size: tuple[int, int],
    n_clumps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres and radii: each clump grows by attaching cells to random members."""
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_clumps):
        members = [len(centres)]
        centres.append(rng.uniform((0, 0), shape))
        radii.append(rng.uniform(*radius))
        for _ in range(int(rng.integers(clump_size[0], clump_size[1] + 1)) - 1):
            for _attempt in range(20):
                parent = members[int(rng.integers(len(members)))]
                r, angle = rng.uniform(*radius), rng.uniform(0, 2 * np.pi)
                centre = centres[parent] + (radii[parent] + r) * rng.uniform(0.7, 0.9) * np.array(
                    [np.sin(angle), np.cos(angle)]
                )
                distance = np.hypot(*(np.array(centres) - centre).T)
                if np.all(distance >= 0.65 * (np.array(radii) + r)):
                    members.append(len(centres))
                    centres.append(centre)
                    radii.append(r)
                    break
    return np.array(centres), np.array(radii)


def _apollonius_cells(
    rng: np.random.Generator, shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Label each pixel with the cell of smallest normalised distance ``|x - c| / r(theta)`` if < 1."""
    best = np.ones(shape)
    labels = np.zeros(shape, dtype=np.int32)
    wobble = 0.06 * _smooth_noise(rng, shape, scale=6.0)
    for index, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        amplitudes, phases = rng.uniform(-0.12, 0.12, 3) / np.arange(1, 4), rng.uniform(0, 2 * np.pi, 3)
        reach = 1.5 * r
        y0, y1 = max(0, int(cy - reach)), min(shape[0], int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(shape[1], int(cx + reach) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.arange(y0, y1)[:, None] - cy, np.arange(x0, x1)[None, :] - cx
        theta = np.arctan2(dy, dx)
        outline = r * (1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amplitudes, phases)))
        distance = np.hypot(dy, dx) / outline + wobble[y0:y1, x0:x1]
        window = (slice(y0, y1), slice(x0, x1))
        closer = distance < best[window]
        best[window][closer] = distance[closer]
        labels[window][closer] = index
    return labels


def _open_gaps(rng: np.random.Generator, labels: np.ndarray, gaps: tuple[float, float, float]) -> np.ndarray:
    """Open a 0, 1 or 2 px background gap between each pair of touching cells.

    For a 1 px gap the cell with the smaller label gives up its contact pixels, for 2 px both.
    """
    n = int(labels.max())
    gap = np.triu(rng.choice(3, size=(n + 1, n + 1), p=gaps), 1)
    gap += gap.T
    remove = np.zeros(labels.shape, dtype=bool)
    for here, there, where in _neighbour_views(labels, remove):
        contact = (here > 0) & (there > 0) & (here != there)
        g = gap[here, there]
        where |= contact & ((g == 2) | ((g == 1) & (here < there)))
    return np.where(remove, 0, labels)


def _neighbour_views(labels: np.ndarray, out: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(a, b, o)`` view triples over all 4-neighbour pairs, in both directions."""
    yield labels[1:], labels[:-1], out[1:]
    yield labels[:-1], labels[1:], out[:-1]
    yield labels[:, 1:], labels[:, :-1], out[:, 1:]
    yield labels[:, :-1], labels[:, 1:], out[:, :-1]


def _one_piece_each(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Keep each cell's largest 4-connected piece if it has ``min_area`` px; relabel 1..N."""
    pieces = label_components(labels, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    owner = np.zeros(sizes.size, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    largest = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    by_size = np.argsort(sizes, kind="stable")
    largest[owner[by_size]] = by_size  # the last (largest) piece of each owner wins
    keep = np.zeros(sizes.size, dtype=bool)
    keep[largest] = True
    keep &= sizes >= min_area
    keep[0] = False
    return relabel_sequential(np.where(keep[pieces], pieces, 0))[0].astype(np.uint16)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth Gaussian random field of unit variance, correlation length about ``scale`` px.

    White noise on a coarse grid of spacing ``scale`` px, interpolated by cubic B-splines
    (four knots per pixel and axis, separably), each pixel's weights scaled to unit norm.
    """
    (rows, row_w), (cols, col_w) = (_bspline_weights(n, scale) for n in shape)
    coarse = rng.standard_normal((rows[-1] + 4, cols[-1] + 4))
    along_y = sum(row_w[:, k, None] * coarse[rows + k] for k in range(4))
    return sum(col_w[None, :, k] * along_y[:, cols + k] for k in range(4))


def _bspline_weights(n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First knot (n,) and the four cubic B-spline weights (n, 4) of pixels 0..n-1, rows of unit norm."""
    t = np.arange(n) / scale
    first = np.floor(t).astype(np.intp)
    f = (t - first)[:, None]
    weights = np.hstack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3]) / 6
    return first, weights / np.linalg.norm(weights, axis=1, keepdims=True)


def _cell_content(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Per-pixel cell content: a random level per cell, texture, dimming towards the outlines.

    Outlines include the contacts between cells, so touching cells are separated by a dip.
    """
    level = np.concatenate([[0.0], rng.uniform(0.5, 1.0, int(labels.max()))])
    outlines = np.zeros(labels.shape, dtype=bool)
    for here, there, where in _neighbour_views(labels, outlines):
        where |= (here > 0) & (here != there)
    depth = ndi.distance_transform_edt(~outlines & (labels > 0))
    texture = 1 + 0.15 * _smooth_noise(rng, labels.shape, scale=3.0)
    return level[labels] * texture * (1 - 0.45 * np.exp(-depth / 2.5))


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uneven illumination: a smooth field between about 0.6 and 1.4 of the mean."""
    return np.exp(0.15 * _smooth_noise(rng, shape, scale=max(shape) / 2))


def _camera(rng: np.random.Generator, intensity: np.ndarray, photons: float, blur: float) -> np.ndarray:
    """Blur, Poisson shot noise for ``photons`` per unit intensity, read noise, offset: uint16."""
    expected = photons * np.clip(ndi.gaussian_filter(intensity, blur), 0, None)
    counts = rng.poisson(expected) + rng.normal(100.0, 3.0, intensity.shape)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _fluorescence(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    intensity = (0.04 + _cell_content(rng, labels)) * _illumination(rng, labels.shape)
    return _camera(rng, intensity, photons=rng.uniform(150, 600), blur=rng.uniform(0.8, 1.5))


def _phase_contrast(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    thickness = _cell_content(rng, labels)
    halo = thickness - ndi.gaussian_filter(thickness, rng.uniform(3.0, 5.0))
    intensity = (0.5 - 0.4 * halo - 0.1 * thickness) * _illumination(rng, labels.shape)
    return _camera(rng, intensity, photons=rng.uniform(1500, 4000), blur=rng.uniform(0.7, 1.1))
