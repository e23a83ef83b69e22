"""Shared fixtures: small models, the real-data location, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder ``$BIOUNET_DATA``; the test is skipped, with the reason, when it is absent."""
    root = os.environ.get("BIOUNET_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real data not available: set BIOUNET_DATA to the shared data folder")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_model():
    """A depth-2, 4-channel valid U-Net: fast enough for property tests."""
    from biounet import UNet

    torch.manual_seed(0)
    return UNet(depth=2, base_channels=4, dropout=0.0).eval()
