"""Transactions: how a set of staged parts becomes one committed checkpoint, or nothing at all.

This module is the one owner of transaction state: every state change happens in a method of
``Transaction`` (the server dispatches, schedules I/O and sends messages, and never sets a state). A
transaction ``txn`` belongs to one ``(output_dir, step)``. Its states (``protocol.TxnState``)::

    OPEN ──(every expected rank joined)──> WRITING ──(every part durable, commit checked)──> PREPARED
      │                                       │                                               │
      │                                       │                          (its turn in the output dir)
      │                                       │                                               v
      │                                       │          COMMITTED <──(rename done)── COMMITTING
      │                                       │                                               │
      └───────────────────────────────────────┴──(deadline, write error, rank abort, refused, │
                                                  shutdown)──> ABORTING <──(failed before ────┘
                                                                   │       the rename)
                                                      (temp dir removed)
                                                                   v
                                                                ABORTED

Legal transitions are exactly ``LEGAL`` below; anything else raises ``IllegalTransition``. COMMITTED and
ABORTED are final. Notably:

* An ``abort`` request in COMMITTING is refused (answered with the real state): the commit is already
  deciding, and its outcome is what every rank hears.
* The rename of the temp dir to ``checkpoint-<step>`` is the **point of no return**: before it any
  failure aborts; after it the outcome is COMMITTED whatever happens next. A failure to fsync the parent,
  to trash a swapped-out checkpoint, or to apply retention is logged and kept in ``warnings`` (``status``
  shows it), never turned into an abort.
* Every state has a deadline (``deadline``, from the rank's ``timeout_s`` and absolute ``deadline``):
  OPEN, WRITING and PREPARED abort when it passes; COMMITTING re-checks it just before the rename; a
  COMMITTING or ABORTING transaction stuck in I/O past it is reported by the server.
* ``aborted`` is announced only after the temp dir is gone (ABORTED), so a rank that sees it also sees
  the disk space back.

Order of calls (the server drives these; the ones marked *I/O* run on a worker thread, the rest on the
daemon's event loop):

Per part (one per rank of this node):
    1. ``Ledger.open`` / ``join``    the first part opens the transaction; ``prepare_dir`` (*I/O*)
                                     sweeps stale entries and creates ``.tmp-checkpoint-<step>-<txn>``
                                     beside its owner record.
    2. ``write_part`` (*I/O*)        every file of the part: validate its header, write its range, hash it;
                                     or, for a region spec, write its runs into the shared file.
    3. (server)                      sends ``released``: the rank's slab may be reused from now on.
    4. ``sync_part`` (*I/O*)         fsync every file of the part; then ``part_durable``.

Once per transaction:
    5. ``try_prepare``               every part durable and the commit info in: check that it can be a
                                     checkpoint (at least one component, every component's files written
                                     and fsynced here by its writers, every shared file's regions adding
                                     up to its size) -> PREPARED, or ABORTING if not.
    6. ``begin_commit``              its turn (commits in one output dir go in hand-over order).
    7. ``commit`` (*I/O*)            remote files' sizes, each shared file checked and hashed, manifest,
                                     fsyncs, the rename (or RENAME_EXCHANGE on a re-save).
    8. ``finish_commit``             -> COMMITTED, or ABORTING if it failed before the rename.
    9. ``update_best``, ``apply_retention``, ``empty_trash`` (*I/O*, COMMITTED only) then the server notifies
       the ranks. The best mark is replaced before retention runs, so retention keeps the new best.

On failure: ``begin_abort`` -> (in-flight I/O drains) ``cleanup`` (*I/O*) -> ``finish_abort``.

Shared files (SHARDED state). A FileSpec of kind ``region`` is one part's share of a file that several
parts write together, each its distinct pieces at their byte offsets (``writer.write_regions``; no part
holds the whole file). The part's record is a ``FileRecord`` of kind ``region``: ``size`` is the bytes it
contributed, ``file_size`` the file's final size, no checksum. Such records never reach the manifest:

* ``refusal`` groups every region record of a path (local parts and followers' votes): they must agree on
  ``file_size`` and component, the path must not also be a whole file, no rank may send a path twice, and
  the bytes contributed must add up to exactly ``file_size``;
* ``commit`` (in ``build_manifest``, on the worker thread, before the manifest is written) checks each
  shared file once, a regular file of exactly ``file_size`` bytes whose safetensors header parses and whose
  data ends at ``file_size``, and hashes it: it becomes one ordinary record (kind ``safetensors``,
  ``written_by`` its lowest writer rank). Any failure there aborts: it is before the rename.

Multi-node (``role``; DESIGN §5). The daemon of the node holding rank 0 is the LEADER, the others are
FOLLOWERs; every node's transaction has the same id and shares one temp dir on shared storage.

* Only the leader creates the temp dir (``prepare_dir``, exclusive, after its owner record): a follower
  never makes it, so a rank's veto that renamed it away can never be undone by a re-``mkdir``. A follower
  waits for the leader's word that it exists, then ``observe_dir`` records its inode.
* A follower is PREPARED once its own parts are durable (``sync_part`` also fsyncs the temp dir, so the
  entries are durable too) and reports its files to the leader (``remote_prepared`` on the leader). It
  never commits itself: PREPARED -> COMMITTED (``follower_committed``) only on the leader's word, or when
  its own veto finds the rename already done; on the leader's abort, or when it gives up (leader lost or
  silent, deadline) after vetoing on disk, PREPARED -> ABORTING as usual. Its ``cleanup`` removes nothing:
  the leader (or the veto) removes the shared dir.
* The leader is PREPARED once its own parts are durable, the commit info is in, and every other node
  reported PREPARED for the same temp dir inode; ``refusal`` then checks the union of every node's files
  against the plan, and ``commit`` checks each remote file's size on disk before the manifest (a region
  record: its shared file's final size). Followers write their regions of a shared file straight into the
  shared temp dir, like their whole files; the leader hashes the assembled file. The rename
  is the decision for every node. Its ``cleanup`` renames the temp dir out of sight before removing it, so
  a follower still writing can add nothing to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ckptd
from ckptd import format as fmt
from ckptd import ownership, pacing, writer
from ckptd.faults import FaultInjector, FaultPoint
from ckptd.protocol import CommitInfo, PeerInfo, Prepared, StageRequest, TxnState

logger = logging.getLogger(__name__)

S = TxnState
LEGAL: dict[TxnState, frozenset[TxnState]] = {
    S.OPEN: frozenset({S.WRITING, S.ABORTING}),
    S.WRITING: frozenset({S.PREPARED, S.ABORTING}),
    S.PREPARED: frozenset({S.COMMITTING, S.COMMITTED, S.ABORTING}),  # -> COMMITTED: a follower, by the leader
    S.COMMITTING: frozenset({S.COMMITTED, S.ABORTING}),
    S.ABORTING: frozenset({S.ABORTED}),
    S.COMMITTED: frozenset(),
    S.ABORTED: frozenset(),
}
ABORTABLE = frozenset({S.OPEN, S.WRITING, S.PREPARED})
FINISHED_KEPT = 1024  # finished transactions remembered for late queries
SEAL_CHUNK = 4 * 1024 * 1024  # bytes per read when a shared file is hashed at commit
MAX_LIVE = 256  # live transactions per daemon: more is a runaway client, not a training job


class Role(str, enum.Enum):
    SOLE = "sole"  # a single-node job: this daemon decides alone
    LEADER = "leader"  # multi-node, the node of rank 0: decides for every node
    FOLLOWER = "follower"  # multi-node, any other node: writes, reports, and is told


@dataclass
class RemoteNode:
    """What the leader knows of one follower node in a transaction."""

    node: int
    reply_to: object  # the peer socket (``peers.PeerListener``) its messages came in on
    identity: bytes
    last_heard: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    told_opened: bool = False


class TxnError(Exception):
    """A request a transaction cannot take; the text is sent back to the rank."""


class IllegalTransition(RuntimeError):
    """A state change that ``LEGAL`` does not allow: a bug in the caller, never a client's fault."""


