"""The daemon's write path: map a rank's staging segment and turn byte ranges of it into durable files.

Each file of a part is written as one contiguous range of the segment (the client laid the safetensors
header and data out back to back), hashed chunk by chunk while the bytes are still in cache, and fsynced.
A *shared* file (SHARDED state: several ranks, possibly on several nodes, each hold distinct pieces of
it) is written in regions instead: each part places its runs at their file offsets (``write_regions``),
and the whole file is checked and hashed once at commit, when every part is in.
Nothing here decides *which* files a checkpoint has or *when* it commits: that is transactions.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptd import format as fmt
from ckptd.protocol import FileSpec

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
LEGACY_SLAB_PREFIX = "ckptd-"  # /dev/shm slabs of ckptd before slabs became memfds
# Small enough that a chunk is still in cache when it is written after being hashed (the copy into the page
# cache reads it again). Measured 2026-12-03: 4, 8 and 16 MiB all about 0.35-0.38 CPU s/GiB, 0.86-0.96 s/GiB.
WRITE_CHUNK = 8 * 1024 * 1024
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


@dataclass
class Segment:
    """A read-only mapping of a rank's staging slab (a sealed memfd), cached by the daemon across saves."""

    name: str
    pid: int
    fd_number: int  # the slab's fd number in the rank's process
    inode: int
    size: int
    mm: mmap.mmap

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.pid, self.fd_number, self.inode)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # A writer thread still holds a view; the mapping is released when the view goes.
            logger.debug("segment %s still referenced at close", self.name)


def open_segment(name: str, pid: int, fd_number: int, inode: int, min_size: int) -> Segment:
    """Map a rank's slab read-only through ``/proc/<pid>/fd/<fd_number>``.

    The rank is alive and waiting for our answer while this runs. The slab must be the memfd it named
    (inode), belong to this user, and be sealed against shrinking: a truncated mapping would kill the daemon
    with SIGBUS mid-write, and the seal makes truncation impossible for every process. Our mapping stays
    valid after the rank exits or closes its fd; the kernel frees the memory when both are gone."""
    path = f"/proc/{pid}/fd/{fd_number}"
    try:
        # O_NONBLOCK: if the fd is a FIFO, opening it must fail below, not block the loop.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise OSError(
            e.errno,
            f"cannot open the staging slab {name} of pid {pid} (fd {fd_number}): {e.strerror}; the trainer may "
            "have exited or given up on this save, or runs in another PID namespace than the daemon",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"staging slab {name} (pid {pid}, fd {fd_number}) is not a memfd")
        if st.st_ino != inode:
            raise ValueError(
                f"staging slab {name}: pid {pid}'s fd {fd_number} is inode {st.st_ino}, the request names {inode} "
                "(the trainer replaced its slab, or the request is stale)"
            )
        if st.st_uid != os.getuid():
            raise PermissionError(f"staging slab {name} belongs to uid {st.st_uid}, not this daemon's user")
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & _F_SEAL_SHRINK:
            raise ValueError(
                f"staging slab {name} is not sealed against shrinking (F_SEAL_SHRINK); the daemon reads only "
                "sealed memfds, which no process can truncate under it"
            )
        if st.st_size < min_size:
            raise ValueError(f"staging slab {name} holds {st.st_size} bytes, the request names {min_size}")
        if st.st_size == 0:
            raise ValueError(f"staging slab {name} is empty")
        # No MAP_POPULATE: faulting the pages in belongs to the writer threads, not to the rank's stall.
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return Segment(name, pid, fd_number, st.st_ino, st.st_size, mm)
    finally:
        os.close(fd)


def segment_is_current(seg: Segment) -> bool:
    """Whether the rank still holds this slab under the same fd (else our mapping only pins memory)."""
    try:
        return os.stat(f"/proc/{seg.pid}/fd/{seg.fd_number}").st_ino == seg.inode
    except OSError:
        return False


def sweep_legacy_slabs() -> list[str]:
    """Unlink /dev/shm slabs of older ckptd versions that no live process has open or mapped."""
    prefix = f"{LEGACY_SLAB_PREFIX}{os.getuid()}-"
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []
    if not names:
        return []
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.split("/dev/shm/", 1)[1].split(" ")[0] for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/") :])
        except OSError:
            continue
    removed = []
    for name in names:
        if name not in used:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        logger.info("removed %d orphaned /dev/shm slab(s) of an older ckptd: %s", len(removed), ", ".join(removed))
    return removed


