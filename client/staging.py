"""Staging: copy this rank's share of the state into its shared-memory slab, laid out as the final files.

The slab is one sealed memfd per rank (no name in /dev/shm, so no crash can leak it), allocated once,
registered as pinned memory when CUDA is present, and reused by every save; it grows only when the state
does. Each file occupies one contiguous
range of it: the safetensors header followed by the tensors back to back in file order, so the daemon
writes ``header + data`` as a single range without re-serialising or copying again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import math
import mmap
import operator
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptd import format as fmt
from ckptd.protocol import SEGMENT_PREFIX, FileSpec
from client import sharding
from client.components import CheckpointError, SharingPattern, ValidationLevel
from client.planning import ComponentPlan

logger = logging.getLogger(__name__)

REGION_ALIGN = 4096  # each file starts on a page boundary of the slab
BIG_COPY = 1 << 20  # bytes from which a tensor is copied on its own (multi-threaded) rather than batched
DEFER_MIN = 64 << 10  # overlapped staging leaves smaller tensors to the synchronous copy (not worth a wait)
GROWTH = 1.125  # headroom when a slab grows, so small state changes do not reallocate every save
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; pre-faults the slab at allocation, not in the first copy
_MADV_DONTFORK = getattr(mmap, "MADV_DONTFORK", 10)  # a forked child does not inherit the mapping
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


# ------------------------------------------------------------------------------------------------ slab


class Slab:
    """One staging buffer: a sealed memfd of this process, mapped read-write and (with CUDA) pinned.

    The daemon opens it through ``/proc/<pid>/fd/<fd>`` while the rank waits for ``accepted`` and keeps its
    own mapping, so the slab has no name anywhere: when both processes let go (exit, kill -9, ``close``),
    the kernel frees the memory. ``F_SEAL_SHRINK`` guarantees the daemon that no process can truncate it
    under its mapping (which would kill the daemon with SIGBUS).

    A forked child (DataLoader workers, multiprocessing pools) keeps neither: the mapping is
    ``MADV_DONTFORK`` and an at-fork hook closes the memfd in the child, so a slab this process replaces or
    abandons is freed as soon as this process and the daemon let go, however long the children live. In
    the child the slab's address range is reserved inaccessible (touching it faults instead of reading a
    stale snapshot) and the slab counts as destroyed.

    Example:
        >>> slab = Slab.create(64 << 20, rank=0)
        >>> slab.fd, slab.ino, slab.size
        (7, 123456, 67108864)
        >>> slab.destroy()
    """

    def __init__(self, name: str, fd: int, ino: int, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.fd = fd
        self.ino = ino
        self.size = size
        self.mm = mm
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8)  # uint8 view of the whole mapping
        self.addr = self.tensor.data_ptr()  # the mapping's address (the at-fork hook reserves it in a child)
        self._mm_fd = _dup_held_by_mmap(name, fd)  # Python's mmap keeps its own dup of the memfd
        self.pinned = False
        self.busy_txn: str | None = None  # the transaction whose bytes the daemon may still be reading
        # A slab dropped without destroy() still closes its memfd when collected (or at exit).
        self._close_fd = weakref.finalize(self, os.close, fd)
        _live_slabs.add(self)

    def __repr__(self) -> str:
        return f"Slab({self.name!r}, fd={self.fd}, size={self.size}, busy_txn={self.busy_txn!r})"

    @classmethod
    def create(cls, size: int, rank: int) -> Slab:
        """Create, size, seal, map, pre-fault and (with CUDA) pin a slab of at least ``size`` bytes.

        Args:
            size: bytes needed (rounded up to 2 MiB).
            rank: this rank, for the memfd's name (seen in ``/proc/<pid>/fd`` and in logs).

        Raises:
            CheckpointError: the memory cannot be reserved (the message says how much and what to do).

        Example:
            >>> Slab.create(1000, rank=0).size
            2097152
        """
        size = max(REGION_ALIGN, _round_up(size, 2 * 1024 * 1024))
        name = f"{SEGMENT_PREFIX}{os.getuid()}-{os.getpid()}-r{rank}-{secrets.token_hex(4)}"
        t0 = time.perf_counter()
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                # Reserve every page now: a full memory fails here, clearly, not with SIGBUS mid-copy.
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise CheckpointError(
                    f"cannot allocate a {describe_size(size)} staging slab in shared memory ({e.strerror}); "
                    "free memory on this node, lower the memory limit of other processes, or raise this "
                    "container's memory limit (memfd pages count as shared memory, like /dev/shm)"
                ) from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            ino = os.fstat(fd).st_ino
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            pass
        try:
            mm.madvise(_MADV_DONTFORK)
        except (OSError, ValueError) as e:  # the at-fork hook still replaces the child's mapping
            logger.debug("madvise(MADV_DONTFORK) on slab %s failed: %s", name, e)
        slab = cls(name, fd, ino, size, mm)
        if torch.cuda.is_available():
            rc = torch.cuda.cudart().cudaHostRegister(slab.tensor.data_ptr(), size, 0)
            slab.pinned = int(rc) == 0 if not hasattr(rc, "value") else rc.value == 0
            if not slab.pinned:
                logger.warning("cudaHostRegister of the %d-byte slab failed (%s); copies will be pageable", size, rc)
        logger.info(
            "staging slab %s: %.1f MiB%s in %.3f s",
            name,
            size / 2**20,
            " pinned" if slab.pinned else "",
            time.perf_counter() - t0,
        )
        return slab

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def destroy(self) -> None:
        """Unpin, unmap and close the memfd. A daemon that still maps it keeps its own mapping (and the
        memory), so this is also how a slab is abandoned to a daemon that may still read it.

        Example:
            >>> slab.destroy()
        """
        if self.closed:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.pinned = False
        del self.tensor
        try:
            self.mm.close()
        except BufferError:
            logger.debug("slab %s still has views; unmapped when they go", self.name)
        self._close_fd()
        self.fd = -1

    def _forget_in_child(self) -> None:
        """In a forked child, right after the fork: let go of the parent's slab without touching it. The fd
        is closed (its finalizer detached, so it can never close a reused fd number later), and the address
        range, which MADV_DONTFORK left unmapped (or which still maps the memfd where that failed), becomes
        an inaccessible reservation: nothing the child maps later can land there and be unmapped when the
        child's copy of the mmap object goes."""
        if self.closed:
            return
        self._close_fd.detach()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._mm_fd is not None:
            # The mmap object's own dup of the memfd: it closes that number when it goes, so the number must
            # stay taken until then; /dev/null takes it over (holding no memory).
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                os.dup2(null, self._mm_fd, inheritable=False)
                os.close(null)
        self.fd = -1
        self.pinned = False  # a CUDA registration is the parent's
        _reserve_range(self.addr, self.size)


