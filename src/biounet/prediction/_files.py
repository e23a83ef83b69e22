"""Predicting image files: reading them, arranging their axes once, and writing probabilities, labels,
overlays and per-object measurements as TIFF or OME-Zarr.

Which files and names: :mod:`biounet.prediction._names`; predict-time overrides of the model's
normalisation and post-processing: :mod:`biounet.prediction._overrides`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biounet.errors import InputError
from biounet.io._display import label_overlay
from biounet.io._files import atomic_folder, ensure_writable_folder, scratch_folder
from biounet.io._images import read_image_axes, write_png, write_tiff, write_tiff_tiled
from biounet.io._zarr import is_zarr
from biounet.model import UNet, load_model
from biounet.postprocess import labels_of_planes
from biounet.prediction._input import converts_to_luminance
from biounet.prediction._names import (
    OUTPUT_NAME,
    SAVE_KINDS,
    OutputFormat,
    Targets,
    check_name,
    find_inputs,
    output_format_of,
    output_stem,
    plan_targets,
)
from biounet.prediction._options import PredictOptions
from biounet.prediction._overrides import Normalization, with_overrides
from biounet.prediction._stitch import predict

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


# --------------------------------------------------------------------------------------------
# predicting files
# --------------------------------------------------------------------------------------------
def predict_files(
    model: UNet | str | Path,
    inputs: Sequence[str | Path],
    output: Path,
    *,
    options: PredictOptions | None = None,
    save: Sequence[str] = ("probabilities", "labels"),
    channel_axis: int | None = None,
    chunk: int | None = None,
    scheduler: str | None = None,
    debug: bool = False,
    overwrite: bool = False,
    pattern: str | None = None,
    recursive: bool = False,
    name: str = OUTPUT_NAME,
    postprocess: Mapping[str, Any] | None = None,
    normalization: Normalization = "model",
    output_format: OutputFormat = "auto",
    levels: int = 1,
    **overrides: Any,
) -> PredictReport:
    """Segment each image of ``inputs`` and write ``<stem>_probabilities.tif`` etc. to ``output``.

    Parameters
    ----------
    model : UNet or path or name
        A loaded model, a model folder, or a shipped model's name.
    inputs : sequence of path
        Image files (TIFF, PNG, JPEG, ``.npy``), Zarr arrays and OME-Zarr images (the first
        multiscale level), and folders of them (see :func:`find_images`; ``pattern`` and
        ``recursive`` apply to folders). Stacks are segmented slice by slice.
    output : Path
        Output folder, created if missing; must be writable (checked before any work). A
        folder inside an input folder is skipped when that folder is searched.
    save : sequence of {"probabilities", "labels", "overlay", "objects"}
        ``probabilities``: float32 TIFF, classes on the axis before Y, X. ``labels``: uint16
        TIFF (uint32 past 65,535 objects) of instances (2-class and border models, by the
        model's post-processing) or classes. ``overlay``: PNG of the labels over
        the image (2D inputs). ``objects``: CSV of one row per object, from
        :func:`biounet.measure_objects` (label, area, centroid, bounding box; the stack index
        of each plane; the mean intensity of the model's input pixels before normalisation:
        the raw pixels of gray images, each channel of multi-channel ones, the luminance of
        RGB images that the model converts). Streamed inputs give
        ``<stem>_probabilities.ome.zarr`` with the labels in its ``labels/`` group, or
        ``<stem>_labels.ome.zarr`` without probabilities (see
        :func:`biounet.prediction.predict_to_zarr`), no overlay, and objects measured chunk
        by chunk from the written labels (one more pass over the labels and the input).
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
    pattern, recursive : optional
        Which images of the folders in ``inputs`` to segment (:func:`find_images`).
    name : str
        Output name template (:func:`output_name`): ``{stem}``, ``{kind}``, ``{ext}``,
        ``{dir}``; the default :data:`OUTPUT_NAME` gives ``<stem>_<kind><ext>``.
    postprocess : mapping, optional
        Post-processing options (:func:`biounet.postprocess.probabilities_to_labels`:
        ``threshold``, ``min_size``, ``split`` ...) over the model's own
        (``model.info.postprocess``), for every input, in memory and streamed.
    normalization : (low, high) or "model" or "none"
        The input's percentile normalisation: the model's (default), none (the pixels as
        they are), or these percentiles instead of the model's.
    output_format : {"auto", "tiff", "ome-zarr"}
        The format of probabilities and labels, whatever the input's size: ``"auto"`` follows
        the input (OME-Zarr for Zarr/OME-Zarr inputs, TIFF for the others, streamed TIFFs
        included: written tile by tile as BigTIFF, :func:`biounet.io.write_tiff_tiled`).
        OME-Zarr outputs hold the labels in the probabilities' ``labels/`` group (see
        :func:`biounet.prediction.predict_to_zarr`), with the input's pixel sizes and units.
    levels : int
        Resolution levels of OME-Zarr outputs (1: full resolution only; more: a pyramid
        halving y and x from level to level, :func:`biounet.io.write_pyramid`).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    options = PredictOptions.of(options, overrides)
    unknown = sorted(set(save) - set(SAVE_KINDS))
    if unknown or not save:
        raise InputError(f"save: unknown output(s) {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(SAVE_KINDS)}")  # fmt: skip
    check_name(name)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise InputError(f"levels must be a positive number of resolution levels, got {levels!r}", option="levels")
    output_format_of(Path("."), output_format)  # an unknown format is refused before any work
    if not isinstance(model, UNet):
        model = load_model(model, device=options.device or "cpu")
    model = with_overrides(model, postprocess, normalization)
    if options.precision == "auto":  # bfloat16 where native: the same segmentation, about 2x faster on such CPUs
        from biounet.device import resolve_precision

        device = options.device or next(model.parameters()).device
        options = options.replace(precision=resolve_precision(device, level=logging.DEBUG))
    output = ensure_writable_folder(output)
    found = find_inputs(inputs, pattern, recursive, output, name)
    files = [path for path, _ in found]
    stream = chunk is not None or scheduler is not None
    plan = plan_targets(files, output, save, stream=stream, overwrite=overwrite, name=name, folders=dict(found),
                        output_format=output_format)  # fmt: skip

    report = PredictReport()
    with contextlib.ExitStack() as stack:
        if scheduler:
            stack.enter_context(_dask_client(scheduler))
        for path in tqdm(files, desc="images", unit="image", disable=not options.progress or len(files) < 2):
            try:
                report.written[str(path)] = _predict_one(
                    model, path, output, plan[path], save=save, options=options, channel_axis=channel_axis,
                    chunk=chunk, levels=levels,
                )
            except (ValueError, OSError, RuntimeError) as exc:
                message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                report.failed[str(path)] = message
                log.error("error: %s", message)
                if debug:
                    log.error("%s", traceback.format_exc())
    report.seconds = time.perf_counter() - started
    log.info("segmented %d of %d image(s) in %.1f s -> %s", len(report.written), len(files), report.seconds, output)
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