def validate_file_bytes(seg: Segment, spec: FileSpec) -> None:
    """Check that the range holds what its name promises before any byte reaches the disk.

    A region of a shared file is not checked here: no part holds the whole file, so it is checked (header
    and size) and hashed at commit, once every part is in."""
    if spec.kind == "region":
        return
    view = memoryview(seg.mm)[spec.offset : spec.offset + spec.length]
    try:
        if spec.kind == "index":
            fmt.parse_model_index(bytes(view))
        else:
            if spec.length < 8:
                raise fmt.FormatError(f"{spec.path}: {spec.length} bytes cannot hold a safetensors header")
            n = int.from_bytes(view[:8], "little")
            fmt.parse_safetensors_header(view[: min(spec.length, 8 + min(n, fmt.MAX_HEADER_BYTES))], spec.length)
    except fmt.FormatError as e:
        # The abort reason must say which file of the part is bad.
        msg = str(e)
        raise fmt.FormatError(msg if msg.startswith(spec.path) else f"{spec.path}: {msg}") from None
    finally:
        view.release()


@dataclass
class OpenFile:
    path: Path
    fd: int
    size: int
    checksum: str
    # After its fsync, drop the file's pages from the page cache (POSIX_FADV_DONTNEED): checkpoint bytes
    # must not evict the trainer's cached data. Left False where the bytes are read back soon (a shared
    # file the leader hashes at commit).
    drop_cache: bool = True


Pace = Callable[[int], None]  # called with a chunk's length before the chunk is written; may sleep or raise


DIRECT_ALIGN = 4096
# O_DIRECT writes are synchronous: fewer, larger ones keep the disk busy and cost less CPU per byte. Measured
# 2026-12-03 on the 2-core VM, write_range of 512 MiB + fsync (docs/benchmarks.md), two runs: 32 MiB 0.57 and
# 0.68 s/GiB at 0.087 and 0.091 CPU s/GiB; 8 MiB 0.75 s/GiB at 0.093 and 0.125; 4 MiB 0.75-0.85 s/GiB at
# 0.115-0.128; 64 MiB 0.58-0.65 s/GiB at 0.078-0.083 (within noise of 32 MiB). Paced writes use it too: a
# 32 MiB O_DIRECT write is a ~20 ms burst here, shorter than a training step, at a third less CPU than 8 MiB.
DIRECT_CHUNK = 32 * 1024 * 1024


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))


def write_range(
    seg: Segment,
    spec: FileSpec,
    directory: Path,
    direct: bool = False,
    pace: Pace | None = None,
    written: Pace | None = None,
) -> OpenFile:
    """Write one file's range into ``directory`` (must not exist yet); returns it still open for fsync.

    With ``direct``, the page-aligned body goes out with O_DIRECT straight from the slab (no copy into the
    page cache, no writeback work: less CPU taken from training); the unaligned tail, and any file system
    that refuses O_DIRECT, fall back to ordinary writes. Each chunk is hashed and then written from the
    same slab view: one pass over the bytes, no second read. ``pace`` (``pacing.Pace.wait``) is called
    before each chunk, ``written`` after each write with the bytes it wrote (the daemon's byte counter).
    """
    path = directory / spec.path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    # The shared hash-while-copying helper, sink-less: O_DIRECT's fallback below needs the write loop here.
    hashing = fmt.HashingWriter()
    view = memoryview(seg.mm)
    end = spec.offset + spec.length
    direct_end = spec.offset
    if direct and hasattr(os, "O_DIRECT") and spec.offset % DIRECT_ALIGN == 0:
        direct_end = spec.offset + spec.length // DIRECT_ALIGN * DIRECT_ALIGN
        if direct_end > spec.offset:
            try:
                _set_direct(fd, True)
            except OSError:
                direct_end = spec.offset
    try:
        pos = spec.offset
        while pos < end:
            limit = direct_end if pos < direct_end else end
            chunk = view[pos : min(limit, pos + (DIRECT_CHUNK if pos < direct_end else WRITE_CHUNK))]
            if pace is not None:
                pace(len(chunk))
            hashing.write(chunk)
            done = 0
            while done < len(chunk):
                try:
                    n = os.write(fd, chunk[done:])
                    done += n
                    if written is not None:
                        written(n)
                except OSError as e:
                    if pos >= direct_end or e.errno != errno.EINVAL:
                        raise
                    # This file system does not take O_DIRECT after all: write the rest buffered.
                    _set_direct(fd, False)
                    direct_end = pos
            chunk.release()
            pos += done
            if pos == direct_end and pos < end:
                _set_direct(fd, False)
    except BaseException:
        os.close(fd)
        raise
    finally:
        view.release()
    return OpenFile(path, fd, spec.length, hashing.checksum)


