"""The predict widget: segment an image layer with a shipped or trained model, in a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from biounet.model import available_models
from biounet.napari._models import MODELS, OTHER_FOLDER, TRAINED, compact, devices, model_choices
from biounet.napari._segment import Segmentation, segment_steps
from biounet.napari._worker import WorkerWidget

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
#: The model chosen when the widget opens.
DEFAULT_MODEL = "nuclei"


class PredictWidget(WorkerWidget):
    """Segment the chosen image layer; add ``<image> probability`` and ``<image> labels`` layers.

    The model is a shipped one (by name), one the train widget made in this session, or any
    model folder. Choosing a model sets the post-processing fields to the model's own
    (threshold, split, min size), as ``biounet predict`` uses them; with those values the
    labels layer equals ``biounet predict``'s labels of the same pixels. The prediction runs
    in a worker thread (:func:`napari.qt.threading.create_worker`) fed by
    :func:`biounet.predict_steps`, with a progress bar; Cancel stops it after the batch of
    tiles in flight. The new layers take the image's scale and translation; a second run
    on the same image replaces their data.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    job = "segmentation"

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(name="image", label="image", choices=self._image_layers)
        self.model = ComboBox(name="model", label="model", choices=model_choices)
        if DEFAULT_MODEL in available_models():
            self.model.value = DEFAULT_MODEL
        self.folder = FileEdit(name="folder", label="model folder", mode="d", visible=False)
        self.device = ComboBox(name="device", label="device", choices=devices)
        self.precision = ComboBox(name="precision", label="precision", choices=PRECISIONS, value="auto")
        self.tta = CheckBox(name="tta", text="test-time augmentation (8 flips)", value=False)
        self.threshold = FloatSpinBox(name="threshold", label="threshold", min=0.0, max=0.9999, step=0.05, value=0.5)
        self.threshold.native.setDecimals(4)  # a model's own threshold, e.g. 0.5333, kept as it is
        self.split = ComboBox(name="split", label="split touching", choices=("none", "distance", "probability",
                                                                             "border"))  # fmt: skip
        self.min_size = SpinBox(name="min_size", label="min size (px)", min=0, max=10**9, value=0)
        self.run_button = self.start_button = PushButton(name="run_button", text="Segment")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.progress = ProgressBar(name="progress", label="tiles", min=0, max=1, value=0)
        self.status = Label(name="status", value="")
        self.extend([self.image, self.model, self.folder, self.device, self.precision, self.tta, self.threshold,
                     self.split, self.min_size, self.run_button, self.cancel_button, self.progress,
                     self.status])  # fmt: skip
        compact(self.image, self.model, self.status)
        self.model.changed.connect(self._model_changed)
        self.folder.changed.connect(self._model_changed)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        TRAINED.added.connect(self._trained)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self.reset_choices)
        self._model_changed()

    # ---- choices -------------------------------------------------------------------------
    def _image_layers(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def model_path(self) -> str:
        """The chosen model: a shipped model's name or a folder."""
        return str(self.folder.value) if self.model.value == OTHER_FOLDER else str(self.model.value)

    def _model_changed(self, *_: Any) -> None:
        """Show the folder field for "model folder...", and take the chosen model's post-processing."""
        from biounet.postprocess import DEFAULTS

        self.folder.visible = self.model.value == OTHER_FOLDER
        try:
            model = MODELS.get(self.model_path(), "cpu")
        except (ValueError, OSError) as exc:
            self.status.value = f"no model: {exc}"
            return
        post = {**DEFAULTS, **model.info.postprocess}
        self.threshold.value, self.split.value, self.min_size.value = post["threshold"], post["split"], post["min_size"]
        self.status.value = f"{model.config.dims}D model, {model.config.in_channels} channel(s), " \
                            f"classes {', '.join(model.info.class_names)}"  # fmt: skip

    def _trained(self, folder: str) -> None:
        """A model the train widget just saved: offer it, and choose it unless a prediction runs."""
        try:
            self.model.reset_choices()
            if self.worker is None:
                self.model.value = folder
        except RuntimeError:  # this widget's Qt side is gone (its viewer was closed)
            TRAINED.added.disconnect(self._trained)

    # ---- running -------------------------------------------------------------------------
    def postprocess_fields(self) -> dict[str, Any]:
        """The post-processing fields (they override the model's own options of the same names)."""
        return {"threshold": float(self.threshold.value), "split": str(self.split.value),
                "min_size": int(self.min_size.value)}  # fmt: skip

    def start(self, *_: Any) -> Any:
        """Segment the chosen image in a worker thread; return the worker (None if nothing to do)."""
        from biounet.prediction import PredictOptions

        layer = self.image.value
        if layer is None:
            self.status.value = "open an image first"
            return None
        if self.worker is not None:
            return self.worker
        data = layer.data[0] if layer.multiscale else layer.data
        try:
            options = PredictOptions(device=self.device.value, precision=self.precision.value, tta=self.tta.value,
                                     progress=False)  # fmt: skip
        except ValueError as exc:
            self.status.value = f"error: {exc}"
            return None
        self.progress.value = 0
        return self.launch(
            _predict, self.model_path(), self.device.value, data, layer.rgb, options, self.postprocess_fields(),
            connect={"yielded": self._progressed, "returned": lambda result: self._add_layers(layer, result)},
            message=f"segmenting {layer.name}...",
        )

    def _progressed(self, step: Any) -> None:
        self.progress.max = max(step.total, 1)
        self.progress.value = step.done
        if step.done == step.total:
            self.status.value = "post-processing..."

    def _add_layers(self, layer: Any, result: Segmentation) -> None:
        geometry = {"scale": layer.scale, "translate": layer.translate}
        meta = {"biounet": {"model": self.model_path(), "image": layer.name}}
        for suffix, data, kind in (("probability", result.probability, "image"), ("labels", result.labels, "labels")):
            name = f"{layer.name} {suffix}"
            existing = next((other for other in self.viewer.layers if other.name == name), None)
            if existing is not None and existing.metadata.get("biounet", {}).get("image") == layer.name:
                existing.data = data
                existing.scale, existing.translate = geometry["scale"], geometry["translate"]
            elif kind == "image":
                self.viewer.add_image(data, name=name, colormap="magma", contrast_limits=(0.0, 1.0),
                                      blending="additive", visible=False, metadata=meta, **geometry)  # fmt: skip
            else:
                self.viewer.add_labels(data, name=name, metadata=meta, **geometry)
        self.status.value = f"{layer.name}: {int(result.labels.max())} object(s)"


def _predict(
    model: str, device: str, data: Any, rgb: bool, options: Any, fields: dict[str, Any]
) -> Generator[Any, None, Segmentation]:
    """The worker: load the model (cached), then :func:`segment_steps` with the fields' post-processing."""
    loaded = MODELS.get(model, device)
    post = {**loaded.info.postprocess, **fields}
    log.info("segmenting %s px with %s on %s", "x".join(map(str, data.shape)), Path(model).name, device)
    return (yield from segment_steps(loaded, data, rgb=rgb, options=options, postprocess=post))
