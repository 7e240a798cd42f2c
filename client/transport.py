"""Transport: this rank's ZeroMQ link to its node daemon, and starting the embedded daemon.

One DEALER socket per rank, used only under a lock (ZeroMQ sockets are not thread-safe). Requests carry
an id and wait for the reply with that id; notifications (released / committed / aborted) that arrive
meanwhile are queued for the client. A socket monitor reports a dropped connection at once, so a daemon
killed mid-save is noticed in milliseconds rather than after a heartbeat timeout.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from ckptd import protocol as proto
from ckptd import security
from ckptd.protocol import MsgType
from client.components import CheckpointError

logger = logging.getLogger(__name__)

DAEMON_START_TIMEOUT_S = 60.0
EMBEDDED_IDLE_EXIT_S = 10.0
LOG_MAX_BYTES = 16 * 1024 * 1024  # every job of the user appends to the default endpoint's log
MAX_PENDING = 1024  # requests awaiting a reply at once; the oldest is forgotten past it (its reply dropped)
_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


class DaemonUnavailable(CheckpointError):
    pass


@dataclass
class Event:
    type: MsgType
    body: dict[str, Any]


@dataclass
class DaemonLink:
    endpoint: str
    ctx: zmq.Context = field(default_factory=zmq.Context)
    sock: zmq.Socket | None = None
    monitor: zmq.Socket | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    events: deque[Event] = field(default_factory=deque)
    # Replies are kept only for requests someone still waits for (``pending``): a reply that comes after its
    # request gave up is dropped, so replies never pile up (and never make ``pump`` return at once forever).
    replies: dict[int, Event] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    connected: bool = False
    secure: bool = False  # CURVE (tcp://)
    refused: str | None = None  # why the daemon's CURVE handshake refused us, if it did
    generation: int = 0  # bumped on every lost connection: transactions sent before it are lost too
    process: subprocess.Popen | None = None  # the embedded daemon this rank started, if it is the one answering
    daemon_pid: int | None = None  # the pid the answering daemon gave in its WELCOME

    def _open(self) -> None:
        try:
            keys = security.keys_for_endpoint(self.endpoint)
        except security.SecurityError as e:
            raise CheckpointError(str(e)) from None
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        if keys is not None:
            # Over CURVE, "connected" means the handshake succeeded (a refused client still connects at the
            # TCP level, every retry), and a failed handshake says why at once instead of timing out.
            security.secure_client_socket(sock, keys)
            events |= zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            events |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self.monitor = sock.get_monitor_socket(events)
        sock.connect(self.endpoint)
        self.sock = sock
        self.secure = keys is not None
        self.refused = None
        self.connected = False

    def reset(self) -> None:
        """Drop the socket (and anything queued on it); the next request reconnects."""
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                self.sock.close(linger=0)
                self.sock = None
            if self.monitor is not None:
                self.monitor.close(linger=0)
                self.monitor = None
            self.connected = False
            self.replies.clear()
            self.pending.clear()

    def close(self) -> None:
        self.reset()
        self.ctx.term()

    # -- receiving ------------------------------------------------------------------------------------

    def pump(self, timeout_s: float) -> None:
        """Receive whatever arrives within ``timeout_s`` (replies and notifications, connection events)."""
        with self.lock:
            if self.sock is None:
                self._open()
            assert self.sock is not None and self.monitor is not None
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            deadline = time.monotonic() + max(0.0, timeout_s)
            while True:
                remaining = deadline - time.monotonic()
                ready = dict(poller.poll(max(0, int(remaining * 1000))))
                if self.monitor in ready:
                    self._drain_monitor()
                if self.sock in ready:
                    while True:
                        try:
                            frame = self.sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(frame)
                if not ready or remaining <= 0 or self.events or self.replies:
                    return

    def _drain_monitor(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                msg = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or (event == zmq.EVENT_CONNECTED and not self.secure):
                self.connected = True
                self.refused = None
            elif event in _HANDSHAKE_FAILURES:
                self.refused = security.handshake_failure_reason(event, msg["value"])
                logger.error("ckptd at %s refused this rank: %s", self.endpoint, self.refused)
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    self.generation += 1
                    logger.warning("lost the connection to ckptd at %s", self.endpoint)
                self.connected = False

    def _dispatch(self, frame: bytes) -> None:
        try:
            msg_type, req_id, body = proto.unpack(frame)
        except proto.ProtocolError as e:
            logger.error("ignoring a malformed message from ckptd: %s", e)
            return
        if req_id:
            if req_id in self.pending:
                self.replies[req_id] = Event(msg_type, body)
            else:
                logger.debug("dropping a late %s reply to request %d, which no one waits for", msg_type.value, req_id)
        else:
            self.events.append(Event(msg_type, body))

    def take_events(self) -> list[Event]:
        with self.lock:
            out = list(self.events)
            self.events.clear()
            return out

    # -- requests -------------------------------------------------------------------------------------

    def _expect(self, req_id: int) -> None:
        self.pending.add(req_id)
        while len(self.pending) > MAX_PENDING:
            oldest = min(self.pending)
            self.pending.discard(oldest)
            self.replies.pop(oldest, None)

    def send(self, msg_type: MsgType, **body: Any) -> int | None:
        """Send one request without waiting; returns its id, whose reply ``take_reply`` gives once it has
        arrived (``pump`` receives it), or None if it could not be queued now (the caller retries later).
        ``forget`` the id when its reply no longer matters."""
        with self.lock:
            if self.sock is None:
                self._open()
            assert self.sock is not None
            req_id = next(self.ids)
            try:
                self.sock.send(proto.pack(msg_type, req_id, **body), zmq.NOBLOCK)
            except zmq.ZMQError as e:  # zmq.Again: the pipe is full (a frozen daemon); or a closed socket
                logger.debug("could not queue a %s request to ckptd: %s", msg_type.value, e)
                return None
            self._expect(req_id)
            return req_id

    def take_reply(self, req_id: int) -> Event | None:
        """The reply to request ``req_id`` if it has arrived (then forgotten), else None (still awaited)."""
        with self.lock:
            reply = self.replies.pop(req_id, None)
            if reply is not None:
                self.pending.discard(req_id)
            return reply

    def forget(self, req_id: int | None) -> None:
        """Stop waiting for request ``req_id``: its reply, now or later, is dropped."""
        if req_id is None:
            return
        with self.lock:
            self.pending.discard(req_id)
            self.replies.pop(req_id, None)

    def request(
        self, msg_type: MsgType, timeout_s: float, *, stage: proto.StageRequest | None = None, **body: Any
    ) -> Event:
        """Send one request and wait for its reply; raises DaemonUnavailable on timeout."""
        with self.lock:
            if self.sock is None:
                self._open()
            assert self.sock is not None
            req_id = next(self.ids)
            data = proto.pack_stage(stage, req_id) if stage is not None else proto.pack(msg_type, req_id, **body)
            self._expect(req_id)
            try:
                self.sock.send(data)
                deadline = time.monotonic() + timeout_s
                while req_id not in self.replies:
                    remaining = deadline - time.monotonic()
                    if self.refused is not None:
                        raise DaemonUnavailable(
                            f"ckptd at {self.endpoint} refused this rank: {self.refused}; check CKPTD_KEYS "
                            "(docs/security.md)"
                        )
                    if remaining <= 0:
                        raise DaemonUnavailable(
                            f"ckptd at {self.endpoint} did not answer a {msg_type.value} request within "
                            f"{timeout_s:.0f} s"
                        )
                    if req_id not in self.pending:  # the link was reset meanwhile: no reply can come
                        raise DaemonUnavailable(
                            f"the connection to ckptd at {self.endpoint} was reset while a {msg_type.value} request "
                            "waited for its reply"
                        )
                    self.pump(min(remaining, 0.5))
                reply = self.replies.pop(req_id)
            finally:
                self.pending.discard(req_id)
                self.replies.pop(req_id, None)
            if reply.type == MsgType.ERROR:
                raise CheckpointError(f"ckptd rejected the {msg_type.value} request: {reply.body.get('message')}")
            return reply

    def ping(self, timeout_s: float) -> bool:
        """True when a daemon answers; False when none does. A daemon that refuses this rank's CURVE keys
        raises DaemonUnavailable saying why: retrying with the same keys cannot help."""
        try:
            reply = self.request(MsgType.HELLO, timeout_s, pid=os.getpid(), version=proto.PROTOCOL_VERSION)
            pid = reply.body.get("pid")
            self.daemon_pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
            return True
        except DaemonUnavailable:
            refused = self.refused
            self.reset()
            if refused is not None:
                raise
            return False

    # -- the embedded daemon --------------------------------------------------------------------------

    def embedded_alive(self) -> bool | None:
        """None when this rank did not start the daemon that answers; else whether that process still runs."""
        if self.process is None:
            return None
        return self.process.poll() is None

    def _keep_child_only_if_it_answers(self) -> None:
        """A daemon answered: if its WELCOME names another pid than the child this rank started, the child
        lost the start race for the endpoint (it exits with code 2 once it gets that far) or died. Either
        way it is not the daemon holding this rank's saves, so its exit must never be read as "our daemon
        died": forget it, reaped by a background thread (no zombie, no wait here)."""
        child = self.process
        if child is None or self.daemon_pid is None or self.daemon_pid == child.pid:
            return
        self.process = None
        if child.poll() is None:
            logger.info(
                "ckptd pid %d answers at %s; the daemon this rank started (pid %d) lost the start race and exits",
                self.daemon_pid,
                self.endpoint,
                child.pid,
            )
            threading.Thread(target=child.wait, name="ckptd-reap-child", daemon=True).start()

    def ensure_daemon(
        self, may_start: bool, output_dir: Path | None = None, timeout_s: float = DAEMON_START_TIMEOUT_S
    ) -> None:
        """Make sure a daemon answers at the endpoint; local rank 0 (``may_start``) starts one if not."""
        if self.ping(1.0 if may_start else 2.0):
            self._keep_child_only_if_it_answers()
            return
        if may_start:
            self.process = start_embedded_daemon(self.endpoint, output_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ping(1.0):
                self._keep_child_only_if_it_answers()
                return
            if self.process is not None and self.process.poll() not in (None, 2):
                log = daemon_log_path(self.endpoint)
                raise DaemonUnavailable(f"the embedded ckptd exited with code {self.process.returncode}; see {log}")
        raise DaemonUnavailable(
            f"no ckptd answers at {self.endpoint} after {timeout_s:.0f} s; start one with "
            f"'ckptd serve --endpoint {self.endpoint}' or let local rank 0 start it "
            f"(log: {daemon_log_path(self.endpoint)})"
        )


def daemon_log_path(endpoint: str) -> Path:
    path = proto.ipc_path(endpoint)
    if path is not None:
        return Path(path + ".log")
    return Path(proto.runtime_dir()) / "ckptd-tcp.log"


def rotate_log(log: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Keep the embedded daemon's log bounded: past ``max_bytes`` it becomes ``<log>.1`` (one old copy)."""
    try:
        if log.stat().st_size > max_bytes:
            os.replace(log, log.with_name(log.name + ".1"))
    except FileNotFoundError:
        pass


def start_embedded_daemon(endpoint: str, output_dir: Path | None = None) -> subprocess.Popen:
    """Start ``python -m ckptd serve`` in its own session so that it outlives this trainer; it removes
    the stale temp directories of ``output_dir`` (left by a daemon that died) as it starts."""
    log = daemon_log_path(endpoint)
    proto.ensure_private_dir(str(log.parent))
    cmd = [sys.executable, "-m", "ckptd", "serve", "--endpoint", endpoint, "--embedded"]
    cmd += ["--idle-exit", str(EMBEDDED_IDLE_EXIT_S)]
    if output_dir is not None:
        cmd += ["--output-dir", str(output_dir)]
    logger.info("starting embedded ckptd: %s (log %s)", " ".join(cmd), log)
    rotate_log(log)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    # The daemon outlives this client by design (it finishes what it was handed): a thread of our own waits
    # for it, so that it never lingers as a zombie and its Popen is never collected while it runs (which
    # Python reports as "ResourceWarning: subprocess N is still running").
    threading.Thread(target=_reap, args=(proc,), name="ckptd-reaper", daemon=True).start()
    return proc


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait()
    except Exception:  # noqa: BLE001 - another waiter (a test's waitpid) reaped it first: nothing to do
        logger.debug("the embedded daemon %d was reaped elsewhere", proc.pid)
