"""The node daemon: one asyncio loop owns the ROUTER socket; writer threads move bytes to disk.

The loop never blocks on I/O: it validates requests, drives transactions through their states (the
transitions themselves live in ``transactions.py``; this module never sets a state), and sends replies and
notifications. Writing, fsync and commit run on thread pools and report back to the loop. Byte movement is
in ``writer.py``, message parsing in ``protocol.py``, ownership records and sweeps in ``ownership.py``.

Multi-node (DESIGN §5): the daemon of rank 0's node leads each save of a multi-node job through a per-job
``peers.PeerListener``; the others follow through a ``peers.PeerLink``. A follower gives up on a save it
has voted PREPARED for (leader lost or silent, its deadline, an abort request) only through
``ownership.veto_commit``, which races the leader's rename on the shared file system and so either makes
the commit impossible or finds it done: every node then tells its ranks the same outcome.

Shutdown (SIGTERM/SIGINT): new saves are refused at once; saves already handed over completely get
``grace`` seconds to commit; then the rest abort cleanly (temp dirs removed) and the daemon exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

import ckptd
from ckptd import metrics, ownership, pacing, peers, security, writer
from ckptd import protocol as proto
from ckptd import transactions as tx
from ckptd.faults import FaultInjector
from ckptd.protocol import MsgType, ProtocolError, TxnState

logger = logging.getLogger(__name__)

TICK_S = 0.25
SWEEP_EVERY_S = 60.0  # stale temp dirs of other daemons, orphaned legacy slabs
DEFAULT_GRACE_S = 30.0
PEER_BEAT_S = 1.0  # a follower asks the leader about each save in flight this often
PEER_SILENCE_S = 10.0  # a peer silent this long about a save in flight is given up on
LISTENER_IDLE_S = 600.0  # a job's peer socket with no traffic and no save this long is closed (re-made on demand)
LINK_IDLE_S = 120.0
MAX_PENDING_JOINS = 4096
MAX_LISTENERS = 64  # jobs this daemon leads at once (each a socket, a ZeroMQ context and its I/O thread)
MAX_LINKS = 256  # leaders this daemon follows at once
MAX_RHYTHMS = 1024  # output dirs whose save intervals auto pacing remembers


@dataclass
class DaemonConfig:
    endpoint: str
    idle_exit_s: float | None = None  # exit after this long with nothing to do and no live client
    writer_threads: int = 4
    nice: int = 10  # CPU priority below the trainer's: writing must not take cores from training
    # O_DIRECT for the page-aligned body of each file: no copy into the page cache and no writeback work,
    # so the write takes less CPU from training and finishes sooner; falls back where unsupported.
    direct_io: bool = True
    sweep_dirs: list[Path] = field(default_factory=list)
    grace_s: float = DEFAULT_GRACE_S  # on SIGTERM: how long saves already handed over may take to commit
    keys_dir: Path | None = None  # CURVE keys; required for tcp:// endpoints
    peer_host: str | None = None  # interface for multi-node peer traffic; None: $CKPTD_PEER_HOST or the host name's
    peer_ports: str | None = None  # "LO-HI" for the leader's per-job peer sockets; None: $CKPTD_PEER_PORTS or any
    # Spread each save's writes (pacing.py): a fixed rate shared by all writers, or auto (a fraction of the
    # measured interval between a dir's saves). Never at the cost of a deadline or of back-pressure.
    max_write_rate: pacing.WriteRate = pacing.UNLIMITED
    cpu_affinity: set[int] | None = None  # CPUs every daemon thread may run on; None: inherited
    ionice: pacing.IoPriority | None = None  # I/O class of every daemon thread; None: inherited
    drop_cache: bool = True  # POSIX_FADV_DONTNEED each written file after its fsync
    metrics_port: int | None = None  # serve Prometheus metrics here (ckptd.metrics); 0: any free port
    metrics_host: str = "127.0.0.1"


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    bytes_staged: int = 0
    bytes_written: int = 0
    commits: int = 0
    aborts: int = 0
    last_commit_path: str | None = None
    last_commit_time: float | None = None
    last_commit_bytes: int = 0
    last_commit_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)  # post-commit failures (retention, fsync), newest last


class EndpointBusy(RuntimeError):
    pass


class EndpointLock:
    """An exclusive lock beside an IPC socket: a second daemon must not steal a live socket."""

    def __init__(self, endpoint: str) -> None:
        self.path = proto.ipc_path(endpoint)
        self.fd: int | None = None
        if self.path is None:
            return
        proto.ensure_private_dir(os.path.dirname(self.path))
        lock = self.path + ".lock"
        for _ in range(5):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EndpointBusy(f"another ckptd already serves {endpoint}") from None
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            # We locked a lock file that the previous daemon removed as it exited: take the new one.
            os.close(fd)
        raise EndpointBusy(f"could not take the lock {lock}; daemons keep starting and stopping at {endpoint}")

    def release(self) -> None:
        """Remove the lock file while still holding it (so no other daemon can be holding it), then let go."""
        if self.fd is None or self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + ".lock")
        os.close(self.fd)
        self.fd = None


class Daemon:
    """One node daemon: its socket, its transactions, the slabs it maps, and its worker pools."""

    def __init__(self, config: DaemonConfig, sock: zmq.asyncio.Socket, faults: FaultInjector | None = None) -> None:
        self.config = config
        self.sock = sock
        self.faults = faults or FaultInjector()
        self.io_pool = ThreadPoolExecutor(max(1, config.writer_threads), thread_name_prefix="ckptd-writer")
        self.writes_running = 0  # write_part calls submitted to io_pool and not finished
        # Commits (manifest, renames, retention) one at a time, in order; everything else about directories
        # (temp dir creation, sweeps, removing trash and aborted temp dirs) beside them, so that a slow
        # rmtree of an old checkpoint never holds up the next save's mkdir.
        self.commit_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-commit")
        self.dir_pool = ThreadPoolExecutor(2, thread_name_prefix="ckptd-dirs")
        self.ledger = tx.Ledger()
        self.segments: dict[tuple[int, int, int], writer.Segment] = {}
        self.clients: dict[int, ownership.ProcessIdentity | None] = {}
        self.swept: set[Path] = set()
        self.dirs_seen: set[Path] = set()
        self.jobs_seen: dict[str, str] = {}  # output dir -> the job of its latest save (for status)
        self.prepared: dict[str, asyncio.Future] = {}  # txn -> its temp dir exists
        self.identity = ownership.ProcessIdentity.current()
        self.stats = Stats()
        self.written = metrics.ByteCounter()  # bytes written to checkpoint files, chunk by chunk
        self.metrics: metrics.DaemonMetrics | None = None
        self.last_activity = time.monotonic()
        self.last_sweep = time.monotonic()
        self.stopping_since: float | None = None
        self.tasks: set[asyncio.Task] = set()
        # Multi-node: the leader's per-job peer sockets, a follower's links to leaders, and which link each
        # follower transaction answers to; joins that came before the leader's own first part.
        self.listeners: dict[str, peers.PeerListener] = {}  # by the job's server key
        self.links: dict[tuple[str, str, str], peers.PeerLink] = {}
        self.txn_links: dict[str, peers.PeerLink] = {}
        self.pending_joins: dict[str, list[tuple[peers.PeerListener, bytes, int, float]]] = {}
        self.checks: dict[int, asyncio.Future] = {}
        self.vetoing: set[str] = set()
        # Saves rank 0 gave up on before this daemon opened them: followers that join or beat are told at once.
        self.aborted_unopened: OrderedDict[str, str] = OrderedDict()
        self.joined: set[str] = set()  # follower transactions the leader has been told of (beats may start)
        self.last_beat = 0.0
        self.last_dir_check = 0.0
        rate = config.max_write_rate
        self.bucket = pacing.TokenBucket(rate.bytes_per_s) if rate.bytes_per_s is not None else None
        self.rhythms: OrderedDict[Path, pacing.Rhythm] = OrderedDict()  # hand-off times per output dir

    # -- messages out ---------------------------------------------------------------------------------

    async def send(self, identity: bytes, msg_type: MsgType, req_id: int = 0, **body: object) -> None:
        try:
            await self.sock.send_multipart([identity, proto.pack(msg_type, req_id, **body)])
        except zmq.ZMQError as e:
            logger.debug("reply to a departed client dropped: %s", e)

    async def notify(self, txn: tx.Transaction) -> None:
        for identity in txn.identities():
            if txn.state == TxnState.COMMITTED:
                await self.send(identity, MsgType.COMMITTED, txn=txn.txn, step=txn.step, path=str(txn.path))
            else:
                await self.send(identity, MsgType.ABORTED, txn=txn.txn, reason=txn.reason or "aborted")
        for remote in txn.remote.values():
            await self.tell_follower(remote.reply_to, remote.identity, txn)

    async def tell_follower(self, listener: Any, identity: bytes, txn: tx.Transaction) -> None:
        if txn.state == TxnState.COMMITTED:
            await listener.send(identity, MsgType.P_COMMITTED, txn=txn.txn, step=txn.step)
        else:
            await listener.send(identity, MsgType.P_ABORTED, txn=txn.txn, reason=txn.reason or "aborted")

    def txn_state_body(self, txn_id: str) -> dict[str, object]:
        txn = self.ledger.get(txn_id)
        if txn is None:
            return {"txn": txn_id, "state": TxnState.UNKNOWN.value, "path": None, "reason": None}
        return {
            "txn": txn_id,
            "state": txn.state.value,
            "path": str(txn.path) if txn.path else None,
            "reason": txn.reason,
        }

    # -- tasks ----------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("daemon task failed", exc_info=task.exception())

    async def run_io(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- the life of a transaction --------------------------------------------------------------------

    async def handle_stage(self, identity: bytes, req_id: int, body: dict) -> None:
        req = proto.parse_stage(body)
        txn = self.ledger.live.get(req.txn)
        if txn is None:
            old = self.ledger.finished.get(req.txn)
            if old is not None:
                raise tx.TxnError(f"transaction {req.txn} is already {old.state.value}" + _reason(old))
            owner = ownership.ProcessIdentity.of_pid(req.pid)
            if self.stopping_since is not None:
                raise tx.TxnError("the daemon is shutting down and takes no new saves; retry against a new daemon")
        # Map the segment before touching any transaction: a part whose bytes cannot be read must neither
        # open a transaction (and its temp dir) nor leave a half-joined one behind.
        try:
            segment = self.get_segment(req) if req.files else None
        except (OSError, ValueError) as e:
            raise tx.TxnError(str(e)) from None
        else:
            owner = ownership.ProcessIdentity.of_pid(req.pid)
        if txn is None:
            txn = tx.Transaction.open(req, self.faults)
            txn.written = self.written
            link = self.link_for(req.peer) if txn.role == tx.Role.FOLLOWER else None
            if txn.role == tx.Role.LEADER and (txn.job is None or txn.peer.server_public not in self.listeners):
                raise tx.TxnError(
                    f"this daemon leads a multi-node save of job {txn.job!r} but has no peer socket for it (the "
                    "daemon was restarted after rank 0 announced it); the next save announces it again"
                )
            self.release_dead_conflicts(txn)
            self.ledger.admit(txn)
            self.dirs_seen.add(txn.output_dir)
            self.jobs_seen[str(txn.output_dir)] = txn.job or ""
            self.plan_pace(txn)
            if link is not None:
                # A follower never creates the shared temp dir: it waits for the leader's word that it exists.
                self.txn_links[txn.txn] = link
                self.prepared[txn.txn] = asyncio.get_running_loop().create_future()
                self.spawn(self.follower_join(txn, link))
            else:
                # Directory work (sweep, mkdir) runs off the loop and off the rank's stall: the rank only waits
                # for validation; its part's writer waits for this future.
                sweep = txn.output_dir not in self.swept
                self.swept.add(txn.output_dir)
                # A live view of the ledger: the sweep sees transactions admitted while it runs.
                live = self.ledger.live.keys()
                fut = asyncio.ensure_future(self.run_io(self.dir_pool, txn.prepare_dir, sweep, live, self.identity))
                self.prepared[txn.txn] = fut
                if txn.role == tx.Role.LEADER:
                    self.listeners[txn.peer.server_public].last_used = time.monotonic()
                    self.adopt_pending_joins(txn)
                    fut.add_done_callback(lambda _f, t=txn: self.spawn(self.tell_opened(t)))
            logger.info(
                "txn %s opened: step %d in %s, ranks %s, job %s%s",
                txn.txn,
                txn.step,
                txn.output_dir,
                sorted(txn.expected_ranks),
                txn.job,
                f", node {txn.peer.node} of {txn.peer.nnodes} ({txn.role.value})" if txn.peer else "",
            )
        part = txn.join(req, identity)
        part.segment = segment
        part.owner = owner
        self.stats.bytes_staged += sum(f.length for f in req.files)
        if self.metrics is not None and req.stall_s is not None:
            self.metrics.stall.observe(req.stall_s)
        await self.send(identity, MsgType.ACCEPTED, req_id, txn=req.txn, rank=req.rank)
        self.spawn(self.run_part(txn, part))

    def plan_pace(self, txn: tx.Transaction) -> None:
        """Note the hand-off in its output dir's rhythm; pace its writes if ``--max-write-rate`` says so.

        A save of the same output dir that is still being written is un-paced for good: this one waits
        behind it (commits go in hand-over order), and its trainer may be waiting too."""
        for other in self.ledger.live.values():
            if other is not txn and other.output_dir == txn.output_dir and other.pace is not None:
                other.pace.lift("a later save of this output dir was handed over")
        rhythm = self.rhythms.pop(txn.output_dir, None) or pacing.Rhythm([])
        self.rhythms[txn.output_dir] = rhythm
        while len(self.rhythms) > MAX_RHYTHMS:
            self.rhythms.popitem(last=False)
        interval = rhythm.note(txn.opened_at)
        rate = self.config.max_write_rate
        if not rate.enabled:
            return
        if interval is None:
            # The first save of this dir here: no interval to spread it over, and nothing would lift the pace
            # while its trainer waits for the slab (with one staging slab the next save cannot be handed over).
            return
        target_end = None
        if rate.auto_fraction is not None:
            target_end = txn.opened_at + min(rate.auto_fraction * interval, pacing.AUTO_MAX_SPREAD_S)
        txn.pace = pacing.Pace(
            txn.opened_at,
            txn.deadline,
            total=lambda: txn.bytes_total,
            cancelled=txn.aborting,
            bucket=self.bucket,
            target_end=target_end,
            due_at=txn.opened_at + interval,
        )
        if self.stopping_since is not None:
            txn.pace.lift("the daemon is stopping")
        logger.debug(
            "txn %s: writes paced (%s%s; interval %s; written by %.1f s at the latest)",
            txn.txn,
            rate.describe(),
            f", done in {txn.pace.target_end - txn.opened_at:.1f} s" if txn.pace.target_end else "",
            f"{interval:.1f} s" if interval is not None else "not known yet",
            txn.pace.safe_end - txn.opened_at,
        )

    def release_dead_conflicts(self, txn: tx.Transaction) -> None:
        """Abort saves of another job in ``txn``'s output dir that can never commit: their job lost the lease,
        or every rank that staged them is dead. A job restarted after a crash must not wait out (or be
        refused because of) the deadline of its dead predecessor's half-handed-over save."""
        for other in self.ledger.conflicts(txn):
            if other.state not in tx.ABORTABLE:
                continue
            if other.orphaned():
                why = "the ranks that staged it are gone, and a new job writes this output dir"
            elif not ownership.lease_allows(other.output_dir, other.job or ""):
                why = f"job {other.job!r} no longer holds the lease of this output dir"
            else:
                continue
            if other.role == tx.Role.FOLLOWER and other.state == TxnState.PREPARED:
                self.spawn(self.give_up(other, why))  # voted: only the veto may decide against the leader
            elif other.begin_abort(why):
                self.spawn(self.after_abort(other))

    def get_segment(self, req: proto.StageRequest) -> writer.Segment:
        key = (req.pid, req.segment_fd, req.segment_ino)
        seg = self.segments.get(key)
        if seg is not None and seg.size < req.segment_size:
            self.segments.pop(key).close()
            seg = None
        if seg is None:
            seg = writer.open_segment(req.segment, req.pid, req.segment_fd, req.segment_ino, req.segment_size)
            self.segments[key] = seg
        return seg

    async def run_part(self, txn: tx.Transaction, part: tx.Part) -> None:
        txn.io_begin()
        try:
            await asyncio.shield(self.prepared[txn.txn])
            if part.segment is not None:
                self.writes_running += 1
                if self.writes_running > self.config.writer_threads:
                    # Every writer thread is taken: paced writers sleeping in them must not hold up this save
                    # (of any output dir) until its deadline.
                    for other in self.ledger.live.values():
                        if other.pace is not None:
                            other.pace.lift("every writer thread is taken and another save waits for one")
                try:
                    await self.run_io(self.io_pool, txn.write_part, part, self.config.direct_io, self.config.drop_cache)
                finally:
                    self.writes_running -= 1
            else:
                part.written = True
            await self.release(txn, part)
            await self.run_io(self.io_pool, txn.sync_part, part)
        except Exception as e:  # any write error aborts the whole transaction, never the daemon
            await self.release(txn, part)
            txn.io_end()
            await self.abort(txn, f"rank {part.rank}: writing failed: {tx.describe_error(e)}")
            return
        txn.io_end()
        txn.part_durable(part)
        self.stats.bytes_written += sum(r.size for r in part.records)
        await self.advance(txn)

    async def advance(self, txn: tx.Transaction) -> None:
        """After a part or a follower's vote came in: PREPARED if it can be, then report or commit."""
        if txn.state in (TxnState.OPEN, TxnState.WRITING):
            if not txn.try_prepare():
                if txn.state == TxnState.ABORTING:
                    await self.after_abort(txn)
                return
            if txn.role == tx.Role.FOLLOWER:
                await self.send_vote(txn)
                return
        if txn.role != tx.Role.FOLLOWER:
            await self.commit_ready(txn.output_dir)

    async def release(self, txn: tx.Transaction, part: tx.Part) -> None:
        """Tell the rank its slab is free, once: the daemon reads no more of it for this part."""
        if not part.released:
            part.released = True
            await self.send(part.identity, MsgType.RELEASED, txn=txn.txn, rank=part.rank)

    async def commit_ready(self, output_dir: Path) -> None:
        """Commit the transactions of ``output_dir`` that are PREPARED, in hand-over order."""
        while True:
            txn = self.ledger.next_in_line(output_dir)
            # A follower's PREPARED save waits for the leader's word; only the leader renames.
            if txn is None or txn.state != TxnState.PREPARED or txn.role == tx.Role.FOLLOWER:
                return
            if txn.expired():
                await self.abort(txn, "its deadline passed while it waited to commit")
                continue
            await self.commit(txn)

    async def commit(self, txn: tx.Transaction) -> None:
        txn.begin_commit()  # before yielding to the loop: no second commit, no abort from now on
        outcome = await self.run_io(self.commit_pool, txn.commit)
        txn.finish_commit(outcome)
        if txn.state == TxnState.ABORTING:
            await self.after_abort(txn)
            return
        elapsed = (txn.committed_at or time.monotonic()) - txn.opened_at
        logger.info("committed %s (%d bytes in %.3f s)", txn.path, txn.bytes_total, elapsed)
        s = self.stats
        s.commits += 1
        s.last_commit_path = str(txn.path)
        s.last_commit_time = time.time()
        s.last_commit_bytes = txn.bytes_total
        s.last_commit_seconds = elapsed
        if self.metrics is not None:
            self.metrics.observe_commit(elapsed)
        # A model save (client.save_model) is no checkpoint: it neither ranks for best nor counts for retention.
        info = txn.commit_info if txn.export_to is None else None
        if info is not None and info.best_metric is not None:
            try:
                await self.run_io(self.commit_pool, txn.update_best, info.best_metric, info.greater_is_better)
            except Exception as e:  # nor may the best mark: the old mark stays, retention keeps it
                txn.warnings.append(f"updating the best-checkpoint mark failed: {tx.describe_error(e)}")
                logger.warning("updating the best mark after committing %s failed: %s", txn.path, e)
        if info is not None and info.save_total_limit:
            try:
                await self.run_io(self.commit_pool, txn.apply_retention, info.save_total_limit, info.keep_every_n_steps)
            except Exception as e:  # retention must never fail a committed checkpoint
                txn.warnings.append(f"retention failed: {tx.describe_error(e)}")
                logger.warning("retention failed after committing %s: %s", txn.path, e)
        # Before announcing the commit: a rank that sees "committed" also sees retention done.
        try:
            await self.run_io(self.dir_pool, txn.empty_trash)
        except Exception as e:
            txn.warnings.append(f"removing trash failed: {tx.describe_error(e)}")
        for w in txn.warnings:
            s.warnings.append(f"{txn.path}: {w}")
        del s.warnings[:-32]
        await self.retire(txn)

    async def abort(self, txn: tx.Transaction, reason: str) -> None:
        """Abort ``txn``. A follower that has voted PREPARED cannot simply abort (the leader may be renaming
        right now): it gives up through the veto instead (``give_up``)."""
        if txn.role == tx.Role.FOLLOWER and txn.state == TxnState.PREPARED:
            await self.give_up(txn, reason)
            return
        if txn.begin_abort(reason):
            await self.after_abort(txn)

    async def after_abort(self, txn: tx.Transaction) -> None:
        """ABORTING: wait for in-flight writes to let go, remove the temp dir, then tell the ranks."""
        self.stats.aborts += 1
        if self.metrics is not None:
            self.metrics.observe_abort(txn.reason)
        prepared = self.prepared.get(txn.txn)
        if prepared is not None and not prepared.done() and not isinstance(prepared, asyncio.Task):
            # A follower's wait for the leader's temp dir: it will never come now; its writers must let go.
            # (The leader's is the prepare_dir task itself, which finishes on its own.)
            prepared.set_exception(tx.TxnError(f"transaction {txn.txn} aborted: {txn.reason}"))
        link = self.txn_links.get(txn.txn)
        if link is not None and not txn.reason_from_leader:
            # Whatever made this follower abort (a rank's request, its ranks gone, a write error, its veto),
            # the leader hears at once instead of after 10 s of silence.
            await link.send(MsgType.P_ABORT, txn=txn.txn, node=txn.peer.node, reason=(txn.reason or "aborted")[:2000])
        await txn.io_idle.wait()
        if prepared is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(prepared)
        try:
            await self.run_io(self.dir_pool, txn.cleanup)
        except Exception as e:
            logger.warning("cleanup of aborted %s failed (a later sweep removes it): %s", txn.temp_dir, e)
        txn.finish_abort()
        await self.retire(txn)

    async def retire(self, txn: tx.Transaction) -> None:
        """Move a committed or aborted transaction out of the live set and tell its ranks."""
        self.ledger.retire(txn)
        fut = self.prepared.pop(txn.txn, None)
        if fut is not None and not fut.done():
            fut.cancel()  # a follower's wait for the leader's temp dir
        self.txn_links.pop(txn.txn, None)
        self.vetoing.discard(txn.txn)
        self.joined.discard(txn.txn)
        await self.notify(txn)
        self.drop_stale_segments()
        # A later save in the same output dir may have been waiting for this one to finish.
        self.spawn(self.commit_ready(txn.output_dir))

    # -- multi-node: the leader's side ------------------------------------------------------------------

    async def handle_listen(self, identity: bytes, req_id: int, body: dict) -> None:
        """Rank 0 announces its job: lead it through a per-job CURVE socket (made once, kept while used)."""
        req = proto.parse_listen(body)
        # One socket per key set, never replaced: two clients of one job id (or a restarted job) each have
        # their own keys, and replacing a socket would cut the other's saves in flight.
        listener = self.listeners.get(req.server_public)
        if listener is not None and (
            listener.job != req.job or listener.keys.authorized[0].public_key.decode() != req.client_public
        ):
            raise tx.TxnError("these peer keys are already in use by another job; make new keys per client")
        if listener is None:
            if len(self.listeners) >= MAX_LISTENERS:
                raise tx.TxnError(
                    f"this daemon already leads {len(self.listeners)} multi-node jobs (limit {MAX_LISTENERS}); "
                    "their idle peer sockets close after 10 minutes, or run a daemon per job (CKPTD_ENDPOINT)"
                )
            keys = security.Keys(
                server_public=req.server_public.encode(),
                server_secret=req.server_secret.encode(),
                authorized=(security.AuthorizedKey(f"job-{req.job}"[:100], req.client_public.encode()),),
            )
            try:
                # Name resolution off the loop: a slow resolver must not freeze the daemon.
                host = await self.run_io(self.dir_pool, peers.resolve_peer_host, self.config.peer_host)
                ports = peers.parse_port_range(self.config.peer_ports)
                listener = peers.PeerListener(req.job, keys, host, ports, self.on_follower_frames)
            except (ValueError, zmq.ZMQError, zmq.ZMQBindError, security.SecurityError) as e:
                raise tx.TxnError(
                    f"cannot open a peer socket for job {req.job} ({e}); expected --peer-host/$CKPTD_PEER_HOST to "
                    "name an address of this host and --peer-ports/$CKPTD_PEER_PORTS a free range"
                ) from None
            self.listeners[req.server_public] = listener
        listener.last_used = time.monotonic()
        await self.send(identity, MsgType.PEER_ADDRESS, req_id, address=listener.address)

    def adopt_pending_joins(self, txn: tx.Transaction) -> None:
        for listener, identity, node, _ in self.pending_joins.pop(txn.txn, []):
            if txn.peer is not None and listener.key == txn.peer.server_public:
                with contextlib.suppress(tx.TxnError):
                    txn.remote_heard(node, listener, identity)

    async def tell_opened(self, txn: tx.Transaction) -> None:
        """The leader's temp dir exists: every follower heard from may write into it."""
        fut = self.prepared.get(txn.txn)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return
        for remote in txn.remote.values():
            if not remote.told_opened and txn.state in tx.ABORTABLE:
                remote.told_opened = True
                await remote.reply_to.send(remote.identity, MsgType.P_OPENED, txn=txn.txn)

    async def on_follower_frames(self, listener: peers.PeerListener, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        identity, frame = frames
        req_id = 0
        try:
            msg_type, req_id, body = proto.unpack(frame)
            if msg_type == MsgType.P_HELLO:
                proto.parse_node(body)
                await listener.send(identity, MsgType.P_WELCOME, req_id, pid=os.getpid())
                return
            if msg_type == MsgType.P_PREPARED:
                prep = proto.parse_prepared(body)
                txn_id, node = prep.txn, prep.node
            elif msg_type in (MsgType.P_JOIN, MsgType.P_BEAT, MsgType.P_ABORT):
                txn_id, node = proto.parse_txn(body), proto.parse_node(body)
            else:
                raise ProtocolError(f"message type {msg_type.value!r} is not sent by a follower daemon")
            txn = self.ledger.get(txn_id)
            if txn is not None and (txn.peer is None or txn.peer.server_public != listener.key):
                raise ProtocolError(f"transaction {txn_id} is not one of this peer socket's (job {listener.job})")
            if txn is None or txn.finished:
                gone = self.aborted_unopened.get(txn_id) if txn is None else None
                if gone is not None:
                    # Rank 0 gave up on it before this daemon ever opened it: tell the follower at once.
                    if msg_type == MsgType.P_BEAT:
                        await listener.send(
                            identity, MsgType.P_STATE, req_id, txn=txn_id, state="aborted", path=None, reason=gone
                        )
                    else:
                        await listener.send(identity, MsgType.P_ABORTED, txn=txn_id, reason=gone)
                    return
                if msg_type == MsgType.P_JOIN and txn is None:
                    self.note_pending_join(txn_id, listener, identity, node)
                if txn is not None and msg_type != MsgType.P_BEAT:
                    await self.tell_follower(listener, identity, txn)
                if msg_type == MsgType.P_BEAT:
                    body = self.txn_state_body(txn_id)
                    if txn is None and txn_id in self.pending_joins:
                        body["state"] = TxnState.OPEN.value  # rank 0's part is not here yet
                    await listener.send(identity, MsgType.P_STATE, req_id, **body)
                return
            if txn.role != tx.Role.LEADER:
                raise ProtocolError(f"this daemon does not lead transaction {txn_id}")
            if msg_type == MsgType.P_PREPARED:
                txn.remote_prepared(prep, listener, identity)
                logger.info("txn %s: node %d prepared (%d files)", txn.txn, node, len(prep.files))
                # As a task of the daemon's: the commit it may complete must neither stall this socket's
                # receiving (other followers' beats) nor die with the socket.
                self.spawn(self.advance(txn))
                return
            txn.remote_heard(node, listener, identity)
            if msg_type == MsgType.P_JOIN:
                await self.tell_opened(txn)
            elif msg_type == MsgType.P_BEAT:
                await listener.send(identity, MsgType.P_STATE, req_id, **self.txn_state_body(txn_id))
            elif msg_type == MsgType.P_ABORT:
                self.spawn(self.abort(txn, f"node {node}: {proto.parse_reason(body)}"))
        except (ProtocolError, tx.TxnError) as e:
            logger.warning("rejected a message from a follower of job %s: %s", listener.job, e)
            await listener.send(identity, MsgType.ERROR, req_id, message=str(e))

    async def abort_unopened(self, txn_id: str, reason: str) -> None:
        """A rank aborted a save this daemon has not opened (rank 0's stage was refused, or never came):
        remember it, so that followers that joined, or join later, hear at once. A part that arrives later is
        still taken as before: the aborting rank's veto on disk already keeps that save from committing."""
        self.aborted_unopened[txn_id] = reason[:2000]
        while len(self.aborted_unopened) > MAX_PENDING_JOINS:
            self.aborted_unopened.popitem(last=False)
        for listener, identity, _, _ in self.pending_joins.pop(txn_id, []):
            await listener.send(identity, MsgType.P_ABORTED, txn=txn_id, reason=reason[:2000])

    def note_pending_join(self, txn_id: str, listener: peers.PeerListener, identity: bytes, node: int) -> None:
        now = time.monotonic()
        if len(self.pending_joins) >= MAX_PENDING_JOINS:
            for old in [t for t, v in self.pending_joins.items() if now - v[0][3] > PEER_SILENCE_S * 6]:
                del self.pending_joins[old]
            if len(self.pending_joins) >= MAX_PENDING_JOINS:
                return
        entries = self.pending_joins.setdefault(txn_id, [])
        if len(entries) < 1024 and all(n != node for _, _, n, _ in entries):
            entries.append((listener, identity, node, now))

    # -- multi-node: a follower's side ----------------------------------------------------------------

    def link_for(self, info: proto.PeerInfo | proto.CheckRequest) -> peers.PeerLink:
        key = (info.leader, info.server_public, info.client_public)
        link = self.links.get(key)
        if link is None:
            # A job's leader moved (its daemon restarted on a new port): the link to its old address is dead.
            for old_key in [k for k in self.links if k[1] == info.server_public and k != key]:
                if not any(lk is self.links[old_key] for lk in self.txn_links.values()):
                    self.links.pop(old_key).close()
            if len(self.links) >= MAX_LINKS:
                raise tx.TxnError(
                    f"this daemon already follows {len(self.links)} leader daemons (limit {MAX_LINKS}); idle links "
                    "close after 2 minutes"
                )
            try:
                link = peers.PeerLink(info, self.on_leader_frames, self.sock.context)
            except (zmq.ZMQError, security.SecurityError) as e:
                raise tx.TxnError(f"cannot connect to the leader daemon at {info.leader}: {e}") from None
            link.on_lost = self.leader_lost
            self.links[key] = link
        link.last_used = time.monotonic()
        return link

    def leader_lost(self, link: peers.PeerLink, reason: str) -> None:
        for txn_id, lk in list(self.txn_links.items()):
            txn = self.ledger.live.get(txn_id)
            if lk is link and txn is not None:
                self.spawn(self.give_up(txn, reason))

    async def follower_join(self, txn: tx.Transaction, link: peers.PeerLink) -> None:
        """Tell the leader this node has parts of ``txn``; its answer (p_opened) lets the writers start."""
        while txn.state in tx.ABORTABLE and not txn.expired():
            if link.refused is not None:
                await self.abort(txn, f"the leader daemon at {link.leader} refused this daemon: {link.refused}")
                return
            if link.connected.is_set() and await link.send(
                MsgType.P_JOIN, txn=txn.txn, node=txn.peer.node, step=txn.step
            ):
                self.joined.add(txn.txn)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.connected.wait(), 0.5)

    async def send_vote(self, txn: tx.Transaction) -> None:
        link = self.txn_links.get(txn.txn)
        records = [r for p in sorted(txn.parts) for r in txn.parts[p].records]
        sent = link is not None and await link.send(
            MsgType.P_PREPARED,
            txn=txn.txn,
            node=txn.peer.node,
            ino=txn.shared_ino or 1,
            files=[dataclasses.asdict(r) for r in records],
        )
        logger.info(
            "txn %s: node %d prepared, %d files%s",
            txn.txn,
            txn.peer.node,
            len(records),
            "" if sent else " (the vote could not be sent: the leader is unreachable)",
        )
        if not sent:
            await self.give_up(txn, f"the leader daemon at {link.leader if link else '?'} cannot be reached")

    async def give_up(self, txn: tx.Transaction, reason: str) -> None:
        """A follower stops waiting for the leader's word. Before its vote it simply aborts; after it, the
        leader may be renaming right now, so the veto on disk decides: vetoed (abort) or already committed."""
        if txn.role != tx.Role.FOLLOWER or txn.state != TxnState.PREPARED:
            if txn.state in tx.ABORTABLE:
                await self.abort(txn, reason)
            return
        if txn.txn in self.vetoing:
            return
        self.vetoing.add(txn.txn)
        try:
            vetoed = await self.run_io(
                self.io_pool,
                ownership.veto_commit,
                txn.output_dir,
                txn.step,
                txn.txn,
                txn.deadline_unix,
                self.identity,
                final=txn.final_dir,
            )
        except Exception as e:  # the outcome stays open: retried at the next housekeeping tick
            logger.warning("txn %s: giving up (%s), but vetoing it failed: %s; retrying", txn.txn, reason, e)
            self.vetoing.discard(txn.txn)
            return
        if txn.state != TxnState.PREPARED:
            return  # the leader's word came meanwhile
        if vetoed:
            txn.begin_abort(f"{reason}; this node vetoed the commit on disk, so it can never commit")
            await self.after_abort(txn)
        else:
            logger.info("txn %s: %s, but the leader had committed it", txn.txn, reason)
            txn.follower_committed()
            await self.retire(txn)

    async def on_leader_frames(self, link: peers.PeerLink, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return
        try:
            msg_type, req_id, body = proto.unpack(frames[0])
            if msg_type == MsgType.P_WELCOME:
                fut = self.checks.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(body.get("pid"))
                return
            if msg_type == MsgType.ERROR:
                logger.warning("the leader daemon at %s rejected a message: %s", link.leader, body.get("message"))
                return
            txn_id = proto.parse_txn(body)
            txn = self.ledger.live.get(txn_id)
            if txn is None or self.txn_links.get(txn_id) is not link:
                return
            txn.last_heard_leader = time.monotonic()
            if msg_type == MsgType.P_OPENED:
                self.spawn(self.observe_leader_dir(txn))
                return
            state = body.get("state") if msg_type == MsgType.P_STATE else None
            # The outcome's work runs as the daemon's tasks, not in this link's receive loop.
            if msg_type == MsgType.P_COMMITTED or state == TxnState.COMMITTED.value:
                if txn.state == TxnState.PREPARED and txn.txn not in self.vetoing:
                    txn.follower_committed()
                    logger.info("committed %s (the leader's rename)", txn.path)
                    self.stats.commits += 1
                    self.spawn(self.retire(txn))
            elif msg_type == MsgType.P_ABORTED or state in (TxnState.ABORTING.value, TxnState.ABORTED.value):
                reason = proto.parse_reason({"reason": body.get("reason") or "aborted"})
                if txn.txn not in self.vetoing and txn.begin_abort(f"the leader daemon aborted it: {reason}"):
                    txn.reason_from_leader = True
                    self.spawn(self.after_abort(txn))
            elif state == TxnState.UNKNOWN.value:
                self.spawn(self.give_up(txn, f"the leader daemon at {link.leader} does not know this save (restarted)"))
        except ProtocolError as e:
            logger.warning("ignored a malformed message from the leader daemon at %s: %s", link.leader, e)

    async def observe_leader_dir(self, txn: tx.Transaction) -> None:
        fut = self.prepared.get(txn.txn)
        if fut is None or fut.done():
            return
        try:
            await self.run_io(self.dir_pool, txn.observe_dir)
        except Exception as e:
            if not fut.done():
                fut.set_exception(e)
            await self.abort(txn, f"the shared temp dir: {tx.describe_error(e)}")
            return
        if not fut.done():
            fut.set_result(None)

    async def handle_check(self, identity: bytes, req_id: int, body: dict) -> None:
        """A follower node's local rank 0 asks at start-up: can this daemon reach the job's leader?"""
        req = proto.parse_check(body)
        link = self.link_for(req)
        deadline = time.monotonic() + peers.PEER_CHECK_TIMEOUT_S
        pid = None
        while time.monotonic() < deadline and pid is None:
            if link.refused is not None:
                break
            if link.connected.is_set():
                fut = asyncio.get_running_loop().create_future()
                check_id = secrets.randbits(62) + 1
                self.checks[check_id] = fut
                if await link.send(MsgType.P_HELLO, check_id, node=1, pid=os.getpid()):
                    with contextlib.suppress(asyncio.TimeoutError):
                        pid = await asyncio.wait_for(fut, max(0.1, min(2.0, deadline - time.monotonic())))
                self.checks.pop(check_id, None)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(link.connected.wait(), max(0.05, deadline - time.monotonic()))
        if pid is None:
            why = (
                f"it refused this daemon's handshake ({link.refused})"
                if link.refused
                else (f"no answer within {peers.PEER_CHECK_TIMEOUT_S:.0f} s")
            )
            await self.send(
                identity,
                MsgType.ERROR,
                req_id,
                message=f"this node's daemon cannot reach the leader daemon at {req.leader}: {why}; expected the "
                "leader's node to be reachable over TCP on that address: set CKPTD_PEER_HOST on the leader's node "
                "to an address the other nodes can reach, and let the firewall pass its port (docs/operations.md)",
            )
            return
        await self.send(identity, MsgType.PEER_OK, req_id, pid=pid)

    def peer_housekeeping(self, now: float) -> None:
        """Beats from followers, silence on either side, vetoes seen on disk, idle sockets."""
        beat = now - self.last_beat >= PEER_BEAT_S
        if beat:
            self.last_beat = now
        check_dirs = []
        for txn in list(self.ledger.live.values()):
            if txn.role == tx.Role.FOLLOWER and txn.state in tx.ABORTABLE:
                link = self.txn_links.get(txn.txn)
                if now - txn.last_heard_leader > PEER_SILENCE_S:
                    self.spawn(self.give_up(txn, f"the leader daemon has not answered for {PEER_SILENCE_S:.0f} s"))
                elif beat and link is not None and link.connected.is_set() and txn.txn in self.joined:
                    self.spawn(link.send(MsgType.P_BEAT, txn=txn.txn, node=txn.peer.node))
                elif link is not None and not link.connected.is_set() and link.ever_connected:
                    self.spawn(self.give_up(txn, f"the connection to the leader daemon at {link.leader} is down"))
            elif txn.role == tx.Role.LEADER and txn.state in tx.ABORTABLE:
                silent = txn.silent_nodes(PEER_SILENCE_S, now)
                if silent:
                    self.spawn(self.abort(txn, f"node(s) {silent} went silent for {PEER_SILENCE_S:.0f} s"))
                elif txn.temp_ino is not None:
                    check_dirs.append(txn)
        if check_dirs and now - self.last_dir_check >= PEER_BEAT_S:
            self.last_dir_check = now
            self.spawn(self.check_vetoes(check_dirs))
        busy_keys = {t.peer.server_public for t in self.ledger.live.values() if t.peer is not None}
        for key, listener in list(self.listeners.items()):
            if key not in busy_keys and now - listener.last_used > LISTENER_IDLE_S:
                logger.info("closing the idle peer socket %s of job %s", listener.address, listener.job)
                self.listeners.pop(key).close()
        busy_links = set(map(id, self.txn_links.values()))
        for key, link in list(self.links.items()):
            if id(link) not in busy_links and now - link.last_used > LINK_IDLE_S:
                self.links.pop(key).close()

    async def check_vetoes(self, txns: list[tx.Transaction]) -> None:
        """A rank of any node that gave up renames the shared temp dir away: abort at once, not at the deadline."""
        for txn in txns:
            why = await self.run_io(self.dir_pool, txn.dir_replaced)
            if why is not None and txn.state in tx.ABORTABLE:
                await self.abort(txn, why)

    def drop_stale_segments(self) -> None:
        """Unmap slabs that no live transaction reads and their rank no longer holds: the mapping is all
        that keeps a dead or replaced slab's memory alive."""
        in_use = {
            (p.request.pid, p.request.segment_fd, p.request.segment_ino)
            for t in self.ledger.live.values()
            for p in t.parts.values()
        }
        for key, seg in list(self.segments.items()):
            if key not in in_use and not writer.segment_is_current(seg):
                self.segments.pop(key).close()
                logger.debug("dropped the mapping of slab %s (pid %d)", seg.name, seg.pid)

    # -- requests -------------------------------------------------------------------------------------

    def metrics_state(self) -> metrics.LiveState:
        """For a metrics scrape, on the HTTP thread: list() snapshots each dict at once (under the GIL)."""
        states: dict[str, int] = {}
        for t in list(self.ledger.live.values()):
            states[t.state.value] = states.get(t.state.value, 0) + 1
        s = self.stats
        seconds = s.last_commit_seconds
        return metrics.LiveState(
            bytes_staged=s.bytes_staged,
            bytes_written=self.written.value,
            in_flight=states,
            slab_bytes=sum(seg.size for seg in list(self.segments.values())),
            last_commit_throughput=s.last_commit_bytes / seconds if seconds else None,
        )

    def status_body(self) -> dict[str, object]:
        s = self.stats
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "version": ckptd.__version__,
            "endpoint": self.config.endpoint,
            "uptime_s": time.time() - s.started_at,
            "stopping": self.stopping_since is not None,
            "in_flight": [
                {
                    "txn": t.txn,
                    "step": t.step,
                    "output_dir": str(t.output_dir),
                    "job": t.job,
                    "state": t.state.value,
                    "ranks_in": sorted(t.parts),
                    "ranks_expected": sorted(t.expected_ranks),
                    "bytes_staged": t.bytes_total,
                    "bytes_written": t.bytes_written,
                    "age_s": now - t.opened_at,
                    "deadline_in_s": t.deadline - now,
                    "role": t.role.value,
                    "node": t.peer.node if t.peer else 0,
                    "nnodes": t.peer.nnodes if t.peer else 1,
                    "nodes_prepared": sorted(n for n, r in t.remote.items() if r.prepared is not None),
                }
                for t in self.ledger.live.values()
            ],
            "bytes_staged": s.bytes_staged,
            "bytes_written": s.bytes_written,
            "commits": s.commits,
            "aborts": s.aborts,
            "last_commit": s.last_commit_path,
            "last_commit_time": s.last_commit_time,
            "last_commit_bytes": s.last_commit_bytes,
            "last_commit_seconds": s.last_commit_seconds,
            "warnings": list(s.warnings),
            "clients": sorted(self.clients),
            "output_dirs": sorted(str(p) for p in self.dirs_seen),
            "jobs": dict(sorted(self.jobs_seen.items())),
            "leading": sorted({f"{lst.job} {lst.address}" for lst in self.listeners.values()}),
            "max_write_rate": self.config.max_write_rate.describe(),
            "metrics": self.metrics.url(self.config.metrics_host) if self.metrics is not None else None,
            "following": sorted({link.leader for link in self.links.values()}),
        }

    async def dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                await self.send(frames[0], MsgType.ERROR, message=f"expected one message frame, got {len(frames) - 1}")
            return
        identity, frame = frames
        req_id = 0
        try:
            msg_type, req_id, body = proto.unpack(frame)
            if msg_type == MsgType.HELLO:
                pid = proto.parse_pid(body)
                self.clients[pid] = ownership.ProcessIdentity.of_pid(pid)
                await self.send(identity, MsgType.WELCOME, req_id, pid=os.getpid(), version=ckptd.__version__)
            elif msg_type == MsgType.STAGE:
                await self.handle_stage(identity, req_id, body)
            elif msg_type == MsgType.QUERY:
                await self.send(identity, MsgType.TXN_STATE, req_id, **self.txn_state_body(proto.parse_txn(body)))
            elif msg_type == MsgType.ABORT:
                txn_id, reason = proto.parse_txn(body), proto.parse_reason(body)
                txn = self.ledger.live.get(txn_id)
                # Refused in COMMITTING and after (the reply carries the real state instead). The cleanup
                # runs as a task: waiting here for in-flight writes to drain would stop every other client.
                if txn is None and self.ledger.finished.get(txn_id) is None:
                    self.spawn(self.abort_unopened(txn_id, reason))
                if txn is not None and txn.role == tx.Role.FOLLOWER and txn.state == TxnState.PREPARED:
                    self.spawn(self.give_up(txn, reason))  # voted: only the veto may decide against the leader
                elif txn is not None and txn.begin_abort(reason):
                    self.spawn(self.after_abort(txn))
                await self.send(identity, MsgType.TXN_STATE, req_id, **self.txn_state_body(txn_id))
            elif msg_type == MsgType.STATUS:
                await self.send(identity, MsgType.STATUS_REPORT, req_id, **self.status_body())
            elif msg_type == MsgType.PEER_LISTEN:
                self.spawn(self.answering_errors(self.handle_listen, identity, req_id, body))
            elif msg_type == MsgType.PEER_CHECK:
                self.spawn(self.answering_errors(self.handle_check, identity, req_id, body))
            elif msg_type == MsgType.SET_BEST:
                self.spawn(self.answering_errors(self.handle_set_best, identity, req_id, body))
            elif msg_type == MsgType.BYE:
                self.clients.pop(proto.parse_pid(body), None)
                await self.send(identity, MsgType.BYE_OK, req_id)
            else:
                raise ProtocolError(f"message type {msg_type.value!r} is sent by the daemon, not to it")
        except (ProtocolError, tx.TxnError) as e:
            logger.warning("rejected request: %s", e)
            await self.send(identity, MsgType.ERROR, req_id, message=str(e))
        except Exception as e:  # a bug or an OS error on one request must not take the daemon down
            logger.exception("request failed")
            await self.send(identity, MsgType.ERROR, req_id, message=f"daemon error: {type(e).__name__}: {e}")

    async def handle_set_best(self, identity: bytes, req_id: int, body: dict) -> None:
        output_dir, step = proto.parse_set_best(body)
        # In the commit pool: after any commit already queued and its retention, never beside them.
        path = await self.run_io(self.commit_pool, tx.set_best, Path(output_dir), step)
        await self.send(identity, MsgType.BEST_SET, req_id, path=str(path))

    async def answering_errors(self, handler: Any, identity: bytes, req_id: int, body: dict) -> None:
        """Run a request that may take a while as a task (the loop keeps serving); its failure is its reply."""
        try:
            await handler(identity, req_id, body)
        except (ProtocolError, tx.TxnError) as e:
            logger.warning("rejected request: %s", e)
            await self.send(identity, MsgType.ERROR, req_id, message=str(e))
        except Exception as e:
            logger.exception("request failed")
            await self.send(identity, MsgType.ERROR, req_id, message=f"daemon error: {type(e).__name__}: {e}")

    # -- housekeeping ---------------------------------------------------------------------------------

    async def housekeeping(self) -> bool:
        """Deadlines, dead clients, sweeps, shutdown and idle exit. Returns True when the daemon should exit."""
        now = time.monotonic()
        for txn in list(self.ledger.live.values()):
            if txn.orphaned():
                if txn.begin_abort("every rank that staged it is gone, so the missing ranks can never come"):
                    self.spawn(self.after_abort(txn))
                continue
            if not txn.expired(now):
                continue
            if txn.state in tx.ABORTABLE:
                missing = txn.missing_ranks()
                if missing:
                    why = f"rank(s) {missing} did not stage within the timeout"
                elif txn.commit_info is None:
                    why = "no rank sent the commit information within the timeout"
                else:
                    why = "its files were not durable within the timeout"
                missing_nodes = txn.missing_nodes()
                if missing_nodes and not missing:
                    why = f"node(s) {missing_nodes} did not report PREPARED within the timeout"
                self.spawn(self.give_up(txn, why) if txn.role == tx.Role.FOLLOWER else self.abort(txn, why))
            elif now - txn.deadline > 60 and int(now - txn.deadline) % 60 == 0:
                logger.warning(
                    "txn %s is %s %.0f s past its deadline (I/O stuck)", txn.txn, txn.state.value, now - txn.deadline
                )
        self.peer_housekeeping(now)
        self.clients = {pid: who for pid, who in self.clients.items() if _client_alive(pid, who)}
        self.drop_stale_segments()
        if now - self.last_sweep > SWEEP_EVERY_S:
            self.last_sweep = now
            self.spawn(self.sweep(list(self.dirs_seen)))
        if self.stopping_since is not None:
            if now - self.stopping_since > self.config.grace_s:
                for txn in list(self.ledger.live.values()):
                    self.spawn(
                        self.abort(
                            txn, f"the daemon was asked to stop and its grace of {self.config.grace_s:g} s ran out"
                        )
                    )
            return not self.ledger.live and not self.tasks
        if self.ledger.live or self.tasks:
            self.last_activity = now
            return False
        idle = self.config.idle_exit_s
        return idle is not None and not self.clients and now - self.last_activity > idle

    async def sweep(self, dirs: list[Path]) -> None:
        # Best effort: a sweep only reclaims space, so whatever goes wrong in it (an unreadable directory, a
        # file it cannot parse, a bug of ours) is logged and the daemon goes on serving. It must never keep
        # a daemon from starting, or every CheckpointClient of that output dir would fail for good.
        for out in dirs:
            # A live view of the ledger: a transaction admitted while the sweep runs is in it before its
            # temp dir exists, so the sweep never takes that dir for an own leftover.
            try:
                await self.run_io(self.dir_pool, ownership.sweep_stale, out, self.ledger.live.keys())
            except OSError as e:
                logger.warning("sweeping %s failed: %s; its leftovers stay until a later sweep or 'ckptd gc'", out, e)
            except Exception:
                logger.exception("sweeping %s failed; its leftovers stay until a later sweep or 'ckptd gc'", out)
        try:
            await self.run_io(self.dir_pool, writer.sweep_legacy_slabs)
        except Exception:
            logger.exception("sweeping leftover shared-memory slabs failed; they stay until a later sweep")

    def stop(self) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            for txn in self.ledger.live.values():
                if txn.pace is not None:
                    txn.pace.lift("the daemon is stopping")  # the grace is for committing, not for pacing
            logger.info(
                "stopping: no new saves; %d in flight get %.0f s to commit", len(self.ledger.live), self.config.grace_s
            )

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.io_pool.shutdown(wait=True)
        self.commit_pool.shutdown(wait=True)
        self.dir_pool.shutdown(wait=True)
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()


