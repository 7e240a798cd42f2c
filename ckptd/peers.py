"""The daemon-to-daemon sockets of a multi-node job (DESIGN §5): one class per end of the link.

``PeerListener`` is the leader's end: for each job, a ROUTER of its own ZeroMQ context (so its ZAP handler
admits exactly that job's client key), bound to the peer host on an ephemeral port or one of
``--peer-ports``. ``PeerLink`` is a follower's end: a DEALER presenting the job's client key pair and
trusting only the job's server key, with a monitor that reports a lost leader at once. Both hand every
frame they receive to the daemon (``on_frames``); message parsing stays in ``protocol.py`` and every
transaction state change in ``transactions.py``.

Why a context per listener: libzmq routes every CURVE handshake of a context to one ZAP handler, and the
keys differ per job. Why ZeroMQ heartbeats: a leader host that vanishes without a TCP reset (power, a
partition) must still look disconnected within seconds, not after the kernel's keepalive of hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ckptd import protocol as proto
from ckptd import security
from ckptd.protocol import MsgType

logger = logging.getLogger(__name__)

PEER_HOST_ENV = "CKPTD_PEER_HOST"
PEER_PORTS_ENV = "CKPTD_PEER_PORTS"
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
PEER_CHECK_TIMEOUT_S = 10.0  # how long peer_check waits for the leader's p_welcome

Handler = Callable[[Any, list[bytes]], Awaitable[None]]


def default_peer_host() -> str:
    """The address of this host's name: what other nodes can most likely reach (DESIGN §5).

    A name that resolves to loopback (Debian's ``127.0.1.1`` line in /etc/hosts) is no use to another node:
    then the address of the interface that routes outwards, found by connecting a UDP socket (which sends
    nothing), or loopback if there is no route at all (a single machine)."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = "127.0.0.1"
    if not address.startswith("127."):
        return address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            routed = probe.getsockname()[0]
    except OSError:
        return address
    return routed if routed and routed != "0.0.0.0" else address


def resolve_peer_host(configured: str | None) -> str:
    host = configured or os.environ.get(PEER_HOST_ENV) or default_peer_host()
    if not host or any(c.isspace() for c in host) or "/" in host or len(host) > 255:
        raise ValueError(f"peer host {host!r} is not a host name or address; set --peer-host or ${PEER_HOST_ENV}")
    return host


def parse_port_range(spec: str | None) -> tuple[int, int] | None:
    """``"LO-HI"`` (inclusive) -> (LO, HI); None or "" -> None (an ephemeral port).

    Example:
        >>> parse_port_range("29600-29699")
        (29600, 29699)
    """
    spec = spec if spec is not None else os.environ.get(PEER_PORTS_ENV)
    if not spec:
        return None
    try:
        lo_s, hi_s = spec.split("-", 1)
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise ValueError(f"peer port range {spec!r} must be LO-HI, e.g. 29600-29699") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"peer port range {spec!r} must lie within 1024-65535 with LO <= HI")
    return lo, hi


