"""Segment image files: read, predict tile by tile, write probabilities, labels and overlays.

This is what ``biounet predict`` runs. Each input is processed on its own: a file that
fails (unreadable, wrong channel count, NaN pixels ...) is reported with one line naming it
and the problem, and the other inputs are still segmented. Outputs are written atomically.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biounet.io import label_overlay, read_image_axes, write_png, write_tiff
from biounet.model import UNet, load_model
from biounet.tiling import Precision, predict

log = logging.getLogger(__name__)

#: Axis letters tifffile uses for channels.
CHANNEL_LETTERS = "CS"


@dataclass
class PredictReport:
    """What :func:`predict_files` did: written files per input, failures, seconds."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def channel_axis_of(axes: str, shape: tuple[int, ...], model: UNet, channel_axis: int | None) -> int | None:
    """The axis that holds channels: ``channel_axis`` if given, else the file's ``C``/``S`` axis.

    Raises a :class:`ValueError` if the channel count does not match the model.
    """
    if channel_axis is None:
        found = [i for i, a in enumerate(axes) if a in CHANNEL_LETTERS]
        channel_axis = found[0] if found else None
    elif not -len(shape) <= channel_axis < len(shape):
        raise ValueError(f"channel axis {channel_axis} is out of range for shape {shape}")
    n_channels = 1 if channel_axis is None else shape[channel_axis]
    expected = model.config.in_channels
    if n_channels != expected:
        raise ValueError(f"has {n_channels} channel(s) (axes {axes}, shape {shape}) but the model takes {expected}")
    return channel_axis


def labels_from_probabilities(prob: np.ndarray) -> np.ndarray:
    """Instance labels (2 classes) or the arg-max class map (more classes) of (C, *spatial) probabilities."""
    if prob.shape[0] == 2:
        from biounet.postprocess import probabilities_to_labels

        return probabilities_to_labels(prob[1])
    return np.argmax(prob, axis=0).astype(np.uint16)


def predict_files(
    model: UNet | str | Path,
    inputs: Sequence[Path],
    output: Path,
    *,
    save: Sequence[str] = ("probabilities", "labels"),
    tile: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    precision: Precision = "float32",
    tta: bool = False,
    channel_axis: int | None = None,
    progress: bool = True,
    debug: bool = False,
) -> PredictReport:
    """Segment each file in ``inputs`` and write ``<stem>_probabilities.tif`` etc. to ``output``.

    Parameters
    ----------
    model : UNet or path or name
        A loaded model, a model folder, or a shipped model's name.
    inputs : sequence of Path
        Image files (TIFF, PNG, JPEG, ``.npy``). Stacks are segmented slice by slice.
    output : Path
        Output folder, created if missing; must be writable (checked before any work).
    save : sequence of {"probabilities", "labels", "overlay"}
        ``probabilities``: float32 TIFF, classes on the axis before Y, X. ``labels``: uint16
        TIFF of instances (2-class models) or classes. ``overlay``: PNG of the labels over
        the image (2D inputs).
    tile, batch_size, device, precision, tta, channel_axis, progress
        See :func:`biounet.predict`.
    debug : bool
        Log the traceback of each failure.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if not isinstance(model, UNet):
        model = load_model(model, device=device)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".biounet-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{output}: output folder cannot be written: {exc.strerror or exc}") from exc

    report = PredictReport()
    for path in tqdm(inputs, desc="images", unit="image", disable=not progress or len(inputs) < 2):
        path = Path(path)
        try:
            report.written[str(path)] = _predict_one(
                model, path, output, save=save, tile=tile, batch_size=batch_size, device=device,
                precision=precision, tta=tta, channel_axis=channel_axis, progress=progress,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            report.failed[str(path)] = message
            log.error("error: %s", message)
            if debug:
                log.error("%s", traceback.format_exc())
    report.seconds = time.perf_counter() - started
    log.info(
        "segmented %d of %d image(s) in %.1f s -> %s", len(report.written), len(inputs), report.seconds, output
    )
    if report.failed:
        log.error("failed (%d): %s", len(report.failed), ", ".join(report.failed))
    return report


def _predict_one(
    model: UNet, path: Path, output: Path, *, save: Sequence[str], channel_axis: int | None, **kwargs
) -> list[Path]:
    image, axes = read_image_axes(path)
    channel_axis = channel_axis_of(axes, image.shape, model, channel_axis)
    spatial_dims = model.config.dims
    if channel_axis is None:
        image = np.expand_dims(image, -1 - spatial_dims)  # a channel axis of length 1
    else:
        image = np.moveaxis(image, channel_axis, -1 - spatial_dims)
    stack_shape = image.shape[: -1 - spatial_dims]
    flat = image.reshape(-1, *image.shape[-1 - spatial_dims :])
    if not stack_shape:
        flat = flat[0]
    prob = predict(model, flat, channel_axis=0 if not stack_shape else 1, **kwargs)
    prob = prob.reshape(*stack_shape, *prob.shape[-1 - spatial_dims :])
    written = []
    stem = path.stem
    if "probabilities" in save:
        plane_axes = "CYX" if spatial_dims == 2 else "CZYX"
        prob_axes = ("Z" if len(stack_shape) == 1 else "Q" * len(stack_shape)) + plane_axes
        written.append(write_tiff(output / f"{stem}_probabilities.tif", prob, axes=prob_axes))
    if "labels" in save or "overlay" in save:
        planes = prob.reshape(-1, *prob.shape[-1 - spatial_dims :])
        labels = np.stack([labels_from_probabilities(p) for p in planes])
        labels = labels.reshape(*stack_shape, *prob.shape[-spatial_dims:])
        if "labels" in save:
            written.append(write_tiff(output / f"{stem}_labels.tif", labels))
        if "overlay" in save:
            if stack_shape or spatial_dims != 2:
                log.warning("%s: overlay skipped (only for 2D images)", path)
            else:
                written.append(write_png(output / f"{stem}_overlay.png", label_overlay(image.mean(axis=0), labels)))
    log.info("%s -> %s", path, ", ".join(p.name for p in written))
    return written
