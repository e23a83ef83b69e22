"""What the widgets compute, without Qt: segmenting a layer's pixels, and training samples from layers."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from biounet.errors import InputError


@dataclass(frozen=True)
class Segmentation:
    """The result of :func:`segment_steps`, the shape of the image without its channels.

    Attributes
    ----------
    probability : ndarray of float32
        Foreground probability (class 1 of a 2-class model, else ``1 - p(background)``).
    labels : ndarray of int32
        Instance labels by the post-processing (class maps for models without instances).
    """

    probability: np.ndarray
    labels: np.ndarray


def layer_axes(ndim: int, dims: int, rgb: bool) -> str:
    """tifffile axes of a napari image layer's data: stack axes, the plane (``ZYX`` for 3D models), RGB samples."""
    plane = "YX" if dims == 2 else "ZYX"
    stack = ndim - len(plane) - (1 if rgb else 0)
    if stack < 0:
        raise InputError(f"image: {ndim} dimension(s){' with RGB' if rgb else ''} cannot hold the {plane} of a "
                         f"{dims}D model")  # fmt: skip
    return "Q" * stack + plane + ("S" if rgb else "")


def segment_steps(
    model: Any, image: Any, *, rgb: bool = False, options: Any = None, postprocess: Mapping[str, Any] | None = None
) -> Generator[Any, None, Segmentation]:
    """Segment a napari image layer's pixels as ``biounet predict`` segments a file with them.

    The pixels are arranged by :func:`biounet.prediction.model_items_of` (stack axes first,
    planes one by one for a 2D model; RGB samples last converted as the model was trained),
    predicted by :func:`biounet.predict_steps` and turned into labels plane by plane by
    :func:`biounet.postprocess.labels_of_planes` with ``postprocess`` (default: the model's).

    Yields
    ------
    Progress
        ``done`` of ``total`` tiles, after every batch (the last one without the result).

    Returns
    -------
    Segmentation
    """
    from biounet.postprocess import foreground_probability, labels_of_planes
    from biounet.prediction import PredictOptions, Progress, model_items_of, predict_steps

    array = np.asarray(image)
    dims = model.config.dims
    axes = layer_axes(array.ndim, dims, rgb)
    items, stack_shape, _ = model_items_of(array, axes, model, None)
    options = (options or PredictOptions()).replace(progress=False)
    prob = None
    for step in predict_steps(model, items if stack_shape else items[0], options=options,
                              channel_axis=1 if stack_shape else 0):  # fmt: skip
        if step.result is None:
            yield step
        else:
            prob = step.result
            yield Progress(step.done, step.total)
    assert prob is not None  # predict_steps always ends with the result
    prob = prob.reshape(*stack_shape, *prob.shape[-1 - dims :])
    post = dict(model.info.postprocess if postprocess is None else postprocess)
    labels = labels_of_planes(prob, dims, **post).astype(np.int32, copy=False)
    planes = prob.reshape(-1, *prob.shape[-1 - dims :])
    foreground = np.stack([foreground_probability(p) for p in planes]).astype(np.float32, copy=False)
    return Segmentation(foreground.reshape(labels.shape), labels)


def samples_from_layers(image: Any, labels: Any, *, rgb: bool = False, name: str = "layer") -> list[Any]:
    """Training samples (:class:`biounet.data.Sample`) of an image layer and a labels layer of its shape.

    A 2D image (``(Y, X)``, or ``(Y, X, 3)`` RGB) is one sample; the planes of a stack (any
    leading axes) are one each. Labels are instances, 0 = background.
    """
    from biounet.data import make_sample

    image, labels = np.asarray(image), np.asarray(labels)
    plane_shape = image.shape[:-1] if rgb else image.shape
    if labels.shape != plane_shape:
        raise InputError(f"labels: shape {labels.shape} differs from the image's {plane_shape}"
                         f"{' (without its RGB axis)' if rgb else ''}")  # fmt: skip
    if len(plane_shape) < 2:
        raise InputError(f"image: need at least 2 dimensions, got shape {image.shape}")
    stack = plane_shape[:-2]
    images = image.reshape(-1, *image.shape[len(stack) :])
    planes = labels.reshape(-1, *labels.shape[-2:])
    names = [name] if not stack else [f"{name}_{'_'.join(map(str, i))}" for i in np.ndindex(*stack)]
    return [make_sample(im, lab, name=n) for im, lab, n in zip(images, planes, names, strict=True)]
