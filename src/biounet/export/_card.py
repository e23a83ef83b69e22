"""The README of a bioimage.io package: the model card, then how to feed the model, validate it and cite it."""

from __future__ import annotations

from collections.abc import Mapping

from biounet.export import ONNX_OPSET
from biounet.export._network import TOLERANCE, Geometry
from biounet.model import UNet

#: The U-Net paper, cited by every exported package.
PAPER = {
    "text": "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
    "MICCAI 2015, LNCS 9351, pp. 234-241.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
#: Citations of the data sets biounet's recipes train on, by the name in ``provenance``.
DATASETS = {
    "dsb2018-nuclei": {
        "text": "Caicedo JC et al. Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
        "Nature Methods 16, 1247-1253 (2019).",
        "doi": "10.1038/s41592-019-0612-7",
    },
    "isbi2012-em": {
        "text": "Arganda-Carreras I et al. Crowdsourcing the creation of image segmentation algorithms for "
        "connectomics. Frontiers in Neuroanatomy 9, 142 (2015).",
        "doi": "10.3389/fnana.2015.00142",
    },
}
_AXES = ("z", "y", "x")


def dataset_name(model: UNet) -> str | None:
    """The training data set's name recorded in the model's provenance, if any."""
    evaluation = model.info.provenance.get("evaluation")
    name = evaluation.get("dataset") if isinstance(evaluation, Mapping) else None
    return name if isinstance(name, str) else None


def input_notes(model: UNet, geometry: Geometry) -> list[str]:
    """What a consumer must do to the image before the network sees it (one sentence each)."""
    config, info = model.config, model.info
    axes = ", ".join(_AXES[-config.dims :])
    notes = [(f"{config.in_channels} channel(s), float32, axes batch, channel, {axes}; valid sizes per spatial axis "
              f"{geometry.min} + {geometry.step} n px.")]
    if info.color == "luminance":
        notes.append("The model was trained on the luminance of colour images: convert an RGB image to one gray "
                     "channel first (Y = 0.2125 R + 0.7154 G + 0.0721 B; the scale does not matter, the "
                     "percentile normalisation removes it).")  # fmt: skip
    if info.normalization is None:
        notes.append("No normalisation: the network takes the intensities as they are.")
    else:
        low, high = info.normalization
        notes.append(f"Normalisation (the `scale_range` preprocessing): each image and channel on its own, the "
                     f"{low:g} and {high:g} percentiles of its pixels map to 0 and 1, not clipped.")  # fmt: skip
    if info.background == "inverted":
        notes.append("Then inverted, 1 - x (the `scale_linear` preprocessing, gain -1 and offset 1): this package is "
                     "for images with a bright background (dark objects on a bright one, as in brightfield and "
                     "H&E), shown to the network as bright objects on a dark background, as it was trained.")  # fmt: skip
    return notes


def output_notes(model: UNet, geometry: Geometry) -> list[str]:
    """What the output is and how its size relates to the input's."""
    config = model.config
    classes = ", ".join(model.info.class_names)
    notes = [(f"Class probabilities ({classes}): the network's logits through the `softmax` postprocessing over "
              "the channel axis.")]
    if config.padding == "valid":
        notes.append(f"Unpadded convolutions: the output is the centre of the input, {-geometry.offset} px smaller "
                     f"per spatial axis ({config.halo} px per side). To segment a whole image, mirror-pad it by "
                     f"{config.halo} px per side first (biounet's overlap-tile strategy), and tile it with "
                     f"an overlap of {-geometry.offset} px.")  # fmt: skip
    else:
        notes.append(f"Zero-padded convolutions: the output has the input's size, but its outer {geometry.halo} px "
                     "per side (the `halo`) lack context and are cropped by consumers that tile.")  # fmt: skip
    post = model.info.postprocess
    if post:
        settings = ", ".join(f"{k}={v!r}" for k, v in post.items())
        notes.append(f"biounet turns the foreground probability into instances with {settings} "
                     "(`biounet.postprocess.labels_from_probabilities`); bioimage.io consumers get the "
                     "probabilities.")  # fmt: skip
    return notes


def package_readme(model: UNet, *, card: str | None, name: str, label: str, geometry: Geometry,
                   measured: Mapping[str, float] | None) -> str:  # fmt: skip
    """The package's ``README.md``: the model card (or a short header) and the package's own sections.

    ``label`` is the model's name for ``biounet predict --model``; ``measured`` holds the
    largest absolute differences found by the export's checks, per weights format (None:
    not checked).
    """
    text = card.rstrip() + "\n" if card else f"# {name}\n\nA U-Net (Ronneberger et al. 2015) trained with biounet.\n"
    lines = ["", "## Inputs and outputs", ""]
    lines += [f"- Input: {note}" for note in input_notes(model, geometry)]
    lines += [f"- Output: {note}" for note in output_notes(model, geometry)]
    lines += [
        "", "## Weights", "",
        ("- `pytorch_state_dict`: a `torch.save` state dict of `biounet.model.UNet` (needs biounet installed; the "
         "architecture's keyword arguments are in `rdf.yaml`)."),
        "- `torchscript`: the network traced with `torch.jit.trace` (runs without biounet).",
        f"- `onnx`: opset {ONNX_OPSET}, dynamic batch and spatial axes (runs without biounet).",
        "", "All three output the logits; the softmax is the package's postprocessing.",
        "", "## Validation", "",
        ("The test tensors were computed by biounet's own predictor (`biounet.predict` on the test input, float32, "
         "CPU)."),
    ]  # fmt: skip
    if measured:
        found = ", ".join(f"{fmt} {value:.1e}" for fmt, value in measured.items())
        lines.append(f"At export, each converted weights format was run at three valid input sizes and compared with "
                     f"PyTorch: largest absolute differences of the logits {found} (allowed: {TOLERANCE:g}).")
    lines += [
        "",
        ("To validate the model on your own images (it has seen only its training data): annotate a few images that "
         "it did not see, segment them, and score the result against your annotation, e.g. with biounet:"),
        "", "```", f"biounet predict --model {label} IMAGES -o PRED", "biounet evaluate PRED --gt LABELS", "```",
    ]  # fmt: skip
    evaluation = model.info.provenance.get("evaluation")
    if isinstance(evaluation, Mapping) and evaluation.get("trained_on_images"):
        lines += ["", ("The scores recorded with this model were measured on images it was trained on: they check "
                       "that the weights reproduce, they do not estimate its accuracy on new images.")]
    lines += ["", "## Citation", "", PAPER["text"] + f" doi:{PAPER['doi']}"]
    dataset = DATASETS.get(dataset_name(model) or "")
    if dataset:
        lines += ["", "Training data: " + dataset["text"] + f" doi:{dataset['doi']}"]
    return text + "\n".join(lines) + "\n"
