"""Readers of annotated data sets on disk: image/label folders, ISBI 2012 and the Cell Tracking Challenge."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from biounet.data._samples import (
    INSTANCE_LABELS,
    ISBI_MEMBRANES,
    LabelFormat,
    PathLike,
    Sample,
    make_sample,
)
from biounet.errors import InputError
from biounet.io._images import image_files, read_image, to_luminance

log = logging.getLogger(__name__)


Layout = Literal["auto", "folders", "isbi", "ctc"]


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
        raise InputError(f"layout must be 'auto', 'folders', 'isbi' or 'ctc', got {layout!r}")
    if sequences is not None and layout != "ctc":
        raise InputError(f"sequences only applies to the 'ctc' layout, not {layout!r}")
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
    raise InputError(
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
            raise InputError(f"{file}: no file with stem {stem!r} in {root / other}")
    if not images:
        raise InputError(f"{root}: empty data set, no images in {root / 'images'}")
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
        raise InputError(f"{volume_path}: no {labels_path.name} beside it")
    volume, labels = read_image(volume_path), read_image(labels_path)
    volume, labels = (a[np.newaxis] if a.ndim == 2 else a for a in (volume, labels))
    if volume.ndim != 3 or volume.shape != labels.shape:
        raise InputError(
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
            raise InputError(f"{root}: sequence {seq!r} has no ground-truth folder {seg}")
        frames = {int(m[1]): f for f in image_files(root / seq) if (m := _CTC_IMAGE.fullmatch(f.name))}
        for gt in image_files(seg):
            match = _CTC_SEG.fullmatch(gt.name)
            if match is None:
                raise InputError(f"{gt}: not a 2D CTC ground-truth name (man_segTTT.tif or man_segTTTT.tif)")
            frame = int(match[1])
            if frame not in frames:
                raise InputError(f"{gt}: no image t{match[1]}.tif for frame {frame} in {root / seq}")
            pairs.append((f"{seq}_t{frame:03d}", frames[frame], gt))
    if not pairs:
        raise InputError(f"{root}: empty data set, no CTC segmentation ground truth found")
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
        raise InputError(f"{path}: cannot read the id and category columns: {exc}") from exc


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
        raise InputError(f"{root}: a file, not a data set folder" if root.exists() else f"{root}: data set folder does not exist")
    return root


def _by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    found: dict[str, Path] = {}
    for file in image_files(folder):
        if file.stem in found:
            raise InputError(f"{file}: {found[file.stem].name} has the same stem {file.stem!r}")
        found[file.stem] = file
    return found


def _ctc_sequences(root: Path) -> list[str]:
    """Names of the sequences ``NN`` of ``root`` that have a ``NN_GT/SEG`` folder."""
    return sorted(
        d.name for d in root.iterdir() if re.fullmatch(r"\d\d", d.name) and (root / f"{d.name}_GT" / "SEG").is_dir()
    )
