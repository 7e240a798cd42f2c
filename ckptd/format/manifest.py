"""The manifest: ``checkpoint_manifest.json``, the one file that says what a checkpoint holds.

It is written last into the temp directory, before the rename; a ``checkpoint-<step>`` directory whose
manifest does not parse is not a checkpoint. It is read with a bound of :data:`MAX_MANIFEST_BYTES` from a
regular file only (see ``safeio``), parsed in bounded memory (see ``safejson``), and every field must have
its type (a manifest that parses is safe to print, sum and compare), and every file name in it must pass
``is_valid_filename``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptd.format.errors import FormatError
from ckptd.format.names import FORMAT_VERSION, MANIFEST_NAME, MODEL_INDEX_NAME, MODEL_KEY, is_valid_filename
from ckptd.format.safeio import CheckpointDir, read_bounded
from ckptd.format.safejson import brief, load_json

# A manifest holds a few hundred bytes per file: 64 MiB is ~200,000 files, far beyond any real checkpoint.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Sizes are file offsets (off_t): anything larger is a lie, whatever the file system.
MAX_FILE_SIZE = 2**63 - 1
# User metadata and topology are nested JSON; the daemon accepts at most 32 levels (protocol._json_like).
MAX_METADATA_DEPTH = 64


@dataclass
class FileRecord:
    """One file of a checkpoint: exact size and checksum, and whose share it holds."""

    path: str
    size: int
    checksum: str
    component: str
    kind: str = "safetensors"  # "safetensors" or "index"
    rank: int | None = None  # PER_RANK
    group_instance: int | None = None  # PER_GROUP
    node: int | None = None  # PER_NODE
    written_by: int = 0  # global rank whose slab held the bytes
    # The daemon's part records only: kind "region" is one rank's share of a shared file, ``size`` the bytes it
    # contributed and ``file_size`` the whole file's. Never in a manifest: the daemon turns the shares of a
    # shared file into one ordinary record (see ckptd.transactions), and to_json leaves the field out.
    file_size: int | None = None


@dataclass
class ComponentRecord:
    """A superset of the seed's ComponentManifest."""

    key: str
    sharing_pattern: str
    ranks: list[int]  # ranks whose share is in the checkpoint
    replicated_across: list[int] | None = None
    group_name: str | None = None
    group_instances: list[list[int]] | None = None  # PER_GROUP: members of every instance, in index order
    size_bytes: int = 0
    checksum: str | None = None
    required: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    format: str
    checkpoint_path: str
    step: int
    txn: str
    world_size: int
    timestamp: str
    components: dict[str, ComponentRecord]
    files: dict[str, FileRecord]
    topology: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    pytorch_version: str | None = None
    ckptd_version: str | None = None
    training_args_hash: str | None = None

    def to_json(self) -> bytes:
        """The manifest as written to disk (indented JSON, one trailing newline).

        A file record's ``file_size`` (a daemon-internal field of region shares) is left out; a manifest
        holding a region record is refused, since only whole files may be listed."""
        body = asdict(self)
        for path, rec in body["files"].items():
            if rec["kind"] == "region" or rec.pop("file_size") is not None:
                raise ValueError(f"{path}: a region record of a shared file cannot be written into a manifest")
        return (json.dumps(body, indent=2, sort_keys=False) + "\n").encode("utf-8")


def now_timestamp() -> str:
    """The manifest's ``timestamp``: now, ISO-8601 in UTC.

    Example:
        >>> now_timestamp()  # doctest: +SKIP
        '2026-11-23T19:50:00.000000+00:00'
    """
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _is_size(v: object) -> bool:
    # JSON true/false parse as bool, an int subclass: never a size.
    return type(v) is int and 0 <= v <= MAX_FILE_SIZE


