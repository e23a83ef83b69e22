"""What the predict and train widgets share: one job at a time in a napari worker thread, with Cancel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from magicgui.widgets import Container, PushButton

log = logging.getLogger(__name__)


class WorkerWidget(Container):
    """A widget that runs one job at a time in a worker thread (:func:`napari.qt.threading.create_worker`).

    Subclasses make ``start_button``, ``cancel_button`` and ``status`` and call :meth:`launch`;
    :meth:`cancel` stops the job after the step in flight. ``job`` names the work in log lines.
    """

    job = "job"
    start_button: PushButton
    cancel_button: PushButton
    status: Any

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker: Any = None

    def launch(self, function: Callable[..., Any], *args: Any, connect: dict[str, Callable[..., Any]],
               message: str) -> Any:  # fmt: skip
        """Run ``function(*args)`` (a generator) in a worker; ``connect`` maps its signals to handlers."""
        from napari.qt.threading import create_worker

        handlers = {"errored": self._failed, "aborted": self._aborted, "finished": self._finished, **connect}
        self.worker = create_worker(function, *args, _connect=handlers, _start_thread=False)
        self.start_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = message
        self.worker.start()
        return self.worker

    def cancel(self, *_: Any) -> None:
        """Stop the job after the step in flight."""
        if self.worker is not None:
            self.worker.quit()
            self.status.value = "cancelling..."

    def _failed(self, exc: Exception) -> None:
        self.status.value = f"error: {exc}"
        log.error("%s failed: %s", self.job, exc)

    def _aborted(self) -> None:
        self.status.value = "cancelled"

    def _finished(self) -> None:
        self.worker = None
        self.start_button.enabled, self.cancel_button.enabled = True, False
