"""The napari plugin of biounet (``pip install 'biounet[napari]'``), declared in ``napari.yaml`` (npe2).

* a reader (``_reader``): image files with their axes and pixel sizes, OME-Zarr images with
  their labels as labels layers;
* a writer (``_writer``): labels layers as TIFF or OME-Zarr label images;
* sample data (``_sample``): synthetic touching cells with their labels;
* the predict widget (``_predict_widget``) and the train widget (``_train_widget``), which
  run in worker threads; what they compute is in ``_segment``, free of Qt.

Nothing here is imported by ``import biounet``; napari imports the modules it needs.
"""

from __future__ import annotations