def parse_manifest(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate a manifest; raises FormatError saying what is wrong (never another exception).

    Besides the JSON itself (bounded: see ``safejson``), every field must have its type: strings, counts
    (non-negative integers, never booleans), lists of ranks, maps for the metadata (nested at most
    :data:`MAX_METADATA_DEPTH` levels), and each file name must be one a checkpoint file can have.

    Args:
        data: the manifest's bytes.
        where: its path, for messages.

    Example:
        >>> parse_manifest(manifest.to_json()) == manifest  # doctest: +SKIP
        True
    """
    raw = load_json(data, where, "manifest")
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(raw).__name__}; the checkpoint is damaged")
    if raw.get("format") != FORMAT_VERSION:
        raise FormatError(f"{where}: format {brief(raw.get('format'))}, expected {FORMAT_VERSION!r}")
    try:
        files = {}
        for path, rec in raw["files"].items():
            fr = FileRecord(**rec)
            if fr.path != path or not is_valid_filename(path) or not _is_size(fr.size):
                raise FormatError(f"{where}: invalid file record {brief(path)}")
            if not isinstance(fr.checksum, str):
                raise FormatError(f"{where}: invalid file record {brief(path)}: checksum must be a string")
            if fr.kind == "region" or "file_size" in rec:
                # A region share is the daemon's own bookkeeping; a manifest lists whole files only.
                raise FormatError(
                    f"{where}: invalid file record {brief(path)}: a region share of a shared file (kind 'region', "
                    "'file_size') is never a manifest entry; the manifest is damaged, resume from an older checkpoint"
                )
            files[path] = fr
        components = {k: ComponentRecord(**c) for k, c in raw["components"].items()}
        fields = {k: v for k, v in raw.items() if k not in ("files", "components")}
        manifest = Manifest(files=files, components=components, **fields)
    except FormatError:
        raise
    except (KeyError, TypeError, AttributeError) as e:
        raise FormatError(
            f"{where}: missing or unexpected field ({brief(e)}); the manifest is damaged, resume from an older "
            "checkpoint"
        ) from None
    if not _is_count(manifest.step) or not _is_count(manifest.world_size):
        raise FormatError(
            f"{where}: step and world_size must be integers (non-negative), got {brief(manifest.step)} and "
            f"{brief(manifest.world_size)}"
        )
    _check_fields(manifest, _MANIFEST_FIELDS, where, "")
    for key, comp in manifest.components.items():
        context = f"component {brief(key)}: "
        if not isinstance(comp.files, list) or not all(isinstance(f, str) for f in comp.files):
            raise FormatError(f"{where}: {context}'files' must be a list of file names")
        if not _is_size(comp.size_bytes):
            raise FormatError(f"{where}: {context}size_bytes {brief(comp.size_bytes)} is not a size")
        _check_fields(comp, _COMPONENT_FIELDS, where, context)
        if comp.key != key:
            raise FormatError(f"{where}: {context}its record names key {brief(comp.key)}; the manifest is damaged")
        for f in comp.files:
            if f not in manifest.files:
                raise FormatError(f"{where}: component {brief(key)} lists {brief(f)}, which has no file record")
    for path, rec in manifest.files.items():
        _check_fields(rec, _FILE_FIELDS, where, f"file record {brief(path)}: ")
    return manifest


# A field's check: (predicate, what it must be, for messages).
_Check = tuple[Callable[[Any], bool], str]


def _is_count(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_FILE_SIZE


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_counts(v: object) -> bool:
    return isinstance(v, list) and all(_is_count(x) for x in v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _depth_within(v: object, limit: int) -> bool:
    """True if ``v`` nests at most ``limit`` lists/dicts deep (iterative: never a RecursionError)."""
    stack = [(v, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (list, dict)):
            if depth > limit:
                return False
            stack.extend((y, depth + 1) for y in (x.values() if isinstance(x, dict) else x))
    return True


def _is_json_map(v: object) -> bool:
    return isinstance(v, dict) and _depth_within(v, MAX_METADATA_DEPTH)


_STR: _Check = (_is_str, "a string")
_OPT_STR: _Check = (_optional(_is_str), "a string or null")
_COUNT: _Check = (_is_count, "a non-negative integer")
_OPT_COUNT: _Check = (_optional(_is_count), "a non-negative integer or null")
_COUNTS: _Check = (_is_counts, "a list of non-negative integers (ranks)")
_MAP: _Check = (_is_json_map, f"a JSON object nested at most {MAX_METADATA_DEPTH} levels")

_MANIFEST_FIELDS: dict[str, _Check] = {
    "checkpoint_path": _STR,
    "txn": _STR,
    "timestamp": (_is_str, "a string (an ISO-8601 time)"),
    "topology": _MAP,
    "metadata": _MAP,
    "pytorch_version": _OPT_STR,
    "ckptd_version": _OPT_STR,
    "training_args_hash": _OPT_STR,
}
_COMPONENT_FIELDS: dict[str, _Check] = {
    "key": _STR,
    "sharing_pattern": _STR,
    "ranks": _COUNTS,
    "replicated_across": (_optional(_is_counts), "a list of non-negative integers (ranks) or null"),
    "group_name": _OPT_STR,
    "group_instances": (
        _optional(lambda v: isinstance(v, list) and all(_is_counts(m) for m in v)),
        "a list of rank lists or null",
    ),
    "checksum": _OPT_STR,
    "required": (lambda v: isinstance(v, bool), "true or false"),
    "metadata": _MAP,
}
_FILE_FIELDS: dict[str, _Check] = {
    "component": _STR,
    "kind": _STR,
    "rank": _OPT_COUNT,
    "group_instance": _OPT_COUNT,
    "node": _OPT_COUNT,
    "written_by": _COUNT,
}


def _check_fields(record: object, checks: dict[str, _Check], where: str, context: str) -> None:
    for name, (ok, expected) in checks.items():
        value = getattr(record, name)
        if not ok(value):
            raise FormatError(
                f"{where}: {context}field {name!r} must be {expected}, got {brief(value)}; the manifest is "
                "damaged, resume from an older checkpoint"
            )


def read_manifest_bytes(checkpoint_dir: str | os.PathLike | CheckpointDir) -> bytes:
    """The raw manifest of a checkpoint, read safely: the directory is a real one, the manifest a regular
    file of at most MAX_MANIFEST_BYTES (a FIFO, a symlink to /dev/zero or a huge file is a FormatError).

    Args:
        checkpoint_dir: ``…/checkpoints/checkpoint-<step>``, or that directory already open (the manifest is
            then read relative to it: see ``safeio.CheckpointDir``).

    Example:
        >>> json.loads(read_manifest_bytes("out/checkpoints/checkpoint-5"))["step"]  # doctest: +SKIP
        5
    """
    if isinstance(checkpoint_dir, CheckpointDir):
        return _read_manifest_at(checkpoint_dir)
    path = Path(checkpoint_dir) / MANIFEST_NAME
    try:
        d = CheckpointDir(checkpoint_dir)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; this is not a committed ckptd checkpoint") from None
    with d:
        return _read_manifest_at(d)


def _read_manifest_at(d: CheckpointDir) -> bytes:
    path = d.path / MANIFEST_NAME
    try:
        return read_bounded(path, MAX_MANIFEST_BYTES, "manifest", at=d)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; this is not a committed ckptd checkpoint") from None


def read_manifest(checkpoint_dir: str | os.PathLike | CheckpointDir) -> Manifest:
    """Read and validate a checkpoint's manifest (see :func:`read_manifest_bytes` for what is refused).

    Args:
        checkpoint_dir: ``…/checkpoints/checkpoint-<step>``, or that directory already open.

    Example:
        >>> read_manifest("out/checkpoints/checkpoint-5").step  # doctest: +SKIP
        5
    """
    base = checkpoint_dir.path if isinstance(checkpoint_dir, CheckpointDir) else Path(checkpoint_dir)
    return parse_manifest(read_manifest_bytes(checkpoint_dir), str(base / MANIFEST_NAME))


def manifest_problems(manifest: Manifest) -> list[str]:
    """Claims of a manifest that contradict each other (no file is read): a component whose ``size_bytes``
    is not the sum of its files' sizes.

    ckptd always writes consistent manifests, so any problem here means the manifest was edited or damaged.

    Args:
        manifest: a parsed manifest.

    Example:
        >>> manifest_problems(read_manifest("out/checkpoints/checkpoint-5"))  # doctest: +SKIP
        []
    """
    problems = []
    for comp in manifest.components.values():
        total = sum(manifest.files[f].size for f in comp.files)
        if comp.size_bytes != total:
            problems.append(
                f"component {comp.key!r}: size mismatch (manifest size_bytes {comp.size_bytes}, "
                f"its files' records sum to {total} bytes)"
            )
    return problems


STALE_TEMP_S = 60.0  # a manifest temp file this old belongs to no drop still running


def _remove_stale_manifest_temps(path: Path) -> None:
    """The temp manifests of drops killed before their rename (younger ones may be another drop's)."""
    now = time.time()
    for name in os.listdir(path):
        if name.startswith(f".{MANIFEST_NAME}.tmp-"):
            with contextlib.suppress(OSError):
                if now - os.lstat(path / name).st_mtime > STALE_TEMP_S:
                    os.unlink(path / name)


def _names_component(name: str, key: str) -> bool:
    """Whether ``name`` is one of the file names component ``key`` is written to."""
    if key == MODEL_KEY and (
        name == MODEL_INDEX_NAME or re.match(r"model-[0-9]{5,}-of-[0-9]{5,}\.safetensors\Z", name)
    ):
        return True
    return name.startswith(f"{key}_state") and name.endswith(".safetensors")


def drop_component(checkpoint_dir: str | os.PathLike, key: str, force: bool = False) -> list[str]:
    """Leave component ``key`` out of a committed checkpoint: the manifest is rewritten without it (temp
    file, fsync, rename over the old one, fsync the directory), then its files are removed. A crash in
    between leaves files no manifest lists, which no reader opens. Returns the files removed.

    Args:
        checkpoint_dir: ``…/checkpoints/checkpoint-<step>``.
        key: the component's key (``"dataset"``).
        force: drop a component saved as required too (loads then need ``skip=[key]``).

    Raises:
        FormatError: no such component, the last component, or a manifest that cannot be read.

    Example:
        >>> drop_component("/runs/exp1/checkpoints/checkpoint-1000", "dataset")  # doctest: +SKIP
        ['dataset_state.safetensors']
    """
    path = Path(checkpoint_dir)
    manifest = read_manifest(path)
    _remove_stale_manifest_temps(path)
    if key not in manifest.components:
        # A drop killed after its rename left the component's files behind, listed nowhere: finish it.
        leftovers = sorted(
            n for n in os.listdir(path) if is_valid_filename(n) and n not in manifest.files and _names_component(n, key)
        )
        if leftovers:
            for f in leftovers:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / f)
            return leftovers
        raise FormatError(
            f"{path}: no component {key!r} in {MANIFEST_NAME}; expected one of {sorted(manifest.components)}"
        )
    if len(manifest.components) == 1:
        raise FormatError(
            f"{path}: {key!r} is its only component; a checkpoint of nothing would still count as the latest. "
            "Remove the whole checkpoint instead"
        )
    if manifest.components[key].required and not force:
        raise FormatError(
            f"{path}: component {key!r} was saved as required, so load('latest') of this checkpoint would fail "
            f"without it (it does not fall back); pass --force to drop it anyway and then load with "
            f"skip=[{key!r}], or mark it required=False in the training script and save again"
        )
    comp = manifest.components.pop(key)
    others = {f for c in manifest.components.values() for f in c.files}
    gone = [f for f in comp.files if f not in others]
    for f in gone:
        manifest.files.pop(f, None)
    tmp = path / f".{MANIFEST_NAME}.tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = memoryview(manifest.to_json())
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    removed = []
    for f in gone:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / f)
            removed.append(f)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return removed
