"""SHARDED state (FSDP2, tensor parallel, any DTensor): the geometry of pieces, on save and on load.

A SHARDED component is stored as ordinary safetensors files of **full** tensors (the model as Hugging Face
shards), yet no rank ever holds a full tensor: each rank copies its local shards into its slab once, and the
daemon places every byte at its row-major offset in the shared file (a "region" of runs). So:

- **Save.** A DTensor's piece on this rank is the hyper-rectangle its placements give
  (``compute_local_shape_and_global_offset``: ``torch.chunk`` semantics, so uneven shards and FSDP2's
  padding are handled). It is written only by the member at coordinate 0 of every mesh dimension that
  replicates it, so each distinct byte is written once. :func:`piece_runs` turns a piece into file runs:
  one run per contiguous stretch, grouped so that a ``Shard(0)`` piece is one run and a ``Shard(1)`` piece
  one strided record.
- **Load.** The target layout comes from the live object's ``state_dict()`` (as DCP does). For a target
  DTensor, :func:`reshard` slices its own piece out of the mapped full tensor (reading only the pages that
  overlap it) and wraps it with the target's mesh and placements; a plain tensor target (world size 1, an
  unsharded module) gets the full tensor.

Nothing here talks to other ranks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from client.components import CheckpointError

logger = logging.getLogger(__name__)


@functools.cache
def dtensor_type() -> Any:
    """``DTensor``, or None where torch was built without distributed support. Cached: the import statement
    alone costs about 2 us, and the staging of a model with 10,000 tensors asks once per tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``.

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    cls = dtensor_type()
    return cls is not None and isinstance(x, cls)


def local_tensor(t: Any) -> Any:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class Piece:
    """A hyper-rectangle of a global tensor: where it starts and how large it is, per dimension."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def local_piece(dt: Any, path: str) -> Piece:
    """The piece of the global tensor that ``dt``'s local shard holds on this rank.

    Args:
        dt: a DTensor.
        path: its dotted path, for messages.

    Example:
        >>> local_piece(dtensor_33_rows_on_4_ranks, "model.w")  # doctest: +SKIP
        Piece(offsets=(27, 0), shape=(6, 10))
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in dt.placements:
        if p.is_partial():
            raise CheckpointError(
                f"{path}: a DTensor with a Partial placement ({list(dt.placements)}) holds unreduced values, not "
                "state; expected Shard or Replicate placements: redistribute it (e.g. to Replicate) in state_dict()"
            )
    shape, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    local = dt.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointError(
            f"{path}: the DTensor's local shard has shape {tuple(local.shape)}, its placements {list(dt.placements)} "
            f"give {tuple(shape)}; expected a DTensor whose local tensor matches its spec"
        )
    return Piece(tuple(int(o) for o in offsets), tuple(int(s) for s in shape))


def writes_piece(dt: Any) -> bool:
    """Whether this rank writes its shard of ``dt``: it must be at coordinate 0 of every mesh dimension that
    replicates the tensor (the others hold the same bytes). A rank outside the mesh writes nothing."""
    coordinate = dt.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(c == 0 for c, p in zip(coordinate, dt.placements, strict=True) if p.is_replicate())


def piece_runs(
    global_shape: tuple[int, ...], itemsize: int, piece: Piece, file_offset: int, slab_offset: int
) -> list[list[int]]:
    """Where a piece's bytes go in the full tensor's row-major bytes, as ``[file_offset, slab_offset, run_len,
    count, file_stride]`` records (the protocol's region runs). The piece lies contiguous in the slab.

    Args:
        global_shape: the full tensor's shape.
        itemsize: bytes per element.
        piece: the piece's offsets and shape.
        file_offset: where the full tensor's data starts in the file.
        slab_offset: where the piece's data starts in the slab.

    Example:
        >>> piece_runs((4, 6), 4, Piece((0, 3), (4, 3)), 1000, 0)  # columns 3-5 of a 4x6 float tensor
        [[1012, 0, 12, 4, 24]]
    """
    nd = len(global_shape)
    if piece.numel == 0:
        return []
    if nd == 0:
        return [[file_offset, slab_offset, itemsize, 1, itemsize]]
    gstride = [math.prod(global_shape[d + 1 :]) for d in range(nd)]
    pstride = [math.prod(piece.shape[d + 1 :]) for d in range(nd)]
    partial = [d for d in range(nd) if piece.shape[d] != global_shape[d]]
    k = partial[-1] if partial else 0  # every dimension after k is whole: runs span them
    run_len = piece.shape[k] * gstride[k] * itemsize
    start = sum(piece.offsets[d] * gstride[d] for d in range(nd)) * itemsize
    if k == 0:
        return [[file_offset + start, slab_offset, run_len, 1, run_len]]
    count, stride = piece.shape[k - 1], gstride[k - 1] * itemsize
    runs = []
    for outer in itertools.product(*(range(piece.shape[d]) for d in range(k - 1))):
        f = file_offset + start + sum(j * gstride[d] for d, j in enumerate(outer)) * itemsize
        s = slab_offset + sum(j * pstride[d] for d, j in enumerate(outer)) * itemsize
        runs.append([f, s, run_len, count, stride if count > 1 else run_len])
    return runs


def reshard(full: torch.Tensor, target: Any, path: str, saved_as_dtensor: bool, world_size: int) -> Any:
    """The value to load for one saved tensor, in the layout of ``target`` (the live state's value there).

    Args:
        full: the saved full tensor (a view of the mapped file: only what is sliced out of it is read).
        target: the live ``state_dict()`` value at the same path (a DTensor, a tensor, or None if absent).
        path: the tensor's name, for messages.
        saved_as_dtensor: it was a DTensor when saved.
        world_size: ranks running now.

    Example:
        >>> reshard(full_weight, live_state["w"], "model.w", True, 2)  # doctest: +SKIP
        DTensor(local_tensor=..., device_mesh=DeviceMesh('cpu', [0, 1]), placements=(Shard(dim=0),))
    """
    if is_dtensor(target):
        if tuple(target.shape) != tuple(full.shape):
            raise CheckpointError(
                f"{path}: saved with global shape {tuple(full.shape)}, the live DTensor has {tuple(target.shape)}; "
                "load into a model of the same architecture"
            )
        from torch.distributed.tensor import DTensor

        piece = local_piece(target, path)
        index = tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.shape, strict=True))
        local = full[index].clone(memory_format=torch.contiguous_format)
        device = target.to_local().device
        if local.device != device:
            local = local.to(device)
        return DTensor.from_local(
            local, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
        )
    if isinstance(target, torch.Tensor):
        if tuple(target.shape) != tuple(full.shape):
            raise CheckpointError(
                f"{path}: saved with shape {tuple(full.shape)}, the live tensor has {tuple(target.shape)}; "
                "load into a model of the same architecture"
            )
        return full
    if saved_as_dtensor and world_size > 1:
        raise CheckpointError(
            f"{path}: saved as a DTensor, but the live state_dict() has no tensor at this path to take the target "
            "layout from; expected the live state to hold it: create it first (get_state_dict() of "
            "torch.distributed.checkpoint.state_dict initialises optimizer state), or load at world size 1"
        )
    return full