_REGION_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def write_regions(
    seg: Segment,
    spec: FileSpec,
    directory: Path,
    key: int,
    pace: Pace | None = None,
    drop_cache: bool = True,
    written: Pace | None = None,
) -> OpenFile:
    """Write one part's regions of a shared file into ``directory``; returns it still open for fsync.

    Other parts write the same file at the same time (other writer threads, other nodes' daemons), so the
    file is opened without ``O_EXCL`` (but never through a symlink, and ``O_NONBLOCK`` so a FIFO cannot
    block), must be a regular file no larger than ``spec.file_size``, and is extended to that size if it is
    smaller (never shrunk: writers racing to extend it to the same size is harmless). Every run is then
    written at its file offsets with ``pwrite``, buffered (runs are not aligned for O_DIRECT).

    Args:
        seg: the rank's mapped slab.
        spec: a ``"region"`` FileSpec, already validated by ``protocol.parse_file_spec``.
        directory: the transaction's temp dir.
        key: the transaction's coverage key (``format.coverage_key``).
        pace: called with each chunk's length before it is written (``pacing.Pace.wait``).
        drop_cache: whether ``fsync_and_close`` drops the file's cached pages (False where this node hashes
            the whole file at commit and would read them back).
        written: called after each ``pwrite`` with the bytes it wrote.

    Returns:
        The open file; ``size`` is the bytes this part contributed, ``checksum`` is empty (the whole file is
        hashed at commit).

    Raises:
        OSError: on a write error, or when something other than a regular file of at most ``file_size``
            bytes is at the path.
    """
    assert spec.kind == "region" and spec.file_size is not None and spec.runs is not None
    path = directory / spec.path
    fd = os.open(path, _REGION_FLAGS, 0o644)
    view = memoryview(seg.mm)
    contributed = 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(
                errno.EINVAL,
                f"{spec.path} in the temp dir is {stat.filemode(st.st_mode)}, not a regular file; a shared file "
                "is written only into a regular file this transaction's parts create",
                str(path),
            )
        if st.st_size > spec.file_size:
            raise OSError(
                errno.EFBIG,
                f"{spec.path} already holds {st.st_size} bytes, more than the {spec.file_size} bytes this part "
                "declares as its file_size; the ranks writing it disagree on its size",
                str(path),
            )
        if st.st_size < spec.file_size:
            os.ftruncate(fd, spec.file_size)
        for file_offset, slab_offset, run_len, count, stride in spec.runs:
            if count == 1 or stride == run_len:  # one contiguous piece: write it in large chunks
                _pwrite_all(fd, view, slab_offset, count * run_len, file_offset, pace, written)
            else:
                for i in range(count):
                    _pwrite_all(fd, view, slab_offset + i * run_len, run_len, file_offset + i * stride, pace, written)
            contributed += count * run_len
    except BaseException:
        os.close(fd)
        raise
    finally:
        view.release()
    coverage = fmt.format_coverage(fmt.coverage_fingerprint(spec.runs or [], key))
    return OpenFile(path, fd, contributed, coverage, drop_cache=drop_cache)


def _pwrite_all(
    fd: int,
    view: memoryview,
    start: int,
    n: int,
    file_offset: int,
    pace: Pace | None = None,
    written: Pace | None = None,
) -> None:
    """Write ``n`` bytes of ``view`` from ``start`` at ``file_offset``, chunk by chunk, retrying short writes."""
    done = 0
    while done < n:
        with view[start + done : start + min(n, done + WRITE_CHUNK)] as chunk:
            if pace is not None:
                pace(len(chunk))
            wrote = os.pwrite(fd, chunk, file_offset + done)
        if wrote <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {file_offset + done}")
        done += wrote
        if written is not None:
            written(wrote)


def fsync_and_close(f: OpenFile) -> None:
    """fsync, then (``f.drop_cache``) drop the now clean pages from the page cache, then close."""
    try:
        os.fsync(f.fd)
        if f.drop_cache:
            drop_cached_pages(f.fd)
    finally:
        os.close(f.fd)


def drop_cached_pages(fd: int) -> None:
    """POSIX_FADV_DONTNEED over the whole file: its clean cached pages go, so that checkpoint bytes do not
    evict the trainer's page cache (data sets, libraries). Best effort: a file system that ignores it loses
    nothing."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            logger.debug("posix_fadvise(DONTNEED) failed: %s", e)


def write_small_file(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (the manifest)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def rename_exchange(a: Path, b: Path) -> None:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is unavailable (glibc < 2.28); cannot replace a checkpoint atomically")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")