@dataclass
class Part:
    rank: int
    identity: bytes
    request: StageRequest
    segment: writer.Segment | None = None
    records: list[fmt.FileRecord] = field(default_factory=list)
    open_files: list[writer.OpenFile] = field(default_factory=list)
    written: bool = False
    durable: bool = False
    released: bool = False  # the rank was told its slab is free (exactly once)
    owner: ownership.ProcessIdentity | None = None  # the rank's process, judged alive by start time


@dataclass(frozen=True)
class CommitOutcome:
    """What ``commit`` did: ``renamed`` is True once the point of no return is behind."""

    renamed: bool
    path: Path | None = None
    error: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class Transaction:
    txn: str
    output_dir: Path
    step: int
    world_size: int
    expected_ranks: frozenset[int]
    deadline: float  # time.monotonic() after which it may not commit
    deadline_unix: float  # the same instant in wall-clock time, for records other processes read
    job: str | None = None
    faults: FaultInjector = field(default_factory=FaultInjector)
    state: TxnState = TxnState.OPEN
    parts: dict[int, Part] = field(default_factory=dict)
    commit_info: CommitInfo | None = None
    reason: str | None = None
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    opened_at: float = field(default_factory=time.monotonic)
    committed_at: float | None = None
    bytes_total: int = 0
    bytes_written: int = 0
    pending_io: int = 0
    io_idle: asyncio.Event = field(default_factory=asyncio.Event)
    trash: list[Path] = field(default_factory=list)  # renamed out of sight, removed before notifying
    temp_ino: int | None = None  # inode of the temp dir prepare_dir made: the only dir this txn may remove
    owner_written: bool = False  # prepare_dir wrote the owner record (so it may remove it)
    leftover_ino: int | None = None  # a swapped-out old checkpoint still at the temp name (trash rename failed)
    peer: PeerInfo | None = None  # multi-node: this node's place in the job (None: a single-node job)
    remote: dict[int, RemoteNode] = field(default_factory=dict)  # leader: the follower nodes heard from
    shared_ino: int | None = None  # follower: inode of the leader's temp dir, as observed here
    last_heard_leader: float = field(default_factory=time.monotonic)  # follower: the leader's last word
    reason_from_leader: bool = False  # follower: aborted on the leader's word (so it need not be told back)
    pace: pacing.Pace | None = None  # when its chunks may be written (the server sets it; None: full speed)
    export_to: Path | None = None  # client.save_model: the commit renames the temp dir here, not checkpoint-<step>
    written: Any = None  # a metrics.ByteCounter the writers add each write's bytes to (the server sets it)

    def __post_init__(self) -> None:
        self.io_idle.set()

    @classmethod
    def open(cls, req: StageRequest, faults: FaultInjector | None = None) -> Transaction:
        """A new OPEN transaction for the first part of ``req``; its deadline is the earlier of
        ``timeout_s`` from now and the rank's absolute ``deadline``."""
        now, now_unix = time.monotonic(), time.time()
        budget = req.timeout_s
        if req.deadline is not None:
            budget = min(budget, req.deadline - now_unix)
        if budget <= 0:
            raise TxnError(
                f"the hand-off of step {req.step} arrived {-budget:.1f} s after its deadline (the daemon was "
                "stopped or overloaded); the rank has given up on it, nothing was written"
            )
        return cls(
            txn=req.txn,
            output_dir=Path(req.output_dir),
            step=req.step,
            world_size=req.world_size,
            expected_ranks=frozenset(req.expected_ranks),
            deadline=now + budget,
            deadline_unix=now_unix + budget,
            job=req.job,
            faults=faults or FaultInjector(),
            peer=req.peer,
            export_to=None if req.export_to is None else Path(req.export_to),
        )

    @property
    def role(self) -> Role:
        if self.peer is None:
            return Role.SOLE
        return Role.LEADER if self.peer.leads else Role.FOLLOWER

    # -- names ----------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return fmt.checkpoints_root(self.output_dir)

    @property
    def temp_dir(self) -> Path:
        return self.root / fmt.temp_dirname(self.step, self.txn)

    @property
    def final_dir(self) -> Path:
        if self.export_to is not None:
            return self.export_to
        return self.root / fmt.checkpoint_dirname(self.step)

    @property
    def finished(self) -> bool:
        return self.state in (TxnState.COMMITTED, TxnState.ABORTED)

    def identities(self) -> list[bytes]:
        return [p.identity for p in self.parts.values()]

    def missing_ranks(self) -> list[int]:
        return sorted(self.expected_ranks - set(self.parts))

    def orphaned(self) -> bool:
        """OPEN, and every rank that staged a part is provably dead: the missing parts can never come (their
        peers' collective failed with them). A WRITING transaction is not: it finishes what it was handed."""
        if self.state != TxnState.OPEN or not self.parts:
            return False
        return all(p.owner is not None and p.owner.alive() is False for p in self.parts.values())

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline

    # -- transitions ----------------------------------------------------------------------------------

    def _move(self, new: TxnState) -> None:
        if new not in LEGAL[self.state]:
            raise IllegalTransition(f"transaction {self.txn}: {self.state.value} -> {new.value} is not a legal move")
        logger.debug("txn %s: %s -> %s", self.txn, self.state.value, new.value)
        self.state = new

    def join(self, req: StageRequest, identity: bytes) -> Part:
        """Add a rank's part; raises TxnError if it disagrees with the transaction it names."""
        if self.state != TxnState.OPEN:
            raise TxnError(
                f"transaction {self.txn} is already {self.state.value}" + (f": {self.reason}" if self.reason else "")
            )
        mismatch = []
        if Path(req.output_dir) != self.output_dir:
            mismatch.append(f"output_dir {req.output_dir} vs {self.output_dir}")
        if req.step != self.step:
            mismatch.append(f"step {req.step} vs {self.step}")
        if req.world_size != self.world_size:
            mismatch.append(f"world_size {req.world_size} vs {self.world_size}")
        if frozenset(req.expected_ranks) != self.expected_ranks:
            mismatch.append("expected_ranks differ")
        if req.job != self.job:
            mismatch.append(f"job {req.job!r} vs {self.job!r}")
        if req.peer != self.peer:
            mismatch.append("its multi-node peer information differs (node, node count, leader or keys)")
        if (None if req.export_to is None else Path(req.export_to)) != self.export_to:
            mismatch.append(f"export_to {req.export_to} vs {self.export_to}")
        if mismatch:
            raise TxnError(f"rank {req.rank} disagrees with transaction {self.txn}: {'; '.join(mismatch)}")
        if req.rank in self.parts:
            raise TxnError(f"rank {req.rank} already staged its part of transaction {self.txn}")
        if req.commit is not None:
            if self.commit_info is not None:
                raise TxnError(f"transaction {self.txn} received commit info twice")
            self.commit_info = req.commit
        part = Part(req.rank, identity, req)
        self.parts[req.rank] = part
        self.bytes_total += sum(f.length for f in req.files)
        if set(self.parts) == set(self.expected_ranks):
            self._move(TxnState.WRITING)
        return part

    def part_durable(self, part: Part) -> None:
        part.durable = True

    def try_prepare(self) -> bool:
        """WRITING -> PREPARED once every part is durable and the commit info is in and passes the checks;
        -> ABORTING if it cannot be a checkpoint. Returns True when PREPARED."""
        if self.state == TxnState.PREPARED:
            return True
        if self.state != TxnState.WRITING or not all(p.durable for p in self.parts.values()):
            return False
        if self.role == Role.FOLLOWER:
            # The leader checks the union of every node's files; this node only reports its own.
            self._move(TxnState.PREPARED)
            return True
        if self.commit_info is None or self.missing_nodes():
            return False
        problem = self.refusal()
        if problem is not None:
            self.begin_abort(f"the daemon refuses to commit it: {problem}")
            return False
        self._move(TxnState.PREPARED)
        return True

    def refusal(self) -> str | None:
        """Why this transaction cannot be a checkpoint, or None. A commit must name at least one component,
        every component must have files, written and fsynced in this transaction by exactly the ranks the
        commit names as its writers, every file must belong to a named component, and the regions of every
        shared file must agree and add up to it (``shared_file_problem``)."""
        info = self.commit_info
        assert info is not None
        if not info.components:
            return "the commit names no component"
        by_component: dict[str, set[int]] = {}
        records: list[fmt.FileRecord] = []
        for part in self.parts.values():
            if not part.durable:
                return f"rank {part.rank}'s files are not durable"
            for rec in part.records:
                by_component.setdefault(rec.component, set()).add(rec.written_by)
            records += part.records
        node_of = self._node_of_rank()
        for node, remote in sorted(self.remote.items()):
            assert remote.prepared is not None
            if remote.prepared.ino != self.temp_ino:
                return f"node {node} wrote into another directory than this save's temp dir (a rank's veto replaced it)"
            for rec in remote.prepared.files:
                if node_of is not None and (rec.written_by >= len(node_of) or node_of[rec.written_by] != node):
                    return f"node {node} reported {rec.path} as written by rank {rec.written_by}, not one of its ranks"
                by_component.setdefault(rec.component, set()).add(rec.written_by)
            records += remote.prepared.files
        problem = shared_file_problem(records, fmt.coverage_key(self.txn))
        if problem is not None:
            return problem
        declared = {c.key for c in info.components}
        stray = sorted(set(by_component) - declared)
        if stray:
            return f"files were staged for components the commit does not name: {stray}"
        for c in info.components:
            outside = sorted(r for r in c.ranks if r >= self.world_size)
            if outside:
                return f"component {c.key!r} names writer rank(s) {outside} outside world size {self.world_size}"
            writers = by_component.get(c.key)
            if not writers:
                return f"component {c.key!r} has no file written in this transaction"
            # Single node: this transaction's parts hold every writer. Multi-node: the leader checks the union
            # of its own parts and every follower's PREPARED files.
            expected = set(c.ranks)
            if writers != expected:
                return (
                    f"component {c.key!r} was written by ranks {sorted(writers)}, the commit names {sorted(expected)}"
                )
        return None

    def _node_of_rank(self) -> list[int] | None:
        """The node of every rank, from the commit info's topology (None if it has none)."""
        topo = self.commit_info.topology if self.commit_info is not None else {}
        node_of = topo.get("node_of_rank")
        if isinstance(node_of, list) and len(node_of) == self.world_size and all(type(n) is int for n in node_of):
            return node_of
        return None

    # -- multi-node -----------------------------------------------------------------------------------

    def expected_nodes(self) -> set[int]:
        """The follower nodes a leader waits for."""
        return set(range(1, self.peer.nnodes)) if self.role == Role.LEADER and self.peer else set()

    def missing_nodes(self) -> list[int]:
        """Follower nodes that have not reported PREPARED (leader only; empty otherwise)."""
        return sorted(n for n in self.expected_nodes() if n not in self.remote or self.remote[n].prepared is None)

    def remote_heard(self, node: int, reply_to: object, identity: bytes) -> RemoteNode:
        """A follower node spoke about this transaction (leader only): remember where to answer it."""
        if self.role != Role.LEADER:
            raise TxnError(f"transaction {self.txn} is not led by this daemon")
        if node not in self.expected_nodes():
            raise TxnError(f"node {node} is not a follower of transaction {self.txn} ({self.peer.nnodes} nodes)")
        remote = self.remote.get(node)
        if remote is None:
            remote = self.remote[node] = RemoteNode(node, reply_to, identity)
        remote.reply_to, remote.identity, remote.last_heard = reply_to, identity, time.monotonic()
        return remote

    def remote_prepared(self, prep: Prepared, reply_to: object, identity: bytes) -> None:
        """A follower's PREPARED vote (leader only). Only OPEN/WRITING take it; a second vote is refused."""
        remote = self.remote_heard(prep.node, reply_to, identity)
        if self.state not in (TxnState.OPEN, TxnState.WRITING):
            raise TxnError(f"transaction {self.txn} is already {self.state.value}; node {prep.node}'s vote is moot")
        if remote.prepared is not None:
            raise TxnError(f"node {prep.node} already reported PREPARED for transaction {self.txn}")
        remote.prepared = prep

    def silent_nodes(self, limit_s: float, now: float | None = None) -> list[int]:
        """Follower nodes heard from once and not for ``limit_s`` since (leader only)."""
        now = time.monotonic() if now is None else now
        return sorted(n for n, r in self.remote.items() if now - r.last_heard > limit_s)

    def follower_committed(self, path: Path | None = None) -> None:
        """PREPARED -> COMMITTED on the leader's word (follower only): the leader's rename decided."""
        if self.role != Role.FOLLOWER:
            raise IllegalTransition(f"transaction {self.txn}: only a follower is committed by another daemon")
        self._move(TxnState.COMMITTED)
        self.path = path or self.final_dir
        self.committed_at = time.monotonic()

    def observe_dir(self) -> None:
        """Follower (*I/O*): the leader made the temp dir; record its inode (it must be a real directory)."""
        try:
            st = os.lstat(self.temp_dir)
        except FileNotFoundError:
            raise TxnError(f"{self.temp_dir.name} is gone: a rank gave up on this save and vetoed it") from None
        if not os.path.isdir(self.temp_dir) or os.path.islink(self.temp_dir):
            raise TxnError(f"{self.temp_dir.name} is not a directory (a rank's tombstone): this save is vetoed")
        self.shared_ino = st.st_ino

    def dir_replaced(self) -> str | None:
        """Leader (*I/O*): why the temp dir this transaction made is no longer at its name, or None."""
        if self.temp_ino is None:
            return None
        try:
            ino = os.lstat(self.temp_dir).st_ino
        except FileNotFoundError:
            ino = None
        except OSError:
            return None  # a transient error (ESTALE, EIO on a soft NFS mount) proves nothing; checked again
        if ino == self.temp_ino:
            return None
        return "its temp dir was renamed away or replaced: a rank gave up on it and vetoed it"

    def begin_commit(self) -> None:
        if self.role == Role.FOLLOWER:
            raise IllegalTransition(f"transaction {self.txn}: a follower never commits; the leader's rename does")
        self._move(TxnState.COMMITTING)

    def finish_commit(self, outcome: CommitOutcome) -> None:
        """Record what ``commit`` did: COMMITTED once renamed (whatever failed after), else ABORTING."""
        if not outcome.renamed:
            self._move(TxnState.ABORTING)
            self.reason = f"commit failed: {outcome.error}"
            logger.warning(
                "transaction %s (step %d in %s) aborted: %s", self.txn, self.step, self.output_dir, self.reason
            )
            return
        self._move(TxnState.COMMITTED)
        self.path = outcome.path
        self.committed_at = time.monotonic()
        self.warnings.extend(outcome.warnings)

    def begin_abort(self, reason: str) -> bool:
        """OPEN/WRITING/PREPARED -> ABORTING. Returns False (and changes nothing) in any other state: an
        abort during COMMITTING is refused, one after the rename is too late, and a second one is moot."""
        if self.state not in ABORTABLE:
            return False
        self._move(TxnState.ABORTING)
        self.reason = reason
        logger.warning("transaction %s (step %d in %s) aborted: %s", self.txn, self.step, self.output_dir, reason)
        return True

    def finish_abort(self) -> None:
        self._move(TxnState.ABORTED)

    # -- in-flight I/O accounting (the server's workers) ----------------------------------------------

    def io_begin(self) -> None:
        self.pending_io += 1
        self.io_idle.clear()

    def io_end(self) -> None:
        self.pending_io -= 1
        if self.pending_io == 0:
            self.io_idle.set()

    # -- I/O (worker threads) -------------------------------------------------------------------------

    def prepare_dir(self, sweep: bool, live: Container[str], owner: ownership.ProcessIdentity) -> None:
        """Create ``checkpoints/`` durably if needed, record the owner, and create the temp dir."""
        ownership.make_dirs_durably(self.root)
        if sweep:
            try:
                ownership.sweep_stale(self.output_dir, live)
            except Exception:  # noqa: BLE001 - a sweep that fails must not fail the save it runs for
                logger.exception("sweeping %s before step %d failed; the save goes on", self.output_dir, self.step)
        try:
            ownership.write_temp_owner(self.root, self.step, self.txn, owner, self.job, self.deadline_unix)
        except FileExistsError:
            raise TxnError(
                f"{fmt.temp_owner_name(self.step, self.txn)} already exists: another daemon holds this "
                "transaction; this one will not touch it"
            ) from None
        self.owner_written = True
        try:
            os.mkdir(self.temp_dir, 0o755)
            self.temp_ino = os.lstat(self.temp_dir).st_ino
        except FileExistsError:
            raise TxnError(
                f"{self.temp_dir} already exists: a rank gave up on this save (its tombstone) or another daemon "
                "owns it; this transaction cannot commit"
            ) from None

    def aborting(self) -> bool:
        """Whether it is being (or has been) aborted: its writers stop at the next chunk. Thread-safe."""
        return self.state in (TxnState.ABORTING, TxnState.ABORTED)

    def write_part(self, part: Part, direct: bool = False, drop_cache: bool = True) -> None:
        """Validate and write every file of a part (not yet fsynced); a region spec's runs go into its
        shared file, which other parts write too (checked and hashed whole at commit). Paced by ``pace``."""
        assert part.segment is not None
        for spec in part.request.files:
            writer.validate_file_bytes(part.segment, spec)
        pace = self.pace.wait if self.pace is not None else None
        counted = self.written.add if self.written is not None else None
        for spec in part.request.files:
            if self.aborting():
                raise TxnError(f"transaction {self.txn} aborted while writing: {self.reason}")
            if spec.kind == "region" and not spec.runs:
                continue  # no byte of this shared file is this rank's to write: not one of its writers
            try:
                if spec.kind == "region":
                    # The leader hashes its shared files at commit: keep its pages cached until then
                    # (seal_shared_file drops them); a follower's pages are of no use to that read.
                    f = writer.write_regions(
                        part.segment,
                        spec,
                        self.temp_dir,
                        fmt.coverage_key(self.txn),
                        pace,
                        drop_cache=drop_cache and self.role == Role.FOLLOWER,
                        written=counted,
                    )
                else:
                    f = writer.write_range(part.segment, spec, self.temp_dir, direct, pace, written=counted)
                    f.drop_cache = drop_cache
            except pacing.Aborted:
                raise TxnError(f"transaction {self.txn} aborted while writing: {self.reason}") from None
            part.open_files.append(f)
            self.faults.hit(FaultPoint.AFTER_FILE_WRITE)
            self.bytes_written += f.size
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
                    file_size=spec.file_size,
                )
            )
        part.written = True

    def sync_part(self, part: Part) -> None:
        """fsync (and close) every file a part wrote."""
        files, part.open_files = part.open_files, []
        if self.state in (TxnState.ABORTING, TxnState.ABORTED):
            # Nothing of an aborted save needs to be durable: let go of the files, do not hold up its cleanup.
            for f in files:
                _close_quietly(f.fd)
            raise TxnError(f"transaction {self.txn} aborted while writing: {self.reason}")
        error: OSError | None = None
        for f in files:
            try:
                self.faults.hit(FaultPoint.BEFORE_FILE_FSYNC)
                writer.fsync_and_close(f)
                self.faults.hit(FaultPoint.AFTER_FILE_FSYNC)
            except OSError as e:
                error = error or e
                _close_quietly(f.fd)
        if error is not None:
            raise error
        if self.role == Role.FOLLOWER:
            # The leader fsyncs the directory at its commit too; on a shared file system its fsync need not
            # cover entries another client created, so this node makes its own entries durable.
            self.faults.hit(FaultPoint.BEFORE_FILE_FSYNC)
            writer.fsync_dir(self.temp_dir)

    def build_manifest(self) -> fmt.Manifest:
        """The manifest of every file of every node. *I/O* when there are shared files: each is checked and
        hashed here (``seal_shared_file``), so this runs on the worker thread, inside ``commit``."""
        info = self.commit_info
        assert info is not None
        files: dict[str, fmt.FileRecord] = {}
        records = [rec for rank in sorted(self.parts) for rec in self.parts[rank].records]
        votes = [self.remote[n].prepared for n in sorted(self.remote)]
        records += [rec for vote in votes if vote is not None for rec in vote.files]
        shared = shared_files(records)
        sealed: set[str] = set()
        started = time.monotonic()
        for rec in records:
            if rec.kind == "region" and rec.path in sealed:
                continue  # another share of a shared file already checked and hashed
            if rec.path in files:
                raise TxnError(
                    f"{rec.path} was staged by both rank {files[rec.path].written_by} and rank {rec.written_by}"
                )
            if rec.kind == "region":
                sealed.add(rec.path)
                files[rec.path] = self.seal_shared_file(rec.path, shared[rec.path])
            else:
                files[rec.path] = rec
        if sealed:
            took = time.monotonic() - started
            total = sum(files[path].size for path in sealed)
            logger.info(
                "txn %s: checked and hashed %d shared file(s), %d bytes, in %.3f s (%.0f MB/s)",
                self.txn,
                len(sealed),
                total,
                took,
                total / 1e6 / max(took, 1e-9),
            )
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
            checkpoint_path=str(self.final_dir),
            step=self.step,
            txn=self.txn,
            world_size=self.world_size,
            timestamp=fmt.now_timestamp(),
            components=components,
            files=files,
            topology=info.topology,
            metadata=info.metadata,
            pytorch_version=info.pytorch_version,
            ckptd_version=ckptd.__version__,
        )

    def commit(self) -> CommitOutcome:
        """Make the temp dir the committed ``checkpoint-<step>``: atomic, durable, never a mixed state.

        Never raises: a failure before the rename comes back as ``renamed=False`` (abort), one after it as a
        warning of a committed outcome."""
        assert self.state == TxnState.COMMITTING
        try:
            self.check_remote_files()  # cheap, before the shared files are hashed
            manifest = self.build_manifest()
            if self.export_to is not None:
                self.check_export_target()
                self.write_hf_config(manifest)
            self.faults.hit(FaultPoint.BEFORE_MANIFEST)
            writer.write_small_file(self.temp_dir / fmt.MANIFEST_NAME, manifest.to_json())
            self.faults.hit(FaultPoint.AFTER_MANIFEST)
            writer.fsync_dir(self.temp_dir)
            if time.time() > self.deadline_unix:
                raise TxnError(f"its deadline passed {time.time() - self.deadline_unix:.1f} s before the rename")
            # A save without a job id may commit only where no live job holds the lease.
            if not ownership.lease_allows(self.output_dir, self.job or ""):
                holder = ownership.read_lease(self.output_dir)
                raise TxnError(
                    f"{self.output_dir} now belongs to job {getattr(holder, 'job', '?')!r}, not {self.job!r}"
                )
            self.faults.hit(FaultPoint.BEFORE_RENAME)
            exchanged = self._rename_into_place()
        except Exception as e:  # noqa: BLE001 - every failure before the rename is an abort, reported as such
            return CommitOutcome(renamed=False, error=describe_error(e))
        # The point of no return is behind us: from here on, failures are warnings of a committed checkpoint.
        warnings: list[str] = []
        if exchanged:
            try:
                self.faults.hit(FaultPoint.BETWEEN_RENAMES)
                trash = self.root / fmt.trash_dirname(self.step, secrets.token_hex(4))
                os.rename(self.temp_dir, trash)  # the swapped-out old checkpoint
                self.trash.append(trash)
            except OSError as e:
                with contextlib.suppress(OSError):
                    self.leftover_ino = os.lstat(self.temp_dir).st_ino
                warnings.append(
                    f"the replaced {self.final_dir.name} stays at {self.temp_dir.name}: {describe_error(e)}"
                )
        try:
            self.faults.hit(FaultPoint.AFTER_RENAME)
            writer.fsync_dir(self.root)
            if self.export_to is not None:
                writer.fsync_dir(self.final_dir.parent)  # where the model save's new entry is
        except OSError as e:
            warnings.append(f"fsync of {self.root} after the rename failed: {describe_error(e)}")
        for w in warnings:
            logger.warning("committed %s, but %s", self.final_dir, w)
        return CommitOutcome(renamed=True, path=self.final_dir, warnings=tuple(warnings))

    def check_export_target(self) -> None:
        """*I/O*, a model save only (``export_to``): its directory may be created, or replace an empty
        directory or a model an earlier ``save_model`` wrote (its manifest says so); anything else is not ours
        to replace. Its parent must exist, outside every checkpoints directory, on this file system."""
        dest = self.final_dir
        parent = Path(os.path.realpath(dest.parent))
        for a in (parent, *parent.parents):
            if a.name == fmt.CHECKPOINTS_DIRNAME and a.parent == Path(os.path.realpath(self.output_dir)):
                raise TxnError(f"{dest} resolves into {a}, the checkpoints directory; a model may not be saved there")
        tree = fmt.checkpoints_tree_of(dest)
        if tree is not None:
            raise TxnError(
                f"{dest} resolves into {tree}, the checkpoints directory of an output dir; a model saved there "
                "would be taken for a checkpoint or replace one"
            )
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            raise TxnError(f"the parent directory of {dest} does not exist (it was removed during the save)") from None
        if st.st_dev != os.stat(self.root).st_dev:
            raise TxnError(
                f"{dest} is on another file system than {self.root}; a model save commits by renaming its temp "
                "dir, so save it beside the output dir"
            )
        if not os.path.lexists(dest):
            return
        if os.path.islink(dest) or not os.path.isdir(dest):
            raise TxnError(f"{dest} exists and is not a directory; it is left as it is")
        if not any(os.scandir(dest)):
            return
        if not _is_model_save(dest, self.output_dir):
            raise TxnError(
                f"{dest} exists, is not empty and holds no model that save_model of {self.output_dir} wrote; it is "
                "left as it is: remove it or choose another directory"
            )

    def write_hf_config(self, manifest: fmt.Manifest) -> None:
        """*I/O*, a model save only: ``config.json`` beside the shards, from the Hugging Face config the
        client put in the model component's metadata (none: no file)."""
        model = manifest.components.get(fmt.MODEL_KEY)
        config = None if model is None else model.metadata.get(fmt.HF_CONFIG_METADATA_KEY)
        if config is None:
            return
        if not isinstance(config, dict):
            raise TxnError(f"the model's {fmt.HF_CONFIG_METADATA_KEY!r} metadata is not a JSON object")
        data = json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
        writer.write_small_file(self.temp_dir / fmt.HF_CONFIG_NAME, data)

    def check_remote_files(self) -> None:
        """Every file a follower reported is in the temp dir, a regular file of the size it reported (for its
        share of a shared file: of the shared file's final size; ``seal_shared_file`` checks the rest)."""
        for node in sorted(self.remote):
            prep = self.remote[node].prepared
            for rec in prep.files if prep is not None else ():
                try:
                    st = os.lstat(self.temp_dir / rec.path)
                except FileNotFoundError:
                    raise TxnError(f"node {node} reported {rec.path}, which is not in {self.temp_dir.name}") from None
                size = rec.file_size if rec.kind == "region" else rec.size
                if not os.path.isfile(self.temp_dir / rec.path) or st.st_size != size:
                    what = f"its share of the shared file {rec.path}, which is" if rec.kind == "region" else rec.path
                    raise TxnError(
                        f"node {node} reported {what} of {size} bytes; the temp dir holds {st.st_size} bytes"
                    )

    def seal_shared_file(self, path: str, shares: list[fmt.FileRecord]) -> fmt.FileRecord:
        """*I/O*: check the shared file ``path`` its ranks wrote in regions, hash it, and return the one
        ordinary record the manifest lists for it.

        Opened without following links, it must be a regular file of exactly the agreed ``file_size``, its
        safetensors header must parse and its data end exactly at ``file_size``; its checksum is then
        computed over the whole file (``refusal`` has checked that the shares agree and add up).

        Raises:
            TxnError: naming the file, its writer ranks and what is wrong (the commit aborts).
        """
        file_size = shares[0].file_size
        assert file_size is not None
        ranks = sorted(r.written_by for r in shares)
        where = self.temp_dir / path
        try:
            fd, st = fmt.open_regular(where)
        except FileNotFoundError:
            raise TxnError(
                f"the shared file {path} (written by ranks {ranks}) is not in {self.temp_dir.name}"
            ) from None
        except fmt.FormatError as e:
            raise TxnError(f"the shared file {path} (written by ranks {ranks}): {e}") from None
        started = time.monotonic()
        try:
            if st.st_size != file_size:
                raise TxnError(
                    f"the shared file {path} holds {st.st_size} bytes, its writer ranks {ranks} declared {file_size}"
                )
            try:
                head = fmt.pread_exact(fd, fmt.HEADER_LENGTH_BYTES, 0, where)
                head = fmt.pread_exact(fd, fmt.header_span(head, file_size), 0, where)
                fmt.parse_safetensors_header(head, file_size)
                # Small reads into one reused buffer stay in cache: 3x faster than the default 64 MiB chunks.
                checksum = fmt.hash_fd(fd, file_size, where=where, chunk_size=SEAL_CHUNK)
                writer.drop_cached_pages(fd)  # fsynced by every part, now read: keep it out of the page cache
            except fmt.FormatError as e:
                raise TxnError(
                    f"the shared file {path}, as ranks {ranks} assembled it, is not a valid safetensors file: {e}; "
                    f"the header rank {ranks[0]} sent at file offset 0 does not describe the {file_size}-byte file"
                ) from None
        finally:
            os.close(fd)
        logger.debug(
            "txn %s: shared file %s (%d bytes, ranks %s) checked and hashed in %.3f s",
            self.txn,
            path,
            file_size,
            ranks,
            time.monotonic() - started,
        )
        return fmt.FileRecord(
            path=path,
            size=file_size,
            checksum=checksum,
            component=shares[0].component,
            kind="safetensors",
            written_by=ranks[0],
        )

    def _rename_into_place(self) -> bool:
        """Rename (or, re-saving a step, swap) the temp dir into place; True when it swapped."""
        # What sits at the temp name must still be the directory this transaction made: a rank that gave up
        # may have renamed it away, and (killed half-way through its veto) left a tombstone in its place.
        try:
            st = os.lstat(self.temp_dir)
        except FileNotFoundError:
            raise TxnError(f"{self.temp_dir.name} is gone: a rank gave up on this save and vetoed it") from None
        if st.st_ino != self.temp_ino:
            raise TxnError(f"{self.temp_dir.name} is not the directory this save wrote (a rank's veto replaced it)")
        try:
            os.rename(self.temp_dir, self.final_dir)
            exchanged = False
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.final_dir.is_dir():
                raise
            # Re-saving an existing step: swap, so the old one is visible until the new one is.
            logger.info("replacing existing %s", self.final_dir)
            writer.rename_exchange(self.temp_dir, self.final_dir)
            exchanged = True
            if self.export_to is not None and not _is_model_save(self.temp_dir, self.output_dir):
                # Something other than an earlier model save appeared at dest after check_export_target:
                # never ours to replace (the trash would remove it). Swap it back; not committed.
                writer.rename_exchange(self.temp_dir, self.final_dir)
                raise TxnError(
                    f"{self.final_dir} was created by someone else during the save (after it was checked); it is "
                    "left as it is and the model was not saved there"
                ) from None
        # The check above and the rename are two steps: something that replaced the temp dir in between
        # (a rank's tombstone) has just been moved into place instead. Put it back out of sight; not committed.
        if os.lstat(self.final_dir).st_ino != self.temp_ino:
            if exchanged:
                writer.rename_exchange(self.temp_dir, self.final_dir)
            else:
                os.rename(self.final_dir, self.root / fmt.trash_dirname(self.step, secrets.token_hex(4)))
            writer.fsync_dir(self.root)
            raise TxnError(f"{self.temp_dir.name} was replaced while it was renamed (a rank's veto); not committed")
        return exchanged

    def update_best(self, metric: str, greater_is_better: bool) -> bool:
        """Mark best the committed checkpoint whose metadata holds the best finite value of ``metric`` (ties:
        the earliest step), ranking every checkpoint of the output dir, not only this one: a re-saved step, a
        daemon killed between a rename and its mark, or a damaged mark cannot lose the best. Returns whether
        the mark changed. COMMITTED only; a failure is a warning."""
        if self.state != TxnState.COMMITTED:
            raise IllegalTransition(f"best mark after a {self.state.value} transaction {self.txn}")
        found, _ = fmt.scan_checkpoints(self.output_dir)
        ranked = [(v, c.step) for c in found if (v := fmt.metric_value(c.manifest.metadata, metric)) is not None]
        if not ranked:
            return False  # no checkpoint carries a finite value of the metric: the mark stays as it is
        if greater_is_better:
            value, step = max(ranked, key=lambda vs: (vs[0], -vs[1]))
        else:
            value, step = min(ranked)
        try:
            current = fmt.read_best_mark(self.output_dir)
        except fmt.FormatError as e:
            self.warnings.append(f"the best-checkpoint mark was unreadable and is replaced: {e}")
            current = None
        mark = fmt.BestMark(step, metric, value, greater_is_better)
        if current == mark:
            return False
        fmt.write_best_mark(self.output_dir, mark)
        logger.info("checkpoint-%d is the best checkpoint now (%s=%g)", step, metric, value)
        return True

    def apply_retention(self, limit: int | None, keep_every_n_steps: int | None = None) -> list[Path]:
        """Keep the ``limit`` newest committed checkpoints (always including the one just committed), plus
        the best (``marks``) and every step that is a multiple of ``keep_every_n_steps``.

        Runs only after a commit that passed ``refusal``; a failure is a warning, never an abort."""
        if self.state != TxnState.COMMITTED:
            raise IllegalTransition(f"retention after a {self.state.value} transaction {self.txn}")
        if limit is None:
            return []
        found, _ = fmt.scan_checkpoints(self.output_dir)
        try:
            mark = fmt.read_best_mark(self.output_dir)
        except fmt.FormatError as e:
            # An unreadable mark protects nothing by name, so nothing at all is removed this time.
            self.warnings.append(f"retention skipped: {e}")
            logger.warning("retention skipped in %s: %s", self.output_dir, e)
            return []
        verdicts = retention_verdicts(
            [c.step for c in found], self.step, limit, keep_every_n_steps, mark.step if mark is not None else None
        )
        doomed = {step for step, kept, _ in verdicts if not kept}
        removed = []
        for info in found:
            if info.step not in doomed:
                continue
            try:
                self.faults.hit(FaultPoint.RETENTION)
                trash = self.root / fmt.trash_dirname(info.step, secrets.token_hex(4))
                os.rename(info.path, trash)
                writer.fsync_dir(self.root)
                self.trash.append(trash)
                removed.append(info.path)
            except OSError as e:
                self.warnings.append(f"retention could not remove {info.path.name}: {describe_error(e)}")
                logger.warning("retention could not remove %s: %s", info.path, e)
        if removed:
            logger.info(
                "retention (save_total_limit=%d, best and milestones kept) removed %s",
                limit,
                ", ".join(p.name for p in removed),
            )
        return removed

    def empty_trash(self) -> None:
        """Remove what the commit took out of sight; the owner record goes last, once nothing is left."""
        trash, self.trash = self.trash, []
        # After a committed re-save whose trash rename failed, the old checkpoint still sits at the temp name.
        if self.leftover_ino is not None and _inode(self.temp_dir) == self.leftover_ino:
            trash.append(self.temp_dir)
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        if self.owner_written and not os.path.lexists(self.temp_dir):
            ownership.remove_temp_owner(self.root, self.step, self.txn)

    def cleanup(self) -> None:
        """After an abort, once no write is in flight: remove the temp dir, then its owner record."""
        for part in self.parts.values():
            for f in part.open_files:
                _close_quietly(f.fd)
            part.open_files = []
        # Only the directory this transaction made: whatever else sits at its name (another daemon's dir, a
        # rank's tombstone) is not ours to remove. A follower made none: the leader or a veto removes it.
        if self.temp_ino is not None and _inode(self.temp_dir) == self.temp_ino:
            target = self.temp_dir
            if self.role == Role.LEADER:
                # Out of sight first: a follower still writing can create nothing more under the temp name.
                target = self.root / fmt.trash_dirname(self.step, secrets.token_hex(4))
                try:
                    os.rename(self.temp_dir, target)
                    if _inode(target) != self.temp_ino:  # replaced in between (a veto): put it back, keep it
                        with contextlib.suppress(OSError):
                            ownership._rename_noreplace(target, self.temp_dir)
                        target = None
                except OSError:
                    target = self.temp_dir
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)
        if self.owner_written and _inode(self.temp_dir) != self.temp_ino:
            ownership.remove_temp_owner(self.root, self.step, self.txn)


