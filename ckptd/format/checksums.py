"""Checksums: xxh3-128 of whole files, and the one streaming helper that hashes bytes while they move.

Every byte that enters or leaves a checkpoint is hashed on its way, once, while it is still in cache:
:class:`HashingWriter` hashes each chunk and then hands it to a sink (write it to a file, copy it, or
nothing). :func:`hash_chunks` drives it over a buffer (a staging slab, a mapped file) and :func:`hash_fd`
over an open file; ``ckptd verify``, ``ckptd export``, ``read_verified`` and ``map_verified`` all go
through them, and so can the daemon's writer.

xxh3-128 runs at ~17 GiB/s here against 3.5 GiB/s for zlib.crc32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from ckptd.format.errors import FormatError

CHECKSUM_ALGO = "xxh3-128"
# Large enough to amortise the per-call cost, small enough for a chunk to be hashed and passed on while
# it is still in cache.
READ_CHUNK = 64 * 1024 * 1024

Sink = Callable[[memoryview], object]
Progress = Callable[[int], object]


def new_hasher() -> Any:
    """A fresh xxh3-128 hasher (``update(bytes)``, ``hexdigest()``).

    Example:
        >>> h = new_hasher(); h.update(b"abc"); format_checksum(h)[:9]
        'xxh3-128:'
    """
    return xxhash.xxh3_128()


def format_checksum(hasher: Any) -> str:
    """The manifest form of a hasher's digest: ``xxh3-128:<32 hex digits>``.

    Args:
        hasher: from :func:`new_hasher`.

    Example:
        >>> format_checksum(new_hasher()) == checksum_bytes(b"")
        True
    """
    return f"{CHECKSUM_ALGO}:{hasher.hexdigest()}"


def checksum_bytes(data: bytes | memoryview) -> str:
    """The manifest checksum of ``data``.

    Args:
        data: the bytes (any buffer).

    Example:
        >>> checksum_bytes(b"hello").startswith("xxh3-128:")
        True
    """
    h = new_hasher()
    h.update(data)
    return format_checksum(h)


def combine_checksums(checksums: Iterable[str]) -> str:
    """One checksum for a component that spans several files (the seed manifest's ``checksum``).

    Args:
        checksums: the files' checksums, in path order (the order matters).

    Example:
        >>> combine_checksums([checksum_bytes(b"a"), checksum_bytes(b"b")]).startswith("xxh3-128:")
        True
    """
    return checksum_bytes("\n".join(checksums).encode("ascii"))


def short_checksum(checksum: str) -> str:
    """A checksum shortened for messages: ``xxh3-128 9f3c0a1b2c3d…``.

    Args:
        checksum: a manifest checksum.

    Example:
        >>> short_checksum("xxh3-128:" + "9f" * 16)
        'xxh3-128 9f9f9f9f9f9f…'
    """
    algo, _, digest = str(checksum).partition(":")
    return f"{algo} {digest[:12]}…"


class HashingWriter:
    """Hashes a stream of bytes chunk by chunk, handing each chunk to ``sink`` right after hashing it.

    The chunk is hashed while it is hot in cache, then passed on; ``sink`` must consume it before it
    returns (write it, copy it), because the caller may reuse the buffer. Without a sink it only hashes.

    Args:
        sink: called with each chunk as a memoryview, e.g. a function writing it to a file descriptor.

    Example:
        >>> out = bytearray()
        >>> w = HashingWriter(out.extend)
        >>> w.write(b"abc"); w.write(memoryview(b"def"))
        >>> bytes(out), w.nbytes, w.checksum == checksum_bytes(b"abcdef")
        (b'abcdef', 6, True)
    """

    def __init__(self, sink: Sink | None = None) -> None:
        self._hasher = new_hasher()
        self._sink = sink
        self.nbytes = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hash ``chunk``, then hand it to the sink."""
        view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
        self._hasher.update(view)
        if self._sink is not None:
            self._sink(view)
        self.nbytes += len(view)

    @property
    def checksum(self) -> str:
        """The manifest checksum of everything written so far."""
        return format_checksum(self._hasher)


def hash_chunks(
    data: bytes | bytearray | memoryview | Any,
    chunk_size: int = READ_CHUNK,
    sink: Sink | None = None,
    progress: Progress | None = None,
) -> str:
    """Hash a buffer chunk by chunk, handing each chunk to ``sink`` right after it is hashed.

    The daemon's writer can write a slab range with it: ``hash_chunks(slab[a:b], WRITE_CHUNK,
    sink=write_all(fd))`` hashes each chunk just before it is written, and returns the file's checksum.

    Args:
        data: any buffer (bytes, memoryview, mmap).
        chunk_size: bytes per chunk.
        sink: called with each chunk as a memoryview (see :class:`HashingWriter`).
        progress: called with the size of each chunk once it has been passed on.

    Returns:
        The manifest checksum of ``data``.

    Example:
        >>> hash_chunks(b"abcdef", 4) == checksum_bytes(b"abcdef")
        True
    """
    writer = HashingWriter(sink)
    view = memoryview(data)
    try:
        for pos in range(0, len(view), chunk_size):
            chunk = view[pos : pos + chunk_size]
            try:
                writer.write(chunk)
            finally:
                chunk.release()
            if progress is not None:
                progress(min(chunk_size, len(view) - pos))
    finally:
        view.release()
    return writer.checksum


def hash_fd(
    fd: int,
    size: int,
    *,
    where: str | os.PathLike = "file",
    sink: Sink | None = None,
    into: bytearray | memoryview | None = None,
    progress: Progress | None = None,
    chunk_size: int = READ_CHUNK,
) -> str:
    """Read exactly ``size`` bytes from ``fd`` (from its current offset), hashing each chunk as it arrives.

    Each chunk is handed to ``sink`` right after it is hashed (``ckptd export`` writes it to the
    destination). With ``into``, chunks are read straight into that buffer instead of a scratch one, so a
    whole-file read costs no extra copy.

    Args:
        fd: an open file descriptor (of a regular file: see ``safeio.open_regular``).
        size: bytes to read; a file that ends earlier raises FormatError.
        where: the file's path, for messages.
        sink: called with each chunk as a memoryview.
        into: a buffer of at least ``size`` bytes to read into.
        progress: called with the size of each chunk.
        chunk_size: bytes per read.

    Returns:
        The manifest checksum of the bytes read.

    Example:
        >>> fd = os.open("model-00001-of-00001.safetensors", os.O_RDONLY)
        >>> hash_fd(fd, os.fstat(fd).st_size, where="model-00001-of-00001.safetensors")  # doctest: +SKIP
        'xxh3-128:…'
    """
    if into is not None:
        target = memoryview(into)
        if len(target) < size:
            raise ValueError(f"hash_fd: buffer of {len(target)} bytes cannot hold {size}")
    else:
        target = memoryview(bytearray(min(chunk_size, max(size, 1))))
    writer = HashingWriter(sink)
    pos = 0
    try:
        while pos < size:
            want = min(chunk_size, size - pos)
            start = pos if into is not None else 0
            with target[start : start + want] as window:
                n = os.readv(fd, [window])
                if n <= 0:
                    raise FormatError(
                        f"{where}: file ended after {pos} of {size} bytes; it was truncated while being read"
                    )
                with window[:n] as chunk:
                    writer.write(chunk)
            pos += n
            if progress is not None:
                progress(n)
    finally:
        target.release()
    return writer.checksum