def _reason(txn: tx.Transaction) -> str:
    return f": {txn.reason}" if txn.reason else ""


def _client_alive(pid: int, who: ownership.ProcessIdentity | None) -> bool:
    if who is not None:
        return who.alive() is not False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def serve_async(config: DaemonConfig, ready: asyncio.Event | None = None) -> int:
    from ckptd import security

    # Before anything binds: a tcp:// endpoint without CURVE keys is refused, never served in the clear.
    keys = security.keys_for_endpoint(config.endpoint, config.keys_dir)
    lock = EndpointLock(config.endpoint)
    # The metrics endpoint before the socket: a daemon that cannot serve it exits before any client sees it.
    served: dict[str, Daemon] = {}
    exporter = None
    if config.metrics_port is not None:
        try:
            exporter = _start_metrics(config, served)
        except BaseException:
            lock.release()
            raise
    # Before any thread starts (ZeroMQ's I/O thread, the worker pools): they inherit what is set here.
    if config.nice > 0:
        os.nice(config.nice)
    if config.cpu_affinity is not None:
        pacing.apply_cpu_affinity(config.cpu_affinity)
    if config.ionice is not None:
        pacing.apply_ionice(config.ionice)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_BYTES)
    guard = security.secure_server_socket(ctx, sock, keys) if keys is not None else None
    path = proto.ipc_path(config.endpoint)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock, so any socket file here is stale
    old_umask = os.umask(0o077)
    try:
        sock.bind(config.endpoint)
    finally:
        os.umask(old_umask)
    d = Daemon(config, sock, FaultInjector.from_env())
    if exporter is not None:
        d.metrics = exporter
        served["daemon"] = d
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, d.stop)
    d.dirs_seen.update(config.sweep_dirs)
    await d.sweep(list(config.sweep_dirs))
    d.swept.update(config.sweep_dirs)
    logger.info("ckptd %s serving %s (pid %d)", ckptd.__version__, config.endpoint, os.getpid())
    if ready is not None:
        ready.set()
    next_tick = 0.0
    try:
        while True:
            if await sock.poll(int(TICK_S * 1000)):
                frames = await sock.recv_multipart()
                d.last_activity = time.monotonic()
                await d.dispatch(frames)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                if await d.housekeeping():
                    break
    finally:
        for txn in list(d.ledger.live.values()):
            await d.abort(txn, "daemon shutting down")
        d.close()
        if d.metrics is not None:
            d.metrics.close()
        sock.close(linger=500)
        if guard is not None:
            guard.stop()  # before term(): its ZAP and monitor sockets live on this context
        ctx.term()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        lock.release()
    logger.info("ckptd exiting")
    return 0


def _start_metrics(config: DaemonConfig, served: dict[str, Daemon]) -> metrics.DaemonMetrics:
    """The Prometheus endpoint; it reads ``served["daemon"]`` once the daemon exists (zeros before)."""
    port = config.metrics_port
    assert port is not None
    if not 0 <= port <= 65535:
        raise metrics.MetricsUnavailable(f"--metrics-port {port}: expected a TCP port, 0 to 65535 (0: any free one)")

    def live() -> metrics.LiveState:
        d = served.get("daemon")
        return d.metrics_state() if d is not None else metrics.LiveState(0, 0, {}, 0, None)

    exporter = metrics.DaemonMetrics(live)
    try:
        exporter.serve(port, config.metrics_host)
    except (OSError, OverflowError) as e:
        raise metrics.MetricsUnavailable(
            f"--metrics-port {port}: cannot listen on {config.metrics_host} ({getattr(e, 'strerror', None) or e}); "
            "pass a free port, or 0 for any"
        ) from None
    return exporter


def serve(config: DaemonConfig) -> int:
    return asyncio.run(serve_async(config))