class Ledger:
    """Every transaction this daemon knows: the live ones in hand-over order, and the recently finished."""

    def __init__(self, max_live: int = MAX_LIVE, finished_kept: int = FINISHED_KEPT) -> None:
        self.live: dict[str, Transaction] = {}  # insertion order is hand-over order
        self.finished: OrderedDict[str, Transaction] = OrderedDict()
        self.max_live = max_live
        self.finished_kept = finished_kept

    def get(self, txn_id: str) -> Transaction | None:
        return self.live.get(txn_id) or self.finished.get(txn_id)

    def admit(self, txn: Transaction) -> None:
        """Add a newly opened transaction; refuses one too many, or one of a second job in the same dir."""
        if len(self.live) >= self.max_live:
            raise TxnError(
                f"the daemon already has {len(self.live)} saves in flight (limit {self.max_live}); wait for them "
                "to commit before handing over more"
            )
        conflicts = [o for o in self.conflicts(txn) if o.state not in (TxnState.ABORTING, TxnState.ABORTED)]
        if conflicts:
            # A job that took the lease over from a dead job (or an earlier process of itself) writes beside
            # that job's saves still in flight: a save handed over still lands (DESIGN §1), and it commits
            # first, since commits in one directory go in hand-over order (next_in_line).
            predecessors = ownership.lease_predecessors(txn.output_dir, txn.job)
            for other in conflicts:
                if other.job not in predecessors:
                    raise TxnError(
                        f"{txn.output_dir} is being written by job {other.job!r} (step {other.step}); job "
                        f"{txn.job!r} may not write the same output_dir at the same time; give each job its own "
                        "output_dir"
                    )
        self.live[txn.txn] = txn

    def conflicts(self, txn: Transaction) -> list[Transaction]:
        """Live transactions of another job in ``txn``'s output dir."""
        return [o for o in self.live.values() if o.output_dir == txn.output_dir and o.job != txn.job]

    def retire(self, txn: Transaction) -> None:
        self.live.pop(txn.txn, None)
        self.finished[txn.txn] = txn
        while len(self.finished) > self.finished_kept:
            self.finished.popitem(last=False)

    def next_in_line(self, output_dir: Path) -> Transaction | None:
        """The oldest live transaction of ``output_dir``: commits there go in hand-over order, so that
        "latest" only moves forward and retention never removes a newer checkpoint."""
        for txn in self.live.values():
            if txn.output_dir == output_dir:
                return txn
        return None

    def live_ids(self) -> set[str]:
        return set(self.live)


