"""Transactions: how a set of staged parts becomes one committed checkpoint, or nothing at all.

A transaction ``txn`` belongs to one ``(output_dir, step)``. Its states (``protocol.TxnState``)::

    OPEN ──(every expected rank's part written)──> WRITING done ──> COMMITTING ──> COMMITTED
      │                                                                  │
      └──(timeout, write error, a rank aborts, bad part)──> ABORTED <────┘ (rename or fsync failed)

Order of calls, by role (the server drives these; each blocking step runs on a worker thread):

Per part (one per rank of this node), in order:
    1. ``join``            first part opens the transaction and its temp dir
                           ``.tmp-checkpoint-<step>-<txn>``; later parts must agree on step, output_dir,
                           world size and the expected ranks.
    2. ``write_part``      every file of the part: validate its header, write its range, hash it.
    3. (server)            send ``released`` to the rank: its slab may be reused from now on.
    4. ``sync_part``       fsync every file of the part.

Once per transaction, when ``ready_to_commit``:
    5. ``commit``          write and fsync the manifest, fsync the temp dir, rename it to
                           ``checkpoint-<step>`` (or swap it with an existing one by RENAME_EXCHANGE and
                           trash the old), fsync the parent.
    6. ``apply_retention`` keep the newest ``save_total_limit`` checkpoints, never the one just
                           committed, by renaming the others to ``.trash-*``.
    7. ``empty_trash``     remove the trash directories.
    8. (server)            send ``committed`` to every rank of the transaction.

At any point before 5 completes, ``abort`` removes the temp dir; earlier checkpoints are never touched.
``sweep_stale`` removes temp and trash directories that no live transaction owns (daemon start, and the
first transaction in an output dir).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ckptd
from ckptd import format as fmt
from ckptd import writer
from ckptd.protocol import CommitInfo, StageRequest, TxnState

logger = logging.getLogger(__name__)


class TxnError(Exception):
    """A part that cannot join its transaction; the text is sent back to the rank."""


@dataclass
class Part:
    rank: int
    identity: bytes
    request: StageRequest
    segment: writer.Segment | None = None
    records: list[fmt.FileRecord] = field(default_factory=list)
    open_files: list[writer.OpenFile] = field(default_factory=list)
    written: bool = False
    synced: bool = False


@dataclass
class Transaction:
    txn: str
    output_dir: Path
    step: int
    world_size: int
    expected_ranks: frozenset[int]
    deadline: float
    state: TxnState = TxnState.OPEN
    parts: dict[int, Part] = field(default_factory=dict)
    commit_info: CommitInfo | None = None
    reason: str | None = None
    path: Path | None = None
    opened_at: float = field(default_factory=time.monotonic)
    committed_at: float | None = None
    bytes_total: int = 0
    bytes_written: int = 0
    pending_io: int = 0
    trash: list[Path] = field(default_factory=list)  # renamed out of sight, removed before notifying

    @property
    def root(self) -> Path:
        return fmt.checkpoints_root(self.output_dir)

    @property
    def temp_dir(self) -> Path:
        return self.root / fmt.temp_dirname(self.step, self.txn)

    @property
    def final_dir(self) -> Path:
        return self.root / fmt.checkpoint_dirname(self.step)

    @property
    def finished(self) -> bool:
        return self.state in (TxnState.COMMITTED, TxnState.ABORTED)

    def identities(self) -> list[bytes]:
        return [p.identity for p in self.parts.values()]


def open_transaction(req: StageRequest) -> Transaction:
    txn = Transaction(
        txn=req.txn,
        output_dir=Path(req.output_dir),
        step=req.step,
        world_size=req.world_size,
        expected_ranks=frozenset(req.expected_ranks),
        deadline=time.monotonic() + req.timeout_s,
    )
    return txn


def join(txn: Transaction, req: StageRequest, identity: bytes) -> Part:
    """Add a rank's part; raises TxnError if it disagrees with the transaction it names."""
    if txn.finished:
        raise TxnError(
            f"transaction {txn.txn} is already {txn.state.value}" + (f": {txn.reason}" if txn.reason else "")
        )
    mismatch = []
    if Path(req.output_dir) != txn.output_dir:
        mismatch.append(f"output_dir {req.output_dir} vs {txn.output_dir}")
    if req.step != txn.step:
        mismatch.append(f"step {req.step} vs {txn.step}")
    if req.world_size != txn.world_size:
        mismatch.append(f"world_size {req.world_size} vs {txn.world_size}")
    if frozenset(req.expected_ranks) != txn.expected_ranks:
        mismatch.append("expected_ranks differ")
    if mismatch:
        raise TxnError(f"rank {req.rank} disagrees with transaction {txn.txn}: {'; '.join(mismatch)}")
    if req.rank in txn.parts:
        raise TxnError(f"rank {req.rank} already staged its part of transaction {txn.txn}")
    if req.commit is not None:
        if txn.commit_info is not None:
            raise TxnError(f"transaction {txn.txn} received commit info twice")
        txn.commit_info = req.commit
    part = Part(req.rank, identity, req)
    txn.parts[req.rank] = part
    if set(txn.parts) == set(txn.expected_ranks):
        txn.state = TxnState.WRITING
    txn.bytes_total += sum(f.length for f in req.files)
    return part


