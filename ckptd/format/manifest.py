"""The manifest: ``checkpoint_manifest.json``, the one file that says what a checkpoint holds.

It is written last into the temp directory, before the rename; a ``checkpoint-<step>`` directory whose
manifest does not parse is not a checkpoint. It is read with a bound of :data:`MAX_MANIFEST_BYTES` from a
regular file only (see ``safeio``), and every file name in it must pass ``is_valid_filename``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckptd.format.errors import FormatError
from ckptd.format.names import FORMAT_VERSION, MANIFEST_NAME, is_valid_filename
from ckptd.format.safeio import check_directory, read_bounded

# A manifest holds a few hundred bytes per file: 64 MiB is ~200,000 files, far beyond any real checkpoint.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Sizes are file offsets (off_t): anything larger is a lie, whatever the file system.
MAX_FILE_SIZE = 2**63 - 1


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
        """The manifest as written to disk (indented JSON, one trailing newline)."""
        return (json.dumps(asdict(self), indent=2, sort_keys=False) + "\n").encode("utf-8")


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
    """Parse and validate a manifest; raises FormatError saying what is wrong.

    Args:
        data: the manifest's bytes.
        where: its path, for messages.

    Example:
        >>> parse_manifest(manifest.to_json()) == manifest  # doctest: +SKIP
        True
    """
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(
            f"{where}: not valid JSON ({type(e).__name__}: {e}); the checkpoint is damaged, resume from an older one"
        ) from None
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: expected a JSON object")
    if raw.get("format") != FORMAT_VERSION:
        raise FormatError(f"{where}: format {raw.get('format')!r}, expected {FORMAT_VERSION!r}")
    try:
        files = {}
        for path, rec in raw["files"].items():
            fr = FileRecord(**rec)
            if fr.path != path or not is_valid_filename(path) or not _is_size(fr.size):
                raise FormatError(f"{where}: invalid file record {path!r}")
            if not isinstance(fr.checksum, str):
                raise FormatError(f"{where}: invalid file record {path!r}: checksum must be a string")
            files[path] = fr
        components = {k: ComponentRecord(**c) for k, c in raw["components"].items()}
        fields = {k: v for k, v in raw.items() if k not in ("files", "components")}
        manifest = Manifest(files=files, components=components, **fields)
    except FormatError:
        raise
    except (KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{where}: missing or unexpected field ({e!r}); the manifest is damaged") from None
    if not isinstance(manifest.step, int) or not isinstance(manifest.world_size, int):
        raise FormatError(f"{where}: step and world_size must be integers")
    for comp in manifest.components.values():
        if not isinstance(comp.files, list) or not all(isinstance(f, str) for f in comp.files):
            raise FormatError(f"{where}: component {comp.key!r}: 'files' must be a list of file names")
        if not _is_size(comp.size_bytes):
            raise FormatError(f"{where}: component {comp.key!r}: size_bytes {comp.size_bytes!r} is not a size")
        for f in comp.files:
            if f not in manifest.files:
                raise FormatError(f"{where}: component {comp.key!r} lists {f!r}, which has no file record")
    return manifest


def read_manifest_bytes(checkpoint_dir: str | os.PathLike) -> bytes:
    """The raw manifest of a checkpoint, read safely: the directory is a real one, the manifest a regular
    file of at most MAX_MANIFEST_BYTES (a FIFO, a symlink to /dev/zero or a huge file is a FormatError).

    Args:
        checkpoint_dir: ``…/checkpoints/checkpoint-<step>``.

    Example:
        >>> json.loads(read_manifest_bytes("out/checkpoints/checkpoint-5"))["step"]  # doctest: +SKIP
        5
    """
    path = Path(checkpoint_dir) / MANIFEST_NAME
    try:
        check_directory(checkpoint_dir)
        return read_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; this is not a committed ckptd checkpoint") from None


def read_manifest(checkpoint_dir: str | os.PathLike) -> Manifest:
    """Read and validate a checkpoint's manifest (see :func:`read_manifest_bytes` for what is refused).

    Args:
        checkpoint_dir: ``…/checkpoints/checkpoint-<step>``.

    Example:
        >>> read_manifest("out/checkpoints/checkpoint-5").step  # doctest: +SKIP
        5
    """
    path = Path(checkpoint_dir) / MANIFEST_NAME
    return parse_manifest(read_manifest_bytes(checkpoint_dir), str(path))


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