def _dup_held_by_mmap(name: str, fd: int) -> int | None:
    """The fd (other than ``fd``) of this process that refers to the memfd named ``name``: the dup that
    Python's ``mmap.mmap`` keeps. None if it cannot be found (no /proc)."""
    target = f"/memfd:{name} "
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit() or int(entry) == fd:
            continue
        try:
            link = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        if link.startswith(target) or link == target.rstrip():
            return int(entry)
    return None


def _libc_mmap() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return fn


_MMAP = _libc_mmap()  # resolved now: a forked child must not dlopen (a lock held by another thread at fork)


def _reserve_range(addr: int, size: int) -> None:
    """Map ``[addr, addr + size)`` anew as inaccessible, unbacked memory (PROT_NONE, MAP_NORESERVE)."""
    if _MMAP is None or not addr:
        return
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
    _MMAP(addr, size, _PROT_NONE, flags, -1, 0)


# The slabs of this process, read only by the at-fork hook below. register_at_fork takes hooks for good
# (there is no unregister), so one module-level hook must be able to find every live slab; the set is weak,
# so it never keeps a slab (or its memory) alive, and a destroyed slab is simply skipped.
_live_slabs: weakref.WeakSet[Slab] = weakref.WeakSet()


def _forget_slabs_in_child() -> None:
    for slab in list(_live_slabs):
        slab._forget_in_child()
    _live_slabs.clear()


os.register_at_fork(after_in_child=_forget_slabs_in_child)


def create_slab(size: int, rank: int) -> Slab:
    """Same as ``Slab.create`` (kept for callers of the function form)."""
    return Slab.create(size, rank)


def destroy_slab(slab: Slab) -> None:
    """Same as ``slab.destroy()``."""
    slab.destroy()


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# -------------------------------------------------------------------------------------------- file images


@dataclass
class CachedTable:
    """What stays the same between saves of the same structure: the data order, the tensor table, the
    header length reserved, and the destination views in the slab."""

    signature: tuple[Any, ...]
    order: list[int]
    table: fmt.TensorTable
    head_len: int = 0
    views_key: tuple[str, int] | None = None
    views: list[torch.Tensor | None] = field(default_factory=list)
    big: list[bool] = field(default_factory=list)  # per view: large enough for a multi-threaded copy_
    # The copy plan of the views: positions (in data order) of the tensors copied one by one (big), and the
    # views of those copied in one batch (small), so that a save of many small tensors splits no list.
    big_at: list[int] = field(default_factory=list)
    small_at: list[int] = field(default_factory=list)
    small_views: list[torch.Tensor] = field(default_factory=list)
    # The last header encoded, with the metadata it was encoded for: a save whose metadata did not change
    # reuses the bytes (the header of 10,000 tensors is about 1 MB of JSON).
    encoded: tuple[dict[str, str], int, fmt.SafetensorsLayout] | None = None
    # Model shards: the index of each of the file's tensors, in data order, in the model's state_dict.
    src_index: list[int] | None = None


# file path -> its cached table; one per client, so steady-state saves skip layout work
LayoutCache = dict[str, Any]  # CachedTable per file, plus the ModelPlan


