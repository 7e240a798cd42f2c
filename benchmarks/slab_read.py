"""What it costs the daemon to read a staging slab safely: mmap of a sealed memfd vs pread from a kept fd.

A slab that a same-user process truncates mid-write kills a daemon that reads it through a plain mapping
(SIGBUS). Two fixes were on the table (issue 5, defect 10):

* ``memfd``: the slab is a memfd sealed against shrinking (``F_SEAL_SHRINK``), so no truncation can happen
  and the daemon keeps hashing and writing straight from its mapping, as before;
* ``pread``: the slab stays a /dev/shm file and the daemon copies each chunk into a private buffer with
  ``os.preadv`` (a truncated file gives a short read, not SIGBUS), then hashes and writes the buffer.

Both then write the chunk to a file. This prints, for the same bytes, the daemon-side time of each (hash +
write of every chunk, then one fsync), interleaved over repeats, medians and the ratio. The pread path adds
one memcpy of the whole checkpoint to the daemon's work (CPU and memory bandwidth taken from training).

    python benchmarks/slab_read.py --size-mib 1024 --repeats 7 --dir /tmp
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import statistics
import tempfile
import time

import xxhash

CHUNK = 32 * 1024 * 1024


def make_memfd(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("ckptd-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    pattern = os.urandom(1 << 20)
    for off in range(0, size, len(pattern)):
        mm[off : off + len(pattern)] = pattern
    return fd, mm


def via_mmap(mm: mmap.mmap, size: int, out: str) -> float:
    t0 = time.perf_counter()
    h = xxhash.xxh3_128()
    view = memoryview(mm)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, CHUNK):
            chunk = view[off : off + CHUNK]
            h.update(chunk)
            os.write(fd, chunk)
            chunk.release()
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
    return time.perf_counter() - t0


def via_pread(slab_fd: int, size: int, out: str, buf: bytearray) -> float:
    t0 = time.perf_counter()
    h = xxhash.xxh3_128()
    mv = memoryview(buf)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, CHUNK):
            n = os.preadv(slab_fd, [mv[: min(CHUNK, size - off)]], off)
            if n <= 0:
                raise OSError("short read: the slab was truncated")
            h.update(mv[:n])
            os.write(fd, mv[:n])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size = args.size_mib << 20
    slab_fd, mm = make_memfd(size)
    buf = bytearray(CHUNK)
    out = os.path.join(args.dir, f"ckptd-slab-read-{os.getpid()}.bin")
    times: dict[str, list[float]] = {"memfd mmap": [], "pread copy": []}
    try:
        via_mmap(mm, size, out)  # warm-up: page cache and file blocks
        for i in range(args.repeats):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for name in order:
                t = via_mmap(mm, size, out) if name == "memfd mmap" else via_pread(slab_fd, size, out, buf)
                times[name].append(t)
    finally:
        mm.close()
        os.close(slab_fd)
        if os.path.exists(out):
            os.unlink(out)
    base = statistics.median(times["memfd mmap"])
    print(f"{args.size_mib} MiB, {args.repeats} interleaved repeats, hash + write + fsync, medians:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:12s} {med:7.3f} s  ({size / med / 2**30:5.2f} GiB/s)  {med / base:5.2f}x memfd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
