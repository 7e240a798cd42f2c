"""CheckpointClient: the rank-side API (save_async / wait / load / close).

Every collective call (the constructor, ``save_async``, ``load``) keeps the ranks in lockstep: whatever
fails on one rank before a collective is carried into it as that rank's vote, so every rank raises the
same CheckpointError at the same point instead of leaving the others blocked in a collective.

A save's staging slab is freed only by the daemon's word (``released``, ``committed``, ``aborted``). A rank
that gives up on a save any other way (no heartbeat answer, lost connection, a hand-off that timed out)
abandons the slab to the daemon (unmaps and closes it, never reuses it) and vetoes the commit through the
file system (``ckptd.ownership.veto_commit``), so a daemon that wakes up later can neither read reused
bytes nor commit the save.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import secrets
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptd import format as fmt
from ckptd import ownership, security
from ckptd import protocol as proto
from ckptd.protocol import MsgType, TxnState
from client import loader, overlap, planning, sharding, staging
from client.components import CheckpointError, SharingPattern, StateComponent, ValidationLevel, hf_config
from client.transport import DAEMON_START_TIMEOUT_S, DaemonLink, DaemonUnavailable

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # at most this long between queries about a save in flight
HEARTBEAT_TIMEOUT_S = 15.0  # a daemon that does not answer a query this long is given up on
DEFAULT_TXN_TIMEOUT_S = 300.0
MAX_FAILURES_KEPT = 64  # failed saves remembered for the next client.wait() (the oldest beyond are dropped)
LEASE_REFRESH_ON_SAVE_S = 5.0  # a save refreshes the lease when it is older than this
DEFAULT_PREEMPTION_TIMEOUT_S = 60.0


@dataclass
class SaveHandle:
    """A save in flight. ``wait()`` returns the committed checkpoint's path or raises CheckpointError."""

    step: int
    txn: str
    client: CheckpointClient = field(repr=False)
    deadline: float = 0.0  # Unix time after which the daemon may not commit it (the tombstone keeps it)
    path: Path | None = None
    error: str | None = None
    staged_s: float = 0.0  # the time save_async copied synchronously (the stall, less the collective)
    collective_s: float = 0.0  # the save path's one collective (the snapshot agreement), part of the stall
    overlapped_bytes: int = 0  # bytes copied in the background after save_async returned (overlapped staging)
    hook_wait_s: float = 0.0  # how long the optimizer's next step() (or another call) waited for that copy
    bytes_staged: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic, repr=False)
    query_id: int | None = field(default=None, repr=False)  # the heartbeat QUERY awaiting its reply, if any
    query_sent: float = field(default=0.0, repr=False)
    dest: Path | None = None  # save_model: the model directory it commits to (else checkpoint-<step>)

    def done(self) -> bool:
        """True once the save has committed or failed; never blocks (a heartbeat query to the daemon is sent
        without waiting, and its reply is taken by a later call)."""
        if self.path is None and self.error is None:
            with self.client._call():
                self.client._progress(0.0)
        return self.path is not None or self.error is not None

    def wait(self, timeout: float | None = None) -> Path:
        """Block until committed; returns the checkpoint path. Raises CheckpointError if it aborted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.client._call():
            self.client._finish_overlap()
            while self.path is None and self.error is None:
                if self.client._inflight.get(self.txn) is not self:
                    # Neither in flight nor settled: nothing could ever settle it, so waiting would spin
                    # forever. Only a bug of ours gets here; say so rather than hang.
                    raise CheckpointError(
                        f"the save of step {self.step} (txn {self.txn}) is no longer tracked by this client and "
                        "was never settled; its outcome is unknown: check 'ckptd ls' for "
                        f"checkpoint-{self.step} and report this as a ckptd bug"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"save of step {self.step} not committed within {timeout} s (still in flight)")
                self.client._progress(0.2 if remaining is None else min(0.2, remaining))
        if self.error is not None:
            raise CheckpointError(self.error)
        assert self.path is not None
        return self.path


@dataclass(frozen=True)
class PreemptionSettings:
    """What ``install_preemption_handler`` was asked to do on a signal."""

    timeout_s: float
    previous: dict[int, Any]  # the handlers it replaced, restored (and handed the signal) on the way out


class CheckpointClient:
    """Asynchronous, transactional checkpoints for one training rank. See docs/quickstart.md.

    Besides the options of docs/quickstart.md: ``heartbeat_timeout_s`` (how long a daemon may leave a query
    unanswered before the rank gives up on its saves in flight), ``daemon_start_timeout_s`` (how long a rank
    waits for a daemon to answer at its endpoint), ``read_only`` (load only: no lease is taken, so a reader
    may open an output dir that a training job writes; ``save_async`` refuses).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        components: list[StateComponent] | Any,
        process_groups: dict[str, Any] | None = None,
        endpoint: str | None = None,
        save_total_limit: int | None = None,
        *,
        max_shard_size: int = fmt.DEFAULT_MAX_SHARD_SIZE,
        timeout_s: float = DEFAULT_TXN_TIMEOUT_S,
        staging_slabs: int = 1,
        verify_on_load: bool = True,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        daemon_start_timeout_s: float = DAEMON_START_TIMEOUT_S,
        read_only: bool = False,
        overlap_staging: bool | None = None,
        optimizers: list[Any] | None = None,
        best_metric: str | None = None,
        greater_is_better: bool = False,
        keep_every_n_steps: int | None = None,
    ) -> None:
        # Absolute but not resolved: paths handed back keep the form (and symlinks) the caller used.
        self.output_dir = Path(os.path.abspath(os.path.expanduser(output_dir)))
        self.save_total_limit = save_total_limit
        self.best_metric = best_metric
        self.greater_is_better = bool(greater_is_better)
        self.keep_every_n_steps = keep_every_n_steps
        self.max_shard_size = int(max_shard_size)
        self.timeout_s = float(timeout_s)
        self.staging_slabs = staging_slabs
        self.verify_on_load = verify_on_load
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.daemon_start_timeout_s = float(daemon_start_timeout_s)
        self.read_only = bool(read_only)
        self.overlap_staging = overlap_staging
        self._optimizers_given = optimizers
        self._overlap: overlap.Overlap | None = None
        self._closed = False
        self._inflight: dict[str, SaveHandle] = {}
        self._slabs: list[staging.Slab] = []
        self._side_streams: dict[int, Any] = {}
        self._layouts: staging.LayoutCache = {}
        self._lease: ownership.Lease | None = None
        self._lease_error: str | None = None
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._lease_finalizer: weakref.finalize | None = None
        self._link: DaemonLink | None = None
        self._depth = 0  # nesting of public calls in progress (a signal handler must not re-enter them)
        # Held by every public call: the copy thread's late hand-off (overlapped staging) takes it too.
        self._call_lock = threading.RLock()
        self._at_exit: Callable[[], None] | None = None
        self._preemption: PreemptionSettings | None = None
        self._deferred_signal: int | None = None
        self._signal: int | None = None  # the preemption signal received, if any
        self._points_seen = False  # the loop calls preemption_point(): the emergency save happens there
        self._preemption_done = threading.Event()
        self._emergency = False
        self._last_committed: int | None = None  # the step of the newest save this client saw commit
        self._failed: list[SaveHandle] = []  # handed-off saves that failed since the last client.wait()
        self.job: str | None = None
        # Multi-node: the job's CURVE keys (made by rank 0) and the leader daemon's peer address.
        self._peer_keys: dict[str, str] | None = None
        self._leader_address: str | None = None
        self._listen_generation: int | None = None  # the daemon link generation rank 0 last announced on
        # Every rank calls this first: it is a collective, and nothing before it can fail on one rank only.
        self._group = _make_sync_group()
        self.rank = self._group_rank()
        try:
            self._construct(components, process_groups, endpoint)
        except BaseException:
            self._teardown()
            raise

    def _construct(self, components: Any, process_groups: dict[str, Any] | None, endpoint: str | None) -> None:
        # 1. Everything local (arguments, the provider's own code, the endpoint, the job id and, on global
        #    rank 0, the lease), agreed by every rank before the topology collective.
        job = None
        keys: dict[str, str] | None = None

        def local() -> None:
            nonlocal components, process_groups, job, keys
            components, process_groups = _resolve_components(components, process_groups)
            if self.save_total_limit is not None and (
                not isinstance(self.save_total_limit, int) or self.save_total_limit < 1
            ):
                raise ValueError(f"save_total_limit must be a positive integer or None, got {self.save_total_limit!r}")
            if self.keep_every_n_steps is not None and (
                isinstance(self.keep_every_n_steps, bool)
                or not isinstance(self.keep_every_n_steps, int)
                or self.keep_every_n_steps < 1
            ):
                raise ValueError(
                    f"keep_every_n_steps must be a positive integer or None, got {self.keep_every_n_steps!r}"
                )
            if self.best_metric is not None and (not isinstance(self.best_metric, str) or not self.best_metric):
                raise ValueError(
                    f"best_metric must be a metadata key (a non-empty string) or None, got {self.best_metric!r}"
                )
            if self.staging_slabs < 1:
                raise ValueError("staging_slabs must be at least 1")
            if self.heartbeat_timeout_s <= 0 or self.daemon_start_timeout_s <= 0:
                raise ValueError("heartbeat_timeout_s and daemon_start_timeout_s must be positive")
            _check_group_names(process_groups)
            self.endpoint = proto.resolve_endpoint(endpoint)
            if self.rank == 0:
                job = ownership.current_job_id()
                if not self.read_only:
                    self._lease = self._take_lease(job)
                if self._group is not None:
                    keys = _job_peer_keys()

        votes = self._agree_on("CheckpointClient(...)", local, extra=lambda: (job, keys))
        self.job, keys = votes[0]
        self.components = list(components)

        # 2. The topology (one collective inside); it raises on every rank alike after its all-gather.
        self.topology = planning.discover_topology(process_groups, self._group, self.endpoint)
        if self.topology.nnodes > 1:
            # The job's own collective carried the keys: every rank has them, nothing was configured.
            self._peer_keys = keys
        self._is_local_leader = self.topology.local_rank == 0
        # A read-only client only loads, which never talks to a daemon: it neither needs one nor starts one
        # (an embedded daemon would sweep the directory it was only meant to read).
        self._link = None if self.read_only else DaemonLink(self.endpoint)
        self._link_generation = 0 if self._link is None else self._link.generation

        # 3. The plan, and the daemon: local rank 0 starts it if none answers. Agreed before the other ranks
        #    wait for it, so that a leader that failed does not leave them waiting out their start timeout.
        def plan_and_start() -> None:
            self.plans = planning.plan(self.components, self.topology)
            if self._is_local_leader and not self.read_only:
                self._ensure_daemon()

        self._agree_on("CheckpointClient(...)", plan_and_start)

        # 4. Every other rank reaches the daemon.
        def connect() -> None:
            if not self._is_local_leader and not self.read_only:
                self._ensure_daemon()

        self._agree_on("CheckpointClient(...)", connect)

        # 5. Multi-node: rank 0's daemon leads; its peer address reaches every rank through the collective, and
        #    each follower node's daemon connects to it now, so a firewall or a wrong peer host fails here.
        if self._peer_keys is not None and not self.read_only:
            votes = self._agree_on(
                "CheckpointClient(...)",
                lambda: self._announce_leader() if self.rank == 0 else None,
                extra=lambda: self._leader_address,
            )
            self._leader_address = votes[0]

            def check() -> None:
                if self._is_local_leader and self.topology.node != 0:
                    self._check_leader_reachable()

            self._agree_on("CheckpointClient(...)", check)
        if not self.read_only and self.overlap_staging is not False:
            self._overlap = overlap.Overlap.for_components(self, self.components, self._optimizers_given)
        if self._lease is not None:
            self._lease_thread = threading.Thread(target=self._refresh_lease_loop, name="ckptd-lease", daemon=True)
            self._lease_thread.start()
            # A process that exits without close() (a script's last line, SystemExit) still gives the
            # output dir back; a killed one leaves a lease that the next job takes over as provably dead.
            self._lease_finalizer = weakref.finalize(self, _release_lease, self._lease, self._lease_stop)
        if self._overlap is not None:
            # A script whose last line is save_async() exits normally: its save is still handed off (after
            # the lease finalizer is registered, so that it runs before the lease is given back).
            ref = weakref.ref(self)

            def hand_off_at_exit() -> None:
                c = ref()
                if c is not None:
                    c._overlap_before_step()

            self._at_exit = hand_off_at_exit
            atexit.register(hand_off_at_exit)

    # -- collective helpers ---------------------------------------------------------------------------

    def _group_rank(self) -> int:
        if self._group is None:
            return 0
        import torch.distributed as dist

        return dist.get_rank()

    def _all_gather(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def _agree_on(self, what: str, work: Callable[[], None], extra: Callable[[], Any] | None = None) -> list[Any]:
        """Run ``work`` on this rank, then vote: if it failed on any rank, every rank raises together.

        On a single process the original exception propagates unchanged (a ValueError stays a ValueError);
        across ranks every rank raises CheckpointError naming each rank that failed and why. Returns the
        ``extra`` values of every rank (index = rank)."""
        error: str | None = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - carried into the collective below, re-raised after it
            if self._group is None:
                raise
            error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            logger.error("%s failed on rank %d: %s", what, self.rank, error)
        votes = self._all_gather((error, extra() if extra is not None and error is None else None))
        failed = [f"rank {r}: {err}" for r, (err, _) in enumerate(votes) if err]
        if failed:
            raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {'; '.join(failed)}")
        return [x for _, x in votes]

    # -- ownership ------------------------------------------------------------------------------------

    def _take_lease(self, job: str) -> ownership.Lease:
        try:
            return ownership.Lease.acquire(self.output_dir, job)
        except (ownership.LeaseHeld, ownership.LockTimeout) as e:
            raise CheckpointError(str(e)) from None
        except OSError as e:
            raise CheckpointError(
                f"cannot take the lease of {self.output_dir} ({e.strerror or e}); the output dir must be "
                "writable, or pass read_only=True to only load from it"
            ) from None

    def _refresh_lease_loop(self) -> None:
        """Keep the lease fresh, so a job on another host sees this one as alive (daemon thread)."""
        while not self._lease_stop.wait(ownership.LEASE_REFRESH_S):
            self._refresh_lease()

    def _refresh_lease(self) -> None:
        lease = self._lease
        if lease is None or self._lease_error is not None:
            return
        try:
            lease.refresh()
        except ownership.LeaseLost as e:
            self._lease_error = str(e)
            logger.error("%s", e)
        except OSError as e:  # a transient NFS error (or a stuck lock holder) must not stop the job; retried
            logger.warning("could not refresh the lease of %s: %s", self.output_dir, e)

    # -- daemon ---------------------------------------------------------------------------------------

    def _ensure_daemon(self) -> None:
        assert self._link is not None
        try:
            self._link.ensure_daemon(
                may_start=self._is_local_leader, output_dir=self.output_dir, timeout_s=self.daemon_start_timeout_s
            )
        except DaemonUnavailable as e:
            raise CheckpointError(str(e)) from None
        self._link_generation = self._link.generation

    def _announce_leader(self) -> None:
        """Rank 0: ask this node's daemon to lead the job's saves (idempotent); keeps its peer address."""
        assert self._link is not None and self._peer_keys is not None and self.job is not None
        keys = self._peer_keys
        try:
            reply = self._link.request(
                MsgType.PEER_LISTEN,
                self.heartbeat_timeout_s,
                job=self.job,
                server_public=keys["server_public"],
                server_secret=keys["server_secret"],
                client_public=keys["client_public"],
            )
        except DaemonUnavailable as e:
            raise CheckpointError(f"the leader daemon did not open its peer socket: {e}") from None
        address = reply.body.get("address")
        self._leader_address = proto.parse_peer_address(address, "address")
        self._listen_generation = self._link.generation

    def _check_leader_reachable(self) -> None:
        """A follower node's local rank 0: its daemon must reach the leader daemon (CURVE over TCP)."""
        assert self._link is not None and self._peer_keys is not None and self._leader_address is not None
        try:
            self._link.request(
                MsgType.PEER_CHECK,
                self.heartbeat_timeout_s + 15.0,
                leader=self._leader_address,
                **self._public_peer_keys(),
            )
        except DaemonUnavailable as e:
            raise CheckpointError(f"could not check the leader daemon: {e}") from None

    def _public_peer_keys(self) -> dict[str, str]:
        assert self._peer_keys is not None
        return {k: self._peer_keys[k] for k in ("server_public", "client_public", "client_secret")}

    def _daemon_healthy(self) -> bool:
        assert self._link is not None
        self._link.pump(0)  # take in a dropped connection that nothing has noticed yet
        return self._link.embedded_alive() is not False and self._link.generation == self._link_generation

    # -- events ---------------------------------------------------------------------------------------

    def _progress(self, timeout_s: float) -> None:
        """Receive daemon notifications for up to ``timeout_s`` and settle handles; detect a dead daemon."""
        if not self._inflight or self._link is None:
            return
        self._finish_overlap(block=False)
        self._link.pump(timeout_s)
        for ev in self._link.take_events():
            self._apply_event(ev)
        if not self._inflight:
            return
        if self._link.embedded_alive() is False:
            code = self._link.process.returncode if self._link.process else None
            self._abandon_all(f"the ckptd process exited (code {code}) before committing")
        elif self._link.generation != self._link_generation:
            self._abandon_all(f"the connection to ckptd at {self.endpoint} was lost (daemon killed or restarted)")
        else:
            self._heartbeat()

    def _heartbeat(self) -> None:
        """Ask the daemon about each save in flight now and then, never waiting for the answer here: a QUERY
        is sent, its reply taken by a later call (``pump`` receives it), and the daemon is given up on only
        once a query has gone unanswered for ``heartbeat_timeout_s``. So ``done()`` never blocks, even on a
        frozen daemon."""
        assert self._link is not None
        now = time.monotonic()
        interval = min(HEARTBEAT_S, self.heartbeat_timeout_s / 3)
        pending = self._overlap.pending.handle if self._overlap is not None and self._overlap.pending else None
        for h in list(self._inflight.values()):
            if h.txn not in self._inflight or h is pending:
                continue  # (a save still being copied is not the daemon's yet: nothing to ask about)
            if h.query_id is not None:
                reply = self._link.take_reply(h.query_id)
                if reply is None:
                    if now - h.query_sent > self.heartbeat_timeout_s:
                        self._abandon_all(
                            f"ckptd stopped answering (ckptd at {self.endpoint} did not answer a query request "
                            f"within {self.heartbeat_timeout_s:.0f} s)"
                        )
                        return
                    continue
                h.query_id = None
                self._apply_query_reply(h, reply)
                continue
            if now - h.last_beat < interval:
                continue
            h.last_beat = now
            sent = self._link.send(MsgType.QUERY, txn=h.txn)
            # One that could not even be queued counts as unanswered (-1 never gets a reply).
            h.query_id, h.query_sent = (-1 if sent is None else sent), now

    def _apply_query_reply(self, h: SaveHandle, reply: Any) -> None:
        if reply.type == MsgType.ERROR:
            self._abandon([h.txn], f"ckptd rejected the query request: {reply.body.get('message')}")
            return
        state = reply.body.get("state")
        if state == TxnState.COMMITTED.value and reply.body.get("path"):
            self._settle(h.txn, path=Path(reply.body["path"]))
        elif state == TxnState.ABORTED.value:
            # ABORTED (not ABORTING) is reported once the daemon has cleaned up: it reads nothing more.
            self._settle(h.txn, error=str(reply.body.get("reason") or "aborted by ckptd"))
        elif state == TxnState.UNKNOWN.value:
            self._abandon([h.txn], "ckptd does not know this save (it was restarted)")

    def _apply_event(self, ev: Any) -> None:
        txn = ev.body.get("txn")
        if ev.type == MsgType.RELEASED:
            self._release_slab(txn)
        elif ev.type == MsgType.COMMITTED:
            self._settle(txn, path=Path(ev.body["path"]))
        elif ev.type == MsgType.ABORTED:
            self._settle(txn, error=str(ev.body.get("reason")))

    def _forget_query(self, h: SaveHandle) -> None:
        if self._link is not None and h.query_id is not None and h.query_id >= 0:
            self._link.forget(h.query_id)
        h.query_id = None

    def _committed(self, h: SaveHandle, path: Path) -> None:
        if h.dest is not None:
            h.path = h.dest  # a follower node's daemon knows only its own node's side of it
            return
        h.path = path
        if self._last_committed is None or h.step >= self._last_committed:
            self._last_committed = h.step

    def _failed_with(self, h: SaveHandle, error: str) -> None:
        h.error = error
        self._failed.append(h)
        del self._failed[:-MAX_FAILURES_KEPT]
        logger.error("%s", error)

    def _settle(self, txn: str, path: Path | None = None, error: str | None = None) -> None:
        """The daemon's word on a save (committed or aborted): it is done with the slab, which is reused."""
        self._release_slab(txn)
        h = self._inflight.pop(txn, None)
        if h is None:
            return
        self._forget_query(h)
        if path is not None:
            self._committed(h, path)
            logger.info(
                "step %d committed: %s (%.3f s after the hand-off began)",
                h.step,
                h.path,
                time.monotonic() - h.started_at,
            )
        else:
            self._failed_with(
                h,
                f"checkpoint for step {h.step} was not committed: {error}; earlier checkpoints are untouched "
                "and training can continue (the next save retries)",
            )

    def _abandon_all(self, reason: str) -> None:
        self._abandon(list(self._inflight), reason)

    def _abandon(self, txns: list[str], reason: str) -> None:
        """Give up on saves without the daemon's word: their slabs go to the daemon for good (a new one is
        made for the next save), and each commit is vetoed on disk, so the daemon can never commit one later.
        A veto that finds the save already committed reports it committed.

        Every handle given up on is settled whatever happens: a veto that fails in any way (an OSError, a
        hostile file, a bug) is reported in that handle's error, and even an interruption (Ctrl-C) settles
        every handle before it propagates, so no handle is ever left neither in flight nor settled."""
        ov = self._overlap
        if ov is not None and ov.pending is not None and ov.pending.handle.txn in txns:
            ov.pending.copying.join()  # its slab is destroyed below: the copy thread must be done with it
            ov.pending.copying.handed.set()
            ov.pending = None
        for txn in txns:
            for slab in [s for s in self._slabs if s.busy_txn == txn]:
                self._slabs.remove(slab)
                staging.forget_views(self._layouts, slab)
                slab.destroy()
                logger.warning(
                    "abandoned staging slab %s to ckptd, which may still read it; the next save makes a new one",
                    slab.name,
                )
        handles = [h for h in (self._inflight.pop(txn, None) for txn in txns) if h is not None]
        try:
            for h in handles:
                self._forget_query(h)
                self._veto(h, reason)
        finally:
            for h in handles:
                if h.path is None and h.error is None:  # the veto loop was interrupted before this one
                    self._failed_with(
                        h,
                        f"checkpoint for step {h.step} was abandoned ({reason}), and making it impossible to "
                        f"commit was interrupted; it may still appear as checkpoint-{h.step} if ckptd resumes",
                    )
            # A courtesy to a daemon that still runs; the veto already decided. Sent without waiting.
            for h in handles:
                self._courtesy_abort(h.txn, reason)

    def _veto(self, h: SaveHandle, reason: str) -> None:
        """Make ``h``'s save impossible to commit (or learn that it committed) and settle ``h`` by it."""
        try:
            vetoed = ownership.veto_commit(self.output_dir, h.step, h.txn, h.deadline, final=h.dest)
        except Exception as e:  # noqa: BLE001 - whatever the veto raises, the handle must be settled
            what = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, OSError):
                logger.exception("vetoing the commit of step %d (txn %s) failed", h.step, h.txn)
            self._failed_with(
                h,
                f"checkpoint for step {h.step} was abandoned ({reason}), and making it impossible to commit "
                f"failed ({what}); it may still appear as checkpoint-{h.step} if ckptd resumes",
            )
            return
        if not vetoed:
            self._committed(h, fmt.checkpoints_root(self.output_dir) / fmt.checkpoint_dirname(h.step))
            logger.warning("step %d committed before this rank gave up on it (%s): %s", h.step, reason, h.path)
            return
        self._failed_with(
            h,
            f"checkpoint for step {h.step} was abandoned and can never commit: {reason}; this rank vetoed "
            "its commit on disk, so ckptd cannot commit it even if it resumes; earlier checkpoints are "
            "untouched and training can continue (the next save uses a new staging slab)",
        )

    def _courtesy_abort(self, txn: str, reason: str) -> None:
        """Tell the daemon this rank gave up on ``txn`` (so it aborts the other ranks' parts at once), without
        waiting for the reply: a frozen daemon must not stall the caller, and the veto or the refusal already
        decided the outcome."""
        if self._link is None:
            return
        try:
            self._link.forget(self._link.send(MsgType.ABORT, txn=txn, reason=f"rank {self.rank}: {reason}"))
        except CheckpointError as e:
            logger.debug("could not send the abort of txn %s to ckptd: %s", txn, e)

    def _release_slab(self, txn: str | None) -> None:
        for slab in self._slabs:
            if slab.busy_txn == txn:
                slab.busy_txn = None

    # -- save -----------------------------------------------------------------------------------------

    def _acquire_slab(self, need: int) -> staging.Slab:
        """A free slab of at least ``need`` bytes; waits for the daemon to release one (back-pressure)."""
        t0 = time.perf_counter()
        while True:
            free = [s for s in self._slabs if s.busy_txn is None]
            if free or len(self._slabs) < self.staging_slabs:
                break
            self._progress(0.05)
        waited = time.perf_counter() - t0
        if waited > 0.001:
            logger.info("save_async waited %.3f s for the daemon to release the staging slab (back-pressure)", waited)
        slab = next((s for s in free if s.size >= need), None) if free else None
        if slab is None:
            if free:
                victim = min(free, key=lambda s: s.size)
                self._slabs.remove(victim)
                staging.forget_views(self._layouts, victim)
                victim.destroy()
                logger.info("state grew to %s; reallocating the staging slab", staging.describe_size(need))
            slab = staging.Slab.create(int(need * staging.GROWTH) if free else need, self.rank)
            self._slabs.append(slab)
        return slab

    def save_async(self, step: int, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot this rank's share into its staging slab, hand it to the daemon, and return.

        Collective: every rank must call it with the same step. Returns once the bytes are staged; the
        returned handle's ``wait()`` gives the committed path. Anything that fails on one rank (a bad
        argument, an unreachable daemon, a ``state_dict()`` that raises) makes every rank raise the same
        CheckpointError together; on a single process a bad argument raises ValueError.

        Args:
            step: the training step, a non-negative int (the same on every rank).
            metadata: a JSON-able dict kept in the manifest (for example the eval loss).

        Example:
            >>> handle = client.save_async(100, metadata={"loss": 1.25})
            >>> handle.wait()
            PosixPath('out/checkpoints/checkpoint-100')
        """
        with self._call():
            return self._save_async(step, metadata)

    def save_model(
        self, dest: str | os.PathLike, *, step: int | None = None, metadata: dict[str, Any] | None = None
    ) -> SaveHandle:
        """Save the ``model`` component alone as a Hugging Face directory at ``dest``, asynchronously.

        Staged like ``save_async`` (same stall, one collective), then written by the daemon into a temp dir
        under ``output_dir/checkpoints`` and committed by one rename to ``dest``: shards,
        ``model.safetensors.index.json``, ``config.json`` when the model has a Hugging Face ``config``, and a
        ``checkpoint_manifest.json`` (``ckptd verify DEST`` checks it). ``dest`` appears whole or not at all;
        an earlier ``save_model`` directory there is replaced atomically, anything else is refused. It is no
        checkpoint: ``load("latest")``, the best mark and retention never see it.

        Args:
            dest: the model directory; on the file system of ``output_dir``, outside its ``checkpoints/``.
                A relative path is resolved by rank 0.
            step: recorded in its manifest (default: the newest step this client committed, else 0).
            metadata: a JSON-able dict kept in its manifest.

        Returns:
            A SaveHandle; ``wait()`` gives ``dest``. Collective: call it on every rank with the same ``dest``.

        Example:
            >>> client.save_model("out/final-model").wait()
            PosixPath('/abs/out/final-model')
            >>> huggingface_hub.load_torch_model(model, "out/final-model")  # doctest: +SKIP
        """
        with self._call():
            if step is None:
                step = self._last_committed or 0
            return self._save_async(step, metadata, export=dest)

    def _model_save_plan(self, export: Any) -> tuple[list[planning.ComponentPlan], Path]:
        """The plan and directory of a ``save_model``; raises CheckpointError (or ValueError) saying why not.
        Only rank 0 looks at the file system (its answer is everyone's, by the save's vote)."""
        try:
            dest = Path(os.path.abspath(os.path.expanduser(os.fspath(export))))
        except TypeError:
            raise ValueError(f"save_model: dest must be a path, got {export!r}") from None
        model = [p for p in self.plans if p.key == fmt.MODEL_KEY]
        if not model:
            raise CheckpointError(
                f"save_model saves the component with key {fmt.MODEL_KEY!r}, and this client has none (its "
                f"components: {', '.join(p.key for p in self.plans)}); declare the model as "
                f"StateComponent({fmt.MODEL_KEY!r}, model, SharingPattern.GLOBAL, REPLICATED or SHARDED)"
            )
        if model[0].pattern not in (SharingPattern.GLOBAL, SharingPattern.REPLICATED, SharingPattern.SHARDED):
            raise CheckpointError(
                f"save_model: the {fmt.MODEL_KEY!r} component is {model[0].pattern.value.upper()}, and only a "
                "GLOBAL, REPLICATED or SHARDED model is one whole model that a Hugging Face directory can hold"
            )
        if self.rank == 0:
            problem = _model_dest_problem(dest, self.output_dir)
            if problem is not None:
                raise CheckpointError(f"save_model to {dest}: {problem}")
        return model, dest

    def _check_save_allowed(self, step: Any, metadata: dict[str, Any] | None) -> str | None:
        """Why this rank cannot save now (None if it can); a bad argument raises ValueError."""
        if self._closed:
            return "this CheckpointClient is closed; create a new one"
        if self.read_only:
            return "this CheckpointClient was opened with read_only=True; it only loads"
        if self._signal is not None and not self._emergency:
            return "a preemption signal was received; no new saves are started (the job is about to exit)"
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if metadata is not None:
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata must be a JSON-able dict ({e})") from None
        return None

    def _save_async(self, step: int, metadata: dict[str, Any] | None, export: Any = None) -> SaveHandle:
        """``save_async``; with ``export`` (a path), ``save_model``'s save of the model alone to there."""
        self._finish_overlap()  # the previous save's hand-off, if its copy was still running
        t0 = time.perf_counter()
        plans, dest = self.plans, None
        try:
            error = self._check_save_allowed(step, metadata)
            if error is None and export is not None:
                plans, dest = self._model_save_plan(export)
        except ValueError as e:
            if self._group is None:
                raise
            error = f"{type(e).__name__}: {e}"
        except CheckpointError as e:
            error = str(e)
        slab: staging.Slab | None = None
        images: list[staging.FileImage] = []
        shared: dict[str, staging.SharedLayout] = {}  # this rank's word on every SHARDED file
        digests: dict[str, str | None] = {}
        full_states: dict[str, Any] = {}
        stats = staging.CopyStats()
        copying: overlap.BackgroundCopy | None = None  # the deferred copies, running on the copy thread
        # The snapshot allocates many small objects; a cyclic GC pass in the middle of it is pure stall.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if error is None:
                self._before_snapshot()
                for p in plans:
                    level = p.component.effective_validation
                    if not p.writes and level == ValidationLevel.NONE:
                        continue
                    try:
                        state = p.component.stateful.state_dict()
                    except Exception as e:
                        raise CheckpointError(
                            f"component {p.key!r}: state_dict() raised {type(e).__name__}: {e}"
                        ) from e
                    sharded = p.pattern == SharingPattern.SHARDED
                    if level != ValidationLevel.NONE:
                        digests[p.key] = staging.replication_digest(state, p.key, level, sharded)
                    if level == ValidationLevel.FULL:
                        full_states[p.key] = state
                    if dest is not None and not staging.is_flat_tensor_dict(state):
                        raise CheckpointError(
                            f"save_model: the {fmt.MODEL_KEY!r} component's state_dict() is not a flat "
                            "{name: tensor} dict, so it cannot be written as a Hugging Face directory"
                        )
                    if sharded:
                        mine, layouts = staging.sharded_images(p, state, self.max_shard_size, self._layouts, self.rank)
                        images += mine
                        shared.update(layouts)
                    elif p.writes:
                        images += staging.component_images(p, state, self.max_shard_size, self._layouts)
                need = staging.layout(images)
                slab = self._acquire_slab(need)
                # A model save copies synchronously: it is rare, and its slab must not wait on optimizer steps.
                defer = self._overlap.deferrable() if self._overlap is not None and dest is None else None
                stats, later = staging.copy_into(slab, images, self._side_streams, defer)
                if later:
                    assert self._overlap is not None
                    copying = self._overlap.start_copy(
                        later, stats.deferred_names, self._side_streams, slab.pinned, None, self._late_hand_off
                    )
        except (fmt.FormatError, CheckpointError, OSError) as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective, or the others hang
            logger.exception("staging failed on rank %d", self.rank)
            error = f"{type(e).__name__}: {e}"
        finally:
            if gc_was_enabled:
                gc.enable()
        t_staged = time.perf_counter()
        # The one collective of the save path: every rank learns that every rank staged, agrees on the
        # step, the transaction id and its deadline, and compares replication digests.
        leader = self._leader_address if self.rank == 0 else None
        vote = (
            error,
            step,
            secrets.token_hex(8),
            digests,
            time.time() + self.timeout_s,
            leader,
            _vote_shared(shared),
            None if dest is None else str(dest),
        )
        votes = self._all_gather(vote)
        collective_s = time.perf_counter() - t_staged
        problem = _agree(votes, plans)
        if problem is None:
            owners = _contested_owners(votes)
            problem = _agree_shared(votes, owners)
        if problem is None and any(p.component.effective_validation == ValidationLevel.FULL for p in plans):
            problem = self._compare_with_rank0(full_states)
        if problem is not None:
            if copying is not None:
                copying.stop()  # the slab is free again only once the copy thread is done with it
            what = f"save_model to {export}" if export is not None else f"save of step {step}"
            raise CheckpointError(f"{what} failed before the hand-off: {problem}; nothing was written")
        txn, deadline = votes[0][2], votes[0][4]
        export_to = None if votes[0][7] is None else Path(votes[0][7])  # rank 0's, wherever ranks' cwds are
        if self._peer_keys is not None:
            self._leader_address = votes[0][5]
        # Every rank places its pieces after rank 0's header; the commit names who wrote each SHARDED component.
        left_out = staging.finalize_regions(
            images, {path: v[3] for path, v in votes[0][6].items()}, _dropped_pieces(owners, self.rank)
        )
        stats.bytes -= left_out
        sharded_writers = _sharded_writers(votes, owners)
        assert slab is not None and self._link is not None
        slab.busy_txn = txn
        handle = SaveHandle(step=step, txn=txn, client=self, deadline=deadline, dest=export_to)
        self._inflight[txn] = handle
        req = self._stage_request(step, txn, deadline, slab, images, metadata, sharded_writers, plans, export_to)
        handle.staged_s = t_staged - t0
        handle.collective_s = collective_s
        req.stall_s = handle.staged_s + collective_s
        handle.bytes_staged = stats.bytes
        if copying is not None:
            # Overlapped staging: the hand-off waits for the copy thread, at the optimizer's next step() (its
            # pre-step hook) or at the next call of this client, whichever comes first.
            assert self._overlap is not None
            handle.overlapped_bytes = copying.nbytes
            self._overlap.pending = overlap.PendingHandOff(handle, req, copying)
            # Without a step or a client call for long (an evaluation), the copy thread hands it off itself.
            copying.hand_off_at = deadline - min(overlap.LATE_MARGIN_S, self.timeout_s / 4)
            return handle
        self._hand_off(handle, req)
        if handle.error is not None:
            # Raised here, so not reported again by the next client.wait().
            with contextlib.suppress(ValueError):
                self._failed.remove(handle)
            raise CheckpointError(handle.error)
        logger.debug(
            "step %d staged %s in %.4f s (+%.4f s hand-off)",
            step,
            staging.describe_size(stats.bytes),
            t_staged - t0,
            time.perf_counter() - t_staged,
        )
        return handle

    def _hand_off(self, handle: SaveHandle, req: proto.StageRequest) -> None:
        """Send this rank's part to the daemon; a failure settles ``handle`` (never raises)."""
        assert self._link is not None
        txn = handle.txn
        try:
            self._link.request(MsgType.STAGE, self.heartbeat_timeout_s, stage=req)
        except DaemonUnavailable as e:
            # The daemon may still take the part later: the slab is abandoned and the commit vetoed.
            self._abandon([txn], f"the hand-off got no answer ({e})")
        except CheckpointError as e:
            # Refused: the daemon reads nothing of this part; the other ranks' parts are aborted.
            self._settle(txn, error=str(e))
            self._courtesy_abort(txn, str(e))

    def _finish_overlap(self, block: bool = True) -> None:
        """Complete an overlapped save's staging (wait for the copy thread) and hand it off. Called by the
        optimizer's pre-step hook and at the start of every client call; never raises (a failure settles the
        handle, reported by ``handle.wait()`` / ``client.wait()``). With ``block=False``, only if the copy is
        already done."""
        ov = self._overlap
        if ov is None or ov.pending is None:
            return
        pending = ov.pending
        if not block and not pending.copying.done():
            return
        t0 = time.perf_counter()
        # An interruption (Ctrl-C) while waiting leaves the save pending: close() still waits for the copy
        # thread, and the next call hands it off.
        error = pending.copying.join()
        ov.pending = None
        pending.copying.handed.set()
        pending.handle.hook_wait_s += time.perf_counter() - t0
        if pending.handle.txn not in self._inflight:
            return  # settled meanwhile (the client was torn down)
        if error is not None:
            error = f"rank {self.rank}: the background copy of the staged state failed: {error}"
        written = pending.copying.written_meanwhile() if error is None else []
        if written:
            shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
            ov.off_because = f"{shown} written in place before the save of step {pending.handle.step} was handed off"
            error = (
                f"rank {self.rank}: {shown} changed in place after save_async() and before the optimizer's next "
                "step() (overlapped staging copies such tensors after save_async returns, so this copy may hold "
                "the new values); "
                "this save is dropped and overlapped staging is now off for this client; let only "
                "optimizer.step() change parameters and optimizer state, or pass overlap_staging=False"
            )
            logger.error("save of step %d: %s", pending.handle.step, error)
        if error is not None:
            self._settle(pending.handle.txn, error=error)
            self._courtesy_abort(pending.handle.txn, error)
            return
        self._hand_off(pending.handle, pending.request)

    def _overlap_before_step(self) -> None:
        """The optimizers' pre-step hook: the save being copied is handed off before step() can change a byte
        of it. A public call, so that a preemption signal meanwhile is acted on after the hand-off."""
        if self._closed:
            return
        with self._call():
            self._finish_overlap(block=True)

    def _late_hand_off(self) -> None:
        """On the copy thread, near the save's deadline: hand the part off unless the trainer's thread is in a
        client call (it holds the call lock, and its call hands it off)."""
        if not self._call_lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                logger.info("handing off an overlapped save from the copy thread: no step() or client call since")
                self._finish_overlap(block=True)
        finally:
            self._call_lock.release()

    def _before_snapshot(self) -> None:
        """This rank's checks before it stages: the lease (rank 0) and a daemon that answers."""
        assert self._link is not None
        if self._lease is not None:
            if time.time() - self._lease.record.refreshed > LEASE_REFRESH_ON_SAVE_S:
                self._refresh_lease()
            if self._lease_error is not None:
                raise CheckpointError(self._lease_error)
        if not self._daemon_healthy():
            self._link.reset()
            self._ensure_daemon()
        if self._peer_keys is not None and self.rank == 0:
            # Every save: a daemon restarted since (or one that closed an idle peer socket) opens it anew,
            # and the address rides on the save's one collective to every rank.
            self._announce_leader()

    def _compare_with_rank0(self, states: dict[str, Any]) -> str | None:
        """FULL validation: every tensor compared byte for byte against rank 0's, after the digests agreed
        (so every rank holds the same keys, shapes and dtypes and the broadcasts line up). A rank that fails
        to prepare a tensor still takes part in its broadcast, so no rank is left waiting."""
        if self._group is None:
            return None
        import torch.distributed as dist

        differ: list[str] = []
        for key in sorted(states):
            for leaf in fmt.flatten_state(states[key], key, sharded=True)[1]:
                if sharding.is_dtensor(leaf.tensor):
                    continue  # a SHARDED component's DTensors differ between ranks by design
                nbytes = leaf.tensor.numel() * leaf.tensor.element_size()
                try:
                    mine = leaf.tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                except Exception as e:  # noqa: BLE001 - reported in the verdict below
                    differ.append(f"{leaf.path} (cannot be read: {type(e).__name__}: {e})")
                    mine = torch.zeros(nbytes, dtype=torch.uint8)
                theirs = mine.clone() if self.rank == 0 else torch.empty_like(mine)
                dist.broadcast(theirs, src=0, group=self._group)
                if self.rank != 0 and not torch.equal(mine, theirs):
                    differ.append(leaf.path)
        verdicts = self._all_gather(differ[:5])
        bad = [f"rank {r}: {', '.join(v)}" for r, v in enumerate(verdicts) if v]
        if bad:
            return f"REPLICATED state differs from rank 0 element-wise (validation level full): {'; '.join(bad)}"
        return None

    def _stage_request(
        self,
        step: int,
        txn: str,
        deadline: float,
        slab: staging.Slab,
        images: list[staging.FileImage],
        metadata: dict[str, Any] | None,
        sharded_writers: dict[str, list[int]],
        plans: list[planning.ComponentPlan],
        export_to: Path | None,
    ) -> proto.StageRequest:
        topo = self.topology
        node_ranks = topo.node_ranks(topo.node)
        commit = None
        peer = None
        if self._peer_keys is not None:
            assert self._leader_address is not None
            peer = proto.PeerInfo(
                node=topo.node, nnodes=topo.nnodes, leader=self._leader_address, **self._public_peer_keys()
            )
        # The commit information goes to the daemon that decides: rank 0's (the leader on multi-node).
        if self.rank == 0:
            specs = [planning.component_spec(p, topo, sharded_writers.get(p.key)) for p in plans]
            for spec, p in zip(specs, plans, strict=True):
                # The model's Hugging Face config rides in the manifest: save_model (and export) write config.json.
                config = hf_config(p.component.stateful) if p.key == fmt.MODEL_KEY else None
                if config is not None:
                    spec.metadata[fmt.HF_CONFIG_METADATA_KEY] = config
            meta = dict(metadata or {})
            if export_to is not None:
                meta[fmt.EXPORT_METADATA_KEY] = {"output_dir": str(self.output_dir), "step": step}
            is_checkpoint = export_to is None
            commit = proto.CommitInfo(
                components=specs,
                topology=topo.describe(),
                metadata=meta,
                pytorch_version=torch.__version__,
                save_total_limit=self.save_total_limit if is_checkpoint else None,
                keep_every_n_steps=self.keep_every_n_steps if is_checkpoint else None,
                best_metric=self.best_metric if is_checkpoint else None,
                greater_is_better=self.greater_is_better,
            )
        return proto.StageRequest(
            txn=txn,
            output_dir=str(self.output_dir),
            step=step,
            rank=self.rank,
            world_size=topo.world_size,
            expected_ranks=node_ranks,
            timeout_s=self.timeout_s,
            pid=os.getpid(),
            segment=slab.name,
            segment_fd=slab.fd,
            segment_ino=slab.ino,
            segment_size=slab.size,
            files=[img.spec() for img in images],
            commit=commit,
            job=self.job,
            deadline=deadline,
            peer=peer,
            export_to=None if export_to is None else str(export_to),
        )

    def wait(self, timeout: float | None = None) -> list[Path]:
        """Block until every save in flight has committed; returns their paths. Raises CheckpointError if any
        of them failed, or if any save handed off since the previous ``client.wait()`` failed meanwhile (also
        one already settled in the background, or whose own ``handle.wait()`` raised): a loop that keeps no
        handles still learns that a checkpoint is missing.

        Args:
            timeout: seconds to wait for each save (None: as long as it takes).

        Example:
            >>> client.wait()
            [PosixPath('out/checkpoints/checkpoint-100')]
        """
        paths, errors = self._wait_in_flight(timeout)
        failed, self._failed = self._failed, []
        errors = [h.error for h in failed if h.error is not None and h.error not in errors] + errors
        if errors:
            raise CheckpointError("; ".join(errors))
        return paths

    def _wait_in_flight(self, timeout: float | None = None) -> tuple[list[Path], list[str]]:
        """Wait for the saves in flight now: their paths, and the errors of those that failed."""
        paths, errors = [], []
        for h in list(self._inflight.values()):
            try:
                paths.append(h.wait(timeout))
            except CheckpointError as e:
                errors.append(str(e))
        return paths, errors

    # -- load -----------------------------------------------------------------------------------------

    def set_best_checkpoint(self, path_or_step: int | str | os.PathLike) -> Path:
        """Mark a committed checkpoint of this output dir as the best (for ``load("best")`` and
        ``find_best_checkpoint``); retention keeps it beside the newest ``save_total_limit``. The daemon
        replaces the mark atomically, between commits. Collective: call it on every rank; rank 0 marks, and
        every rank returns once the mark is on disk. With ``best_metric`` set, the next commit ranks every
        checkpoint by its metadata again and may move the mark.

        Args:
            path_or_step: the checkpoint's step, or its directory.

        Example:
            >>> client.set_best_checkpoint(40)
            PosixPath('out/checkpoints/checkpoint-40')
        """
        with self._call():
            self._check_open()
            if self.read_only:
                raise CheckpointError(
                    "this CheckpointClient was opened with read_only=True; it only loads (marking a best "
                    "checkpoint writes to the output dir): open one without read_only to mark it"
                )
            if isinstance(path_or_step, int) and not isinstance(path_or_step, bool):
                step = path_or_step
            else:
                step = fmt.parse_checkpoint_dirname(Path(path_or_step).name)
                if step is None or Path(os.path.abspath(path_or_step)).parent != fmt.checkpoints_root(self.output_dir):
                    raise CheckpointError(
                        f"{path_or_step}: not a checkpoint-<step> directory of {self.output_dir}; pass a step or "
                        "one of the paths list_checkpoints() gives"
                    )
            path = fmt.checkpoints_root(self.output_dir) / fmt.checkpoint_dirname(step)

            def mark() -> None:
                if self.rank != 0:
                    return
                assert self._link is not None
                # Queued behind the commits in the daemon's commit thread: as long as a save may take.
                ev = self._link.request(MsgType.SET_BEST, self.timeout_s, output_dir=str(self.output_dir), step=step)
                if ev.type != MsgType.BEST_SET:
                    raise CheckpointError(f"ckptd did not mark {path} best: {ev.body.get('message', ev.body)}")

            # Collective: every rank returns (or raises) together, after the mark is on disk.
            self._agree_on(f"set_best_checkpoint({step})", mark)
            return path

    def load(
        self,
        checkpoint: str | os.PathLike | None | bool = "latest",
        *,
        strict: bool = True,
        verify: bool | None = None,
        fallback: bool = True,
        skip: Iterable[str] = (),
    ) -> Path | None:
        """Restore every component from a committed checkpoint; returns its path, or None for a fresh start.

        ``checkpoint`` is "latest", "best" (see ``set_best_checkpoint``), a checkpoint path, or None/False.
        With "latest", a checkpoint that fails
        verification is skipped with a warning and the next newest is tried (``fallback``). Sizes are always
        checked; checksums too unless ``verify=False`` (an extra pass over the bytes at ~17 GiB/s).
        Collective: a failure on any rank (including a save in flight that failed) makes every rank raise.

        Args:
            checkpoint: "latest", "best", a checkpoint directory, or None/False for a fresh start.
            strict: a missing required component is an error (else a warning).
            verify: check checksums (default: the client's ``verify_on_load``).
            fallback: with "latest", try older checkpoints past one that fails verification.
            skip: keys of components to leave out on purpose (not read, not verified, not restored), e.g.
                ``skip=["dataset"]`` to restart the data order.

        Example:
            >>> client.load("latest")
            PosixPath('out/checkpoints/checkpoint-100')
        """
        with self._call():
            skip_error = None
            try:
                skipped = frozenset([skip] if isinstance(skip, str) else skip)
                unknown = sorted(skipped - {p.key for p in self.plans})
                if unknown:
                    raise ValueError(
                        f"skip={unknown}: no such component; expected keys among {[p.key for p in self.plans]}"
                    )
            except (TypeError, ValueError) as e:
                if self._group is None:
                    raise ValueError(str(e)) from None
                # Carried into the load's first collective, so that every rank raises it, none waits.
                skipped, skip_error = frozenset(), f"{type(e).__name__}: {e}"
            return self._load(
                checkpoint, strict=strict, verify=verify, fallback=fallback, skip=skipped, skip_error=skip_error
            )

    def _load(
        self,
        checkpoint: str | os.PathLike | None | bool,
        *,
        strict: bool,
        verify: bool | None,
        fallback: bool,
        skip: frozenset[str] = frozenset(),
        skip_error: str | None = None,
    ) -> Path | None:
        if checkpoint is None or checkpoint is False:
            self._check_open()
            return None
        if checkpoint is True:
            checkpoint = "latest"
        verify = self.verify_on_load if verify is None else verify
        local_error = None
        cands: list[Path] = []
        may_fall_back = False
        try:
            self._check_open()
            if skip_error is not None:
                raise CheckpointError(skip_error)
            failed = self._wait_in_flight()[1] if self._inflight else []
            if failed:
                raise CheckpointError("; ".join(failed))
            cands, may_fall_back = loader.candidates(self.output_dir, checkpoint)
        except CheckpointError as e:
            local_error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to every rank so none is left waiting
            local_error = f"{type(e).__name__}: {e}"
        votes = self._all_gather((local_error, [str(c) for c in cands], sorted(skip)))
        for r, (err, _, _) in enumerate(votes):
            if err:
                raise CheckpointError(f"rank {r}: {err}")
        differ = [r for r, v in enumerate(votes) if v[2] != votes[0][2]]
        if differ:
            # A component read by some ranks only would leave the others outside its collectives.
            raise CheckpointError(
                f"ranks {differ} passed skip={votes[differ[0]][2]}, rank 0 skip={votes[0][2]}; load() is collective: "
                "pass the same skip= on every rank"
            )
        if any(v[1] != votes[0][1] for v in votes):
            raise CheckpointError(
                f"ranks see different checkpoints under {self.output_dir}; output_dir must be shared by every rank"
            )
        if not cands:
            logger.info("no committed checkpoint under %s; starting fresh", self.output_dir)
            return None
        failures = []
        for ckpt in cands:
            t0 = time.perf_counter()
            verdict: tuple[str, str] | None = None
            result = None
            try:
                result = loader.read_share(ckpt, self.plans, self.topology, strict, verify, skip)
            except loader.VerificationFailed as e:
                verdict = ("verify", str(e))
            except CheckpointError as e:
                verdict = ("fatal", str(e))
            except Exception as e:  # noqa: BLE001 - reported to every rank so none is left waiting
                verdict = ("fatal", f"{type(e).__name__}: {e}")
            votes = self._all_gather(verdict)
            fatal = [(r, v[1]) for r, v in enumerate(votes) if v and v[0] == "fatal"]
            if fatal:
                raise CheckpointError("; ".join(f"rank {r}: {m}" for r, m in fatal))
            bad = [(r, v[1]) for r, v in enumerate(votes) if v]
            if not bad:
                assert result is not None
                applied: str | None = None
                try:
                    self._apply(ckpt, result)
                except CheckpointError as e:
                    if self._group is None:
                        raise
                    applied = str(e)
                # Every rank learns whether every rank could apply its share: all return, or all raise.
                problems = [f"rank {r}: {m}" for r, m in enumerate(self._all_gather(applied)) if m]
                if problems:
                    raise CheckpointError("; ".join(problems))
                logger.info(
                    "loaded %s (%s in %.3f s)", ckpt, staging.describe_size(result.bytes_read), time.perf_counter() - t0
                )
                return ckpt
            msg = "; ".join(f"rank {r}: {m}" for r, m in bad)
            failures.append(f"{ckpt.name}: {msg}")
            if not (fallback and may_fall_back):
                raise CheckpointError(f"{ckpt} failed verification: {msg}; run 'ckptd verify {ckpt}'")
            text = f"{ckpt} failed verification ({msg}); falling back to the next newest checkpoint"
            logger.warning("%s", text)
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        raise CheckpointError(
            f"no committed checkpoint under {self.output_dir} could be loaded: {' | '.join(failures)}; "
            "run 'ckptd verify' on them, or start fresh with load(None)"
        )

    def _apply(self, ckpt: Path, result: loader.ReadResult) -> None:
        for p in self.plans:
            if p.key not in result.states:
                continue
            try:
                p.component.stateful.load_state_dict(result.states[p.key])
            except Exception as e:
                raise CheckpointError(
                    f"{ckpt}: component {p.key!r}: load_state_dict failed ({type(e).__name__}: {e}); "
                    "the checkpoint does not match the object it is loaded into"
                ) from e

    # -- preemption -----------------------------------------------------------------------------------

    @property
    def preempted(self) -> bool:
        """True once the preemption handler has received its signal on this rank."""
        return self._signal is not None

    def install_preemption_handler(
        self, *, timeout_s: float = DEFAULT_PREEMPTION_TIMEOUT_S, signals: tuple[int, ...] = (signal.SIGTERM,)
    ) -> None:
        """Handle a cluster's preemption notice (SIGTERM): finish the saves in flight, save the current step
        if the loop marks its step boundaries, then let the job exit. Opt-in; call it from the main thread.

        On the signal, no new save starts (``save_async`` raises), and then:

        - If the loop calls ``preemption_point(step)`` at its step boundaries: at the next one, every rank
          together waits for the saves in flight, saves ``step`` (the "emergency save", unless a save of
          that step has committed; ranks agree on it) and exits. A step boundary is where the state is
          consistent; a signal arrives anywhere, for example halfway through ``optimizer.step()``, so the
          save is never made from the signal handler itself. If no step boundary comes within
          ``timeout_s``, the process exits anyway.
        - If it never does: the handler waits for the saves in flight and exits (no emergency save).

        Either way at most ``timeout_s`` is spent waiting (set it below the cluster's grace period), and the
        job exits through the previous handler: a Python handler is called, an ignored signal stays
        ignored, and the default action becomes ``SystemExit(128 + signum)``, so ``finally`` blocks and
        ``with`` statements run. A signal that arrives inside a client call is acted on as the call returns.

        Args:
            timeout_s: the bound on all the waiting together.
            signals: the signals to handle.

        Example:
            >>> client.install_preemption_handler(timeout_s=25)
            >>> for step in range(start, total):
            ...     train_step()
            ...     if step % 500 == 0:
            ...         client.save_async(step)
            ...     client.preemption_point(step)
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        previous = {sig: signal.signal(sig, self._on_preemption_signal) for sig in signals}
        self._preemption = PreemptionSettings(float(timeout_s), previous)
        logger.info("preemption handler installed for %s", ", ".join(signal.Signals(s).name for s in signals))

    def preemption_point(self, step: int) -> None:
        """Mark a step boundary (the state is consistent): if a preemption signal was received, on this or
        any other rank, finish the saves in flight, save ``step`` and exit (see
        ``install_preemption_handler``); otherwise return at once.

        Collective when there are several ranks (one tiny all-reduce): call it at the same steps on every
        rank (a rank that got no signal, or has no handler installed, stops there too).

        Args:
            step: the step the state now holds (the one an emergency save would record).

        Example:
            >>> client.preemption_point(step)
        """
        self._points_seen = True
        # Every rank takes part, handler installed or not, so that the ranks stop at the same step.
        flag = self._any_rank(self._signal is not None)
        if flag:
            if self._preemption is None:  # another rank got the signal; this one has no handler of its own
                self._preemption = PreemptionSettings(DEFAULT_PREEMPTION_TIMEOUT_S, {})
            self._finish_preemption(self._signal or signal.SIGTERM, None, step)

    def _on_preemption_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            logger.warning("%s again while handling preemption; still finishing", name)
            return
        self._signal = signum
        settings = self._preemption
        assert settings is not None
        if self._points_seen:
            logger.warning("received %s: no new saves; saving at the next preemption_point, then exiting", name)
            threading.Thread(target=self._preemption_watchdog, args=(signum,), daemon=True).start()
            return
        logger.warning("received %s: no new saves; finishing the saves in flight, then exiting", name)
        if self._depth > 0:
            self._deferred_signal = signum  # acted on when the client call in progress returns
            return
        self._finish_preemption(signum, frame, None)

    def _preemption_watchdog(self, signum: int) -> None:
        """The loop must reach a preemption_point within the timeout; if it does not, exit anyway."""
        settings = self._preemption
        assert settings is not None
        if self._preemption_done.wait(settings.timeout_s):
            return
        if settings.previous.get(signum) == signal.SIG_IGN:
            return
        logger.error(
            "no preemption_point was reached within %.0f s of %s; exiting without an emergency save",
            settings.timeout_s,
            signal.Signals(signum).name,
        )
        logging.shutdown()
        os._exit(128 + signum)

    def _finish_preemption(self, signum: int, frame: Any, step: int | None) -> None:
        settings = self._preemption
        assert settings is not None
        deadline = time.monotonic() + settings.timeout_s
        self._depth += 1
        try:
            if self._inflight:
                steps = sorted(h.step for h in self._inflight.values())
                logger.warning(
                    "preemption: waiting up to %.0f s for %d save(s) in flight (steps %s)",
                    settings.timeout_s,
                    len(steps),
                    steps,
                )
            for h in list(self._inflight.values()):
                try:
                    h.wait(max(0.0, deadline - time.monotonic()))
                except (CheckpointError, TimeoutError) as e:
                    logger.error("preemption: the save of step %d did not commit: %s", h.step, e)
            if step is not None:
                self._emergency_save(step, deadline)
        finally:
            self._depth -= 1
            self._preemption_done.set()
            for sig, prev in settings.previous.items():
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        prev = settings.previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def _emergency_save(self, step: int, deadline: float) -> None:
        """Save ``step`` unless it is committed already, decided by every rank together.

        Only a commit counts: a save of ``step`` that was handed off but then aborted, vetoed or given up on
        does not. The decision is agreed (any rank that needs the save makes every rank save) after the
        saves in flight were waited for, so that a save of ``step`` that commits during that wait is not made
        twice, and no rank ever enters the snapshot collective alone. A rank whose peers are gone gets the
        backend's RuntimeError from the collective: logged, and the job exits without the save."""
        mine = not (self._closed or self.read_only) and step != self._last_committed
        self._emergency = True
        try:
            if not self._any_rank(mine):
                logger.warning("preemption: step %d is already committed; no emergency save", step)
                return
            path = self._save_async(step, {"preempted": True}).wait(max(0.0, deadline - time.monotonic()))
            logger.warning("preemption: emergency save of step %d committed: %s", step, path)
        except (CheckpointError, TimeoutError, ValueError, RuntimeError) as e:
            logger.error("preemption: emergency save of step %s failed: %s", step, e)
        finally:
            self._emergency = False

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a one-integer all-reduce; this rank's own flag alone)."""
        if self._group is None:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return bool(t.item())

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """Marks a public call in progress: a preemption signal arriving meanwhile is acted on at its end."""
        with self._call_lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                signum, self._deferred_signal = self._deferred_signal, None
                if signum is not None and self._depth == 0:
                    self._finish_preemption(signum, None, None)

    # -- lifecycle ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointClient is closed; create a new one")

    def close(self, wait: bool = True) -> None:
        """Finish the saves in flight (or, with wait=False, leave them to the daemon, which still commits
        them), free the slabs and release the output dir's lease.

        Args:
            wait: wait for the saves in flight first.

        Example:
            >>> client.close()
        """
        if self._closed:
            return
        with self._call():
            self._finish_overlap()  # a save still being copied is handed off either way
            if wait:
                failed = self._wait_in_flight()[1]
                if failed:
                    logger.error("a save failed before close: %s", "; ".join(failed))
            self._closed = True
            if self._link is not None:
                with contextlib.suppress(CheckpointError):
                    self._link.request(MsgType.BYE, 2.0, pid=os.getpid())
            self._teardown()

    def _teardown(self) -> None:
        """Free what this client holds; also after a failed construction."""
        self._closed = True
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        if self._overlap is not None:
            self._overlap.close()  # no copy thread may still write into a slab unmapped below
        for h in self._inflight.values():
            # Left to the daemon (close(wait=False)): it still commits them, but this client cannot tell.
            h.error = (
                f"the CheckpointClient was closed while the save of step {h.step} was in flight; ckptd may "
                f"still commit it as checkpoint-{h.step} (see 'ckptd ls {self.output_dir}')"
            )
        self._inflight.clear()
        self._lease_stop.set()
        if self._lease_thread is not None:
            self._lease_thread.join(5.0)
        if self._lease_finalizer is not None:
            self._lease_finalizer.detach()
        if self._lease is not None:
            _release_lease(self._lease, self._lease_stop)
        self._layouts.clear()  # the cached views into the slabs, which would keep them mapped
        for slab in self._slabs:
            slab.destroy()
        self._slabs.clear()
        if self._link is not None:
            self._link.close()
            self._link = None

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _model_dest_problem(dest: Path, output_dir: Path) -> str | None:
    """Why ``dest`` cannot receive a ``save_model`` of the client of ``output_dir`` (None: it can; its parent
    directories are created here). The daemon checks the same again before its rename."""
    root = fmt.checkpoints_root(output_dir)
    real, real_out = Path(os.path.realpath(dest)), Path(os.path.realpath(output_dir))
    real_root = real_out / fmt.CHECKPOINTS_DIRNAME
    if real in (real_out, real_root) or real in real_out.parents or real_root in real.parents:
        return (
            f"it is (or resolves to) the output dir, a directory above it or one inside {root}; a model saved "
            f"there would be taken for a checkpoint or replace them: choose e.g. {output_dir / 'model'}"
        )
    tree = fmt.checkpoints_tree_of(dest)
    if tree is not None:
        return (
            f"it is (or resolves to) a place inside {tree}, the checkpoints directory of an output dir; a model "
            f"saved there would be taken for a checkpoint or replace one: choose e.g. {output_dir / 'model'}"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        same_fs = os.stat(dest.parent).st_dev == os.stat(root).st_dev
    except OSError as e:
        return f"cannot create {dest.parent} ({e.strerror or e}); choose a writable directory"
    if not same_fs:
        return (
            f"{dest.parent} is on another file system than {root}; the daemon commits a model by renaming its "
            f"temp dir, so save it beside the output dir (e.g. {output_dir / 'model'}) and copy it afterwards"
        )
    if not os.path.lexists(dest):
        return None
    if dest.is_symlink() or not dest.is_dir():
        return "it exists and is not a directory; choose another path or remove it"
    if not any(dest.iterdir()):
        return None
    try:
        old = fmt.read_manifest(dest)
    except (fmt.FormatError, OSError):
        old = None
    mark = None if old is None else old.metadata.get(fmt.EXPORT_METADATA_KEY)
    if not isinstance(mark, dict):
        return (
            "it exists and holds files that no earlier save_model wrote; nothing was replaced: choose another "
            "directory or remove it"
        )
    if mark.get("output_dir") != str(output_dir):
        return (
            f"it holds a model that save_model of another output dir ({mark.get('output_dir')}) wrote; that job's, "
            "not this one's to replace: choose another directory or remove it"
        )
    return None


def _release_lease(lease: ownership.Lease, stop: threading.Event) -> None:
    stop.set()
    try:
        lease.release()
    except OSError as e:
        logger.warning("could not release the lease of %s: %s", lease.output_dir, e)


def _resolve_components(components: Any, process_groups: dict[str, Any] | None) -> tuple[list, dict | None]:
    """The component list (from a provider's ``get_state_components()`` if need be), type-checked."""
    if not isinstance(components, (list, tuple)):
        provider = components
        if not hasattr(provider, "get_state_components"):
            raise TypeError("components must be a list of StateComponent or have get_state_components()")
        components = list(provider.get_state_components())
        if process_groups is None and hasattr(provider, "get_process_groups"):
            process_groups = provider.get_process_groups()
    for c in components:
        if not isinstance(c, StateComponent):
            raise TypeError(f"components must be StateComponent instances, got {type(c).__name__}")
    return list(components), process_groups


def _check_group_names(process_groups: dict[str, Any] | None) -> None:
    """What ``planning.discover_topology`` would reject before its all-gather, checked before it instead,
    so that one rank's bad group cannot leave the others waiting in that all-gather."""
    if not process_groups:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CheckpointError("process_groups were given but torch.distributed is not initialized")
    for name, g in process_groups.items():
        if not fmt.is_valid_key(name):
            raise CheckpointError(f"process group name {name!r} is invalid; expected {fmt.KEY_PATTERN}")
        planning._group_ranks(g)


def _agree(votes: list[Any], plans: list[planning.ComponentPlan]) -> str | None:
    errors = [f"rank {r}: {v[0]}" for r, v in enumerate(votes) if v[0]]
    if errors:
        return "; ".join(errors)
    steps = {v[1] for v in votes}
    if len(steps) != 1:
        return f"ranks passed different steps {sorted(steps)}; save_async must be called with the same step everywhere"
    for p in plans:
        if p.component.effective_validation == ValidationLevel.NONE:
            continue
        ref = votes[0][3].get(p.key)
        differ = [r for r, v in enumerate(votes) if v[3].get(p.key) != ref]
        if differ:
            what = "its plain (non-DTensor) values" if p.pattern == SharingPattern.SHARDED else "it"
            return (
                f"{p.pattern.value.upper()} component {p.key!r} differs from rank 0 on rank(s) {differ} "
                f"(validation level {p.component.effective_validation.value}, comparing {what}); the replicas "
                "have diverged"
            )
    return None


def _vote_shared(shared: dict[str, staging.SharedLayout]) -> dict[str, tuple[Any, ...]]:
    """This rank's word on each SHARDED file, small enough for the save's one collective."""
    return {
        path: (s.component, s.digest, s.data_size, s.head_len, s.contributed, s.contested)
        for path, s in sorted(shared.items())
    }


def _agree_shared(votes: list[Any], owners: ContestedOwners) -> str | None:
    """Every rank must see the same SHARDED files (names, dtypes and global shapes of their tensors), and
    the bytes they write must tile each file exactly: rank 0's header, then every distinct piece once."""
    ref = votes[0][6]
    for r, v in enumerate(votes):
        mine = v[6]
        if set(mine) != set(ref):
            return (
                f"rank {r} would write SHARDED files {sorted(mine)}, rank 0 {sorted(ref)}; every rank must hold "
                "the same SHARDED components with the same tensor names"
            )
        for path, (component, digest, *_rest) in mine.items():
            if digest != ref[path][1]:
                return (
                    f"SHARDED component {component!r}: rank {r} holds other tensors in {path} than rank 0 (names, "
                    "dtypes, global shapes, or DTensor meshes and placements differ); every rank must hold the "
                    "same DTensors, split the same way, and the same plain tensors"
                )
    for path, (component, _, data_size, head_len, _, _) in ref.items():
        written = sum(v[6][path][4] for v in votes) + sum(n for _, n in owners.get(path, {}).values())
        if head_len is None or written != head_len + data_size:
            return (
                f"SHARDED component {component!r}: the ranks' pieces of {path} add up to {written} bytes, the file "
                f"holds {(head_len or 0) + data_size}; a DTensor's placements do not tile its global shape (each "
                "distinct shard must be held by one writer); this is a ckptd bug if the placements are "
                "Shard/Replicate: report it"
            )
    return None


# For each shared file: contested piece (tensor, offsets) -> (the lowest rank holding it, its bytes).
ContestedOwners = dict[str, dict[tuple[str, tuple[int, ...]], tuple[int, int]]]


def _contested_owners(votes: list[Any]) -> ContestedOwners:
    """For each file, every contested piece (tensor, offsets) -> (the lowest rank holding it, its bytes): a
    DTensor on a submesh (FSDP over one data-parallel group of a DP x TP job) is held alike by every submesh
    that replicates it, and the lowest rank writes it. The same on every rank (gathered votes)."""
    owners: ContestedOwners = {}
    for r, v in enumerate(votes):
        for path, layout in v[6].items():
            for name, offsets, nbytes in layout[5]:
                owners.setdefault(path, {}).setdefault((name, tuple(offsets)), (r, nbytes))
    return owners


def _dropped_pieces(owners: ContestedOwners, rank: int) -> dict[str, frozenset[tuple[str, tuple[int, ...]]]]:
    """The contested pieces this rank holds but a lower rank writes."""
    return {
        path: frozenset(key for key, (owner, _) in pieces.items() if owner != rank) for path, pieces in owners.items()
    }


def _sharded_writers(votes: list[Any], owners: ContestedOwners) -> dict[str, list[int]]:
    """The ranks that write each SHARDED component (those contributing bytes to any of its files)."""
    writers: dict[str, set[int]] = {}
    for r, v in enumerate(votes):
        for path, (component, _, _, _, contributed, _) in v[6].items():
            ranks = writers.setdefault(component, set())
            if contributed or any(owner == r for owner, _ in owners.get(path, {}).values()):
                ranks.add(r)
    return {k: sorted(v) for k, v in writers.items()}


def _job_peer_keys() -> dict[str, str]:
    """Fresh CURVE keys for this job's daemons (Z85 strings), made by rank 0 and never written anywhere."""
    keys = security.ephemeral_keys()
    assert keys.server_secret is not None and keys.client_public is not None and keys.client_secret is not None
    return {
        "server_public": keys.server_public.decode(),
        "server_secret": keys.server_secret.decode(),
        "client_public": keys.client_public.decode(),
        "client_secret": keys.client_secret.decode(),
    }


def _make_sync_group() -> Any:
    """A gloo group of our own, so the snapshot collective never interleaves with the trainer's NCCL."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")
