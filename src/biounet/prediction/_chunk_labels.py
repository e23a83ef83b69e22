"""Connected components of a chunked mask, with one label per object across chunk borders.

Not ``dask_image.ndmeasure.label`` (2026.5.0, same partition): its graph grows with the square of
the chunk count (it recomputes every chunk and the mask's producer about once per chunk) and it
numbers objects across the whole array, not 1..N per item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from biounet.errors import InputError
from biounet.io._ngff import store_blocks

log = logging.getLogger(__name__)


def _label_block(foreground: np.ndarray, *, spatial_dims: int) -> np.ndarray:
    """Face-connected components of each item of a chunk (items first), labelled 1..n locally."""
    flat = foreground.reshape(-1, *foreground.shape[-spatial_dims:])
    structure = ndimage.generate_binary_structure(spatial_dims, 1)
    labels = np.stack([ndimage.label(item, structure)[0] for item in flat]).astype(np.uint32)
    return labels.reshape(foreground.shape)


def _block_summary(labels: np.ndarray, spatial_dims: int) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """The number of local labels of a chunk and its first and last slice along each spatial axis."""
    faces = []
    for axis in range(labels.ndim - spatial_dims, labels.ndim):
        faces.append((np.take(labels, 0, axis=axis).copy(), np.take(labels, -1, axis=axis).copy()))
    return int(labels.max(initial=0)), faces


def _relabel_table(summaries: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each chunk's labels and the table from offset labels to final labels.

    Chunk ``b``'s local label ``l > 0`` has the global number ``l + offsets[b]``. Two
    global labels are the same object when their pixels touch across a chunk face (the last
    slice of a chunk and the first slice of its neighbour, at the same position); the
    connected components of that graph are the objects, numbered 1..N per item (leading,
    non-spatial block index) in the order of their smallest global label.
    """
    grid = summaries.shape
    counts = np.array([s[0] for s in summaries.flat], dtype=np.int64).reshape(grid)
    offsets = (np.cumsum(counts) - counts.ravel()).reshape(grid)
    total = int(counts.sum())
    sources, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    lead = len(grid) - spatial_dims
    for block in np.ndindex(*grid):
        for face in range(spatial_dims):
            neighbour = list(block)
            neighbour[lead + face] += 1
            if neighbour[lead + face] == grid[lead + face]:
                continue
            last = summaries[block][1][face][1]
            first = summaries[tuple(neighbour)][1][face][0]
            touching = (last > 0) & (first > 0)
            sources.append(last[touching].astype(np.int64) + offsets[block])
            targets.append(first[touching].astype(np.int64) + offsets[tuple(neighbour)])
    u, v = np.concatenate(sources), np.concatenate(targets)
    graph = sparse.coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(total + 1, total + 1))
    members = connected_components(graph, directed=False)[1][1:]  # the component of every global label
    item_counts = counts.reshape(int(np.prod(grid[:lead], dtype=np.int64)), -1).sum(axis=1)
    item_of_label = np.repeat(np.arange(len(item_counts)), item_counts)  # items hold consecutive labels
    objects, first_seen = np.unique(members, return_index=True)
    order = np.argsort(first_seen)
    objects, item = objects[order], item_of_label[first_seen[order]]
    number = np.zeros(len(members) + 1, np.uint32)
    number[objects] = np.arange(len(objects)) - np.searchsorted(item, item) + 1  # 1..N within each item
    return offsets, np.concatenate([[0], number[members]]).astype(np.uint32)


def _relabel_block(
    labels: np.ndarray, table: np.ndarray, *, offsets: np.ndarray, block_info: dict | None = None
) -> np.ndarray:
    assert block_info is not None
    offset = offsets[tuple(block_info[0]["chunk-location"])]
    out = np.zeros(labels.shape, np.uint32)
    inside = labels > 0
    out[inside] = table[labels[inside].astype(np.int64) + offset]
    return out


class LabelJob:
    """Instance labels of a chunked foreground mask, written chunk by chunk to a Zarr array.

    :attr:`work` labels every chunk on its own, stores it and summarises its faces; run it
    in one ``dask.compute`` with other work on the same inputs so that they are computed
    once. :meth:`finish` then merges labels across chunk faces and rewrites every chunk.
    """

    def __init__(self, foreground: da.Array, target: zarr.Array, spatial_dims: int) -> None:
        lead = foreground.ndim - spatial_dims
        self.spatial_dims, self.target = spatial_dims, target
        self.local = foreground.rechunk({axis: 1 for axis in range(lead)}).map_blocks(
            _label_block, spatial_dims=spatial_dims, dtype=np.uint32
        )
        blocks = self.local.to_delayed(optimize_graph=False)  # the same keys as the store's
        self.grid = blocks.shape
        summaries = [dask.delayed(_block_summary)(block, spatial_dims) for block in blocks.flat]
        self.work = [store_blocks(self.local, target), *summaries]

    def finish(self, results: Sequence[Any]) -> None:
        """Merge and rewrite, given the results of :attr:`work`."""
        summaries = np.empty(len(results) - 1, dtype=object)
        summaries[:] = list(results[1:])
        offsets, table = _relabel_table(summaries.reshape(self.grid), self.spatial_dims)
        log.debug("merged %d chunk labels into %d objects", len(table) - 1, int(table.max(initial=0)))
        stored = da.from_zarr(self.target, chunks=self.local.chunks)
        relabelled = stored.map_blocks(
            _relabel_block, dask.delayed(table, pure=False, traverse=False), offsets=offsets, dtype=np.uint32
        )
        dask.compute(store_blocks(relabelled, self.target))


def label_chunked(foreground: da.Array, target: zarr.Array, *, spatial_dims: int = 2) -> None:
    """Label the face-connected objects of a chunked mask into ``target``, one label per object.

    Parameters
    ----------
    foreground : dask.array.Array of bool
        ``(*items, *spatial)``; each item (e.g. each plane of a stack) is labelled on its own.
    target : zarr.Array
        Of the same shape, an unsigned integer type, and chunks that tile the mask's chunks
        (every mask chunk is a whole number of target chunks), so chunks are written in
        parallel safely.
    spatial_dims : int
        Number of trailing spatial axes.

    Notes
    -----
    Two passes over the data: each chunk is labelled (``scipy.ndimage.label``, face
    connectivity) and stored with its own numbers; the numbers of foreground pixels that
    touch across chunk faces are merged by a union-find; every chunk is then rewritten
    through the resulting table. Memory: one chunk per worker, plus the faces and the table
    (one entry per chunk-local object). The partition equals dask-image's ``ndmeasure.label``
    (and ``scipy.ndimage.label`` of the whole item).
    """
    if foreground.dtype != bool or not 1 <= spatial_dims <= foreground.ndim:
        raise InputError(
            f"foreground: expected a boolean mask with {spatial_dims} spatial axes, got {foreground.dtype} "
            f"of shape {foreground.shape}"
        )
    job = LabelJob(foreground, target, spatial_dims)
    job.finish(dask.compute(*job.work))