def _predict_one(
    model: UNet, path: Path, output: Path, targets: Targets, *, save: Sequence[str], options: PredictOptions,
    channel_axis: int | None, chunk: int | None, levels: int,
) -> list[Path]:  # fmt: skip
    if targets.streamed:
        return _predict_streamed(model, path, output, targets, save=save, options=options, channel_axis=channel_axis,
                                 chunk=chunk, levels=levels)  # fmt: skip
    image, axes = read_image_axes(path)
    spatial_dims = model.config.dims
    items, stack_shape, stack_axes = model_items_of(image, axes, model, channel_axis)
    prob = predict(model, items if stack_shape else items[0], options=options, channel_axis=1 if stack_shape else 0)
    prob = prob.reshape(*stack_shape, *prob.shape[-1 - spatial_dims :])
    paths = targets.paths
    for target in paths.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    labels = None
    if {"labels", "overlay", "objects"} & set(save):
        labels = labels_of_planes(prob, spatial_dims, **model.info.postprocess)
    if targets.format == "ome-zarr":
        written = _write_ngff_from_memory(model, path, paths, prob, labels if "labels" in save else None,
                                          stack_shape, stack_axes, levels)  # fmt: skip
    else:
        plane_axes = "YX" if spatial_dims == 2 else "ZYX"  # outputs keep the input's stack axes (Z, T, ...)
        written = []
        if "probabilities" in paths:
            written.append(write_tiff(paths["probabilities"], prob, axes=stack_axes + "C" + plane_axes))
        if "labels" in paths:
            written.append(write_tiff(paths["labels"], labels, axes=stack_axes + plane_axes))
    if "overlay" in save:
        if stack_shape or spatial_dims != 2:
            log.warning("%s: overlay skipped (only for 2D images)", path)
        else:
            written.append(write_png(paths["overlay"], label_overlay(items[0].mean(axis=0), labels)))
    if "objects" in paths:
        written.append(_write_objects(paths["objects"], labels, items, stack_shape, stack_axes, spatial_dims))
    log.info("%s -> %s", path, ", ".join(_shown(p, output) for p in written))
    return written