def shared_files(records: list[fmt.FileRecord]) -> dict[str, list[fmt.FileRecord]]:
    """The region records (shares of shared files) among ``records``, by path, in order."""
    shared: dict[str, list[fmt.FileRecord]] = {}
    for rec in records:
        if rec.kind == "region":
            shared.setdefault(rec.path, []).append(rec)
    return shared


def shared_file_problem(records: list[fmt.FileRecord], cover_key: int | None = None) -> str | None:
    """Why the shares of some shared file among ``records`` (every node's) cannot make it, or None.

    Every share of a path must agree on ``file_size`` and component, no rank may send two shares of it, the
    path must not also be a whole file, and the bytes contributed must add up to exactly ``file_size``.
    With ``cover_key`` (the transaction's, ``writer.coverage_key``), the shares' coverage fingerprints (in
    their checksum field, computed from the runs by the daemon that wrote them) must add up to the whole
    file's: shares that overlap while leaving a hole of the same size are refused too."""
    whole = {rec.path: rec.written_by for rec in records if rec.kind != "region"}
    for path, shares in shared_files(records).items():
        ranks = sorted(r.written_by for r in shares)
        if path in whole:
            return (
                f"{path} is written both as a whole file (by rank {whole[path]}) and in regions of a shared file "
                f"(by ranks {ranks}); a file is one or the other"
            )
        if len(set(ranks)) != len(ranks):
            twice = sorted({r for r in ranks if ranks.count(r) > 1})
            return f"rank(s) {twice} sent regions of the shared file {path} twice"
        sizes = {r.file_size for r in shares}
        if len(sizes) != 1:
            said = ", ".join(f"rank {r.written_by}: {r.file_size}" for r in sorted(shares, key=lambda r: r.written_by))
            return (
                f"the ranks writing the shared file {path} disagree on its size ({said} bytes); every rank must "
                "declare the same file_size"
            )
        components = {r.component for r in shares}
        if len(components) != 1:
            return f"the ranks {ranks} writing the shared file {path} name different components {sorted(components)}"
        (file_size,) = sizes
        received = sum(r.size for r in shares)
        if received != file_size:
            why = (
                "a rank's part is missing or incomplete: every rank holding a piece of it must send its regions"
                if received < file_size
                else "the ranks' regions overlap"
            )
            return (
                f"the shared file {path} received {received} bytes from ranks {ranks}, expected exactly its "
                f"file_size of {file_size} bytes; {why}"
            )
        if cover_key is not None:
            prints = [fmt.parse_coverage(r.checksum) for r in shares]
            if None in prints or sum(prints) % fmt.COVER_PRIME != fmt.full_coverage(file_size, cover_key):  # type: ignore[arg-type]
                return (
                    f"the ranks' regions of the shared file {path} (ranks {ranks}) add up to its {file_size} bytes "
                    "but do not cover each byte exactly once: some overlap and leave a hole; the ranks disagree "
                    "on where their pieces go (a ckptd bug, or ranks with different DTensor placements)"
                )
    return None


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _is_model_save(directory: Path, output_dir: Path | None = None) -> bool:
    """Whether ``directory`` holds a manifest a ``save_model`` wrote (its metadata says so), of the job of
    ``output_dir`` when given (another output dir's saved model is that job's, not ours to replace)."""
    try:
        mark = fmt.read_manifest(directory).metadata.get(fmt.EXPORT_METADATA_KEY)
    except (fmt.FormatError, OSError):
        return False
    if not isinstance(mark, dict):
        return False
    return output_dir is None or mark.get("output_dir") == str(output_dir)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        text = e.strerror or str(e)
        where = f" ({e.filename})" if e.filename else ""
        return f"{name}: {text}{where}"
    return str(e) or type(e).__name__