def forget_views(cache: LayoutCache, slab: Slab) -> None:
    """Drop the cached destination views into ``slab`` (before it is destroyed), so that its mapping is
    released at once instead of when the next save rebuilds the views."""
    for value in cache.values():
        ent = value.pieces if isinstance(value, SharedPlan) else value
        if isinstance(ent, CachedTable) and ent.views_key is not None and ent.views_key[0] == slab.name:
            ent.views, ent.views_key, ent.big = [], None, []


HEADER_SLACK = 256  # bytes reserved in the header so small metadata changes keep the data offset


@dataclass
class FileImage:
    """One file as it will sit in the slab: its header (or raw bytes) and the tensors after it."""

    path: str
    component: str
    kind: str
    head: bytes  # safetensors header (8-byte length + JSON), or the whole index file
    srcs: list[torch.Tensor]  # in file data order
    cached: CachedTable | None
    size: int
    rank: int | None = None
    group_instance: int | None = None
    node: int | None = None
    offset: int = 0  # in the slab, assigned by layout()
    region: Region | None = None  # a SHARDED file: this rank's part of a file every rank writes pieces of

    def spec(self) -> FileSpec:
        if self.region is not None:
            assert self.region.file_size is not None, "finalize_regions() runs before the hand-off"
            return FileSpec(
                path=self.path,
                offset=self.offset,
                length=self.size,
                component=self.component,
                kind="region",
                file_size=self.region.file_size,
                runs=self.region.runs(self.offset, len(self.head)),
            )
        return FileSpec(
            path=self.path,
            offset=self.offset,
            length=self.size,
            component=self.component,
            kind=self.kind,
            rank=self.rank,
            group_instance=self.group_instance,
            node=self.node,
        )


def _encode_header(ent: CachedTable, table: fmt.TensorTable, metadata: dict[str, str]) -> fmt.SafetensorsLayout:
    """``table``'s header padded to the length ``ent`` reserved, growing the reservation (with slack) when the
    metadata outgrows it, so that the data keeps its slab offset from one save to the next."""
    if ent.encoded is not None and ent.encoded[0] == metadata and ent.encoded[1] == ent.head_len and table is ent.table:
        return ent.encoded[2]
    layout = fmt.encode_header(table, metadata, ent.head_len)
    if len(layout.header) > ent.head_len:
        ent.head_len = len(layout.header) + HEADER_SLACK
        layout = fmt.encode_header(table, metadata, ent.head_len)
    if table is ent.table:
        ent.encoded = (dict(metadata), ent.head_len, layout)
    return layout