def _write_ngff_from_memory(
    model: UNet, path: Path, paths: dict[str, Path], prob: np.ndarray, labels: np.ndarray | None,
    stack_shape: tuple[int, ...], stack_axes: str, levels: int,
) -> list[Path]:  # fmt: skip
    """OME-Zarr outputs of a prediction made in memory, in the streamed path's layout, at the planned names."""
    from biounet.io._lazy import open_image
    from biounet.prediction._ngff_outputs import write_ngff_prediction

    if len(stack_shape) > 1:
        raise InputError(f"{path}: OME-Zarr outputs take at most one stack axis; the image has stack axes {stack_axes}")
    source = open_image(path) if path.suffix.lower() in (".tif", ".tiff") or is_zarr(path) else None
    kind = "probabilities" if "probabilities" in paths else "labels"
    with scratch_folder(paths[kind].parent, output_stem(path)) as folder:
        made = write_ngff_prediction(
            folder, "x", prob if "probabilities" in paths else None, labels, model=model,
            stack_axis=stack_axes or None, scale=source.scale if source else None,
            units=source.units if source else None, levels=levels,
        )  # fmt: skip
        _move_folder(made[0], paths[kind])
    return [paths[kind]]


def _write_objects(
    target: Path, labels: Any, items: Any, stack_shape: tuple[int, ...], stack_axes: str, spatial_dims: int
) -> Path:
    """Measure the objects of ``labels`` on the model's input pixels ``items`` (before normalisation) into a CSV."""
    from biounet.measure import measure_objects, write_objects_csv

    target.parent.mkdir(parents=True, exist_ok=True)
    channels = items.shape[1]
    image = np.moveaxis(items, 1, -1)  # (items, *spatial, channels): numpy or dask
    image = image.reshape(*stack_shape, *image.shape[1:]) if stack_shape else image[0]
    table = measure_objects(labels, image[..., 0] if channels == 1 else image, spatial_dims=spatial_dims,
                            stack_axes=stack_axes)  # fmt: skip
    log.debug("%s: %d object(s)", target, len(table["label"]))
    return write_objects_csv(target, table)


def _shown(path: Path, output: Path) -> str:
    try:
        return path.relative_to(output).as_posix()
    except ValueError:
        return str(path)


