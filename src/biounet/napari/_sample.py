"""napari sample data: synthetic touching cells with their instance labels."""

from __future__ import annotations

from typing import Any

from biounet.data import Style, synthetic_cells

#: Shape of the sample images: large enough for several clumps, small enough to segment in seconds on a CPU.
SAMPLE_SHAPE = (256, 256)


def touching_cells(style: Style = "fluorescence", seed: int = 0) -> list[tuple[Any, dict[str, Any], str]]:
    """One synthetic image of clumps of touching cells and its labels (:func:`biounet.data.synthetic_cells`).

    Returns napari layer data: the ``(256, 256)`` uint16 image and its uint16 instance
    labels, 0 = background.
    """
    image, labels = synthetic_cells(1, SAMPLE_SHAPE, seed=seed, style=style)[0]
    name = f"synthetic {style}"
    source = f"biounet.synthetic_cells(1, {SAMPLE_SHAPE}, seed={seed}, style={style!r})"
    return [
        (image, {"name": name, "metadata": {"source": source}}, "image"),
        (labels, {"name": f"{name} ground truth"}, "labels"),
    ]


def fluorescence_cells() -> list[tuple[Any, dict[str, Any], str]]:
    """Synthetic touching cells, fluorescence style (sample data)."""
    return touching_cells("fluorescence")


def phase_cells() -> list[tuple[Any, dict[str, Any], str]]:
    """Synthetic touching cells, phase-contrast style (sample data)."""
    return touching_cells("phase")
