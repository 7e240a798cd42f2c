"""The node daemon: one asyncio loop owns the ROUTER socket; writer threads move bytes to disk.

The loop never blocks on I/O: it validates requests, tracks transactions, and sends replies and
notifications. Writing, fsync and commit run on thread pools and report back to the loop. Transaction
logic lives in transactions.py, byte movement in writer.py, message parsing in protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
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
from ckptd import protocol as proto
from ckptd import transactions as tx
from ckptd import writer
from ckptd.protocol import MsgType, ProtocolError, TxnState

logger = logging.getLogger(__name__)

FINISHED_KEPT = 1024  # finished transactions remembered for late queries
TICK_S = 0.25


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


@dataclass
class Daemon:
    config: DaemonConfig
    sock: zmq.asyncio.Socket
    io_pool: ThreadPoolExecutor
    commit_pool: ThreadPoolExecutor
    txns: dict[str, tx.Transaction] = field(default_factory=dict)
    finished: OrderedDict[str, tx.Transaction] = field(default_factory=OrderedDict)
    segments: dict[str, writer.Segment] = field(default_factory=dict)
    clients: set[int] = field(default_factory=set)
    swept: set[Path] = field(default_factory=set)
    prepared: dict[str, asyncio.Future] = field(default_factory=dict)  # txn -> its temp dir exists
    stats: Stats = field(default_factory=Stats)
    last_activity: float = field(default_factory=time.monotonic)
    stopping: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)


class EndpointBusy(RuntimeError):
    pass


def acquire_endpoint_lock(endpoint: str) -> int | None:
    """Hold an exclusive lock beside an IPC socket: a second daemon must not steal a live socket."""
    path = proto.ipc_path(endpoint)
    if path is None:
        return None
    proto.ensure_private_dir(os.path.dirname(path))
    lock = path + ".lock"
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
            return fd
        # We locked a lock file that the previous daemon removed as it exited: take the new one.
        os.close(fd)
    raise EndpointBusy(f"could not take the lock {lock}; daemons keep starting and stopping at {endpoint}")


def release_endpoint_lock(endpoint: str, fd: int | None) -> None:
    """Remove the lock file while still holding it (so no other daemon can be holding it), then let go."""
    path = proto.ipc_path(endpoint)
    if fd is None or path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".lock")
    os.close(fd)


async def send(d: Daemon, identity: bytes, msg_type: MsgType, req_id: int = 0, **body: object) -> None:
    try:
        await d.sock.send_multipart([identity, proto.pack(msg_type, req_id, **body)])
    except zmq.ZMQError as e:
        logger.debug("reply to a departed client dropped: %s", e)


async def notify_txn(d: Daemon, txn: tx.Transaction) -> None:
    for identity in txn.identities():
        if txn.state == TxnState.COMMITTED:
            await send(d, identity, MsgType.COMMITTED, txn=txn.txn, step=txn.step, path=str(txn.path))
        else:
            await send(d, identity, MsgType.ABORTED, txn=txn.txn, reason=txn.reason or "aborted")


def txn_state_body(d: Daemon, txn_id: str) -> dict[str, object]:
    txn = d.txns.get(txn_id) or d.finished.get(txn_id)
    if txn is None:
        return {"txn": txn_id, "state": TxnState.UNKNOWN.value, "path": None, "reason": None}
    return {
        "txn": txn_id,
        "state": txn.state.value,
        "path": str(txn.path) if txn.path else None,
        "reason": txn.reason,
    }


async def finish(d: Daemon, txn: tx.Transaction) -> None:
    """Move a committed or aborted transaction out of the live set and tell its ranks."""
    d.txns.pop(txn.txn, None)
    d.prepared.pop(txn.txn, None)
    d.finished[txn.txn] = txn
    while len(d.finished) > FINISHED_KEPT:
        d.finished.popitem(last=False)
    await notify_txn(d, txn)
    if txn.state == TxnState.ABORTED:
        d.stats.aborts += 1
        spawn(d, cleanup_after_abort(d, txn))
    else:
        release_dead_segments(d, txn)
    # A later save in the same output dir may have been waiting for this one to finish.
    spawn(d, commit_ready(d, txn.output_dir))


def spawn(d: Daemon, coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(coro)
    d.tasks.add(task)
    task.add_done_callback(d.tasks.discard)


async def cleanup_after_abort(d: Daemon, txn: tx.Transaction) -> None:
    # Writer threads may still hold files of this transaction; remove the temp dir once they let go.
    while txn.pending_io:
        await asyncio.sleep(0.02)
    await asyncio.get_running_loop().run_in_executor(d.commit_pool, tx.cleanup_aborted, txn)
    release_dead_segments(d, txn)


def release_dead_segments(d: Daemon, txn: tx.Transaction) -> None:
    """Unlink the slabs of trainers that died: nobody else will, and they pin RAM in /dev/shm.

    A slab that a later live transaction still reads from (the trainer handed over another save before it
    died) is left to housekeeping, which unlinks it once no transaction uses it."""
    in_use = {p.request.segment for t in d.txns.values() for p in t.parts.values()}
    for part in txn.parts.values():
        pid = part.request.pid
        if part.request.segment not in in_use and not writer.pid_alive(pid):
            seg = d.segments.pop(part.request.segment, None)
            if seg is not None:
                seg.close()
            writer.unlink_segment(part.request.segment)
            logger.info("trainer pid %d is gone; unlinked its segment %s", pid, part.request.segment)


async def abort_txn(d: Daemon, txn: tx.Transaction, reason: str) -> None:
    if txn.finished:
        return
    tx.abort(txn, reason)
    await finish(d, txn)


def get_segment(d: Daemon, req: proto.StageRequest) -> writer.Segment:
    seg = d.segments.get(req.segment)
    if seg is not None and (seg.size < req.segment_size or not writer.segment_is_current(seg)):
        d.segments.pop(req.segment).close()
        seg = None
    if seg is None:
        seg = writer.open_segment(req.segment, req.segment_size, req.pid)
        d.segments[req.segment] = seg
    return seg


async def handle_stage(d: Daemon, identity: bytes, req_id: int, body: dict) -> None:
    req = proto.parse_stage(body)
    txn = d.txns.get(req.txn)
    if txn is None and req.txn in d.finished:
        old = d.finished[req.txn]
        raise tx.TxnError(f"transaction {req.txn} is already {old.state.value}: {old.reason or ''}".rstrip(": "))
    # Map the segment before touching any transaction: a part whose bytes cannot be read must neither
    # open a transaction (and its temp dir) nor leave a half-joined one behind (commit info, WRITING
    # state) that no timeout would ever end.
    try:
        segment = get_segment(d, req) if req.files else None
    except (OSError, ValueError) as e:
        raise tx.TxnError(str(e)) from None
    if txn is None:
        txn = tx.open_transaction(req)
        # Directory work (sweep, mkdir) runs off the loop and off the rank's stall: the rank only waits
        # for validation; its part's writer waits for this future.
        loop = asyncio.get_running_loop()
        sweep = txn.output_dir not in d.swept
        d.swept.add(txn.output_dir)
        live = set(d.txns) | {txn.txn}
        d.prepared[txn.txn] = loop.run_in_executor(d.commit_pool, prepare, txn, sweep, live)
        d.txns[req.txn] = txn
        logger.info(
            "txn %s opened: step %d in %s, ranks %s", txn.txn, txn.step, txn.output_dir, sorted(txn.expected_ranks)
        )
    part = tx.join(txn, req, identity)
    part.segment = segment
    d.stats.bytes_staged += sum(f.length for f in req.files)
    await send(d, identity, MsgType.ACCEPTED, req_id, txn=req.txn, rank=req.rank)
    spawn(d, run_part(d, txn, part))


def prepare(txn: tx.Transaction, sweep: bool, live: set[str]) -> None:
    if sweep:
        tx.sweep_stale(txn.output_dir, live)
    tx.prepare_temp_dir(txn)


async def run_part(d: Daemon, txn: tx.Transaction, part: tx.Part) -> None:
    loop = asyncio.get_running_loop()
    txn.pending_io += 1
    try:
        await asyncio.shield(d.prepared[txn.txn])
        if part.segment is not None:
            await loop.run_in_executor(d.io_pool, tx.write_part, txn, part, d.config.direct_io)
        else:
            part.written = True
        await send(d, part.identity, MsgType.RELEASED, txn=txn.txn, rank=part.rank)
        await loop.run_in_executor(d.io_pool, tx.sync_part, part)
    except Exception as e:  # any write error aborts the whole transaction, never the daemon
        txn.pending_io -= 1
        await send(d, part.identity, MsgType.RELEASED, txn=txn.txn, rank=part.rank)
        await abort_txn(d, txn, f"rank {part.rank}: writing failed: {e}")
        return
    txn.pending_io -= 1
    d.stats.bytes_written += sum(r.size for r in part.records)
    await commit_ready(d, txn.output_dir)


def waits_for_earlier(d: Daemon, txn: tx.Transaction) -> bool:
    """True while a transaction opened earlier in the same output dir is still live.

    Commits in one output dir happen in the order the saves were handed over, so that "latest" only ever
    moves forward and retention never removes a newer checkpoint because an older one finished last.
    """
    for other in d.txns.values():  # insertion order is opening order
        if other is txn:
            return False
        if other.output_dir == txn.output_dir and not other.finished:
            return True
    return False


async def commit_ready(d: Daemon, output_dir: Path) -> None:
    for txn in list(d.txns.values()):
        if txn.output_dir != output_dir:
            continue
        if waits_for_earlier(d, txn) or not tx.ready_to_commit(txn):
            return
        await commit_txn(d, txn)


async def commit_txn(d: Daemon, txn: tx.Transaction) -> None:
    loop = asyncio.get_running_loop()
    # Set before yielding to the loop, so a second part finishing now cannot start a second commit.
    txn.state = TxnState.COMMITTING
    try:
        path = await loop.run_in_executor(d.commit_pool, tx.commit, txn)
    except Exception as e:
        txn.state = TxnState.OPEN  # let abort() record it
        await abort_txn(d, txn, f"commit failed: {e}")
        return
    elapsed = (txn.committed_at or time.monotonic()) - txn.opened_at
    logger.info("committed %s (%d bytes in %.3f s)", path, txn.bytes_total, elapsed)
    d.stats.commits += 1
    d.stats.last_commit_path = str(path)
    d.stats.last_commit_time = time.time()
    d.stats.last_commit_bytes = txn.bytes_total
    d.stats.last_commit_seconds = elapsed
    limit = txn.commit_info.save_total_limit if txn.commit_info else None
    if limit:
        try:
            await loop.run_in_executor(d.commit_pool, tx.apply_retention, txn, limit)
        except Exception as e:  # retention must never fail a committed checkpoint
            logger.warning("retention failed after committing %s: %s", path, e)
    if txn.trash:
        # Before announcing the commit: a rank that sees "committed" also sees retention done.
        await loop.run_in_executor(d.commit_pool, tx.empty_trash, txn)
    await finish(d, txn)


def status_body(d: Daemon) -> dict[str, object]:
    s = d.stats
    return {
        "pid": os.getpid(),
        "version": ckptd.__version__,
        "endpoint": d.config.endpoint,
        "uptime_s": time.time() - s.started_at,
        "in_flight": [
            {
                "txn": t.txn,
                "step": t.step,
                "output_dir": str(t.output_dir),
                "state": t.state.value,
                "ranks_in": sorted(t.parts),
                "ranks_expected": sorted(t.expected_ranks),
                "bytes_staged": t.bytes_total,
                "bytes_written": t.bytes_written,
                "age_s": time.monotonic() - t.opened_at,
            }
            for t in d.txns.values()
        ],
        "bytes_staged": s.bytes_staged,
        "bytes_written": s.bytes_written,
        "commits": s.commits,
        "aborts": s.aborts,
        "last_commit": s.last_commit_path,
        "last_commit_time": s.last_commit_time,
        "last_commit_bytes": s.last_commit_bytes,
        "last_commit_seconds": s.last_commit_seconds,
        "clients": sorted(d.clients),
    }


async def dispatch(d: Daemon, frames: list[bytes]) -> None:
    if len(frames) != 2:
        if frames:
            await send(d, frames[0], MsgType.ERROR, message=f"expected one message frame, got {len(frames) - 1}")
        return
    identity, frame = frames
    req_id = 0
    try:
        msg_type, req_id, body = proto.unpack(frame)
        if msg_type == MsgType.HELLO:
            d.clients.add(proto.parse_pid(body))
            await send(d, identity, MsgType.WELCOME, req_id, pid=os.getpid(), version=ckptd.__version__)
        elif msg_type == MsgType.STAGE:
            await handle_stage(d, identity, req_id, body)
        elif msg_type == MsgType.QUERY:
            await send(d, identity, MsgType.TXN_STATE, req_id, **txn_state_body(d, proto.parse_txn(body)))
        elif msg_type == MsgType.ABORT:
            txn_id, reason = proto.parse_txn(body), proto.parse_reason(body)
            if txn_id in d.txns:
                await abort_txn(d, d.txns[txn_id], reason)
            await send(d, identity, MsgType.TXN_STATE, req_id, **txn_state_body(d, txn_id))
        elif msg_type == MsgType.STATUS:
            await send(d, identity, MsgType.STATUS_REPORT, req_id, **status_body(d))
        elif msg_type == MsgType.BYE:
            d.clients.discard(proto.parse_pid(body))
            await send(d, identity, MsgType.BYE_OK, req_id)
        else:
            raise ProtocolError(f"message type {msg_type.value!r} is sent by the daemon, not to it")
    except (ProtocolError, tx.TxnError) as e:
        logger.warning("rejected request: %s", e)
        await send(d, identity, MsgType.ERROR, req_id, message=str(e))
    except Exception as e:  # a bug or an OS error on one request must not take the daemon down
        logger.exception("request failed")
        await send(d, identity, MsgType.ERROR, req_id, message=f"daemon error: {type(e).__name__}: {e}")


async def housekeeping(d: Daemon) -> bool:
    """Timeouts, dead clients, idle exit. Returns True when the daemon should exit."""
    now = time.monotonic()
    for txn in list(d.txns.values()):
        if txn.state == TxnState.OPEN and now > txn.deadline and tx.missing_ranks(txn):
            await abort_txn(d, txn, f"rank(s) {tx.missing_ranks(txn)} did not stage within the timeout")
        elif txn.state == TxnState.OPEN and now > txn.deadline and txn.commit_info is None:
            await abort_txn(d, txn, "no rank sent the commit information within the timeout")
    d.clients = {pid for pid in d.clients if writer.pid_alive(pid)}
    in_use = {p.request.segment for t in d.txns.values() for p in t.parts.values()}
    for name, seg in list(d.segments.items()):
        if name in in_use:
            continue
        if not writer.pid_alive(seg.owner_pid):
            d.segments.pop(name).close()
            writer.unlink_segment(name)
        elif not writer.segment_is_current(seg):
            # The client closed or replaced (grew) its slab: drop our mapping so the memory is freed.
            d.segments.pop(name).close()
    busy = bool(d.txns) or bool(d.tasks)
    if busy:
        d.last_activity = now
        return False
    if d.stopping:
        return True
    idle = d.config.idle_exit_s
    return idle is not None and not d.clients and now - d.last_activity > idle


async def serve_async(config: DaemonConfig, ready: asyncio.Event | None = None) -> int:
    lock_fd = acquire_endpoint_lock(config.endpoint)
    if config.nice > 0:
        os.nice(config.nice)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_BYTES)
    path = proto.ipc_path(config.endpoint)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # we hold the lock, so any socket file here is stale
    old_umask = os.umask(0o077)
    try:
        sock.bind(config.endpoint)
    finally:
        os.umask(old_umask)
    d = Daemon(
        config=config,
        sock=sock,
        io_pool=ThreadPoolExecutor(max(1, config.writer_threads), thread_name_prefix="ckptd-writer"),
        commit_pool=ThreadPoolExecutor(1, thread_name_prefix="ckptd-commit"),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: setattr(d, "stopping", True))
    for out in config.sweep_dirs:
        await loop.run_in_executor(d.commit_pool, tx.sweep_stale, out, set())
        d.swept.add(out)
    logger.info("ckptd %s serving %s (pid %d)", ckptd.__version__, config.endpoint, os.getpid())
    if ready is not None:
        ready.set()
    next_tick = 0.0
    try:
        while True:
            if await sock.poll(int(TICK_S * 1000)):
                frames = await sock.recv_multipart()
                d.last_activity = time.monotonic()
                await dispatch(d, frames)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                if await housekeeping(d):
                    break
    finally:
        for txn in list(d.txns.values()):
            await abort_txn(d, txn, "daemon shutting down")
        d.io_pool.shutdown(wait=True)
        d.commit_pool.shutdown(wait=True)
        for seg in d.segments.values():
            seg.close()
        sock.close(linger=500)
        ctx.term()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        release_endpoint_lock(config.endpoint, lock_fd)
    logger.info("ckptd exiting")
    return 0


def serve(config: DaemonConfig) -> int:
    return asyncio.run(serve_async(config))
