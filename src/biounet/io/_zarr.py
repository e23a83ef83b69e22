"""Telling a Zarr store from a file."""

from __future__ import annotations

from pathlib import Path

#: Files that mark a folder as a Zarr array or group (v3, v2 array, v2 group).
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a Zarr (v2 or v3) array or group on disk."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ZARR_MARKERS)