def prepare_temp_dir(txn: Transaction) -> None:
    root = txn.root
    root.mkdir(parents=True, exist_ok=True)
    # No fsync here: the temp dir only has to be durable once it is renamed, and commit fsyncs then.
    txn.temp_dir.mkdir(mode=0o755, exist_ok=True)


def write_part(txn: Transaction, part: Part, direct: bool = False) -> None:
    """Validate and write every file of a part (not yet fsynced). Runs on a writer thread."""
    assert part.segment is not None
    for spec in part.request.files:
        writer.validate_file_bytes(part.segment, spec)
    for spec in part.request.files:
        if txn.state == TxnState.ABORTED:
            raise TxnError(f"transaction {txn.txn} aborted while writing: {txn.reason}")
        f = writer.write_range(part.segment, spec, txn.temp_dir, direct)
        part.open_files.append(f)
        txn.bytes_written += f.size
        part.records.append(
            fmt.FileRecord(
                path=spec.path,
                size=f.size,
                checksum=f.checksum,
                component=spec.component,
                kind=spec.kind,
                rank=spec.rank,
                group_instance=spec.group_instance,
                node=spec.node,
                written_by=part.rank,
            )
        )
    part.written = True


def sync_part(part: Part) -> None:
    """fsync (and close) every file a part wrote."""
    files, part.open_files = part.open_files, []
    errors = []
    for f in files:
        try:
            writer.fsync_and_close(f)
        except OSError as e:
            errors.append(e)
    if errors:
        raise errors[0]
    part.synced = True


def close_part_files(part: Part) -> None:
    for f in part.open_files:
        try:
            os.close(f.fd)
        except OSError:
            pass
    part.open_files = []


def ready_to_commit(txn: Transaction) -> bool:
    return (
        txn.state in (TxnState.OPEN, TxnState.WRITING)
        and txn.commit_info is not None
        and set(txn.parts) == set(txn.expected_ranks)
        and all(p.synced for p in txn.parts.values())
    )


def missing_ranks(txn: Transaction) -> list[int]:
    return sorted(txn.expected_ranks - set(txn.parts))


def build_manifest(txn: Transaction) -> fmt.Manifest:
    info = txn.commit_info
    assert info is not None
    files: dict[str, fmt.FileRecord] = {}
    for rank in sorted(txn.parts):
        for rec in txn.parts[rank].records:
            if rec.path in files:
                raise TxnError(f"{rec.path} was staged by both rank {files[rec.path].written_by} and rank {rank}")
            files[rec.path] = rec
    by_component: dict[str, list[str]] = {}
    for rec in files.values():
        by_component.setdefault(rec.component, []).append(rec.path)
    components = {}
    for spec in info.components:
        paths = sorted(by_component.pop(spec.key, []))
        components[spec.key] = fmt.ComponentRecord(
            key=spec.key,
            sharing_pattern=spec.sharing_pattern,
            ranks=spec.ranks,
            replicated_across=spec.replicated_across,
            group_name=spec.group_name,
            group_instances=spec.group_instances,
            size_bytes=sum(files[p].size for p in paths),
            checksum=fmt.combine_checksums(files[p].checksum for p in paths) if paths else None,
            required=spec.required,
            metadata=spec.metadata,
            files=paths,
        )
    if by_component:
        raise TxnError(f"files staged for undeclared components {sorted(by_component)}")
    return fmt.Manifest(
        format=fmt.FORMAT_VERSION,
        checkpoint_path=str(txn.final_dir),
        step=txn.step,
        txn=txn.txn,
        world_size=txn.world_size,
        timestamp=fmt.now_timestamp(),
        components=components,
        files=files,
        topology=info.topology,
        metadata=info.metadata,
        pytorch_version=info.pytorch_version,
        ckptd_version=ckptd.__version__,
    )


