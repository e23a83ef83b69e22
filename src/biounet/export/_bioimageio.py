"""bioimage.io model package (spec 0.5): ``rdf.yaml``, three weights formats, test tensors, cover, README.

The description is built as plain data from the network's own shape arithmetic and
:class:`~biounet.model.ModelInfo`, validated by ``bioimageio.spec`` and packaged by it
(``save_bioimageio_package`` for a ``.zip``, ``save_bioimageio_package_as_folder`` for a
folder). Everything runs offline: the description holds no URL (the paper is cited by its
DOI), so validation reads local files only. ``bioimageio.core``'s test (the one behind
``bioimageio test``) runs on the written package before it is moved into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

import biounet
from biounet.errors import InputError
from biounet.export._card import DATASETS, PAPER, dataset_name, input_notes, package_readme
from biounet.export._network import TOLERANCE, ExportedNetwork, Geometry, frozen_copy
from biounet.export._onnx import ONNX_OPSET, check_onnx, write_onnx
from biounet.export._torchscript import check_torchscript, write_torchscript
from biounet.model import UNet

log = logging.getLogger(__name__)

#: Reliable output pixels per spatial axis of the test tensors (2D, 3D models): small, so that
#: ``bioimageio test`` stays quick, large enough for a cover image that shows objects.
TEST_OUTPUT = {2: 128, 3: 24}
#: What ``bioimageio test`` tolerates between its run of the test input and the test output
#: (probabilities in [0, 1]). Wider than :data:`~biounet.export._network.TOLERANCE`: a GPU
#: with TF32 convolutions (PyTorch's default for cuDNN) moves probabilities by ~1e-4.
REPRODUCIBILITY = {"absolute_tolerance": 1e-3, "relative_tolerance": 1e-3, "mismatched_elements_per_million": 0}
WEIGHTS = {"pytorch_state_dict": "weights.pt", "torchscript": "weights_torchscript.pt", "onnx": "weights.onnx"}
RDF_NAME = "rdf.yaml"
_AXES = ("z", "y", "x")


def write_bioimageio(
    model: UNet,
    output: Path,
    *,
    card: str | None,
    label: str,
    sample: np.ndarray | None,
    authors: Sequence[str],
    license: str,
    check: bool,
) -> Path:
    """Write the bioimage.io package of ``model`` to ``output`` (a ``.zip`` file, else a folder), atomically.

    Parameters are those of :func:`biounet.export.export_model`; ``label`` names the model
    (e.g. the model folder's name), ``card`` is its model card's text. With ``check``, the
    TorchScript and ONNX weights are compared with PyTorch at three valid sizes, and the
    written package must pass ``bioimageio.core``'s test (on the CPU) before it replaces
    ``output``; a failure raises :class:`RuntimeError` and leaves ``output`` as it was.
    """
    from biounet.io._files import atomic_folder, atomic_write

    check_license(license)
    if model.info.background == "dark":
        raise InputError("model: it inverts the images with a bright background (background = 'dark'), a choice "
                         "made per image that bioimage.io's preprocessing cannot express; give the background of "
                         "the images the package is for (for_images)", option="background")  # fmt: skip
    if model.info.normalization is not None and model.info.normalization[1] <= 1.0:
        raise InputError(f"model: bioimage.io's scale_range needs an upper percentile above 1, and this model "
                         f"normalises with percentiles {list(model.info.normalization)}", option="model")  # fmt: skip
    geometry = Geometry.of(model.config, TEST_OUTPUT[model.config.dims])
    image = make_test_image(model, sample, geometry)
    probabilities = make_test_probabilities(model, image, geometry)
    with tempfile.TemporaryDirectory(prefix="biounet-export-") as staging_name:
        staging = Path(staging_name)
        np.save(staging / "test_input.npy", image[None])
        np.save(staging / "test_output.npy", probabilities[None])
        tifffile.imwrite(staging / "sample_input.tif", image[0] if len(image) == 1 else image)
        tifffile.imwrite(staging / "sample_output.tif", probabilities)
        write_cover(staging / "cover.png", model, image, probabilities, geometry)
        torch.save(frozen_copy(model).state_dict(), staging / WEIGHTS["pytorch_state_dict"])
        write_torchscript(model, staging / WEIGHTS["torchscript"], softmax=False)
        write_onnx(model, staging / WEIGHTS["onnx"], softmax=False)
        measured = None
        if check:
            measured = {"torchscript": check_torchscript(staging / WEIGHTS["torchscript"], model, softmax=False),
                        "onnx": check_onnx(staging / WEIGHTS["onnx"], model, softmax=False)}  # fmt: skip
            _require_within_tolerance(measured)
        name = package_name(label)
        readme = package_readme(model, card=card, name=name, label=label, geometry=geometry, measured=measured)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        rdf = describe(model, name=name, geometry=geometry, authors=authors, license=license)
        with bioimageio_quiet():
            descr = _validated(rdf, staging)
            if output.suffix.lower() == ".zip":
                with atomic_write(output) as tmp:
                    _save(descr, tmp, as_zip=True)
                    if check:
                        require_passing(tmp)
            else:
                with atomic_folder(output) as tmp:
                    _save(descr, tmp, as_zip=False)
                    if check:
                        require_passing(tmp / RDF_NAME)
    log.info("wrote the bioimage.io package %s (valid input sizes %d + %d n px)", output, geometry.min, geometry.step)
    return output


def for_images(model: UNet, background: str | None) -> UNet:
    """The model as its bioimage.io package runs it on images whose ``background`` is ``"dark"`` or ``"bright"``.

    A model that inverts bright-background images (``info.background == "dark"``) decides
    per image, which bioimage.io's preprocessing cannot express: its package is made for
    one kind of image, a copy of the model (sharing the weights) whose ``info.background``
    is ``"as-is"`` for dark backgrounds (fluorescence) and ``"inverted"`` for bright ones
    (brightfield, H&E). Other models are returned as they are; ``background`` must then be
    None. Raises :class:`InputError` (``option="background"``) otherwise.
    """
    import copy

    rule = model.info.background
    if background is not None and background not in ("dark", "bright"):
        raise InputError(f"background must be 'dark' or 'bright' (the background of the images the package is "
                         f"for), got {background!r}", option="background")  # fmt: skip
    if rule != "dark":
        if background is not None:
            raise InputError(f"background: only for a model that inverts bright-background images (background = "
                             f"'dark'); this one takes every image {'inverted' if rule == 'inverted' else 'as it is'}",
                             option="background")  # fmt: skip
        return model
    if background is None:
        raise InputError("background: the model inverts images with a bright background, a choice it makes per "
                         "image and bioimage.io's preprocessing cannot; choose the images the package is for: "
                         "'dark' (bright objects on a dark background, as in fluorescence) or 'bright' (dark "
                         "objects on a bright background, as in brightfield and H&E), e.g. biounet export --background "
                         "bright", option="background")  # fmt: skip
    package = copy.copy(model)  # a shallow copy: the same weights, its own info
    package.info = dataclasses.replace(model.info, background="as-is" if background == "dark" else "inverted")
    return package


def describe(model: UNet, *, name: str, geometry: Geometry, authors: Sequence[str], license: str) -> dict[str, Any]:
    """The ``rdf.yaml`` content (bioimage.io model spec 0.5) of a package laid out by :func:`write_bioimageio`."""
    from bioimageio.spec.model.v0_5 import ModelDescr

    config, info = model.config, model.info
    spatial = _AXES[-config.dims :]
    in_channels = ["luminance" if info.color == "luminance" else "raw"] if config.in_channels == 1 else \
        [f"channel{i}" for i in range(config.in_channels)]  # fmt: skip
    preprocessing = []
    if info.normalization is not None:
        low, high = info.normalization
        preprocessing.append({"id": "scale_range",
                              "kwargs": {"axes": list(spatial), "min_percentile": low, "max_percentile": high}})  # fmt: skip
    if info.background == "inverted":  # 1 - x: the high percentile maps to 0, the low one to 1
        preprocessing.append({"id": "scale_linear", "kwargs": {"gain": -1.0, "offset": 1.0}})
    output_axes: list[dict[str, Any]] = []
    for axis in spatial:
        size = {"tensor_id": "input", "axis_id": axis, "offset": geometry.offset}
        output_axes.append({"type": "space", "id": axis, "size": size, **({"halo": geometry.halo} if geometry.halo else {})})
    torch_version = torch.__version__.split("+")[0]
    cite = [PAPER] + ([DATASETS[dataset_name(model)]] if dataset_name(model) in DATASETS else [])
    description = (f"U-Net (Ronneberger et al. 2015) trained with biounet: {config.dims}D, depth {config.depth}, "
                   f"{config.padding} padding; outputs the probabilities of {', '.join(info.class_names)}. "
                   + " ".join(input_notes(model, geometry)[1:]))  # fmt: skip
    return {
        "format_version": ModelDescr.implemented_format_version,
        "type": "model",
        "name": name,
        "description": description[:512],
        "authors": [{"name": author} for author in authors],
        "cite": cite,
        "license": license,
        "tags": ["biounet", "unet", f"unet{config.dims}d", "pytorch", "torchscript", "onnx", "segmentation",
                 "semantic-segmentation", f"{config.dims}d"],
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "inputs": [{
            "id": "input",
            "description": "raw image" + (" (RGB: its luminance)" if info.color == "luminance" else ""),
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": in_channels},
                     *({"type": "space", "id": a, "size": {"min": geometry.min, "step": geometry.step}}
                       for a in spatial)],
            "data": {"type": "float32"},
            "test_tensor": {"source": "test_input.npy"},
            "sample_tensor": {"source": "sample_input.tif"},
            "pad": {"mode": "reflect"},
            "preprocessing": preprocessing,
        }],
        "outputs": [{
            "id": "output",
            "description": "class probabilities (softmax of the network's logits)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": list(info.class_names)}, *output_axes],
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "test_tensor": {"source": "test_output.npy"},
            "sample_tensor": {"source": "sample_output.tif"},
            "postprocessing": [{"id": "softmax", "kwargs": {"axis": "channel"}}],
        }],
        "weights": {
            "pytorch_state_dict": {
                "source": WEIGHTS["pytorch_state_dict"],
                "architecture": {"callable": "UNet", "import_from": "biounet.model", "kwargs": config.to_dict()},
                "pytorch_version": torch_version,
            },
            "torchscript": {"source": WEIGHTS["torchscript"], "pytorch_version": torch_version,
                            "parent": "pytorch_state_dict", "comment": "torch.jit.trace of the network"},
            "onnx": {"source": WEIGHTS["onnx"], "opset_version": ONNX_OPSET, "parent": "pytorch_state_dict",
                     "comment": "torch.onnx.export (dynamo), dynamic batch and spatial axes"},
        },
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": [REPRODUCIBILITY],
                "architecture_type": f"U-Net {config.dims}D",
                "architecture_description": f"biounet.model.UNet: {_architecture(model)}",
                "model_parameter_count": sum(p.numel() for p in model.parameters()),
                "task": "semantic segmentation",
            },
            "biounet": {"version": biounet.__version__, "architecture": config.to_dict(),
                        **{k: v for k, v in info.to_dict().items() if k != "provenance"}},
        },
    }


def check_license(license: str) -> None:
    """Raise an :class:`InputError` unless ``license`` is an SPDX identifier that bioimage.io accepts."""
    from bioimageio.spec.generic.v0_3 import DeprecatedLicenseId, LicenseId

    for kind in (LicenseId, DeprecatedLicenseId):
        try:
            kind(license)
        except ValueError:
            continue
        return
    raise InputError(f"license must be an SPDX identifier such as BSD-3-Clause, MIT or CC-BY-4.0, got {license!r}",
                     option="license")  # fmt: skip


def check_sample(model: UNet, sample: np.ndarray | None) -> None:
    """Raise the :class:`InputError` that :func:`make_test_image` would raise for ``sample``, if any."""
    if sample is not None:
        make_test_image(model, sample, Geometry.of(model.config, TEST_OUTPUT[model.config.dims]))


def package_name(label: str) -> str:
    """``biounet <label>`` in the characters bioimage.io allows in a name (letters, digits, ``_+- ()``)."""
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"biounet {label}".strip())
    return name[:64]


def make_test_image(model: UNet, sample: np.ndarray | None, geometry: Geometry) -> np.ndarray:
    """The test input, ``(channels, *spatial)`` float32 intensities before normalisation.

    ``sample`` (``(Y, X)``, ``(C, Y, X)`` for multi-channel models, an RGB ``(Y, X, 3)``
    for models that take luminance; ``Z`` first for 3D models) is cropped around its
    centre to :attr:`Geometry.test_size` per axis, or to the largest valid size it holds.
    Without it, synthetic fluorescent cells (2D) or smoothed noise (3D) of that size.
    """
    config = model.config
    size = geometry.test_size
    if sample is None:
        image = _synthetic(config.in_channels, config.dims, size)
        # a package for bright-background images gets dark cells on a bright background
        return image.max() + image.min() - image if model.info.background == "inverted" else image
    from biounet.io._images import to_luminance
    from biounet.prediction import converts_to_luminance

    image = np.asarray(sample)
    if image.ndim == config.dims + 1 and converts_to_luminance(model, image.shape[-1]):  # RGB, channels last
        image = to_luminance(image, "sample", axis=-1)
    if image.ndim == config.dims:
        image = image[None]
    if image.ndim != config.dims + 1 or image.shape[0] != config.in_channels or image.dtype.kind not in "biuf":
        layout = ("(Y, X)" if config.dims == 2 else "(Z, Y, X)") if config.in_channels == 1 else \
            f"({config.in_channels}, {'Y, X' if config.dims == 2 else 'Z, Y, X'}) (channels first)"
        raise InputError(f"sample: expected a {layout} image of numbers for this {config.in_channels}-channel "
                         f"{config.dims}D model, got {image.dtype} {np.shape(sample)}", option="sample")  # fmt: skip
    crop = []
    for have in image.shape[1:]:
        fits = [s for s in range(geometry.min, min(have, size) + 1, geometry.step)]
        if not fits:
            raise InputError(f"sample: {image.shape[1:]} px is smaller than the smallest input this model takes "
                             f"({geometry.min} px per axis)", option="sample")  # fmt: skip
        start = (have - fits[-1]) // 2
        crop.append(slice(start, start + fits[-1]))
    data = image[(slice(None), *crop)].astype(np.float32)
    if not np.isfinite(data).all():
        raise InputError("sample: has NaN or infinite pixels", option="sample")
    return np.ascontiguousarray(data)


def make_test_probabilities(model: UNet, image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Softmax probabilities of the network on the whole test input, by biounet's own code.

    Valid padding: :func:`biounet.predict` with the halo as real context on every side (one
    tile, the whole input: what the package's network computes from it). Same padding: the
    network on the normalised input as it is (what ``bioimageio test`` runs, without the
    mirror padding that :func:`biounet.predict` adds at the image borders).
    """
    from biounet.prediction import PredictOptions, normalize_items, predict

    config = model.config
    if config.padding == "valid":
        options = PredictOptions(tile=max(image.shape[1:]), batch_size=1, device="cpu", precision="float32",
                                 progress=False)  # fmt: skip
        channels = (image[0], None) if config.in_channels == 1 else (image, 0)
        context = [(config.halo, config.halo)] * config.dims
        return predict(model, channels[0], options=options, channel_axis=channels[1], context=context)
    items = normalize_items(image[None], model.info.normalization, background=model.info.background)
    with torch.inference_mode():
        return ExportedNetwork(model, softmax=True)(torch.from_numpy(items))[0].numpy()


def write_cover(path: Path, model: UNet, image: np.ndarray, probabilities: np.ndarray, geometry: Geometry) -> None:
    """A 2:1 cover: the test input's predicted region in gray beside the labels biounet makes of it."""
    from biounet.io import label_overlay, to_uint8, write_png
    from biounet.postprocess import labels_from_probabilities

    spatial = image.shape[1:]
    out = probabilities.shape[1:]
    region = tuple(slice((s - o) // 2, (s - o) // 2 + o) for s, o in zip(spatial, out, strict=True))
    gray = image[(slice(None), *region)].mean(axis=0)
    labels = labels_from_probabilities(probabilities, **model.info.postprocess)
    if model.config.dims == 3:  # the middle plane
        gray, labels = gray[gray.shape[0] // 2], labels[labels.shape[0] // 2]
    left = np.repeat(to_uint8(gray)[..., None], 3, axis=-1)
    write_png(path, np.concatenate([left, label_overlay(gray, labels.astype(np.int64))], axis=1))


def require_passing(source: Path) -> None:
    """Run ``bioimageio.core``'s test of the package at ``source`` on the CPU; raise if it does not pass."""
    summary = run_bioimageio_test(source)
    if summary.status != "passed":
        raise RuntimeError(f"{source}: the exported package fails bioimageio's test: {'; '.join(failures(summary))}")


def run_bioimageio_test(source: Path, *, weight_format: str | None = None) -> Any:
    """``bioimageio.core.test_model`` on ``source`` (CPU, offline, quiet); returns its validation summary."""
    from bioimageio.core import test_model

    with bioimageio_quiet(), _preserved_random_state():
        return test_model(str(source), weight_format=weight_format, devices=["cpu"])  # type: ignore[arg-type]


def failures(summary: Any) -> list[str]:
    """One line per failed check of a bioimageio validation summary."""
    lines = []
    for detail in summary.details:
        if detail.status == "failed":
            reasons = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg.splitlines()[0] if e.msg else ''}"
                                for e in detail.errors) or "failed"  # fmt: skip
            lines.append(f"{detail.name}: {reasons}")
    return lines or [f"status {summary.status}"]


@contextlib.contextmanager
def bioimageio_quiet() -> Iterator[None]:
    """bioimageio's own logging (loguru) off, and its validation warnings not printed, for a while."""
    from bioimageio.spec import ValidationContext
    from loguru import logger

    logger.disable("bioimageio")
    try:
        with ValidationContext(log_warnings=False, progressbar=False):
            yield
    finally:
        logger.enable("bioimageio")


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Undo what bioimageio's test does to the process: it seeds numpy and torch and sets torch's determinism."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.are_deterministic_algorithms_enabled())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.use_deterministic_algorithms(states[3])


def _validated(rdf: Mapping[str, Any], root: Path) -> Any:
    from bioimageio.spec import ValidationContext, build_description

    context = ValidationContext(root=root, file_name=RDF_NAME, perform_io_checks=True, log_warnings=False)
    descr = build_description(dict(rdf), context=context)
    summary = descr.validation_summary
    if summary.status == "failed":
        raise RuntimeError(f"the bioimage.io description biounet made is invalid: {'; '.join(failures(summary))}")
    return descr


def _save(descr: Any, target: Path, *, as_zip: bool) -> None:
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

    if as_zip:
        save_bioimageio_package(descr, output_path=target)
    else:
        save_bioimageio_package_as_folder(descr, output_path=target)


def _require_within_tolerance(measured: Mapping[str, float]) -> None:
    over = {fmt: value for fmt, value in measured.items() if not value <= TOLERANCE}
    if over:
        found = ", ".join(f"{fmt} {value:.2e}" for fmt, value in over.items())
        raise RuntimeError(f"exported weights differ from PyTorch by more than {TOLERANCE:g}: {found}")


def _architecture(model: UNet) -> str:
    c = model.config
    return (f"depth {c.depth}, {c.base_channels} base channels, {c.padding} padding, norm {c.norm}, dropout "
            f"{c.dropout:g}, {c.in_channels} input channel(s), {c.num_classes} classes")  # fmt: skip


def _synthetic(channels: int, dims: int, size: int) -> np.ndarray:
    if dims == 2:
        from biounet.data import synthetic_cells

        images = [image for image, _ in synthetic_cells(channels, shape=(size, size), seed=0)]
        return np.stack(images).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((channels, size, size, size))
    return np.stack([gaussian_filter(c, 2.0) for c in noise]).astype(np.float32) * 1000.0 + 500.0