def _image(
    path: str,
    p: ComponentPlan,
    leaves: list[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    cache: LayoutCache,
    signature: tuple[Any, ...] | None = None,
) -> FileImage:
    if signature is None:
        signature = tuple((name, t.dtype, t.shape) for name, t in leaves)
    ent = cache.get(path)
    if ent is None or ent.signature != signature:
        items = [(name, fmt.safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in leaves]
        order = fmt.alignment_order(items)  # type: ignore[arg-type]
        ent = CachedTable(signature, order, fmt.tensor_table([items[i] for i in order]))  # type: ignore[misc]
        cache[path] = ent
    return _cached_image(path, p, ent, [leaves[i][1] for i in ent.order], metadata)


def _cached_image(
    path: str, p: ComponentPlan, ent: CachedTable, srcs: list[torch.Tensor], metadata: dict[str, str]
) -> FileImage:
    """The image of a file whose table is ``ent``, with its tensors ``srcs`` in data order."""
    layout = _encode_header(ent, ent.table, metadata)
    return FileImage(
        path=path,
        component=p.key,
        kind="safetensors",
        head=layout.header,
        srcs=srcs,
        cached=ent,
        size=layout.file_size,
        rank=p.rank,
        group_instance=p.group_instance,
        node=p.node,
    )


# ------------------------------------------------------------------------------------- SHARDED (regions)


@dataclass(frozen=True)
class PlacedPiece:
    """One piece this rank writes: where its full tensor's data starts in the file, and where it sits."""

    data_begin: int  # the full tensor's data offset in the file's data section
    global_shape: tuple[int, ...]
    itemsize: int
    piece: sharding.Piece
    slab_begin: int  # the piece's data offset after this image's head in the slab
    # Set for a DTensor on a mesh smaller than the job (FSDP over one data-parallel submesh of a 2-D job):
    # other submeshes may hold the very same piece, so the save's vote decides who writes it.
    contested: tuple[str, tuple[int, ...]] | None = None

    @property
    def nbytes(self) -> int:
        return self.piece.numel * self.itemsize


@dataclass
class Region:
    """This rank's share of a shared SHARDED file (full tensors, every writer placing its own pieces).

    ``head_len`` and ``file_size`` are known only after the save's vote: the header is rank 0's (it holds
    rank 0's plain values), and every rank places its data after it."""

    digest: str  # names, dtypes, global shapes and data offsets of the file: equal on every rank
    data_size: int
    pieces: list[PlacedPiece]
    head_len: int | None = None
    dropped: frozenset[tuple[str, tuple[int, ...]]] = frozenset()  # contested pieces another rank writes

    @property
    def file_size(self) -> int | None:
        return None if self.head_len is None else self.head_len + self.data_size

    def runs(self, slab_offset: int, own_head: int) -> list[list[int]]:
        assert self.head_len is not None
        out: list[list[int]] = []
        if own_head:
            out.append([0, slab_offset, own_head, 1, own_head])
        base = slab_offset + own_head
        for pp in self.pieces:
            if pp.contested is not None and pp.contested in self.dropped:
                continue
            out += sharding.piece_runs(
                pp.global_shape, pp.itemsize, pp.piece, self.head_len + pp.data_begin, base + pp.slab_begin
            )
        return out


@dataclass(frozen=True)
class SharedLayout:
    """What each rank says in the save's vote about one shared file, so that every rank can check the
    others agree and place its bytes after rank 0's header."""

    component: str
    digest: str
    data_size: int
    head_len: int | None  # rank 0's header length (None on the other ranks)
    contributed: int  # bytes this rank surely writes into it (rank 0: its header too), contested ones aside
    contested: tuple[tuple[str, tuple[int, ...], int], ...] = ()  # (tensor, offsets, bytes) others may hold too


@dataclass
class SharedPlan:
    """What stays the same between saves of one shared file while names, shapes and placements do."""

    signature: tuple[Any, ...]
    table: fmt.TensorTable  # the full tensors, in file order
    digest: str
    data_size: int
    mine: list[int]  # indices (in the leaves given) of the pieces this rank writes, in slab order
    placed: list[PlacedPiece]
    pieces: CachedTable  # the pieces' table in the slab (and the views into it, and rank 0's header length)


def _shared_image(
    path: str,
    p: ComponentPlan,
    leaves: list[tuple[str, Any]],
    metadata: dict[str, str],
    cache: LayoutCache,
    rank: int,
) -> tuple[FileImage | None, SharedLayout]:
    """This rank's part of one shared file of full tensors: rank 0's header, and every piece this rank
    writes (its DTensor shards where it is the writer of their replicas, plus every plain tensor on rank 0)."""
    signature = tuple(
        (name, t.dtype, tuple(t.shape), tuple(t.placements), t.device_mesh.get_coordinate())
        if sharding.is_dtensor(t)
        else (name, t.dtype, tuple(t.shape))
        for name, t in leaves
    )
    key = f"\0shared:{path}"
    ent = cache.get(key)
    if not isinstance(ent, SharedPlan) or ent.signature != signature:
        items = [(name, fmt.safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in leaves]
        for (name, dtype, _), (_, t) in zip(items, leaves, strict=True):
            if dtype is None or t.layout != torch.strided:
                raise fmt.UnsupportedLeafError(f"{name}: tensor {t.dtype}/{t.layout} cannot be stored in safetensors")
        order = fmt.alignment_order(items)  # type: ignore[arg-type]
        table = fmt.tensor_table([items[i] for i in order])  # type: ignore[misc]
        # Placements and mesh shapes too: ranks that disagree on how a tensor is split would place pieces that
        # add up to its size yet overlap (the daemon's coverage check would refuse it; this says why, earlier).
        layouts = [
            (name, list(t.device_mesh.shape), fmt.describe_placements(t))
            for name, t in leaves
            if sharding.is_dtensor(t)
        ]
        digest = fmt.checksum_bytes(f"{path}|{table.json_fragment}|{json.dumps(layouts)}".encode())
        mine: list[tuple[int, sharding.Piece]] = []  # (index in leaves, piece)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        for i, e in zip(order, table.entries, strict=True):
            t = leaves[i][1]
            if sharding.is_dtensor(t):
                if not sharding.writes_piece(t):
                    continue
                piece = sharding.local_piece(t, leaves[i][0])
            elif rank == 0:
                piece = sharding.Piece((0,) * t.dim(), tuple(t.shape))
            else:
                continue
            if piece.numel and e.end > e.begin:
                mine.append((i, piece))
        piece_items = [(f"{leaves[i][0]}@{i}", items[i][1], piece.shape) for i, piece in mine]
        piece_table = fmt.tensor_table(piece_items)  # type: ignore[arg-type]
        begin_of = {i: e.begin for i, e in zip(order, table.entries, strict=True)}
        placed = [
            PlacedPiece(
                begin_of[i],
                tuple(leaves[i][1].shape),
                leaves[i][1].element_size(),
                piece,
                pe.begin,
                (leaves[i][0], piece.offsets)
                if sharding.is_dtensor(leaves[i][1]) and leaves[i][1].device_mesh.size() < world
                else None,
            )
            for (i, piece), pe in zip(mine, piece_table.entries, strict=True)
        ]
        data_size = table.entries[-1].end if table.entries else 0
        ent = SharedPlan(
            signature, table, digest, data_size, [i for i, _ in mine], placed, CachedTable(signature, [], piece_table)
        )
        cache[key] = ent
    table, digest, data_size, placed, cached = ent.table, ent.digest, ent.data_size, ent.placed, ent.pieces
    mine_idx = ent.mine
    head = b""
    if rank == 0:
        head = _encode_header(cached, table, metadata).header
    srcs = [sharding.local_tensor(leaves[i][1]) for i in mine_idx]
    piece_bytes = cached.table.entries[-1].end if cached.table.entries else 0
    contested = tuple((*pp.contested, pp.nbytes) for pp in placed if pp.contested is not None)
    sure = len(head) + sum(pp.nbytes for pp in placed if pp.contested is None)
    shared = SharedLayout(p.key, digest, data_size, len(head) if rank == 0 else None, sure, contested)
    if not head and not srcs:
        return None, shared
    img = FileImage(
        path=path,
        component=p.key,
        kind="region",
        head=head,
        srcs=srcs,
        cached=cached,
        size=len(head) + piece_bytes,
        region=Region(digest, data_size, placed),
    )
    return img, shared


def _same_layout(a: Any, b: Any) -> bool:
    """Two tensors sharing local memory are one tensor only if they are alike globally too."""
    if sharding.is_dtensor(a) != sharding.is_dtensor(b) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return not sharding.is_dtensor(a) or (a.placements == b.placements and a.device_mesh == b.device_mesh)


def sharded_images(
    p: ComponentPlan, state: Any, max_shard_size: int, cache: LayoutCache, rank: int
) -> tuple[list[FileImage], dict[str, SharedLayout]]:
    """The files of a SHARDED component this rank takes part in, and its word on each for the save's vote.

    A ``model`` component with a flat ``{name: tensor or DTensor}`` state becomes Hugging Face shards of full
    tensors plus ``model.safetensors.index.json`` (rank 0's); anything else one ``<key>_state.safetensors``
    holding the full tensors and, in its header, the tree (with each DTensor's mesh and placements).

    Example:
        >>> images, shared = sharded_images(plan, model.state_dict(), 5 << 30, {}, rank=1)  # doctest: +SKIP
    """
    images: list[FileImage] = []
    shared: dict[str, SharedLayout] = {}
    if p.is_model_index and is_flat_tensor_dict(state):
        names = list(state)
        tied: dict[str, list[str]] = {}
        aliases: set[str] = set()
        # Tied weights share memory: a DTensor's local shard (state_dict() detaches, so objects differ). The
        # same tie must be seen on every rank: the file tables (and their digest) depend on it.
        for first, members in tied_groups([sharding.local_tensor(state[n]) for n in names]).items():
            same = [names[i] for i in members if _same_layout(state[names[first]], state[names[i]])]
            if same:
                tied[names[first]] = same
                aliases.update(same)
        stored = [n for n in names if n not in aliases]
        sizes = [state[n].numel() * state[n].element_size() for n in stored]
        shards = fmt.plan_model_shards(sizes, max_shard_size)
        weight_map: dict[str, str] = {}
        for si, idx in enumerate(shards):
            path = fmt.model_shard_filename(si, len(shards))
            leaves = [(stored[k], state[stored[k]]) for k in idx]
            for name, _ in leaves:
                weight_map[name] = path
            placements = {
                name: {"mesh": list(t.device_mesh.shape), "placements": fmt.describe_placements(t)}
                for name, t in leaves
                if sharding.is_dtensor(t)
            }
            meta = {fmt.PLACEMENTS_METADATA_KEY: json.dumps(placements, separators=(",", ":"))} if placements else {}
            img, layout_ = _shared_image(path, p, leaves, meta, cache, rank)
            shared[path] = layout_
            if img is not None:
                images.append(img)
        if rank == 0:
            groups = [[owner, *aliases] for owner, aliases in tied.items()]
            index = fmt.build_model_index(weight_map, sum(sizes), groups)
            images.append(FileImage(fmt.MODEL_INDEX_NAME, p.key, "index", index, [], None, len(index)))
        return images, shared
    if p.is_model_index:
        raise fmt.UnsupportedLeafError(
            "model: the 'model' component must return a flat {name: tensor} state_dict to be written as "
            "Hugging Face shards; use another key for nested state"
        )
    tree, leaves = fmt.flatten_state(state, p.key, sharded=True)
    meta = {fmt.TREE_METADATA_KEY: json.dumps(tree, separators=(",", ":"), allow_nan=False)}
    path = fmt.component_filename(p.key, SharingPattern.SHARDED.value)
    img, layout_ = _shared_image(path, p, [(leaf.name, leaf.tensor) for leaf in leaves], meta, cache, rank)
    shared[path] = layout_
    return ([img] if img is not None else []), shared


def finalize_regions(
    images: list[FileImage], head_lens: dict[str, int], dropped: dict[str, frozenset[tuple[str, tuple[int, ...]]]]
) -> int:
    """Place this rank's pieces after rank 0's header, whose length the save's vote carried, leaving out the
    contested pieces that a lower rank writes. Returns the bytes left out (staged, never handed off)."""
    left_out = 0
    for img in images:
        if img.region is not None:
            img.region.head_len = head_lens[img.path]
            img.region.dropped = dropped.get(img.path, frozenset())
            left_out += sum(
                pp.nbytes for pp in img.region.pieces if pp.contested is not None and pp.contested in img.region.dropped
            )
    return left_out


def is_flat_tensor_dict(state: Any) -> bool:
    """Whether ``state`` is ``{str: tensor}``; by the set of key and value types, without a Python step per item."""
    if not isinstance(state, dict):
        return False
    return all(issubclass(c, str) for c in set(map(type, state))) and all(
        issubclass(c, torch.Tensor) for c in set(map(type, state.values()))
    )


def _tie_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tied_groups(tensors: list[torch.Tensor]) -> dict[int, list[int]]:
    """``{first index: [alias indices]}`` for tensors that are the same memory (tied weights).

    Screens by data pointer (cheap) and confirms candidates with the full storage/offset/shape/stride key,
    so that a view starting at the same address (``a`` and ``a[:2]``) is not mistaken for a tie.
    """
    ptrs = [t.data_ptr() for t in tensors]
    if len(set(ptrs)) == len(ptrs):
        return {}  # the common case, decided without a Python step per tensor
    by_ptr: dict[int, list[int]] = {}
    for i, p in enumerate(ptrs):
        by_ptr.setdefault(p, []).append(i)
    groups: dict[int, list[int]] = {}
    for members in by_ptr.values():
        if len(members) < 2:
            continue
        # Tensors that start at one address are ties only among those with the same full key (``a[:2]``
        # before ``a`` and ``a``: the two ``a`` are tied, the view is not); the first of each key stays.
        by_key: dict[tuple[Any, ...], list[int]] = {}
        for i in members:
            if tensors[i].numel() > 0:
                by_key.setdefault(_tie_key(tensors[i]), []).append(i)
        for same in by_key.values():
            if len(same) > 1:
                groups[same[0]] = same[1:]
    return dict(sorted(groups.items()))


@dataclass
class ModelPlan:
    """The model's sharding, reused while names, dtypes, shapes and ties stay the same."""

    signature: tuple[Any, ...]
    generation: int  # distinguishes plans, so shard tables can be keyed by (generation, shard)
    stored: list[int]  # indices of the tensors written (aliases of tied weights left out)
    shards: list[list[int]]  # positions in ``stored``, per shard
    index: bytes


_plan_ids = itertools.count()
_MODEL_PLAN = "\0model-plan"  # key of the model plan in a LayoutCache (no file is named like this)


def model_images(
    p: ComponentPlan, state: dict[str, torch.Tensor], max_shard_size: int, cache: LayoutCache
) -> list[FileImage]:
    """The model as Hugging Face shards plus index; tensors that share memory (tied weights) stored once."""
    # Every step below is one pass over the tensors with no per-tensor Python call that can be avoided: a
    # model of 10,000 small tensors must stage in about twice the time of one tensor of the same bytes.
    names = list(state)
    tensors = list(state.values())
    dtensor = sharding.dtensor_type()
    if dtensor is not None and any(issubclass(cls, dtensor) for cls in set(map(type, tensors))):
        for name, t in state.items():
            if isinstance(t, dtensor):
                raise fmt.UnsupportedLeafError(
                    f"model.{name}: a DTensor (placements {fmt.describe_placements(t)}) in a component that is "
                    "not SHARDED; expected plain tensors here: declare the model component SharingPattern.SHARDED"
                )
    ties = tied_groups(tensors)
    # Two C-level passes are cheaper than one of Python tuples (4.6 against 6.0 ms for 10,000 tensors).
    signature = (max_shard_size, names, list(map(_DTYPE, tensors)), list(map(torch.Tensor.size, tensors)))
    signature += (tuple((j, tuple(m)) for j, m in ties.items()),)
    plan = cache.get(_MODEL_PLAN)
    if not isinstance(plan, ModelPlan) or plan.signature != signature:
        for name, t in state.items():
            if fmt.safetensors_dtype(t.dtype) is None or t.layout != torch.strided:
                raise fmt.UnsupportedLeafError(
                    f"model.{name}: tensor {t.dtype}/{t.layout} cannot be stored in safetensors"
                )
        aliases = {i for members in ties.values() for i in members}
        stored = [i for i in range(len(names)) if i not in aliases]
        sizes = [tensors[i].numel() * tensors[i].element_size() for i in stored]
        shards = fmt.plan_model_shards(sizes, max_shard_size)
        weight_map = {
            names[stored[k]]: fmt.model_shard_filename(si, len(shards)) for si, idx in enumerate(shards) for k in idx
        }
        tied = [[names[j]] + [names[i] for i in members] for j, members in ties.items()]
        plan = ModelPlan(
            signature, next(_plan_ids), stored, shards, fmt.build_model_index(weight_map, sum(sizes), tied)
        )
        cache[_MODEL_PLAN] = plan  # type: ignore[assignment]
    images = []
    for si, idx in enumerate(plan.shards):
        path = fmt.model_shard_filename(si, len(plan.shards))
        # The plan's signature already covers these leaves: no need to recompute one per shard.
        shard_sig = ("model-plan", plan.generation, si)
        ent = cache.get(path)
        if isinstance(ent, CachedTable) and ent.signature == shard_sig and ent.src_index is not None:
            images.append(_cached_image(path, p, ent, [tensors[j] for j in ent.src_index], {}))
            continue
        leaves = [(names[plan.stored[k]], tensors[plan.stored[k]]) for k in idx]
        img = _image(path, p, leaves, {}, cache, shard_sig)
        assert img.cached is not None
        img.cached.src_index = [plan.stored[idx[i]] for i in img.cached.order]
        images.append(img)
    images.append(FileImage(fmt.MODEL_INDEX_NAME, p.key, "index", plan.index, [], None, len(plan.index)))
    return images


def component_images(p: ComponentPlan, state: Any, max_shard_size: int, cache: LayoutCache) -> list[FileImage]:
    """The files of one component this rank writes. Raises UnsupportedLeafError naming a bad leaf."""
    if p.is_model_index and is_flat_tensor_dict(state):
        return model_images(p, state, max_shard_size, cache)
    if p.is_model_index:
        raise fmt.UnsupportedLeafError(
            "model: the 'model' component must return a flat {name: tensor} state_dict to be written as "
            "Hugging Face shards; use another key for nested state"
        )
    tree, leaves = fmt.flatten_state(state, p.key)
    meta = {fmt.TREE_METADATA_KEY: json.dumps(tree, separators=(",", ":"), allow_nan=False)}
    return [_image(p.filename, p, [(leaf.name, leaf.tensor) for leaf in leaves], meta, cache)]


def layout(images: list[FileImage]) -> int:
    """Assign each file its slab offset; returns the bytes needed."""
    offset = 0
    for img in images:
        img.offset = offset
        offset = _round_up(offset + img.size, REGION_ALIGN)
    return offset


# ----------------------------------------------------------------------------------------------- copying


@dataclass
class CopyStats:
    bytes: int = 0
    tensors: int = 0
    cuda_bytes: int = 0
    deferred_names: list[str] = field(default_factory=list)  # component.tensor of each deferred copy


def _views(slab: Slab, img: FileImage) -> list[torch.Tensor | None]:
    """Destination views of ``img``'s tensors in the slab, reused while the slab and offsets stay put."""
    ent = img.cached
    assert ent is not None
    base = img.offset + len(img.head)
    key = (slab.name, base)
    if ent.views_key != key:
        views: list[torch.Tensor | None] = []
        for e in ent.table.entries:
            if e.end == e.begin:
                views.append(None)
            else:
                dtype = fmt.torch_dtype(e.dtype)
                views.append(slab.tensor[base + e.begin : base + e.end].view(dtype).view(e.shape))
        ent.views, ent.views_key = views, key
        ent.big = [e.end - e.begin >= BIG_COPY for e in ent.table.entries]
        ent.big_at = [i for i, v in enumerate(views) if v is not None and ent.big[i]]
        ent.small_at = [i for i, v in enumerate(views) if v is not None and not ent.big[i]]
        ent.small_views = [views[i] for i in ent.small_at]  # type: ignore[misc]
    return ent.views


def copy_into(
    slab: Slab,
    images: list[FileImage],
    side_streams: dict[int, Any],
    defer: Any = None,
) -> tuple[CopyStats, list[tuple[torch.Tensor, torch.Tensor, bool]]]:
    """One copy per byte: headers, then every tensor into its place. CUDA tensors go device-to-host on a
    side stream (non-blocking into pinned memory) that is synchronised before this returns.

    ``defer(src)``, when given, picks the tensors *not* copied now (overlapped staging: those only
    ``optimizer.step()`` changes) among those of at least ``DEFER_MIN`` bytes; they come back as
    ``(dst, src, big)`` for :func:`copy_pairs`, and their bytes count in the stats. Returns the stats and the
    deferred copies."""
    stats = CopyStats()
    mv = memoryview(slab.mm)
    try:
        for img in images:
            mv[img.offset : img.offset + len(img.head)] = img.head
    finally:
        mv.release()
    now: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    later: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    if defer is None and not any(any(map(_IS_CUDA, img.srcs)) for img in images):
        # Host tensors only, nothing deferred: the cached copy plan, with no per-tensor Python in between.
        with torch.no_grad():
            small_dst: list[torch.Tensor] = []
            small_src: list[torch.Tensor] = []
            for img in images:
                if img.cached is None:
                    continue
                views, ent, srcs = _views(slab, img), img.cached, img.srcs
                for i in ent.big_at:
                    views[i].copy_(srcs[i])  # type: ignore[union-attr]
                small_dst += ent.small_views
                small_src += srcs if len(ent.small_at) == len(srcs) else [srcs[i] for i in ent.small_at]
                stats.tensors += len(srcs)
                stats.bytes += img.size - len(img.head)
            _batch_copy(small_dst, small_src)
        return stats, later
    for img in images:
        if img.cached is None:
            continue
        views = _views(slab, img)
        entries = img.cached.table.entries
        for dst, src, is_big, e in zip(views, img.srcs, img.cached.big, entries, strict=True):
            if dst is None:
                continue
            if defer is not None and dst.nbytes >= DEFER_MIN and defer(src):
                later.append((dst, src, is_big))
                stats.deferred_names.append(f"{img.component}.{e.name}")
            else:
                now.append((dst, src, is_big))
        stats.tensors += len(img.srcs)
        stats.bytes += img.size - len(img.head)
    stats.cuda_bytes = copy_pairs(now, side_streams, slab.pinned)
    stats.cuda_bytes += sum(dst.nbytes for dst, src, _ in later if src.is_cuda)
    return stats, later


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor, bool]], side_streams: dict[int, Any], pinned: bool) -> int:
    """Copy ``(dst, src, big)`` pairs: those of a save's ``copy_into``, and its deferred ones (overlapped
    staging, on the client's copy thread). Returns the bytes copied from CUDA devices."""
    small_dst: list[torch.Tensor] = []
    small_src: list[torch.Tensor] = []
    big: list[tuple[torch.Tensor, torch.Tensor]] = []
    cuda: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src, is_big in pairs:
        if src.is_cuda:
            cuda.append((dst, src))
        elif is_big:
            big.append((dst, src))
        else:
            small_dst.append(dst)
            small_src.append(src)
    cuda_bytes = 0
    with torch.no_grad():
        used: dict[int, Any] = {}
        for dst, src in cuda:
            dev = src.device.index if src.device.index is not None else torch.cuda.current_device()
            stream = used.get(dev)
            if stream is None:
                stream = side_streams.get(dev)
                if stream is None:
                    stream = side_streams[dev] = torch.cuda.Stream(device=dev)
                # The side stream must see every kernel that produced the state so far.
                stream.wait_stream(torch.cuda.current_stream(dev))
                used[dev] = stream
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=pinned)
            cuda_bytes += dst.nbytes
        # The host copies run while the device-to-host copies are in flight. Large tensors go through
        # copy_, which is multi-threaded; small ones in one dispatch.
        for dst, src in big:
            dst.copy_(src)
        _batch_copy(small_dst, small_src)
        for stream in used.values():
            stream.synchronize()
    return cuda_bytes


