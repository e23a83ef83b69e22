"""Render the README figure of the synthetic data: ``python docs/make_figures.py``.

One synthetic sample as a row of four panels: the image in both styles (fluorescence, phase
contrast; one seed gives the same cells), its instance labels in colours, and the loss weight
map of the U-Net paper (eq. 2, ``w0 = 10``, ``sigma = 5``, balanced classes) drawn like the
paper's Fig. 3d. Writes ``docs/images/synthetic_sample.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import label2rgb

from biounet.data import synthetic_cells
from biounet.io import to_uint8, write_png
from biounet.data import render_weight_map, weight_map

OUTPUT = Path(__file__).resolve().parent / "images" / "synthetic_sample.png"
GAP = 4  # white pixels between panels


def gray_rgb(image: np.ndarray) -> np.ndarray:
    """An image as an RGB uint8 panel, scaled by percentiles."""
    return np.repeat(to_uint8(image)[..., None], 3, axis=-1)


def side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    """RGB panels of equal height in a row, with white gaps."""
    gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return np.concatenate(row, axis=1)


def main() -> None:
    (fluorescence, labels), = synthetic_cells(1, seed=0, style="fluorescence")
    (phase, _), = synthetic_cells(1, seed=0, style="phase")
    colours = (label2rgb(labels, bg_label=0) * 255 + 0.5).astype(np.uint8)
    weights = render_weight_map(weight_map(labels))
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    write_png(OUTPUT, side_by_side([gray_rgb(fluorescence), gray_rgb(phase), colours, weights]))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
