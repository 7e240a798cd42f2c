"""Reading checkpoints: which ones exist, and each file's bytes checked against the manifest as they are read.

Every function here reads through ``safeio`` (regular files only, no symlinks, no blocking, bounded) and
hashes through ``checksums`` (one streaming helper), so the CLI, the client's loader and the daemon's
retention all see the same checkpoints and the same verdicts:

- :func:`survey_checkpoints` / :func:`scan_checkpoints`: committed checkpoints by step (never mtime), and
  the ``checkpoint-<int>`` entries that are not checkpoints, each with the reason;
- :func:`verify_checkpoint`: every listed file's type, size, checksum and structure (safetensors header,
  model index);
- :func:`stream_verified`: one file streamed to a sink while it is verified (``ckptd export``);
- :func:`read_verified`, :func:`map_verified`: one file in memory or mapped copy-on-write (the loader);
- :func:`disk_problems`: what ``lstat`` alone reveals, cheap enough for ``ckptd ls``;
- :func:`index_problems`: a model index checked against the manifest (its shards are the model's own
  files) and against the shards' headers (each tensor is where the index says).

A reader of a whole checkpoint passes ``at=`` (a ``safeio.CheckpointDir`` opened once) so that every file is
opened relative to the directory it started with, never through a path resolved again (see ``safeio``).
Whatever the bytes of a file, the only exception its content can cause here is a FormatError naming it.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.format.checksums import Sink, hash_chunks, hash_fd, short_checksum
from ckptd.format.errors import FormatError
from ckptd.format.header import HEADER_LENGTH_BYTES, SafetensorsLayout, header_span, parse_safetensors_header
from ckptd.format.manifest import FileRecord, Manifest, manifest_problems, read_manifest
from ckptd.format.model_index import MAX_INDEX_BYTES, parse_model_index
from ckptd.format.names import (
    CHECKPOINTS_DIRNAME,
    LEASE_NAME,
    MANIFEST_NAME,
    MODEL_INDEX_NAME,
    checkpoints_root,
    is_trash_dirname,
    is_valid_filename,
    parse_checkpoint_dirname,
    parse_temp_dirname,
)
from ckptd.format.safeio import CheckpointDir, entry_problem, open_regular, pread_exact, size_mismatch
from ckptd.format.safejson import brief, brief_text

logger = logging.getLogger(__name__)

Progress = Callable[[int], object]


# ------------------------------------------------------------------------------------ which checkpoints


@dataclass
class CheckpointInfo:
    """A committed checkpoint: its step, directory and parsed manifest."""

    step: int
    path: Path
    manifest: Manifest


@dataclass
class BrokenCheckpoint:
    """A ``checkpoint-<int>`` entry that no reader uses, and why (naming the file at fault)."""

    path: Path
    reason: str


@dataclass
class CheckpointSurvey:
    """Committed checkpoints (oldest step first) and the broken ``checkpoint-<int>`` entries (by name)."""

    found: list[CheckpointInfo] = field(default_factory=list)
    broken: list[BrokenCheckpoint] = field(default_factory=list)


def survey_checkpoints(output_dir: str | os.PathLike) -> CheckpointSurvey:
    """Committed checkpoints under ``output_dir``, and every look-alike with the reason it is not one.

    Only real ``checkpoint-<int>`` directories (not symlinks) whose manifest is a regular file that parses
    and names the same step count. Order is by step, never by mtime; temp and trash directories are ignored.

    Args:
        output_dir: the training output dir (holding ``checkpoints/``).

    Example:
        >>> s = survey_checkpoints("/runs/exp1")  # doctest: +SKIP
        >>> [c.step for c in s.found], [(b.path.name, b.reason) for b in s.broken]
        ([5, 10], [('checkpoint-15', '…/checkpoint-15/checkpoint_manifest.json: is a FIFO, not a regular file; …')])
    """
    root = checkpoints_root(output_dir)
    survey = CheckpointSurvey()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return survey
    for name in names:
        step = parse_checkpoint_dirname(name)
        if step is None:
            continue
        path = root / name
        try:
            manifest = read_manifest(path)
        except FormatError as e:
            reason = str(e)
        except OSError as e:
            reason = f"{path / MANIFEST_NAME}: cannot be read ({e.strerror or e})"
        else:
            if manifest.step == step:
                survey.found.append(CheckpointInfo(step, path, manifest))
                continue
            reason = f"{path / MANIFEST_NAME}: says step {manifest.step}, not {step}; the directory was renamed by hand"
        logger.warning("ignoring %s: %s", path, reason)
        survey.broken.append(BrokenCheckpoint(path, reason))
    survey.found.sort(key=lambda c: c.step)
    survey.broken.sort(key=lambda b: b.path.name)
    return survey


def is_checkpoints_tree(directory: Path) -> bool:
    """True for a directory named ``checkpoints`` that holds anything ckptd puts there (a checkpoint, a temp
    or trash dir, the lease): the ``checkpoints/`` of some output dir, not a user's folder of that name.

    Example:
        >>> is_checkpoints_tree(Path("runs/exp1/checkpoints"))  # doctest: +SKIP
        True
    """
    if directory.name != CHECKPOINTS_DIRNAME:
        return False
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(
        parse_checkpoint_dirname(n) is not None
        or parse_temp_dirname(n) is not None
        or is_trash_dirname(n)
        or n == LEASE_NAME
        for n in names
    )


def checkpoints_tree_of(path: Path) -> Path | None:
    """The ``checkpoints/`` directory of an output dir that ``path`` (resolved) is, or is inside; else None.
    A model save or an export must never land there: it would be taken for a checkpoint or replace one.

    Example:
        >>> checkpoints_tree_of(Path("runs/exp1/checkpoints/checkpoint-7"))  # doctest: +SKIP
        PosixPath('/abs/runs/exp1/checkpoints')
    """
    target = Path(os.path.realpath(path))
    for a in (target, *target.parents):
        if is_checkpoints_tree(a):
            return a
    return None


def scan_checkpoints(output_dir: str | os.PathLike) -> tuple[list[CheckpointInfo], list[Path]]:
    """Committed checkpoints (oldest first) and the names that look like checkpoints but are not.

    :func:`survey_checkpoints` gives the reasons as well.

    Args:
        output_dir: the training output dir (holding ``checkpoints/``).

    Example:
        >>> found, broken = scan_checkpoints("/runs/exp1")  # doctest: +SKIP
    """
    survey = survey_checkpoints(output_dir)
    return survey.found, [b.path for b in survey.broken]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Paths of the committed checkpoints under ``output_dir``, oldest step first.

    Args:
        output_dir: the training output dir.

    Example:
        >>> [p.name for p in list_checkpoints("/runs/exp1")]  # doctest: +SKIP
        ['checkpoint-5', 'checkpoint-10']
    """
    return [c.path for c in survey_checkpoints(output_dir).found]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint with the highest step, or None. Never chosen by mtime.

    Args:
        output_dir: the training output dir.

    Example:
        >>> find_latest_checkpoint("/runs/exp1")  # doctest: +SKIP
        PosixPath('/runs/exp1/checkpoints/checkpoint-10')
    """
    found = survey_checkpoints(output_dir).found
    return found[-1].path if found else None


# ----------------------------------------------------------------------------------------- one file


# What check_structure parsed: (metadata, layout) of a safetensors file, (weight_map, tied) of a model index.
Structure = tuple[dict[str, str], SafetensorsLayout] | tuple[dict[str, str], list[list[str]]] | None

# What hostile content can make a parser raise besides FormatError; each becomes a FormatError naming the file.
_CONTENT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
    MemoryError,
)


def check_structure(fd: int, size: int, path: Path) -> Structure:
    """Check that an open checkpoint file is what its name says: a safetensors file whose header parses and
    whose tensors cover the data exactly, or a valid model index. Reads the header only (bounded).

    Args:
        fd: the open file (from ``safeio.open_regular``).
        size: its size.
        path: its path; the name decides what it must be.

    Returns:
        ``(metadata, layout)`` for a safetensors file, ``(weight_map, tied)`` for the model index, else None.

    Raises:
        FormatError: naming the file (never another exception, whatever its bytes).

    Example:
        >>> shard = ckpt / "model-00001-of-00002.safetensors"
        >>> meta, layout = check_structure(fd, os.fstat(fd).st_size, shard)  # doctest: +SKIP
    """
    try:
        if path.name == MODEL_INDEX_NAME:
            if size > MAX_INDEX_BYTES:
                raise FormatError(f"{size} bytes, larger than any model index can be (at most {MAX_INDEX_BYTES})")
            return parse_model_index(pread_exact(fd, size, 0, path), str(path))
        if path.name.endswith(".safetensors"):
            head = pread_exact(fd, min(size, HEADER_LENGTH_BYTES), 0, path)
            span = header_span(head, size)  # refuses an 8 EiB length before anything is allocated
            return parse_safetensors_header(head + pread_exact(fd, span - len(head), len(head), path), size)
        return None
    except FormatError as e:
        text = str(e)
        raise FormatError(text if text.startswith(str(path)) else f"{path}: {text}") from None
    except _CONTENT_ERRORS as e:  # a parser missed a case: still the file's fault, still named
        raise FormatError(
            f"{path}: cannot be parsed ({type(e).__name__}: {brief_text(str(e))}); the file is damaged, resume from "
            "an older checkpoint"
        ) from None


def _open_checked(path: Path, record: FileRecord, at: CheckpointDir | None = None) -> tuple[int, int]:
    """Open a listed file safely and check its size against the manifest; returns ``(fd, size)``."""
    if not is_valid_filename(path.name):
        raise FormatError(f"{path}: not a name a checkpoint file can have; the manifest is damaged")
    try:
        fd, st = open_regular(path, at=at)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing (manifest lists {record.size} bytes)") from None
    if st.st_size != record.size:
        os.close(fd)
        raise FormatError(size_mismatch(path, record.size, st.st_size))
    return fd, st.st_size


def _check_checksum(path: Path, record: FileRecord, got: str) -> None:
    if got != record.checksum:
        raise FormatError(
            f"{path}: checksum mismatch (manifest {short_checksum(record.checksum)}, file {short_checksum(got)})"
        )


def stream_verified(
    path: Path,
    record: FileRecord,
    *,
    sink: Sink | None = None,
    progress: Progress | None = None,
    verify_checksum: bool = True,
    structure: bool = True,
    at: CheckpointDir | None = None,
) -> Structure:
    """Stream a checkpoint file to ``sink`` while checking it: type, size, checksum, then structure.

    Everything is checked before this returns, but the sink sees the bytes as they are read: a caller
    that copies must write to a temporary name and keep it only if this returns (``ckptd export``).

    Args:
        path: the file; its name must be a checkpoint file name and it must be a regular file.
        record: its manifest entry.
        sink: called with each chunk as a memoryview, right after it is hashed.
        progress: called with the size of each chunk.
        verify_checksum: compare the checksum (without a sink and without this, the data is not read).
        structure: check the safetensors header / model index too.
        at: the checkpoint directory, already open: the file is opened relative to it.

    Returns:
        what :func:`check_structure` parsed (None without ``structure``).

    Raises:
        FormatError: naming the file and what is wrong with it (missing, a FIFO, a symlink, size mismatch,
            checksum mismatch, a header length of 8 EiB...).

    Example:
        >>> with open(tmp, "wb") as out:  # doctest: +SKIP
        ...     stream_verified(ckpt / name, manifest.files[name], sink=out.write)
    """
    fd, size = _open_checked(path, record, at)
    try:
        if verify_checksum or sink is not None:
            got = hash_fd(fd, size, where=path, sink=sink, progress=progress)
            if verify_checksum:
                _check_checksum(path, record, got)
        # After the checksum: a damaged file is reported as such; a forged one (checksum recomputed) here.
        return check_structure(fd, size, path) if structure else None
    finally:
        os.close(fd)


def read_verified(
    path: Path,
    record: FileRecord,
    *,
    verify_checksum: bool = True,
    progress: Progress | None = None,
    max_bytes: int | None = None,
    at: CheckpointDir | None = None,
) -> bytearray:
    """Read a whole checkpoint file, checking its size always and its checksum when asked.

    The file is opened safely and its real size compared with the manifest before the buffer is allocated,
    so a manifest that lies about a size can never make this allocate it. The checksum is computed chunk by
    chunk while the data is still in cache (one extra pass at ~17 GiB/s, not a second read from disk).

    Args:
        path: the file (a regular file with a checkpoint file name).
        record: its manifest entry.
        verify_checksum: compare the checksum.
        progress: called with the size of each chunk read.
        max_bytes: refuse a file larger than this (e.g. MAX_INDEX_BYTES for the model index).
        at: the checkpoint directory, already open: the file is opened relative to it.

    Example:
        >>> index = read_verified(ckpt / MODEL_INDEX_NAME, rec, max_bytes=MAX_INDEX_BYTES)  # doctest: +SKIP
    """
    fd, size = _open_checked(path, record, at)
    try:
        if max_bytes is not None and size > max_bytes:
            raise FormatError(f"{path}: {size} bytes, larger than such a file can be (at most {max_bytes} bytes)")
        buf = bytearray(size)
        got = hash_fd(fd, size, where=path, into=buf, progress=progress)
        if verify_checksum:
            _check_checksum(path, record, got)
        return buf
    finally:
        os.close(fd)


def map_verified(
    path: Path, record: FileRecord, *, verify_checksum: bool = True, at: CheckpointDir | None = None
) -> mmap.mmap:
    """Map a whole checkpoint file copy-on-write, checking its size always and its checksum when asked.

    The mapping shares the page cache: no fresh buffer has to be allocated and faulted in, and no copy is
    made until someone writes to a page (then only that page is copied; the file never changes). Tensors
    built over it keep it alive. Files are never truncated in place (they are replaced by rename), so the
    mapping stays valid even after the checkpoint is deleted.

    Args:
        path: the file (a non-empty regular file with a checkpoint file name).
        record: its manifest entry.
        verify_checksum: compare the checksum.
        at: the checkpoint directory, already open: the file is opened relative to it.

    Example:
        >>> mm = map_verified(ckpt / "optimizer_state.safetensors", rec)  # doctest: +SKIP
    """
    fd, size = _open_checked(path, record, at)
    try:
        if size == 0:
            raise FormatError(f"{path}: empty; a safetensors file holds at least its 8-byte header length")
        # No MAP_POPULATE: on a private writable mapping it would copy every page up front.
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if verify_checksum:
        try:
            _check_checksum(path, record, hash_chunks(mm))
        except FormatError:
            mm.close()
            raise
    return mm


# ----------------------------------------------------------------------------------- whole checkpoint


@dataclass
class VerifyResult:
    """Truthy iff every file matches its manifest entry; ``problems`` names each mismatch."""

    path: Path
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.files_checked} files, {self.bytes_checked} bytes)"
        return f"{self.path}: {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems)


def verify_checkpoint(
    path: str | os.PathLike, *, checksums: bool = True, progress: Progress | None = None
) -> VerifyResult:
    """Check every file of a checkpoint against its manifest entry and its own structure.

    For each listed file: a regular file (never a FIFO, device or symlink: none is opened), its exact size,
    its checksum (unless ``checksums=False``), and its structure (a safetensors header that parses, with every
    rule of the safetensors reader, with tensors covering the data exactly; a valid model index). The
    manifest must be a bounded regular file in a real directory, and agree with itself (component sizes);
    the model index must map tensors only to the model's own shards, each holding the tensors mapped to it.

    The directory is opened once and every file read relative to it, so a checkpoint directory swapped for
    a symlink while this runs is never followed (see ``safeio.CheckpointDir``).

    Args:
        path: the checkpoint directory.
        checksums: compare checksums (reads every byte); False checks types, sizes and headers only.
        progress: called with the number of bytes hashed as verification proceeds.

    Example:
        >>> result = verify_checkpoint("/runs/exp1/checkpoints/checkpoint-10")  # doctest: +SKIP
        >>> bool(result), result.problems
        (False, ['…/model-00001-of-00002.safetensors: is a FIFO, not a regular file; …'])
    """
    path = Path(path)
    result = VerifyResult(path)
    try:
        d = CheckpointDir(path)
    except FileNotFoundError:
        result.problems.append(f"{path / MANIFEST_NAME}: missing; this is not a committed ckptd checkpoint")
        return result
    except FormatError as e:
        result.problems.append(str(e))
        return result
    except OSError as e:
        result.problems.append(f"{path}: cannot be opened ({e.strerror or e})")
        return result
    with d:
        try:
            manifest = read_manifest(d)
        except FormatError as e:
            result.problems.append(str(e))
            return result
        except OSError as e:
            result.problems.append(f"{path / MANIFEST_NAME}: cannot be read ({e.strerror or e})")
            return result
        result.problems.extend(f"{path / MANIFEST_NAME}: {p}" for p in manifest_problems(manifest))
        parsed: dict[str, Structure] = {}
        for rel, record in manifest.files.items():
            fpath = path / rel
            try:
                parsed[rel] = stream_verified(fpath, record, progress=progress, verify_checksum=checksums, at=d)
            except FormatError as e:
                result.problems.append(str(e))
                continue
            except OSError as e:  # e.g. an unreadable file
                result.problems.append(f"{fpath}: cannot be read ({e.strerror or e})")
                continue
            result.files_checked += 1
            result.bytes_checked += record.size
        result.problems.extend(_index_problems_of(path, manifest, parsed))
    return result


def _index_problems_of(path: Path, manifest: Manifest, parsed: dict[str, Structure]) -> list[str]:
    """index_problems for a checkpoint whose files were parsed (``parsed``: file -> check_structure result)."""
    index = parsed.get(MODEL_INDEX_NAME)
    if index is None:
        return []
    weight_map, tied = index
    shard_tensors = {
        rel: {e.name for e in st[1].entries}
        for rel, st in parsed.items()
        if rel != MODEL_INDEX_NAME and st is not None and isinstance(st[1], SafetensorsLayout)
    }
    return index_problems(path, manifest, weight_map, tied, shard_tensors)  # type: ignore[arg-type]


def index_problems(
    checkpoint_dir: Path,
    manifest: Manifest,
    weight_map: dict[str, str],
    tied: list[list[str]],
    shard_tensors: dict[str, set[str]] | None = None,
) -> list[str]:
    """What is wrong with a model index against the manifest and, where known, the shards' headers.

    Every file ``weight_map`` names must be a safetensors file of the index's own component (the model),
    never another component's file (an optimizer state exported as a model shard); every tensor mapped to a
    shard whose header is known (``shard_tensors``) must be in it; every tied group must start with a stored
    tensor and alias names the index does not store.

    Args:
        checkpoint_dir: the checkpoint directory, for messages.
        manifest: its parsed manifest.
        weight_map: tensor name -> shard file, from the index.
        tied: tied groups from the index (stored name first).
        shard_tensors: shard file -> the tensor names its header holds, for the shards read so far.

    Example:
        >>> index_problems(ckpt, manifest, {"w": "optimizer_state.safetensors"}, [])  # doctest: +SKIP
        ['…/model.safetensors.index.json: maps 1 tensor(s) (e.g. 'w') to optimizer_state.safetensors, …']
    """
    where = checkpoint_dir / MODEL_INDEX_NAME
    record = manifest.files.get(MODEL_INDEX_NAME)
    component = manifest.components.get(record.component) if record is not None else None
    own = set(component.files) if component is not None else set()
    problems = []
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        if shard not in own or not shard.endswith(".safetensors"):
            owner = manifest.files[shard].component if shard in manifest.files else None
            what = f"a file of the {owner!r} component" if owner is not None else "not listed in the manifest"
            problems.append(
                f"{where}: maps {len(names)} tensor(s) (e.g. {brief(names[0])}) to {brief(shard)}, which is {what}, "
                f"not a safetensors shard of the {brief(record.component if record else None)} component; the "
                "index is damaged, resume or export from an older checkpoint"
            )
            continue
        if shard_tensors is not None and shard in shard_tensors:
            absent = [n for n in names if n not in shard_tensors[shard]]
            if absent:
                problems.append(
                    f"{where}: maps {len(absent)} tensor(s) (e.g. {brief(absent[0])}) to {shard}, whose header "
                    "does not hold them; the index is damaged, resume or export from an older checkpoint"
                )
    for group in tied:
        if group[0] not in weight_map:
            problems.append(
                f"{where}: tied_weights group {brief(group)} starts with {brief(group[0])}, which no shard stores "
                "(weight_map does not name it); the index is damaged"
            )
        stored_aliases = [a for a in group[1:] if a in weight_map]
        if stored_aliases:
            problems.append(
                f"{where}: tied_weights group {brief(group)} aliases {brief(stored_aliases[0])}, which is stored "
                "in its own right; the index is damaged"
            )
    return problems


def disk_problems(
    checkpoint_dir: Path, manifest: Manifest, *, structure: bool = False, at: CheckpointDir | None = None
) -> list[str]:
    """What the directory entries of a checkpoint reveal against its manifest, without reading any data.

    Catches missing files, FIFOs, devices, symlinks, sizes the manifest lies about (a 909 TiB claim for a
    1 KiB file) and manifest self-contradictions; with ``structure``, also safetensors headers, the model
    index and the index against the manifest and the headers (a few KiB read per file). Checksums are
    ``verify_checkpoint``'s job.

    Args:
        checkpoint_dir: the checkpoint directory.
        manifest: its parsed manifest.
        structure: also check each file's header (``ckptd inspect``); ``ckptd ls`` leaves it off.
        at: the checkpoint directory, already open (else it is opened here, once).

    Example:
        >>> disk_problems(ckpt, read_manifest(ckpt))  # doctest: +SKIP
        ['…/model-00001-of-00002.safetensors: size mismatch (manifest 999474621104128 bytes, file 1221 bytes)']
    """
    if at is None:
        try:
            with CheckpointDir(checkpoint_dir) as d:
                return disk_problems(checkpoint_dir, manifest, structure=structure, at=d)
        except FormatError as e:
            return [str(e)]
        except OSError as e:
            return [f"{checkpoint_dir}: cannot be opened ({e.strerror or e})"]
    problems = [f"{checkpoint_dir / MANIFEST_NAME}: {p}" for p in manifest_problems(manifest)]
    parsed: dict[str, Structure] = {}
    for rel, record in manifest.files.items():
        fpath = checkpoint_dir / rel
        problem = entry_problem(fpath, record.size, at=at)
        if problem is None and structure:
            try:
                fd, size = _open_checked(fpath, record, at)
                try:
                    parsed[rel] = check_structure(fd, size, fpath)
                finally:
                    os.close(fd)
            except FormatError as e:
                problem = str(e)
            except OSError as e:
                problem = f"{fpath}: cannot be read ({e.strerror or e})"
        if problem is not None:
            problems.append(problem)
    if structure:
        problems.extend(_index_problems_of(checkpoint_dir, manifest, parsed))
    return problems