def commit(txn: Transaction) -> Path:
    """Make the temp dir the committed ``checkpoint-<step>``; atomic, durable, never a mixed state."""
    txn.state = TxnState.COMMITTING
    manifest = build_manifest(txn)
    writer.write_small_file(txn.temp_dir / fmt.MANIFEST_NAME, manifest.to_json())
    writer.fsync_dir(txn.temp_dir)
    final = txn.final_dir
    try:
        os.rename(txn.temp_dir, final)
    except OSError as e:
        if not final.exists():
            raise
        # Re-saving an existing step: swap, so the old one is visible until the new one is.
        logger.info("replacing existing %s (%s)", final, e.strerror)
        writer.rename_exchange(txn.temp_dir, final)
        trash = txn.root / fmt.trash_dirname(txn.step, secrets.token_hex(4))
        os.rename(txn.temp_dir, trash)
        txn.trash.append(trash)
    writer.fsync_dir(txn.root)
    txn.state = TxnState.COMMITTED
    txn.path = final
    txn.committed_at = time.monotonic()
    return final


def abort(txn: Transaction, reason: str) -> None:
    """Mark aborted; remove the temp dir once no write is in flight (the server calls cleanup later)."""
    if txn.finished:
        return
    txn.state = TxnState.ABORTED
    txn.reason = reason
    logger.warning("transaction %s (step %d in %s) aborted: %s", txn.txn, txn.step, txn.output_dir, reason)


def cleanup_aborted(txn: Transaction) -> None:
    for part in txn.parts.values():
        close_part_files(part)
    shutil.rmtree(txn.temp_dir, ignore_errors=True)


def trash_checkpoint(root: Path, path: Path, step: int) -> Path:
    """Take a committed checkpoint out of sight by renaming it to a trash name (durably); returns that name.

    Removal of the trash happens later (``empty_trash``), so no half-deleted directory is ever visible.
    """
    trash = root / fmt.trash_dirname(step, secrets.token_hex(4))
    os.rename(path, trash)
    writer.fsync_dir(root)
    return trash


def apply_retention(txn: Transaction, limit: int) -> list[Path]:
    """Keep the ``limit`` newest committed checkpoints, always including the one just committed."""
    found, _ = fmt.scan_checkpoints(txn.output_dir)
    others = [c for c in found if c.step != txn.step]
    excess = len(others) - (limit - 1)
    removed = []
    for info in others[: max(0, excess)]:
        try:
            txn.trash.append(trash_checkpoint(txn.root, info.path, info.step))
            removed.append(info.path)
        except OSError as e:
            logger.warning("retention could not remove %s: %s", info.path, e)
    if removed:
        logger.info("retention (save_total_limit=%d) removed %s", limit, ", ".join(p.name for p in removed))
    return removed


def empty_trash(txn: Transaction) -> None:
    trash, txn.trash = txn.trash, []
    for path in trash:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale(output_dir: Path, live_txns: set[str]) -> list[Path]:
    """Remove temp/trash directories that no live transaction of this daemon owns."""
    root = fmt.checkpoints_root(output_dir)
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in names:
        temp = fmt.parse_temp_dirname(name)
        if (temp is not None and temp[1] not in live_txns) or fmt.is_trash_dirname(name):
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(root / name)
    if removed:
        logger.info("removed stale %s", ", ".join(p.name for p in removed))
    return removed
