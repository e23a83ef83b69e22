"""Models that travel: a biounet model as a bioimage.io package, a TorchScript file or an ONNX file.

* ``"bioimageio"``: a bioimage.io model package (spec 0.5; a ``.zip`` file, or a folder for
  any other name) for Fiji/deepImageJ, QuPath, ilastik, napari and ``bioimageio.core``:
  ``rdf.yaml`` with typed axes and the network's valid input sizes, the model's percentile
  normalisation as ``scale_range`` preprocessing, ``softmax`` postprocessing, test tensors
  computed by :func:`biounet.predict`, a cover image, the model card as README, and the
  weights as ``pytorch_state_dict``, TorchScript and ONNX (``_bioimageio``);
* ``"torchscript"``: the network traced with ``torch.jit.trace`` (``_torchscript``);
* ``"onnx"``: ONNX opset 18 with dynamic batch and spatial axes (``_onnx``).

The TorchScript and ONNX files end with a softmax: they take a normalised image and output
class probabilities (the normalisation, and the luminance of colour images for models that
ask for it, stay the caller's job; ``docs/export.md`` shows them in numpy). Every export is
checked before it is moved into place (``check=True``) and written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from biounet.model import UNet

log = logging.getLogger(__name__)

ExportFormat = Literal["bioimageio", "torchscript", "onnx"]
#: The formats :func:`export_model` writes.
FORMATS: tuple[str, ...] = ("bioimageio", "torchscript", "onnx")
#: ONNX operator set of the exported ONNX files: torch 2.13's dynamo exporter's own (lower
#: opsets would go through onnx's version converter); onnxruntime 1.14 and later run it.
ONNX_OPSET = 18


def export_model(
    model: UNet | str | Path,
    output: str | Path,
    *,
    format: ExportFormat = "bioimageio",
    overwrite: bool = False,
    check: bool = True,
    sample: np.ndarray | str | Path | None = None,
    authors: tuple[str, ...] | list[str] = ("biounet developers",),
    license: str = "BSD-3-Clause",
    background: Literal["dark", "bright"] | None = None,
) -> Path:
    """Export a model to a bioimage.io package, a TorchScript file or an ONNX file.

    Parameters
    ----------
    model : UNet, str or Path
        A model, a model folder (its ``MODEL_CARD.md``, if present, becomes the package's
        README) or the name of a shipped model (:func:`biounet.available_models`).
    output : str or Path
        The file (or, for ``"bioimageio"`` with a name not ending in ``.zip``, the folder) to
        write; its parent folder is created. Written atomically: a failure leaves nothing.
    format : {"bioimageio", "torchscript", "onnx"}
        ``"bioimageio"``: a bioimage.io model package, spec 0.5 (``.zip``: zipped, else a
        folder). ``"torchscript"``: ``torch.jit.trace`` of the network followed by a softmax
        (``torch.jit.script`` cannot compile it: ``forward`` reads ``self.config``).
        ``"onnx"``: the same as ONNX, opset 18 (:data:`ONNX_OPSET`), dynamic batch and
        spatial axes, exported with ``torch.onnx.export(dynamo=True)`` and each spatial axis
        declared as the network's size rule ``min + step * k`` (see ``_onnx``).
        The TorchScript and ONNX files take ``(batch, channels, *spatial)`` float32 images
        already normalised as the model was trained, of valid sizes per spatial axis (not
        checked by the files: an invalid size gives a misaligned output), and return
        ``(batch, classes, *spatial_out)`` probabilities.
    overwrite : bool
        Replace ``output`` if it exists (else an error).
    check : bool
        Before ``output`` is written: run the TorchScript/ONNX file (after ``torch.jit.load``,
        in onnxruntime) at three valid input sizes and require PyTorch's output within 1e-4;
        for ``"bioimageio"`` also run ``bioimageio.core``'s test of the package (``bioimageio
        test``, on the CPU, offline) and require it to pass. A failure is a
        :class:`RuntimeError` and leaves ``output`` as it was.
    sample : ndarray, str or Path, optional
        ``"bioimageio"`` only: an image (or image file) for the test tensors and the cover,
        ``(Y, X)`` (channels first for multi-channel models, RGB ``(Y, X, 3)`` for models
        that take its luminance), cropped around its centre. Default: synthetic cells.
    authors : sequence of str
        ``"bioimageio"`` only: the package's authors (who trained the model).
    license : str
        ``"bioimageio"`` only: the SPDX identifier of the weights' licence.
    background : {"dark", "bright"}, optional
        ``"bioimageio"`` only, and required for a model that inverts bright-background
        images (``model.info.background == "dark"``, a choice biounet makes per image and
        bioimage.io's preprocessing cannot): the background of the images the package is
        for. ``"dark"`` (bright objects on a dark background, as in fluorescence): no
        inversion. ``"bright"`` (dark objects on a bright background, as in brightfield
        and H&E): every image inverted after normalisation (a ``scale_linear`` with gain
        -1 and offset 1 after ``scale_range``), and the default sample inverted likewise.

    Returns
    -------
    Path
        ``output``.

    Raises
    ------
    biounet.errors.InputError
        An unknown format or model, an existing ``output`` without ``overwrite``, an output
        that is the model's own folder, a bad ``sample``; before anything is written. The
        error's ``option`` names the argument.
    RuntimeError
        A check failed (nothing written).
    """
    from biounet.errors import InputError

    if format not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {format!r}", option="format")
    net, folder = _resolve_model(model)
    target = _check_output(Path(output), format, overwrite=overwrite, model_folder=folder)
    if format != "bioimageio":
        if sample is not None:
            raise InputError(f"sample: only the bioimageio format has test tensors, not {format}", option="sample")
        if background is not None:
            raise InputError(f"background: only the bioimageio format normalises its input, not {format}",
                             option="background")  # fmt: skip
        _make_parent(target)
        return _write_file(net, target, format, check=check)
    from biounet.export._bioimageio import check_license, check_sample, for_images, write_bioimageio

    net = for_images(net, background)

    if not authors or not all(isinstance(a, str) and a.strip() for a in authors):
        raise InputError(f"authors must be one or more names, got {authors!r}", option="authors")
    check_license(license)
    image = _read_sample(sample)
    check_sample(net, image)
    card_path = folder / "MODEL_CARD.md" if folder is not None else None
    card = card_path.read_text(encoding="utf-8") if card_path is not None and card_path.is_file() else None
    label = folder.name if folder is not None else str(net.info.provenance.get("name") or "U-Net")
    _make_parent(target)
    return write_bioimageio(net, target, card=card, label=label, sample=image, authors=list(authors),
                            license=license, check=check)  # fmt: skip


def _resolve_model(model: object) -> tuple[UNet, Path | None]:
    """The network, and the folder it was loaded from (None for a model object)."""
    from biounet.errors import InputError
    from biounet.model import CONFIG_FILE, UNet, available_models, load_model

    if isinstance(model, UNet):
        return model, None
    if not isinstance(model, (str, Path)):
        raise InputError(f"model must be a UNet, a model folder or a shipped model's name, got {type(model).__name__}",
                         option="model")  # fmt: skip
    try:
        net = load_model(model)
    except InputError as exc:
        raise InputError(f"model: {exc}", option="model") from exc
    folder = Path(model)
    if not (folder / CONFIG_FILE).is_file() and str(model) in available_models():
        from importlib.resources import files

        folder = Path(str(files("biounet") / "models" / str(model)))
    return net, folder


def _check_output(output: Path, format: str, *, overwrite: bool, model_folder: Path | None) -> Path:
    from biounet.errors import InputError

    as_folder = format == "bioimageio" and output.suffix.lower() != ".zip"
    if model_folder is not None:
        inside = output.resolve()
        if inside == model_folder.resolve() or model_folder.resolve() in inside.parents:
            raise InputError(f"{output}: is inside the model folder {model_folder}; choose another output",
                             option="output")  # fmt: skip
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise InputError(f"{output}: exists; choose another output or overwrite it", option="overwrite")
        if as_folder != output.is_dir():
            kind = "a folder" if output.is_dir() else "a file"
            raise InputError(f"{output}: is {kind}; the {format} export writes a {'folder' if as_folder else 'file'} "
                             "there and does not replace one with the other", option="output")  # fmt: skip
    return output


def _make_parent(output: Path) -> None:
    from biounet.errors import InputError

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{output}: cannot create its folder: {exc.strerror or exc}", option="output") from exc


def _read_sample(sample: object) -> np.ndarray | None:
    import numpy as np

    if sample is None or isinstance(sample, np.ndarray):
        return sample
    if isinstance(sample, (str, Path)):
        from biounet.io import read_image

        return read_image(sample)
    from biounet.errors import InputError

    raise InputError(f"sample must be an image array or file, got {type(sample).__name__}", option="sample")


def _write_file(model: UNet, output: Path, format: str, *, check: bool) -> Path:
    from biounet.export._network import TOLERANCE
    from biounet.io._files import atomic_write

    if format == "torchscript":
        from biounet.export._torchscript import check_torchscript as check_file
        from biounet.export._torchscript import write_torchscript as write_file
    else:
        from biounet.export._onnx import check_onnx as check_file
        from biounet.export._onnx import write_onnx as write_file
    with atomic_write(output) as tmp:
        write_file(model, tmp, softmax=True)
        if check:
            difference = check_file(tmp, model, softmax=True)
            if not difference <= TOLERANCE:
                raise RuntimeError(f"{output}: the {format} export differs from PyTorch by {difference:.2e} "
                                   f"(allowed: {TOLERANCE:g}); nothing written")  # fmt: skip
            log.info("%s: %s export within %.1e of PyTorch at three valid sizes", output, format, difference)
    return output
