"""Shared fixtures: small models, the real-data location, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def data_root() -> Path | None:
    """``$BIOUNET_DATA`` if it names an existing folder, else None."""
    root = os.environ.get("BIOUNET_DATA")
    return Path(root) if root and Path(root).is_dir() else None


requires_data = pytest.mark.skipif(
    data_root() is None, reason="real data not available: set BIOUNET_DATA to the shared data folder"
)


@pytest.fixture(scope="session")
def tiny_model():
    """A depth-2, 4-channel valid U-Net: fast enough for property tests."""
    from biounet import UNet

    torch.manual_seed(0)
    return UNet(depth=2, base_channels=4, dropout=0.0).eval()
