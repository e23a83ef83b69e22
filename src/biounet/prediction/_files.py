"""Predicting image files: reading, choosing outputs, writing probabilities, labels and overlays."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import InputError
from biounet.io._display import label_overlay
from biounet.io._files import ensure_writable_folder
from biounet.io._images import read_image_axes, write_png, write_tiff
from biounet.io._zarr import is_zarr
from biounet.model import UNet, load_model
from biounet.postprocess import labels_from_probabilities
from biounet.prediction._input import converts_to_luminance
from biounet.prediction._options import PredictOptions
from biounet.prediction._stitch import predict

log = logging.getLogger(__name__)


#: Axis letters tifffile uses for channels.
CHANNEL_LETTERS = "CS"


#: TIFF inputs with more pixels than this are streamed (2**26: 8192 x 8192); the in-memory
#: path needs about 26 bytes per pixel for a 2-class model (docs/benchmarks.md).
STREAM_ABOVE_PIXELS = 2**26


@dataclass
class PredictReport:
    """What :func:`predict_files` did: written files per input, failures, seconds."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def channel_axis_of(axes: str, shape: tuple[int, ...], model: UNet, channel_axis: int | None) -> int | None:
    """The axis that holds channels: ``channel_axis`` if given, else the file's ``C``/``S`` axis.

    Raises a :class:`ValueError` if the channel count does not match the model, unless the
    model converts RGB images to luminance (``model.info.color``) and the image is RGB.
    """
    if channel_axis is None:
        found = [i for i, a in enumerate(axes) if a in CHANNEL_LETTERS]
        channel_axis = found[0] if found else None
    elif not -len(shape) <= channel_axis < len(shape):
        raise InputError(f"channel axis {channel_axis} is out of range for shape {shape}")
    n_channels = 1 if channel_axis is None else shape[channel_axis]
    expected = model.config.in_channels
    if n_channels != expected and not converts_to_luminance(model, n_channels):
        if model.info.color == "luminance":
            how = "; it converts 3-channel (RGB) images to luminance, and no other channel count"
        else:
            how = " (it was trained without colour conversion: its config.json has no \"color\": \"luminance\")"
        raise InputError(f"has {n_channels} channel(s) (axes {axes}, shape {shape}) but the model takes {expected}{how}")
    return channel_axis


