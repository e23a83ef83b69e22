"""The train widget: train a U-Net on an image and labels layer pair (or a data set folder), in a worker thread."""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox

from biounet.napari._models import TRAINED, compact, devices
from biounet.napari._segment import samples_from_layers
from biounet.napari._worker import WorkerWidget

log = logging.getLogger(__name__)

#: Where the widget proposes run folders: ``~/biounet-runs/napari-001``, ``-002``, ...
RUNS_FOLDER = Path.home() / "biounet-runs"

#: A comma that starts the next ``field=value`` (not one inside a list value such as ``[1, 99.8]``).
_NEXT_OPTION = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")


class TrainWidget(WorkerWidget):
    """Train a U-Net from the viewer; save a model folder that the predict widget offers at once.

    The training data is an image layer with a labels layer of its shape (each plane of a
    stack is one sample; labels are instances, 0 = background) or a data set folder in any
    layout ``biounet train`` reads. The recipe is a preset (``fast``: minutes on a CPU;
    ``paper``) with its number of steps and any ``field=value`` options of
    :class:`biounet.TrainConfig`, comma-separated (as ``biounet train --set``). Training runs in
    a worker thread over :func:`biounet.train_steps`, with a progress bar and a live loss
    curve, into the run folder (log, checkpoints, ``last/`` and ``best/`` models); Cancel
    stops it after the step in flight (the last checkpoint's model stays in ``last/``). When
    it ends, ``<run folder>/last`` is added to the predict widgets' models and chosen there.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    job = "training"

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.losses: list[tuple[int, float]] = []
        self._steps_gen: Any = None
        self.source = ComboBox(name="source", label="train on", choices=("layers", "folder"), value="layers")
        self.images = ComboBox(name="images", label="image", choices=self._layers("Image"))
        self.masks = ComboBox(name="masks", label="labels", choices=self._layers("Labels"))
        self.data = FileEdit(name="data", label="data set folder", mode="d", visible=False)
        self.preset = ComboBox(name="preset", label="preset", choices=("fast", "paper"), value="fast")
        self.steps = SpinBox(name="steps", label="steps", min=1, max=10**7, value=_preset_steps("fast"))
        self.recipe = LineEdit(name="recipe", label="options", value="")
        self.recipe.tooltip = 'TrainConfig fields, e.g. lr=0.001, norm="batch", tile=252'
        self.device = ComboBox(name="device", label="device", choices=devices)
        self.run_dir = FileEdit(name="run_dir", label="run folder", mode="d", value=fresh_run_dir())
        self.train_button = self.start_button = PushButton(name="train_button", text="Train")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.progress = ProgressBar(name="progress", label="steps", min=0, max=1, value=0)
        self.status = Label(name="status", value="")
        self.extend([self.source, self.images, self.masks, self.data, self.preset, self.steps, self.recipe,
                     self.device, self.run_dir, self.train_button, self.cancel_button, self.progress,
                     self.status])  # fmt: skip
        compact(self.images, self.masks, self.status)
        self._figure, self._canvas, self._line = _loss_plot(self.native)
        self.source.changed.connect(self._source_changed)
        self.preset.changed.connect(lambda name: setattr(self.steps, "value", _preset_steps(name)))
        self.train_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self.reset_choices)

    def _layers(self, kind: str) -> Any:
        def choices(*_: Any) -> list[tuple[str, Any]]:
            import napari.layers

            cls = getattr(napari.layers, kind)
            return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, cls)]

        return choices

    def _source_changed(self, source: str) -> None:
        for widget in (self.images, self.masks):
            widget.visible = source == "layers"
        self.data.visible = source == "folder"

    # ---- running -------------------------------------------------------------------------
    def config(self) -> Any:
        """The recipe: the preset, the ``field=value`` options, then the steps."""
        from biounet.training import TrainConfig

        options = [o.strip() for o in _NEXT_OPTION.split(self.recipe.value.strip()) if o.strip()]
        return TrainConfig.preset(self.preset.value).updated([*options, f"steps={int(self.steps.value)}"])

    def start(self, *_: Any) -> Any:
        """Train in a worker thread; return the worker (None when the inputs are wrong, said in the status)."""
        if self.worker is not None:
            return self.worker
        try:
            config = self.config()
            if self.source.value == "layers":
                if self.images.value is None or self.masks.value is None:
                    raise ValueError("choose an image layer and a labels layer (or train on a folder)")
                image = self.images.value
                data: Any = samples_from_layers(image.data, self.masks.value.data, rgb=image.rgb, name=image.name)
            else:
                data = Path(self.data.value)
        except ValueError as exc:
            self.status.value = f"error: {exc}"
            return None
        run_dir = Path(self.run_dir.value)
        self.losses.clear()
        self._line.set_data([], [])
        self._canvas.draw_idle()
        self._steps_gen = _train(data, run_dir, config, str(self.device.value))
        self.progress.max, self.progress.value = config.steps, 0
        return self.launch(_relay, self._steps_gen, connect={"yielded": self._stepped, "returned": self._trained},
                           message=f"training {config.steps} steps into {run_dir}...")

    def _stepped(self, status: Any) -> None:
        if status.steps:
            self.progress.max = status.steps
        self.progress.value = min(status.step, self.progress.max)
        self.losses.append((status.step, status.loss))
        steps, losses = zip(*self.losses, strict=True)
        self._line.set_data(steps, losses)
        axes = self._figure.axes[0]
        axes.relim()
        axes.autoscale_view()
        self._canvas.draw_idle()
        self.status.value = f"step {status.step}: loss {status.loss:.4f}"

    def _trained(self, model_dir: Path) -> None:
        TRAINED.add(model_dir)
        self.status.value = f"saved model {model_dir}"
        self.run_dir.value = fresh_run_dir()

    def _aborted(self) -> None:
        if self._steps_gen is not None:
            self._steps_gen.close()  # ends train_steps (its event files closed)
        last = Path(self.run_dir.value) / "last"
        step = self.losses[-1][0] if self.losses else 0
        self.status.value = f"cancelled at step {step}" + (f"; last checkpoint's model in {last}" if last.is_dir()
                                                           else "")  # fmt: skip
        if last.is_dir():
            TRAINED.add(last)

    def _finished(self) -> None:
        super()._finished()
        self._steps_gen = None


def fresh_run_dir(root: Path | None = None) -> Path:
    """The first ``napari-NNN`` under ``root`` (default :data:`RUNS_FOLDER`) that does not exist yet."""
    root = RUNS_FOLDER if root is None else root
    n = 1
    while (root / f"napari-{n:03d}").exists():
        n += 1
    return root / f"napari-{n:03d}"


def _preset_steps(name: str) -> int:
    from biounet.training import TrainConfig

    return TrainConfig.preset(name).steps


def _relay(steps: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    """A generator function around a generator the widget keeps (so that Cancel can close it)."""
    return (yield from steps)


def _train(data: Sequence[Any] | Path, run_dir: Path, config: Any, device: str) -> Generator[Any, None, Path]:
    """The worker: read a folder's samples if given one, then :func:`biounet.train_steps`; return ``run_dir/last``."""
    from biounet.data import load_dataset
    from biounet.training import train_steps

    samples = load_dataset(data, as_gray=config.color == "luminance") if isinstance(data, Path) else list(data)
    log.info("training on %d image(s) into %s", len(samples), run_dir)
    yield from train_steps(samples, run_dir, config, device=device)
    return run_dir / "last"


def _loss_plot(parent: Any) -> tuple[Any, Any, Any]:
    """A small matplotlib loss plot in the widget's layout (Qt canvas; pyplot is not used)."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2, 2.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    (line,) = axes.plot([], [], color="tab:blue", linewidth=1.2)
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(160)
    parent.layout().addWidget(canvas)
    return figure, canvas, line
