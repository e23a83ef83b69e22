"""The models the widgets offer: the shipped ones, those trained in this session, and a folder."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from psygnal import Signal

#: The choice that shows the model folder field.
OTHER_FOLDER = "model folder..."


class TrainedModels:
    """Model folders trained by the train widget in this session; ``added`` fires with each new one."""

    added = Signal(str)

    def __init__(self) -> None:
        self.folders: list[str] = []

    def add(self, folder: str | Path) -> None:
        folder = str(Path(folder).resolve())
        if folder not in self.folders:
            self.folders.append(folder)
        self.added.emit(folder)


#: The one registry the widgets of a napari session share.
TRAINED = TrainedModels()


def model_choices(*_: Any) -> list[tuple[str, str]]:
    """(label, value) pairs: the shipped models by name, then trained folders, then :data:`OTHER_FOLDER`."""
    from biounet.model import available_models

    shipped = [(name, name) for name in available_models()]
    trained = [(f"{Path(f).parent.name}/{Path(f).name} (trained)", f) for f in TRAINED.folders]
    return shipped + trained + [(OTHER_FOLDER, OTHER_FOLDER)]


def devices(*_: Any) -> list[str]:
    """The devices torch sees: ``cpu``, each ``cuda:N``, ``mps``."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


class ModelCache:
    """Loaded models by (folder or name, device), reloaded when the folder's ``config.json`` changes."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, model: str, device: str) -> Any:
        from biounet.model import available_models, load_model

        config = Path(model) / "config.json"
        stamp = config.stat().st_mtime if model not in available_models() and config.is_file() else 0.0
        key = (model, device)
        with self._lock:
            cached = self._models.get(key)
            if cached is None or cached[0] != stamp:
                self._models[key] = (stamp, load_model(model, device=device))
            return self._models[key][1]


#: Models loaded by the predict widgets.
MODELS = ModelCache()


def compact(*widgets: Any) -> None:
    """Keep long layer names and paths in combo boxes and labels from widening the dock (Qt)."""
    from qtpy.QtWidgets import QComboBox, QLabel

    for widget in widgets:
        native = widget.native
        if isinstance(native, QComboBox):
            native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            native.setMinimumContentsLength(16)
        elif isinstance(native, QLabel):
            native.setWordWrap(True)
