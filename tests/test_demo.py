"""``make demo``'s job: train the fast preset on synthetic cells, segment a held-out image."""

from __future__ import annotations

import pytest

from biounet.demo import run_demo


@pytest.mark.slow
def test_demo_separates_touching_cells(tmp_path):
    result = run_demo(tmp_path, progress=False)
    assert result.tiles > 1  # the held-out image is segmented tile by tile
    assert result.iou >= 0.85, result
    assert result.f1 >= 0.8, result  # touching cells come out separated
    for path in result.files:
        assert path.is_file() and path.stat().st_size > 0, path