def set_best(output_dir: Path, step: int) -> Path:
    """Mark ``checkpoint-<step>`` of ``output_dir`` best (``client.set_best_checkpoint``). Run in the commit
    pool, between commits and their retention, never beside them. Raises TxnError if it is not committed."""
    for info in fmt.scan_checkpoints(output_dir)[0]:
        if info.step == step:
            fmt.write_best_mark(output_dir, fmt.BestMark(step))
            logger.info("%s marked best", info.path)
            return info.path
    raise TxnError(
        f"{fmt.checkpoints_root(output_dir) / fmt.checkpoint_dirname(step)} is not a committed checkpoint, so it "
        f"cannot be marked best; expected one of {[p.name for p in fmt.list_checkpoints(output_dir)]}"
    )


def retention_verdicts(
    steps: list[int], just_committed: int, limit: int, keep_every_n_steps: int | None, best: int | None
) -> list[tuple[int, bool, str]]:
    """What retention does to each committed step (oldest first): ``(step, kept, why)``. The one policy, for
    the daemon (``apply_retention``) and for ``ckptd gc --dry-run --save-total-limit``.

    Example:
        >>> retention_verdicts([1, 2, 3], 3, 1, None, 1)
        [(1, True, 'the best'), (2, False, 'older than the 1 newest'), (3, True, 'just committed')]
        >>> retention_verdicts([5, 10], 5, 1, None, None)  # an older step re-saved: the newest stays
        [(5, True, 'just committed'), (10, True, 'among the 1 newest')]
    """
    # The N newest of all committed steps; the one just committed is kept besides (a re-saved older step
    # must never cost the newer checkpoints their place).
    newest = set(sorted(steps)[-limit:])
    out = []
    for step in steps:
        if step == just_committed:
            out.append((step, True, "just committed"))
        elif step == best:
            out.append((step, True, "the best"))
        elif keep_every_n_steps and step % keep_every_n_steps == 0:
            out.append((step, True, f"a milestone (a multiple of keep_every_n_steps={keep_every_n_steps})"))
        elif step in newest:
            out.append((step, True, f"among the {limit} newest"))
        else:
            out.append((step, False, f"older than the {limit} newest"))
    return out