def model_items_of(
    image: np.ndarray, axes: str, model: UNet, channel_axis: int | None
) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Arrange a file's pixels as (items, channels, *spatial) for ``model``.

    Returns the items, the shape of the stack axes (empty for a single image) and their
    letters. Works on numpy and dask arrays alike (a dask array stays lazy). An RGB image
    for a model that takes the luminance (``model.info.color``) is converted here.
    """
    channel_axis = channel_axis_of(axes, image.shape, model, channel_axis)
    if channel_axis is not None and converts_to_luminance(model, image.shape[channel_axis]):
        from biounet.io._images import to_luminance

        image = to_luminance(image, "image", axis=channel_axis)
        axes = axes[: channel_axis % len(axes)] + axes[channel_axis % len(axes) + 1 :]
        channel_axis = None
    spatial_dims = model.config.dims
    if channel_axis is None:
        image = np.expand_dims(image, -1 - spatial_dims)  # a channel axis of length 1
    else:
        image = np.moveaxis(image, channel_axis, -1 - spatial_dims)
        axes = axes[: channel_axis % len(axes)] + axes[channel_axis % len(axes) + 1 :]
    stack_shape = tuple(image.shape[: -1 - spatial_dims])
    items = image.reshape(-1, *image.shape[-1 - spatial_dims :])
    return items, stack_shape, axes[: len(stack_shape)]


def predict_files(
    model: UNet | str | Path,
    inputs: Sequence[Path],
    output: Path,
    *,
    options: PredictOptions | None = None,
    save: Sequence[str] = ("probabilities", "labels"),
    channel_axis: int | None = None,
    chunk: int | None = None,
    scheduler: str | None = None,
    debug: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> PredictReport:
    """Segment each file in ``inputs`` and write ``<stem>_probabilities.tif`` etc. to ``output``.

    Parameters
    ----------
    model : UNet or path or name
        A loaded model, a model folder, or a shipped model's name.
    inputs : sequence of Path
        Image files (TIFF, PNG, JPEG, ``.npy``), Zarr arrays and OME-Zarr images (the first
        multiscale level). Stacks are segmented slice by slice.
    output : Path
        Output folder, created if missing; must be writable (checked before any work).
    save : sequence of {"probabilities", "labels", "overlay"}
        ``probabilities``: float32 TIFF, classes on the axis before Y, X. ``labels``: uint16
        TIFF (uint32 past 65,535 objects) of instances (2-class and border models, by the
        model's post-processing) or classes. ``overlay``: PNG of the labels over
        the image (2D inputs). Streamed inputs give ``<stem>_probabilities.ome.zarr`` and
        ``<stem>_labels.ome.zarr`` (see :func:`biounet.prediction.predict_to_zarr`)
        and no overlay.
    options : PredictOptions, optional
        How to predict (see :class:`biounet.PredictOptions`; ``**overrides`` change single
        fields). ``tta`` is not available for streamed inputs. ``precision="auto"`` (the
        CLI's default) is bfloat16 where the device computes it natively
        (:func:`biounet.device.resolve_precision`), else float32; the device defaults to the
        CPU for a model given by path or name.
    channel_axis : int, optional
        See :func:`biounet.predict`.
    chunk : int, optional
        Stream every input with output chunks of this many pixels per axis.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (e.g. ``tcp://10.0.0.5:8786``): stream
        every input on that cluster. Its workers must see the input and output paths.
    debug : bool
        Log the traceback of each failure.
    overwrite : bool
        Replace output files that exist already. Without it an existing file under an
        output name (an earlier result, or ground truth such as ``x_labels.tif`` beside
        ``x.tif``) is refused before any work. Never overwritten, whatever ``overwrite``
        says: an input of the call, or the output of another input of the same call (two
        inputs ``a/x.tif`` and ``b/x.tif`` would both write ``x_labels.tif``); see
        :func:`plan_outputs`.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    options = PredictOptions.of(options, overrides)
    if not isinstance(model, UNet):
        model = load_model(model, device=options.device or "cpu")
    if options.precision == "auto":  # bfloat16 where native: the same segmentation, about 2x faster on such CPUs
        from biounet.device import resolve_precision

        options = options.replace(precision=resolve_precision(options.device or next(model.parameters()).device))
    output = ensure_writable_folder(output)
    plan_outputs(inputs, output, save, stream=chunk is not None or scheduler is not None, overwrite=overwrite)

    report = PredictReport()
    with contextlib.ExitStack() as stack:
        if scheduler:
            stack.enter_context(_dask_client(scheduler))
        for path in tqdm(inputs, desc="images", unit="image", disable=not options.progress or len(inputs) < 2):
            path = Path(path)
            try:
                report.written[str(path)] = _predict_one(
                    model, path, output, save=save, options=options, channel_axis=channel_axis,
                    stream=chunk is not None or scheduler is not None, chunk=chunk,
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


@contextlib.contextmanager
def _dask_client(address: str) -> Iterator[object]:
    """A ``dask.distributed`` client connected to ``address``, the default scheduler while open."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise InputError("a scheduler needs dask.distributed: pip install 'biounet[large]'", option="scheduler") from exc
    try:
        client = Client(address)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"scheduler {address}: cannot connect ({exc})") from exc
    log.info("computing on the Dask cluster at %s (%d workers)", address, len(client.scheduler_info()["workers"]))
    with client:
        yield client


def output_stem(path: Path) -> str:
    """The name an input's outputs start with: the file name without its suffix (``.ome.zarr`` counts as one)."""
    return path.name.removesuffix(".zarr").removesuffix(".ome") if is_zarr(path) else path.stem


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InputError(f"{path}: cannot be resolved ({exc})") from None


def plan_outputs(
    inputs: Sequence[Path], output: Path, save: Sequence[str], *, stream: bool = False, overwrite: bool = False
) -> dict[Path, list[Path]]:
    """The files :func:`predict_files` will write for each input; refuse any that would destroy data.

    Checked before any work, so that nothing is written when one name is wrong. Raises a
    :class:`ValueError` naming both paths when an output would be an input of the call, when
    two inputs would write the same output, or (unless ``overwrite``) when an output exists.
    """
    planned: dict[Path, list[Path]] = {}
    owner: dict[Path, Path] = {}
    sources = {_resolved(Path(p)): Path(p) for p in inputs}
    for path in map(Path, inputs):
        streamed = stream or is_zarr(path) or _is_large_tiff(path)
        stem, suffix = output_stem(path), ".ome.zarr" if streamed else ".tif"
        names = [f"{stem}_{kind}{suffix}" for kind in ("probabilities", "labels") if kind in save]
        names += [f"{stem}_overlay.png"] if "overlay" in save and not streamed else []
        planned[path] = [output / name for name in names]
        for target in planned[path]:
            resolved = _resolved(target)
            if resolved in sources:
                raise InputError(f"{path} would write {target}, which is an input of this call ({sources[resolved]}); "
                                 "choose another output folder")  # fmt: skip
            if resolved in owner:
                raise InputError(f"{owner[resolved]} and {path} would both be written to {target}: rename one of "
                                 "them, or segment them into separate output folders")  # fmt: skip
            owner[resolved] = path
            if target.exists() and not overwrite:
                raise InputError(f"{target} exists already (ground truth, or an earlier result?) and {path} would "
                                 "overwrite it; choose another output folder, or replace it with overwrite=True",
                                 option="overwrite")  # fmt: skip
    return planned


def _is_large_tiff(path: Path) -> bool:
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.series) and math.prod(tif.series[0].shape) > STREAM_ABOVE_PIXELS
    except Exception:  # an unreadable file is reported by the in-memory reader
        return False


def _predict_one(
    model: UNet, path: Path, output: Path, *, save: Sequence[str], options: PredictOptions, channel_axis: int | None,
    stream: bool, chunk: int | None,
) -> list[Path]:  # fmt: skip
    if stream or is_zarr(path) or _is_large_tiff(path):
        return _predict_streamed(model, path, output, save=save, options=options, channel_axis=channel_axis,
                                 chunk=chunk)  # fmt: skip
    image, axes = read_image_axes(path)
    spatial_dims = model.config.dims
    items, stack_shape, stack_axes = model_items_of(image, axes, model, channel_axis)
    prob = predict(model, items if stack_shape else items[0], options=options, channel_axis=1 if stack_shape else 0)
    prob = prob.reshape(*stack_shape, *prob.shape[-1 - spatial_dims :])
    written = []
    stem = output_stem(path)
    plane_axes = "YX" if spatial_dims == 2 else "ZYX"  # outputs keep the input's stack axes (Z, T, ...)
    if "probabilities" in save:
        written.append(write_tiff(output / f"{stem}_probabilities.tif", prob, axes=stack_axes + "C" + plane_axes))
    if "labels" in save or "overlay" in save:
        planes = prob.reshape(-1, *prob.shape[-1 - spatial_dims :])
        labels = np.stack([labels_from_probabilities(p, **model.info.postprocess) for p in planes])
        labels = labels.reshape(*stack_shape, *prob.shape[-spatial_dims:])
        if "labels" in save:
            written.append(write_tiff(output / f"{stem}_labels.tif", labels, axes=stack_axes + plane_axes))
        if "overlay" in save:
            if stack_shape or spatial_dims != 2:
                log.warning("%s: overlay skipped (only for 2D images)", path)
            else:
                written.append(write_png(output / f"{stem}_overlay.png", label_overlay(items[0].mean(axis=0), labels)))
    log.info("%s -> %s", path, ", ".join(p.name for p in written))
    return written


def _predict_streamed(
    model: UNet, path: Path, output: Path, *, save: Sequence[str], options: PredictOptions, channel_axis: int | None,
    chunk: int | None,
) -> list[Path]:  # fmt: skip
    """Predict one input chunk by chunk into OME-Zarr outputs (see :mod:`biounet.prediction`)."""
    try:
        from biounet.io._lazy import open_image
        from biounet.prediction._chunked import predict_to_zarr
    except ImportError as exc:
        raise InputError(f"{path}: streaming needs dask and zarr: pip install 'biounet[large]'") from exc
    if options.tta:
        raise InputError(f"{path}: test-time augmentation (tta) is not available for streamed (chunked) prediction",
                         option="tta")
    source = open_image(path)
    items, stack_shape, stack_axes = model_items_of(source.array, source.axes, model, channel_axis)
    if len(stack_shape) > 1:
        raise InputError(f"{path}: streamed prediction takes at most one stack axis; the image has axes {source.axes}")
    if "overlay" in save:
        log.warning("%s: overlay skipped (not made for streamed images)", path)
    stem = output_stem(path)
    written = predict_to_zarr(
        model, items, output, stem, stack_axis=stack_axes or None, save=[s for s in save if s != "overlay"],
        zarr_format=source.zarr_format or 2, scale=source.scale, units=source.units, chunk=chunk, options=options,
    )  # fmt: skip
    log.info("%s -> %s", path, ", ".join(p.name for p in written))
    return written
