"""Screenshot of the napari plugin's predict widget on a real image: docs/images/napari.png.

Run it headlessly under Xvfb (Debian's ``xvfb`` package), from the repository root::

    BIOUNET_DATA=../shared/data xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/napari_screenshot.py

It opens a viewer, reads the first fluorescence image among the shipped ``nuclei`` model's
held-out DSB 2018 images (recorded in the model's provenance) under ``$BIOUNET_DATA`` through
the plugin's reader (without the data: a synthetic fluorescence image), docks the predict
widget, segments the image with the ``nuclei`` model in the widget's worker thread, and saves
the window. Prints the image, the number of objects and the seconds the segmentation took.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def held_out_image() -> Path | None:
    """The first fluorescence image among the nuclei model's held-out images under ``$BIOUNET_DATA``."""
    from biounet.data import read_manifest
    from biounet.model import load_model

    evaluation = load_model("nuclei").info.provenance.get("evaluation", {})
    data = os.environ.get("BIOUNET_DATA")
    if not data:
        return None
    root = Path(data) / str(evaluation.get("dataset", ""))
    found = [i for i in evaluation.get("images", []) if (root / "images" / f"{i}.png").is_file()]
    try:
        categories = read_manifest(root / "manifest.csv")
    except ValueError:
        categories = {}
    found.sort(key=lambda i: categories.get(i) != "fluorescence")
    return root / "images" / f"{found[0]}.png" if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "images" / "napari.png")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="biounet", show=True)
    viewer.window.resize(1500, 900)
    path = held_out_image()
    if path is not None:
        (layer,) = viewer.open(str(path), plugin="biounet")
        layer.name = source = f"{path.parent.parent.name} {path.stem[:8]}"
    else:
        from biounet.data import synthetic_cells

        layer = viewer.add_image(synthetic_cells(1, (512, 512), seed=2000)[0][0], name="synthetic cells")
        source = "synthetic fluorescence cells (no $BIOUNET_DATA)"
    _, widget = viewer.window.add_plugin_dock_widget("biounet", "Segment")
    _, trainer = viewer.window.add_plugin_dock_widget("biounet", "Train", tabify=True)
    widget.image.value = layer
    widget.model.value = "nuclei"
    app = QApplication.instance()
    started = time.perf_counter()
    widget.start()
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - started > 600:
            print("the segmentation did not finish in 10 minutes", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - started
    name = f"{layer.name} labels"
    if name not in viewer.layers:
        print(f"no labels layer: {widget.status.value}", file=sys.stderr)
        return 1
    labels = viewer.layers[name]
    labels.opacity = 0.55
    viewer.layers.selection = {labels}
    widget.native.parent().raise_()  # the predict widget's tab in front of the train widget's
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(args.output), flash=False, canvas_only=False)
    objects = int(np.count_nonzero(np.unique(np.asarray(labels.data))))
    print(f"{source}: {objects} objects in {seconds:.1f} s -> {args.output}")
    del trainer
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