def _tune(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # Dual-stack: an IPv6 peer host (or a leader at an IPv6 address) works; IPv4 addresses still do.
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


def _bind_in_range(sock: zmq.Socket, host: str, ports: tuple[int, int]) -> int:
    """Bind to the first free port of the range (every one tried, in order: a busy range is not sampled)."""
    for port in range(ports[0], ports[1] + 1):
        try:
            sock.bind(f"tcp://{host}:{port}")
            return port
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
    raise zmq.ZMQError(
        zmq.EADDRINUSE, f"every port of the peer port range {ports[0]}-{ports[1]} is in use; widen or free it"
    )


async def _receive_loop(end: PeerListener | PeerLink, on_frames: Handler, peer: str) -> None:
    """Hand every message of ``end``'s socket to ``on_frames`` until the socket closes; a failure on one
    message is logged and the next one is read (one bad message must not stop the job's peer traffic)."""
    while True:
        try:
            frames = await end.sock.recv_multipart()
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as e:
            if e.errno in (zmq.ENOTSOCK, zmq.ETERM):
                return
            logger.warning("peer socket to %s: receive failed: %s", peer, e)
            await asyncio.sleep(0.1)
            continue
        end.last_used = time.monotonic()
        try:
            await on_frames(end, frames)
        except Exception:
            logger.exception("peer message from %s failed", peer)


def _format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class PeerListener:
    """The leader daemon's socket for one job's followers."""

    def __init__(self, job: str, keys: security.Keys, host: str, ports: tuple[int, int] | None, on_frames: Handler):
        self.job = job
        self.keys = keys
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        _tune(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.guard: security.ServerSecurity | None = None
        try:
            self.guard = security.secure_server_socket(self.ctx, self.sock, keys)
            bind_host = f"[{host}]" if ":" in host else host
            if ports is None:
                self.sock.bind(f"tcp://{bind_host}:0")
                port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            else:
                port = _bind_in_range(self.sock, bind_host, ports)
        except BaseException:
            self.close()
            raise
        self.address = _format_address(host, port)
        self.last_used = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._receive(on_frames), name=f"ckptd-peers-{job}")
        logger.info("leading job %s: peer socket %s (CURVE, per-job key)", job, self.address)

    @property
    def key(self) -> str:
        """The job's server key: one listener per key set (two clients of one job each have their own)."""
        return self.keys.server_public.decode()

    async def _receive(self, on_frames: Handler) -> None:
        await _receive_loop(self, on_frames, f"a follower of job {self.job} on {self.address}")

    async def send(self, identity: bytes, msg_type: MsgType, req_id: int = 0, **body: object) -> None:
        try:
            await self.sock.send_multipart([identity, proto.pack(msg_type, req_id, **body)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.debug("peer message to a departed follower dropped: %s", e)

    def close(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.close(linger=0)
        if self.guard is not None:
            self.guard.stop()
        self.ctx.term()


class PeerLink:
    """A follower daemon's connection to one job's leader daemon."""

    def __init__(self, info: proto.PeerInfo | proto.CheckRequest, on_frames: Handler, ctx: zmq.asyncio.Context):
        self.leader = info.leader
        self.server_public = info.server_public
        self.client_public = info.client_public
        keys = security.Keys(
            server_public=info.server_public.encode(),
            client_public=info.client_public.encode(),
            client_secret=info.client_secret.encode(),
        )
        self.sock = ctx.socket(zmq.DEALER)
        self.monitor = None
        try:
            _tune(self.sock)
            # Queue nothing for a leader that is not there: a message for a dead leader must fail, not wait.
            self.sock.setsockopt(zmq.IMMEDIATE, 1)
            security.secure_client_socket(self.sock, keys)
            events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            events |= zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            events |= zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            self.monitor = self.sock.get_monitor_socket(events)
            self.sock.connect(self.leader)
        except BaseException:
            if self.monitor is not None:
                self.monitor.close(linger=0)
            self.sock.close(linger=0)
            raise
        self.connected = asyncio.Event()
        self.ever_connected = False
        self.refused: str | None = None
        self.last_used = time.monotonic()
        self.on_lost: Callable[[PeerLink, str], None] | None = None
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._receive(on_frames), name="ckptd-peer-link"),
            loop.create_task(self._watch(), name="ckptd-peer-monitor"),
        ]

    async def _receive(self, on_frames: Handler) -> None:
        await _receive_loop(self, on_frames, f"the leader at {self.leader}")

    async def _watch(self) -> None:
        while True:
            try:
                msg = parse_monitor_message(await self.monitor.recv_multipart())
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:
                return
            event = msg["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.ever_connected = True
                self.refused = None
                self.connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                if self.connected.is_set():
                    self.connected.clear()
                    logger.warning("lost the connection to the leader daemon at %s", self.leader)
                    if self.on_lost is not None:
                        self.on_lost(self, f"the connection to the leader daemon at {self.leader} was lost")
            elif event in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                self.refused = security.handshake_failure_reason(event, msg["value"], client=True)
                logger.error("the leader daemon at %s refused this daemon: %s", self.leader, self.refused)

    async def send(self, msg_type: MsgType, req_id: int = 0, **body: object) -> bool:
        """Queue one message for the leader; False when it cannot be (no connection up)."""
        self.last_used = time.monotonic()
        try:
            await self.sock.send(proto.pack(msg_type, req_id, **body), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            logger.debug("peer message %s to %s not sent: %s", msg_type.value, self.leader, e)
            return False

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