def _predict_streamed(
    model: UNet, path: Path, output: Path, targets: Targets, *, save: Sequence[str], options: PredictOptions,
    channel_axis: int | None, chunk: int | None, levels: int,
) -> list[Path]:  # fmt: skip
    """Predict one input chunk by chunk (see :mod:`biounet.prediction`) into OME-Zarr or tiled TIFF outputs.

    :func:`predict_to_zarr` writes ``<stem>_probabilities.ome.zarr`` (labels in its
    ``labels/`` group) or ``<stem>_labels.ome.zarr`` into a folder. Where the targets are
    just that, it writes them in place; else (TIFF outputs, another name template, objects
    without the labels) into a hidden scratch folder beside them, from which the targets are
    written or moved into place (each one atomically); the scratch folder is then removed.
    """
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
    paths, stem = targets.paths, output_stem(path)
    tiff = targets.format == "tiff"
    image_kind = "probabilities" if "probabilities" in paths else "labels" if "labels" in paths else None
    zarr_save = [k for k in ("probabilities", "labels") if k in save or (k == "labels" and "objects" in paths)]
    suffix = f"_{image_kind}.ome.zarr"
    direct = (not tiff and image_kind is not None and zarr_save == [k for k in ("probabilities", "labels") if k in save]
              and paths[image_kind].name.endswith(suffix))  # fmt: skip
    with contextlib.ExitStack() as stack:
        if direct:
            folder, prefix = paths[image_kind].parent, paths[image_kind].name.removesuffix(suffix)
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder, prefix = stack.enter_context(scratch_folder(output, stem)), stem
        made = predict_to_zarr(
            model, items, folder, prefix, stack_axis=stack_axes or None, save=zarr_save,
            zarr_format=source.zarr_format or 2, scale=source.scale, units=source.units,
            levels=1 if tiff else levels, chunk=chunk, options=options,
        )  # fmt: skip
        written = []
        for target in paths.values():
            target.parent.mkdir(parents=True, exist_ok=True)
        if tiff:
            written = _zarr_to_tiff(made[0], paths, stack_axes, model.config.dims, source.scale, source.units)
        if "objects" in paths:
            labels = open_image(_labels_in(made[0])).array
            written.append(_write_objects(paths["objects"], labels, items, stack_shape, stack_axes, model.config.dims))
        if direct:
            written[:0] = made
        elif not tiff:
            if "probabilities" in zarr_save and "labels" not in save:  # measured, not asked for
                shutil.rmtree(made[0] / "labels")
            if image_kind is not None:
                _move_folder(made[0], paths[image_kind])
                written.insert(0, paths[image_kind])
    log.info("%s -> %s", path, ", ".join(_shown(p, output) for p in written))
    return written


def _zarr_to_tiff(
    image: Path, paths: dict[str, Path], stack_axes: str, dims: int, scale: Any, units: Any
) -> list[Path]:
    """Write the streamed OME-Zarr ``image`` (and its labels) to the planned TIFFs, tile by tile, in the TIFF axis order."""
    import dask.array as da
    import zarr

    plane_axes = "YX" if dims == 2 else "ZYX"
    written = []
    if "probabilities" in paths:
        prob = da.from_zarr(zarr.open_array(str(image / "0"), mode="r"))
        if stack_axes and stack_axes != "T":  # NGFF's (c, z, y, x) back to the in-memory TIFF's (Z, C, Y, X)
            prob = prob.transpose(1, 0, *range(2, prob.ndim))
        written.append(write_tiff_tiled(paths["probabilities"], prob, axes=stack_axes + "C" + plane_axes, scale=scale,
                                        units=units))  # fmt: skip
    if "labels" in paths:
        labels = da.from_zarr(zarr.open_array(str(_labels_in(image) / "0"), mode="r"))
        written.append(write_tiff_tiled(paths["labels"], labels, axes=stack_axes + plane_axes, scale=scale, units=units))
    return written


def _labels_in(image: Path) -> Path:
    """The label image of a streamed output: the first of its NGFF ``labels/`` group, else ``image`` itself."""
    import zarr

    group = image / "labels"
    if not is_zarr(group):
        return image
    attrs = zarr.open_group(str(group), mode="r").attrs.asdict()
    names = attrs.get("ome", attrs).get("labels") or []
    if not names:
        raise InputError(f"{group}: an NGFF labels group that names no label image")
    return group / names[0]


def _move_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target`` in one rename (replacing an earlier ``target``; see ``atomic_folder``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        for child in source.iterdir():
            child.rename(tmp / child.name)
