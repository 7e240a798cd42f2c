"""Opening checkpoint files: regular files only, never through a symlink, never blocking, always bounded.

A checkpoint directory holds nothing but regular files the daemon wrote, and is itself a real directory
that appeared by rename. Anything else found there was planted or damaged, and reading it naively could
block forever (a FIFO), never end (a symlink to /dev/zero), or read outside the checkpoint (a symlink to
/etc/passwd). So every reader of a checkpoint opens through here:

- the entry is ``lstat``-ed first and refused unless it is a regular file (a checkpoint directory: unless it
  is a real directory), without ever being opened;
- it is then opened with ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` and ``fstat``-ed again, so an
  entry swapped in between is refused too, and a FIFO can never block the open;
- whole-file reads (manifest, index) are bounded by a limit checked against the size before any buffer is
  allocated, and again while reading;
- a reader of a whole checkpoint opens its directory once (:class:`CheckpointDir`: ``O_DIRECTORY |
  O_NOFOLLOW``) and every file relative to that descriptor (``openat``), so a checkpoint directory renamed
  away and replaced by a symlink (or another directory) halfway through is never followed: the reader goes
  on reading the directory it started with.

Errors are FormatError naming the file, what it is, and what to do.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ckptd.format.errors import FormatError

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def describe_mode(mode: int) -> str:
    """What kind of directory entry a stat mode is, for messages.

    Args:
        mode: ``st_mode`` from lstat/fstat.

    Example:
        >>> describe_mode(os.lstat("/dev/null").st_mode)
        'a character device'
    """
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"a special file (mode {mode:o})"


def _link_target(path: str | os.PathLike, dir_fd: int | None = None) -> str:
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except OSError:
        return "?"


def not_a_regular_file(path: str | os.PathLike, mode: int, target: str | None = None) -> FormatError:
    """The error for a checkpoint file that is not a regular file (a FIFO, a symlink, a device...).

    Args:
        path: the file.
        mode: its ``st_mode`` from lstat (so that a symlink shows as one).
        target: where a symlink points (read from ``path`` when not given).

    Example:
        >>> str(not_a_regular_file("ckpt/model-00001-of-00001.safetensors", stat.S_IFIFO))[:60]
        'ckpt/model-00001-of-00001.safetensors: is a FIFO, not a regu'
    """
    if stat.S_ISLNK(mode):
        return FormatError(
            f"{path}: is a symbolic link (to {target or _link_target(path)}), not a regular file; checkpoint files are "
            "never symlinks, so ckptd does not follow it: restore the real file, or resume from an older checkpoint"
        )
    return FormatError(
        f"{path}: is {describe_mode(mode)}, not a regular file; ckptd reads regular files only and did not open "
        "it: restore the real file, or resume from an older checkpoint"
    )


def open_regular(path: str | os.PathLike, *, at: CheckpointDir | None = None) -> tuple[int, os.stat_result]:
    """Open a checkpoint file for reading: a regular file only, never through a symlink, never blocking.

    Args:
        path: the file; the caller has checked its name (``is_valid_filename``) and its directory.
        at: the checkpoint directory it is in, already open: the file is then opened relative to that
            descriptor (``path`` must be ``at.path / name``), never by resolving ``path`` again.

    Returns:
        ``(fd, stat)``; the caller closes ``fd``.

    Raises:
        FileNotFoundError: nothing is there (callers report it as a missing file).
        FormatError: something other than a regular file is there.

    Example:
        >>> fd, st = open_regular(ckpt / "optimizer_state.safetensors")  # doctest: +SKIP
        >>> os.close(fd)
    """
    name: str | os.PathLike = path
    dir_fd = None
    if at is not None:
        name, dir_fd = at.name_of(path), at.fd
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise not_a_regular_file(path, st.st_mode, _link_target(name, dir_fd) if stat.S_ISLNK(st.st_mode) else None)
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a symlink or a socket since the lstat
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            raise not_a_regular_file(path, mode, _link_target(name, dir_fd) if stat.S_ISLNK(mode) else None) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_a_regular_file(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_exact(fd: int, n: int, offset: int, where: str | os.PathLike) -> bytes:
    """Exactly ``n`` bytes at ``offset`` (the fd's position is left alone); a short file is a FormatError.

    Args:
        fd: an open regular file.
        n: bytes to read (the caller has bounded it).
        offset: where to read from.
        where: the file's path, for messages.

    Example:
        >>> pread_exact(fd, 8, 0, path)  # doctest: +SKIP
        b'\\x90\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    parts = []
    got = 0
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            raise FormatError(f"{where}: file ended at byte {offset + got}, {n - got} bytes short of what it declares")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_bounded(path: str | os.PathLike, limit: int, what: str, *, at: CheckpointDir | None = None) -> bytes:
    """The whole content of a small regular file (a manifest, an index), never more than ``limit`` bytes.

    Args:
        path: the file.
        limit: the most bytes such a file may hold; a larger one is refused before anything is allocated.
        what: what the file is, for messages ("manifest").
        at: its checkpoint directory, already open (see :func:`open_regular`).

    Raises:
        FileNotFoundError: nothing is there.
        FormatError: not a regular file, or larger than ``limit``.

    Example:
        >>> read_bounded(ckpt / "checkpoint_manifest.json", 64 << 20, "manifest")[:1]  # doctest: +SKIP
        b'{'
    """
    fd, st = open_regular(path, at=at)
    try:
        if st.st_size > limit:
            raise _too_large(path, st.st_size, limit, what)
        chunks = []
        total = 0
        # Read to the real end, not to st_size: a file still growing is caught by the bound too.
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(path, total, limit, what)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_large(path: str | os.PathLike, size: int, limit: int, what: str) -> FormatError:
    return FormatError(
        f"{path}: {size} bytes or more, larger than any {what} can be (at most {limit} bytes); the file is "
        "damaged or not what its name says: resume from an older checkpoint"
    )


def check_directory(path: str | os.PathLike) -> os.stat_result:
    """Refuse a checkpoint directory that is a symlink or not a directory at all (lstat, never followed).

    ckptd makes a checkpoint appear by renaming a real directory, so a symlink named ``checkpoint-<step>``
    was planted by hand; following it would read files from anywhere.

    Args:
        path: the checkpoint directory.

    Raises:
        FileNotFoundError: nothing is there.
        FormatError: a symlink or something other than a directory.

    Example:
        >>> check_directory(Path("out/checkpoints/checkpoint-5"))  # doctest: +SKIP
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise FormatError(
            f"{path}: is a symbolic link (to {_link_target(path)}), not a checkpoint directory; ckptd commits "
            "checkpoints by renaming real directories and never follows a link in their place: pass the "
            "directory it points to, or remove the link"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise FormatError(
            f"{path}: is {describe_mode(st.st_mode)}, not a checkpoint directory; pass a checkpoint directory "
            "such as OUTPUT_DIR/checkpoints/checkpoint-<step>"
        )
    return st


_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CheckpointDir:
    """A checkpoint directory opened once, so that every file in it is opened relative to that descriptor.

    Opened with ``O_DIRECTORY | O_NOFOLLOW`` after :func:`check_directory`: a symlink or anything but a real
    directory is refused with a FormatError. Every later open (:func:`open_regular` with ``at=``) is an
    ``openat`` on this descriptor with a single-component name, so if the directory is renamed away and a
    symlink put in its place halfway through a verify, an export or a load, the reader still reads the
    directory it started with, never the link.

    Use it as a context manager (or call :meth:`close`).

    Example:
        >>> with CheckpointDir("out/checkpoints/checkpoint-5") as d:  # doctest: +SKIP
        ...     fd, st = open_regular(d.path / "optimizer_state.safetensors", at=d)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Open ``path``; raises FileNotFoundError if nothing is there, FormatError if it is not a real directory."""
        self.path = Path(path)
        check_directory(self.path)
        try:
            self.fd = os.open(self.path, _DIRECTORY_FLAGS)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped since the lstat
                check_directory(self.path)  # says what is there now
                raise FormatError(
                    f"{self.path}: was replaced while being opened; a committed checkpoint never changes: "
                    "check what is modifying it, then retry"
                ) from None
            raise

    def name_of(self, path: str | os.PathLike) -> str:
        """The name of ``path`` inside this directory; refuses a path that is not ``self.path / <name>``."""
        p = Path(path)
        if p.parent != self.path or p.name in ("", ".", ".."):
            raise ValueError(f"{p} is not a file directly inside {self.path}")
        return p.name

    def lstat(self, path: str | os.PathLike) -> os.stat_result:
        """``lstat`` of ``self.path / name``, relative to the open directory."""
        return os.stat(self.name_of(path), dir_fd=self.fd, follow_symlinks=False)

    def link_target(self, path: str | os.PathLike) -> str:
        return _link_target(self.name_of(path), self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CheckpointDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def entry_problem(path: Path, expected_size: int, *, at: CheckpointDir | None = None) -> str | None:
    """What is wrong with a listed checkpoint file judged by ``lstat`` alone (no open, no read), or None.

    Cheap enough for ``ckptd ls`` over every checkpoint: it catches a missing file, anything that is not a
    regular file, and a size the manifest lies about.

    Args:
        path: the file.
        expected_size: the size its manifest record claims.
        at: its checkpoint directory, already open (the lstat is then relative to it).

    Example:
        >>> entry_problem(ckpt / "optimizer_state.safetensors", 909 << 40)  # doctest: +SKIP
        '…/optimizer_state.safetensors: size mismatch (manifest 999474621104128 bytes, file 1221 bytes)'
    """
    try:
        st = at.lstat(path) if at is not None else os.lstat(path)
    except FileNotFoundError:
        return f"{path}: missing (manifest lists {expected_size} bytes)"
    except OSError as e:
        return f"{path}: cannot be examined ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        target = (at.link_target(path) if at is not None else None) if stat.S_ISLNK(st.st_mode) else None
        return str(not_a_regular_file(path, st.st_mode, target))
    if st.st_size != expected_size:
        return size_mismatch(path, expected_size, st.st_size)
    return None


def size_mismatch(path: str | os.PathLike, expected: int, actual: int) -> str:
    """The message for a file whose size is not what its manifest says.

    Args:
        path: the file.
        expected: the manifest's size.
        actual: the file's size.

    Example:
        >>> size_mismatch("x_state.safetensors", 10, 7)
        'x_state.safetensors: size mismatch (manifest 10 bytes, file 7 bytes)'
    """
    return f"{path}: size mismatch (manifest {expected} bytes, file {actual} bytes)"