_IS_CUDA = operator.attrgetter("is_cuda")
_DTYPE = operator.attrgetter("dtype")
BATCH_SPLIT = 2048  # host tensors from which a batched copy is split across two threads


def _batch_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy many small host tensors in as few dispatches as torch allows (``_foreach_copy_``). Its cost is
    about 2 us of dispatch per tensor, not the bytes, and it releases the GIL, so a large batch is split
    between this thread and a second one where torch may use more than one thread."""
    if len(dsts) <= 16 or not hasattr(torch, "_foreach_copy_"):
        for dst, src in zip(dsts, srcs, strict=True):
            dst.copy_(src)
        return
    if len(dsts) < BATCH_SPLIT or torch.get_num_threads() < 2:
        torch._foreach_copy_(dsts, srcs)
        return
    half = len(dsts) // 2
    failed: list[BaseException] = []

    def second_half() -> None:
        try:
            with torch.no_grad():
                torch._foreach_copy_(dsts[half:], srcs[half:])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    helper = threading.Thread(target=second_half, name="ckptd-batch-copy", daemon=True)
    helper.start()
    try:
        torch._foreach_copy_(dsts[:half], srcs[:half])
    finally:
        helper.join()
    if failed:
        raise failed[0]


# -------------------------------------------------------------------------------------------- validation


def replication_digest(state: Any, key: str, level: ValidationLevel, sharded: bool = False) -> str | None:
    """A digest that is equal on two ranks iff their REPLICATED state agrees at ``level``. With ``sharded``
    (a SHARDED component) only its plain values count: DTensors differ between ranks by design."""
    if level == ValidationLevel.NONE:
        return None
    tree, leaves = fmt.flatten_state(state, key, sharded=sharded)
    h = fmt.new_hasher()
    h.update(json.dumps(tree, sort_keys=True, allow_nan=False).encode())
    for leaf in leaves:
        t = leaf.tensor
        h.update(f"{leaf.name}|{t.dtype}|{tuple(t.shape)}".encode())
        if sharding.is_dtensor(t):
            continue
        if level in (ValidationLevel.TENSOR, ValidationLevel.FULL) and t.numel() > 0:
            raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(raw.numpy()))
    return fmt.format_checksum(h)


def describe_size(n: int) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(len(units) - 1, int(math.log(n, 1024)))
    return f"{n / 1024**i:.1f} {units[i]}"
